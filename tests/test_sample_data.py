"""End to end on sample_data/ with the embedded models: fusion is needed and works (slow)."""

import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "prepared"
    r = run_cli("prepare", str(ROOT / "sample_data" / "manifest.csv"), "--output", str(out))
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
