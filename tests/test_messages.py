"""Issue 25, point 2: messages that point to the fix; the same weights have one identity however they are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import load_json_lines, make_tokenizer, one_line_error, run_cli, write_csv, write_wav


def text_manifest(tmp_path: Path, extra: dict[str, list[str]]) -> Path:
    rows = [{"id": f"r{i}", "text": ["it is big", "it is small", "a red thing"][i % 3],
             **{k: v[i % len(v)] for k, v in extra.items()}} for i in range(24)]
    return write_csv(tmp_path / "m.csv", rows)


@pytest.mark.parametrize("name", ["intent", "topic", "sentiment", "Emotion"])
def test_common_label_column_names_are_detected(tiny_models, tmp_path, name):
    manifest = text_manifest(tmp_path, {name: ["a", "b", "c"]})
    r = run_cli("prepare", manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"])
    assert r.exit_code == 0, r.output
    assert f"label <- {name}" in r.stderr and "columns not used" not in r.stderr
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert meta["labels"] == ["a", "b", "c"] and meta["ignored_columns"] == []


def test_finetune_without_labels_names_the_unused_columns_the_flag_and_generate(tiny_models, tmp_path):
    """A label column under a name no one guesses (`mood`) and a target column: finetune names what prepare left
    unused, the flag that names the label, and --task generate."""
    manifest = text_manifest(tmp_path, {"mood": ["up", "down"], "answer": ["yes", "no", "maybe"]})
    r = run_cli("prepare", manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"])
    assert r.exit_code == 0, r.output
    assert "columns not used: mood" in r.stderr
    r = run_cli("finetune", tmp_path / "p", "--output", tmp_path / "ck", "--epochs", "1")
    line = one_line_error(r)
    assert r.exit_code == 2
    assert "has no label column" in line and "prepare left these columns unused: mood" in line, line
    assert f"mmllm prepare {manifest.resolve()} --label-column mood" in line, line
    assert "--task generate" in line, line
    assert not (tmp_path / "ck" / "model.safetensors").exists()


def test_generate_without_a_target_names_the_unused_columns_and_classify(tiny_models, tiny_decoder, tmp_path):
    manifest = text_manifest(tmp_path, {"label": ["a", "b"], "reply": ["yes", "no"]})
    r = run_cli("prepare", manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"])
    assert r.exit_code == 0, r.output
    line = one_line_error(run_cli("finetune", tmp_path / "p", "--output", tmp_path / "ck", "--task", "generate",
                                  "--decoder", tiny_decoder, "--epochs", "1"))
    assert "has no target column" in line and "unused: reply" in line and "--target-column reply" in line, line
    assert "--task classify" in line, line


@pytest.fixture(scope="session")
def tiny_whisper(tiny_models, tmp_path_factory) -> Path:
    """The tiny random Whisper of conftest with a tokenizer, so its token ids decode to words."""
    folder = tmp_path_factory.mktemp("asr") / "whisper"
    shutil.copytree(tiny_models["whisper"], folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("given", [True, False])
def test_the_transcript_reference_column_is_not_reported_unused(tiny_models, tiny_whisper, tmp_path, given):
    rows = []
    for i in range(8):
        audio = write_wav(tmp_path / f"a{i}.wav", freq=300 + 100 * (i % 4))
        rows.append({"id": f"r{i}", "audio": audio.name, "label": "ab"[i % 2],
                     ("transcript" if given else "reference"): ["yes", "no"][i % 2], "note": "x"})
    manifest = write_csv(tmp_path / "m.csv", rows)
    flags = ["--transcript-reference-column", "transcript"] if given else []
    r = run_cli("prepare", manifest, "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"], "--transcribe", "--transcribe-model", tiny_whisper, *flags)
    assert r.exit_code == 0, r.output
    column = "transcript" if given else "reference"
    assert f"transcript reference <- {column}" in r.stderr
    unused = [line for line in r.stderr.splitlines() if "columns not used" in line]
    assert len(unused) == 1 and "note" in unused[0] and column not in unused[0], r.stderr
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    assert meta["ignored_columns"] == ["note"] and meta["transcripts"]["reference_column"] == column
    # without transcription (auto: off, the audio model is not the embedded Whisper) the column given is said to
    # be unused, by name (--no-transcribe with it is refused by the config's rules)
    r = run_cli("prepare", manifest, "--output", tmp_path / "q", "--text-model", tiny_models["text"],
                "--audio-model", tiny_models["whisper"], *flags)
    assert r.exit_code == 0, r.output
    if given:
        assert "--transcript-reference-column transcript: not used" in r.stderr
    else:
        assert "columns not used: reference, note" in r.stderr


# ---------------------------------------------------------------- encoder identity: from the weights

def pulled(home: Path, alias: str, weights_from: Path) -> Path:
    """A folder as `mmllm models pull ALIAS` leaves it: the weights (here a tiny model's) and the marker."""
    from mmllm import hub

    folder = home / "models" / alias
    shutil.copytree(weights_from, folder)
    (folder / hub.MARKER).write_text(json.dumps({"alias": alias, "source": hub.ALIASES[alias].source,
                                                 "sha256": hub.ALIASES[alias].sha256,
                                                 "files": sorted(p.name for p in folder.iterdir())}))
    return folder


def test_an_alias_and_its_folder_have_one_identity(tiny_models, tmp_path, monkeypatch):
    from mmllm import hub
    from mmllm.encoders import resolve

    home = tmp_path / "home"
    monkeypatch.setenv("MMLLM_HOME", str(home))
    folder = pulled(home, "minilm", tiny_models["text"])
    alias = resolve("minilm")[1]
    assert alias == hub.identity_of_alias("minilm")
    assert resolve(str(folder))[1] == alias  # the alias's own folder, spelled as a path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/home/models/minilm")[1] == alias  # ... with ~
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert resolve(str(copy))[1] == alias  # a copy with the same weights
    other = tmp_path / "changed"
    shutil.copytree(folder, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert resolve(str(other))[1].startswith("changed@")  # other weights: not the alias, whatever its marker says
    plain = tmp_path / "plain"
    shutil.copytree(tiny_models["text"], plain)
    assert resolve(str(plain))[1].startswith("plain@")  # a folder mmllm did not pull: NAME@hash of its weights


def test_eval_accepts_data_prepared_with_the_alias_folder(tiny_models, tmp_path, monkeypatch):
    """Prepared with --text-model minilm, evaluated on data prepared with the folder's path: the same model."""
    home = tmp_path / "home"
    monkeypatch.setenv("MMLLM_HOME", str(home))
    folder = pulled(home, "minilm", tiny_models["text"])
    manifest = text_manifest(tmp_path, {"label": ["a", "b", "c"]})
    for out, model in (("by_alias", "minilm"), ("by_path", str(folder))):
        r = run_cli("prepare", manifest, "--output", tmp_path / out, "--text-model", model, "--max-text-tokens", "16")
        assert r.exit_code == 0, r.output
    r = run_cli("finetune", tmp_path / "by_alias", "--output", tmp_path / "ck", "--epochs", "1", "--hidden-size",
                "16")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "model", tmp_path / "ck", tmp_path / "by_path", "--split", "test", "--no-reliance")
    assert r.exit_code == 0, r.output
    assert load_json_lines(r.stdout)[-1]["n"] > 0


# ---------------------------------------------------------------- eval bleu / wer: --field is the hypotheses'

def test_bleu_field_applies_to_the_hypotheses_only(tmp_path):
    from mmllm.metrics import bleu

    hyp, ref = tmp_path / "pred.jsonl", tmp_path / "ref.jsonl"
    hyp.write_text("".join(json.dumps({"id": i, "generated": g, "text": "the prompt"}) + "\n"
                           for i, g in enumerate(["a big red thing", "it is small"])))
    ref.write_text("".join(json.dumps({"id": i, "target": t}) + "\n" for i, t in enumerate(["a big red thing",
                                                                                           "it is tiny"])))
    r = run_cli("eval", "bleu", "--hyp", hyp, "--ref", ref, "--field", "generated")
    assert r.exit_code == 0, r.output  # was: "ref.jsonl, line 1: no field 'generated'"
    expected = bleu(["a big red thing", "it is small"], [["a big red thing", "it is tiny"]])["bleu"]
    assert load_json_lines(r.stdout)[-1]["bleu"] == pytest.approx(expected)
    ref.write_text("".join(json.dumps({"gold": t, "target": "x"}) + "\n" for t in ["a big red thing", "it is small"]))
    r = run_cli("eval", "bleu", "--hyp", hyp, "--ref", ref, "--field", "generated", "--ref-field", "gold")
    assert r.exit_code == 0, r.output
    assert load_json_lines(r.stdout)[-1]["bleu"] == pytest.approx(100.0)
    r = run_cli("eval", "wer", "--hyp", hyp, "--ref", ref, "--field", "generated", "--ref-field", "gold")
    assert r.exit_code == 0 and load_json_lines(r.stdout)[-1]["wer"] == 0.0, r.output
    r = run_cli("eval", "bleu", "--help")
    assert "generated" in r.stdout and "--ref-field" in r.stdout
