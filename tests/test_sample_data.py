"""End to end on sample_data/ with the embedded models: fusion is needed and works (slow)."""

import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "prepared"
    # without transcripts: the spoken yes/no would also reach the text model, and this test is about fusion
    r = run_cli("prepare", str(ROOT / "sample_data" / "manifest.csv"), "--output", str(out), "--no-transcribe")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["counts"] == {"train": 336, "validation": 72, "test": 72} and summary["skipped"] == 0
    return out


def train_and_eval(prepared, out, modalities):
    r = run_cli("finetune", str(prepared), "--output", str(out), "--modalities", modalities, "--epochs", "8",
                "--patience", "3")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "model", str(out), str(prepared), "--split", "test")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_fused_model_beats_every_single_modality(sample_prepared, tmp_path):
    fused = train_and_eval(sample_prepared, tmp_path / "fused", "text,image,audio")
    singles = {m: train_and_eval(sample_prepared, tmp_path / m, m)["accuracy"] for m in ("text", "image", "audio")}
    assert fused["accuracy"] >= 0.9
    assert fused["accuracy"] >= max(singles.values()) + 0.15, (fused["accuracy"], singles)
    # the reliance table shows every modality is needed: masking any one costs > 30 points
    for m in ("text", "image", "audio"):
        assert fused["reliance"]["masked"][m]["accuracy_drop"] > 0.3, fused["reliance"]


def test_the_embedded_whisper_transcribes_by_default(tmp_path):
    """prepare's default with the embedded whisper-tiny.en: the spoken yes/no reaches the text model as words."""
    import csv

    import datasets

    rows = list(csv.DictReader(open(ROOT / "sample_data" / "manifest.csv", encoding="utf-8")))[:24]
    for r in rows:
        r["image"], r["audio"] = str(ROOT / "sample_data" / r["image"]), str(ROOT / "sample_data" / r["audio"])
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run_cli("prepare", str(manifest), "--output", str(tmp_path / "p"))
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert meta["preprocessing"]["transcribe"]["name"] == "whisper-tiny.en"
    ds = datasets.load_from_disk(str(tmp_path / "p"))
    said = {row["id"]: row["transcript"].lower() for split in ds.values() for row in split}
    heard = [("yes" in said[r["id"]]) == ("-yes-" in r["label"]) for r in rows]
    assert sum(heard) >= 0.9 * len(rows), said
