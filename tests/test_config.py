"""Configs and flags are checked before any work: types, bounds and cross-option rules, one line, exit 2."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import one_line_error, run_cli, tiny_prepare_args
from mmllm import config as C


@pytest.fixture
def no_work(monkeypatch):
    """Every command's body replaced by a recorder: reaching it means the config was accepted."""
    import mmllm.finetuning
    import mmllm.predict
    import mmllm.preparation

    seen = {}
    for module in (mmllm.preparation, mmllm.finetuning, mmllm.predict):
        monkeypatch.setattr(module, "run", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    return seen


# ---------------------------------------------------------------- values converted to their declared type

def test_yaml_numbers_in_exponent_notation_are_numbers(tmp_path, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nbackbone_lr: 3E-5\nepochs: '4'\nbatch-size: 8.0\nfreeze_text: 'yes'\n")
    r = run_cli("finetune", "p", "--output", "o", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    c = no_work["cfg"]
    assert (c.lr, c.backbone_lr, c.epochs, c.batch_size, c.freeze_text) == (0.001, 3e-5, 4, 8, True)
    assert type(c.lr) is float and type(c.epochs) is int and type(c.batch_size) is int


@pytest.mark.parametrize("text, key", [
    ('epochs: "abc"\n', "epochs"),
    ("modalities: [image]\n", "modalities"),
    ("lr: [1, 2]\n", "lr"),
    ("batch_size: 2.5\n", "batch_size"),
    ("freeze_text: maybe\n", "freeze_text"),
    ("lr: .nan\n", "lr"),
    ("lr:\n", "lr"),
])
def test_wrong_type_names_key_and_file(tmp_path, no_work, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    line = one_line_error(run_cli("finetune", "p", "--output", "o", "--config", str(cfg)))
    assert f"--config {cfg}: {key}:" in line
    assert "cfg" not in no_work


def test_list_for_text_option_says_how_to_write_it(tmp_path, no_work):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"modalities": ["image", "text"]}))
    line = one_line_error(run_cli("finetune", "p", "--output", "o", "--config", str(cfg)))
    assert "modalities: expected text, written as 'image,text'" in line


def test_latin1_config_is_one_line(tmp_path, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes("output: caf\xe9\n".encode("latin-1"))
    line = one_line_error(run_cli("prepare", "x.csv", "--config", str(cfg)))
    assert str(cfg) in line and "not UTF-8" in line and "0xe9" in line


def test_yaml_alias_bomb_is_refused(tmp_path, no_work):
    """519 bytes that expand to 9^9 strings: refused at the first alias, never expanded."""
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(rows) + "\n")
    assert len(cfg.read_bytes()) < 600
    line = one_line_error(run_cli("prepare", "x.csv", "--config", str(cfg)))
    assert "aliases" in line and str(cfg) in line


def test_yaml_anchor_without_alias_is_fine(tmp_path, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output: &out folder\n")
    assert run_cli("prepare", "x.csv", "--config", str(cfg)).exit_code == 0
    assert no_work["cfg"].output == "folder"


def test_config_must_be_a_mapping_with_text_keys(tmp_path, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("1: 2\n")
    assert "option names must be text" in one_line_error(run_cli("prepare", "x.csv", "--config", str(cfg)))
    cfg.write_text("- a\n- b\n")
    assert "mapping" in one_line_error(run_cli("prepare", "x.csv", "--config", str(cfg)))


@pytest.mark.parametrize("kind, value, expected", [
    ("int", "12", 12), ("int", 3.0, 3), ("int", "1e3", 1000), ("float", "1e-3", 0.001), ("float", 2, 2.0),
    ("bool", "off", False), ("bool", 1, True), ("str", 2020, "2020"), ("list", "a.txt", ["a.txt"]),
    ("list", ["a", 1], ["a", "1"]),
])
def test_coerce_converts(kind, value, expected):
    f = dataclasses.field(default=None)
    f.name, f.type = "x", kind
    assert C.coerce(f, value) == expected


@pytest.mark.parametrize("kind, value", [
    ("int", "abc"), ("int", 2.5), ("int", True), ("float", "inf"), ("float", [1]), ("bool", "maybe"),
    ("bool", 2), ("str", ["a", ["b"]]), ("str", True), ("list", [{"a": 1}]),
])
def test_coerce_refuses(kind, value):
    f = dataclasses.field(default=0)
    f.name, f.type = "x", kind
    with pytest.raises(ValueError, match="expected"):
        C.coerce(f, value)


# ---------------------------------------------------------------- the device, before any model loads

@pytest.mark.parametrize("command", [
    ["finetune", "PREP", "--output", "o"], ["eval", "model", "CK", "PREP"], ["predict", "CK", "-"]])
def test_cuda_without_cuda_is_one_line_before_models(monkeypatch, tmp_path, command):
    import torch

    import mmllm.checkpoint
    import mmllm.features

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def loaded(*a, **k):
        raise AssertionError("a model or dataset was loaded before the device was checked")

    monkeypatch.setattr(mmllm.features, "load_prepared", loaded)
    monkeypatch.setattr(mmllm.checkpoint, "read_config", loaded)
    args = [str(tmp_path / a) if a in ("PREP", "CK") else a for a in command]
    line = one_line_error(run_cli(*args, "--device", "cuda", input=""))
    assert "--device cuda" in line and "CUDA" in line


def test_device_names_are_checked():
    cfg = C.FinetuneConfig(prepared="p", output="o", device="gpu")
    assert any("--device" in p for p in C.validate(cfg))
    assert not any("--device" in p for p in C.validate(C.FinetuneConfig(prepared="p", output="o", device="cuda:1")))


# ---------------------------------------------------------------- bounds that a model or the machine imposes

def test_max_text_tokens_beyond_the_model_is_refused_by_prepare(tiny_models, toy_manifest, tmp_path):
    out = tmp_path / "p"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--max-text-tokens", "1000")
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if "error" in x]  # after prepare's report of the columns
    assert "--max-text-tokens 1000" in line and "at most 64" in line  # the tiny BERT has 64 positions
    assert not out.exists()
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--max-text-tokens", "64")
    assert r.exit_code == 0, r.output


def test_augment_is_bounded(tmp_path, no_work):
    line = one_line_error(run_cli("prepare", "x.csv", "--output", "o", "--augment", "5000000"))
    assert "--augment" in line and str(C.MAX_AUGMENT) in line
    assert run_cli("prepare", "x.csv", "--output", "o", "--augment", str(C.MAX_AUGMENT)).exit_code == 0


@pytest.mark.parametrize("seconds", ["0", "1e12"])
def test_max_audio_seconds_is_bounded(tmp_path, no_work, seconds):
    line = one_line_error(run_cli("prepare", "x.csv", "--output", "o", "--max-audio-seconds", seconds))
    assert "--max-audio-seconds" in line


def test_accuracy_jsonl_with_blank_lines(tmp_path):
    pred, gold = tmp_path / "p.jsonl", tmp_path / "g.jsonl"
    pred.write_text('{"prediction": "a"}\n\n{"prediction": "b"}\n   \n')
    gold.write_text('{"label": "a"}\n{"label": "a"}\n\n')
    r = run_cli("eval", "accuracy", "--pred", str(pred), "--gold", str(gold))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["accuracy"] == 0.5


def test_bleu_jsonl_with_a_broken_line_names_file_and_line(tmp_path):
    hyp, ref = tmp_path / "h.jsonl", tmp_path / "r.jsonl"
    hyp.write_text('{"text": "a b"}\n{"text": oops}\n')
    ref.write_text('{"text": "a b"}\n{"text": "c d"}\n')
    line = one_line_error(run_cli("eval", "bleu", "--hyp", str(hyp), "--ref", str(ref), "--field", "text"))
    assert f"{hyp}, line 2" in line


# ---------------------------------------------------------------- cross-option rules (one test per rule)

FINETUNE = ["finetune", "p", "--output", "o"]


@pytest.mark.parametrize("args, expected", [
    (["--task", "generate", "--monitor", "val_accuracy"], "--monitor: --task generate produces val_loss, val_bleu"),
    (["--task", "generate", "--monitor", "val_f1"], "--monitor: --task generate produces"),
    (["--monitor", "val_bleu"], "--monitor: --task classify produces val_loss, val_accuracy, val_f1"),
    (["--task", "generate", "--fusion", "gated"], "--fusion: only used by --task classify"),
    (["--task", "generate", "--class-weights", "auto"], "--class-weights: only used by --task classify"),
    (["--task", "generate", "--modality-dropout", "0.2"], "--modality-dropout: only used by --task classify"),
    (["--task", "generate", "--share-projections"], "--share-projections: only used by --task classify"),
    (["--task", "generate", "--freeze-text"], "--freeze-text: only used by --task classify"),
    (["--train-decoder"], "--train-decoder: only used by --task generate"),
    (["--decoder", "gpt2"], "--decoder: only used by --task generate"),
    (["--prefix-tokens", "2"], "--prefix-tokens: only used by --task generate"),
    (["--max-new-tokens", "8"], "--max-new-tokens: only used by --task generate"),
    (["--lora-r", "4", "--freeze-text"], "--lora-r and --freeze-text"),
    (["--task", "generate", "--lora-r", "4", "--train-decoder"], "--lora-r and --train-decoder"),
    (["--modalities", "image,audio", "--lora-r", "4"], "--lora-r: needs the text modality"),
    (["--modalities", "image", "--freeze-text"], "--freeze-text: needs the text modality"),
    (["--modalities", "text,image", "--share-projections"], "--share-projections: shares one projection between media"),
    (["--modalities", "image", "--modality-dropout", "0.3"], "--modality-dropout: needs at least two"),
    (["--modalities", "text,text"], "--modalities: each modality once"),
    (["--epochs", "0", "--max-steps", "10"], "--max-steps: with --epochs 0 nothing is trained"),
    (["--task", "generate", "--prefix-tokens", "0"], "--prefix-tokens: must be >= 1"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16: needs a CUDA GPU (this run is on cpu)"),
])
def test_finetune_rule(no_work, args, expected):
    assert expected in one_line_error(run_cli(*FINETUNE, *args))
    assert "cfg" not in no_work


@pytest.mark.parametrize("args", [
    ["--task", "generate", "--monitor", "val_bleu", "--lora-r", "2", "--max-new-tokens", "8"],
    ["--task", "generate", "--train-decoder", "--prefix-tokens", "2"],
    ["--monitor", "val_f1", "--fusion", "attention", "--modality-dropout", "0.2", "--freeze-text"],
    ["--lora-r", "2", "--share-projections", "--class-weights", "auto"],
    ["--modalities", "image,audio", "--share-projections", "--modality-dropout", "0.1"],
    ["--epochs", "0"],
])
def test_finetune_combinations_that_are_fine(no_work, args):
    r = run_cli(*FINETUNE, *args)
    assert r.exit_code == 0, r.output
    assert no_work["cfg"].prepared == "p"


@pytest.mark.parametrize("args, expected", [
    (["--temperature", "0.7"], "--temperature: only used with --do-sample"),
    (["--top-p", "0.9"], "--top-p: only used with --do-sample"),
    (["--do-sample", "--temperature", "0"], "--temperature: must be > 0"),
    (["--do-sample", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
])
def test_predict_sampling_rule(no_work, args, expected):
    assert expected in one_line_error(run_cli("predict", "ck", "-", *args))


def test_predict_sampling_combinations_that_are_fine(no_work):
    r = run_cli("predict", "ck", "-", "--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--num-beams", "2")
    assert r.exit_code == 0, r.output


def test_merge_refuses_options_fixed_by_the_shards(no_work):
    line = one_line_error(run_cli("prepare", "a", "b", "--merge", "--output", "o", "--augment", "2", "--seed", "3"))
    assert "--merge: --augment, --seed do not apply" in line
    assert run_cli("prepare", "a", "b", "--merge", "--output", "o").exit_code == 0


def test_every_problem_reported_at_once(tmp_path, no_work):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: abc\n")
    line = one_line_error(run_cli(*FINETUNE, "--config", str(cfg), "--task", "generate", "--monitor", "val_f1",
                                  "--fusion", "gated"))
    for part in ("epochs:", "--monitor", "--fusion"):
        assert part in line


def test_bad_number_flags_are_one_line_naming_each_flag(no_work):
    line = one_line_error(run_cli(*FINETUNE, "--epochs", "abc", "--lr", "1e-x", "--batch-size", "2.5"))
    assert "--epochs: expected a whole number (got 'abc')" in line and "--lr: expected a number" in line
    assert "--batch-size" in line
    r = run_cli(*FINETUNE, "--epochs", "2", "--lr", "1e-3")
    assert r.exit_code == 0 and (no_work["cfg"].epochs, no_work["cfg"].lr) == (2, 0.001)
