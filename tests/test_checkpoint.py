"""Checkpoints are validated on load; resume never mixes runs; weights are written with the usual file mode."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from conftest import one_line_error, run_cli
from mmllm import checkpoint, tasks


@pytest.fixture
def ck(trained_checkpoint, tmp_path):
    """A private copy of the session's tiny text classifier, to edit."""
    return shutil.copytree(trained_checkpoint, tmp_path / "ck")


def edit(folder, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------- schema of config.json, at load

CASES = {
    "labels shorter than num_labels": (lambda c: c.update(labels=c["labels"][:1]), "model.num_labels is 2 but labels"),
    "unknown fusion": (lambda c: c["model"].update(fusion="magic"), "model.fusion 'magic' is not one of"),
    "unknown modality": (lambda c: c["model"].update(modalities=["text", "smell"]), "model.modalities has 'smell'"),
    "negative size": (lambda c: c["model"].update(hidden_size=-4), "model.hidden_size must be >= 1"),
    "size as text": (lambda c: c["model"].update(hidden_size="16"), "model.hidden_size must be an integer"),
    "dropout out of range": (lambda c: c["model"].update(dropout=1.5), "model.dropout must be a number in [0, 1)"),
    "unknown model field": (lambda c: c["model"].update(colour="red"), "model.colour is not a known field"),
    "huge audio window": (lambda c: c["preprocessing"].update(max_audio_seconds=1e12),
                          "preprocessing.max_audio_seconds must be <= 600"),
    "zero text tokens": (lambda c: c["preprocessing"].update(max_text_tokens=0),
                         "preprocessing.max_text_tokens must be >= 1"),
    "labels not names": (lambda c: c.update(labels=[1, 2]), "labels must be a list of label names"),
    "duplicate labels": (lambda c: c.update(labels=["b", "b"]), "labels lists a label twice"),
    "unknown task": (lambda c: c.update(task="translate"), "task 'translate' is not classify or generate"),
    "future version": (lambda c: c.update(version=99), "version 99 is not one this mmllm reads"),
    "missing dim": (lambda c: c["model"].update(text_dim=None), "model.text_dim is missing"),
    "model not an object": (lambda c: c.update(model=[1]), "model must be an object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edited_checkpoint_is_one_line_naming_the_field(ck, case):
    change, expected = CASES[case]
    edit(ck, change)
    line = one_line_error(run_cli("predict", str(ck), "-", input='{"id": "a", "text": "it is big"}\n'))
    assert str(ck / "config.json") in line and expected in line, line


def test_eval_refuses_an_edited_checkpoint_too(ck, tmp_path):
    edit(ck, lambda c: c["model"].update(modalities=["smell"]))
    line = one_line_error(run_cli("eval", "model", str(ck), str(tmp_path)))
    assert "model.modalities has 'smell'" in line


def test_checkpoint_without_its_text_model_folder(ck):
    shutil.rmtree(ck / "text_model")
    assert "text_model/" in one_line_error(run_cli("predict", str(ck), "-", input="{}\n"))


def test_checkpoint_without_its_tokenizer_is_refused(ck):
    """Without a tokenizer file AutoTokenizer would build an empty vocabulary: every text [UNK], wrong answers."""
    for f in ("tokenizer.json", "vocab.txt"):
        (ck / "text_model" / f).unlink(missing_ok=True)
    r = run_cli("predict", str(ck), "-", input='{"text": "it is big"}\n')
    assert "no tokenizer file" in one_line_error(r) and r.stdout == ""


def test_checkpoint_with_a_corrupt_text_model_config_is_refused(ck):
    (ck / "text_model" / "config.json").write_text("{")
    r = run_cli("predict", str(ck), "-", input='{"text": "it is big"}\n')
    assert "text_model" in one_line_error(r) and r.stdout == ""


def _edit_text_config(ck, **changes) -> None:
    path = ck / "text_model" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes,expected", [
    ({"num_hidden_layers": 150}, "num_hidden_layers 150, but "),
    ({"intermediate_size": 4096}, "encoder.layer.0.intermediate.dense.weight is [4096, 32] by the config, [64, 32] in "
                                  "the weights"),
    ({"vocab_size": 10**6}, "embeddings.word_embeddings.weight is [1000000, 32] by the config"),
])
def test_untrusted_text_model_config_is_refused_before_the_model_is_built(ck, monkeypatch, changes, expected):
    """An edited text_model/config.json is checked against the safetensors header (shapes only, on the meta device):
    one line, exit 2, and no model is built from it (the real minilm with 150 layers took 1.5 GB and 15 s)."""
    import transformers

    def never(*_a, **_k):
        raise AssertionError("a model was built from the untrusted config")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", never)
    _edit_text_config(ck, **changes)
    for args in (["predict", str(ck), "-"], ["eval", "model", str(ck), str(ck)]):
        line = one_line_error(run_cli(*args, input='{"text": "it is big"}\n'))
        assert str(ck / "text_model" / "config.json") in line and expected in line and "refused" in line, line


def test_untrusted_decoder_config_is_refused_before_the_model_is_built(tiny_decoder, tmp_path, monkeypatch):
    import transformers

    from mmllm.errors import UserError

    folder = shutil.copytree(tiny_decoder, tmp_path / "decoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 150}))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(UserError, match=r"config.json: n_layer 150, but .*model.safetensors holds \d+ tensors"):
        checkpoint.load_hf_weights(transformers.AutoModelForCausalLM, folder)


def test_untouched_hf_folders_pass_the_header_check(trained_checkpoint, tiny_decoder):
    from transformers import AutoModelForCausalLM

    assert checkpoint.load_hf_weights(AutoModelForCausalLM, tiny_decoder) is not None
    model, config, tokenizer = checkpoint.load(trained_checkpoint)
    assert config["format"] == checkpoint.FORMAT and tokenizer is not None and model.text is not None


def test_hand_edited_labels_json_is_refused_not_ignored(ck):
    """labels.json is a copy of config.json's labels (the ones used): an edit of it alone is one line, not ignored."""
    line_in = '{"id": "a", "text": "it is big"}\n'
    (ck / "labels.json").write_text(json.dumps({"big": 0, "s": 1}))
    line = one_line_error(run_cli("predict", str(ck), "-", input=line_in))
    assert line.startswith(f"error: {ck / 'labels.json'} disagrees with {ck / 'config.json'}: 'b' (id 0 in "
                           "config.json) is not in it; config.json's labels are the ones used"), line
    (ck / "labels.json").write_text(json.dumps({"b": 1, "s": 0}))
    assert "'b' is id 0 in config.json, 1 in labels.json" in one_line_error(run_cli("eval", "model", str(ck), "x"))
    (ck / "labels.json").write_text(json.dumps({"s": 1, "b": 0}))  # the same map in another order: fine
    assert run_cli("predict", str(ck), "-", input=line_in).exit_code == 0
    (ck / "labels.json").unlink()  # as in generation checkpoints, which have none
    assert run_cli("predict", str(ck), "-", input=line_in).exit_code == 0
    assert "| [labels.json](labels.json) | label name -> id, a copy of config.json's labels (those are used" in \
        (ck / "README.md").read_text()  # the model card says so


def test_untouched_checkpoint_passes_the_schema(trained_checkpoint):
    config = json.loads((trained_checkpoint / "config.json").read_text())
    assert tasks.check_config(config, trained_checkpoint) == []


def generation_config() -> dict:
    return {"format": checkpoint.FORMAT, "version": 1, "task": "generate", "labels": [],
            "generation": {"modalities": ["image"], "dims": {"image": 32}, "prefix_tokens": 2, "hidden_size": 16,
                           "dropout": 0.1, "lora_r": 0, "train_decoder": False, "decoder": "d",
                           "decoder_identity": "d@1"},
            "model": {"modalities": ["image"]}, "encoders": {"image": {"name": "vit", "identity": "vit@1"}},
            "preprocessing": {"max_text_tokens": 128, "max_audio_seconds": 30.0}}


@pytest.mark.parametrize("change, expected", [
    (lambda c: None, None),
    (lambda c: c["generation"].update(prefix_tokens=0), "generation.prefix_tokens must be >= 1"),
    (lambda c: c["generation"]["dims"].update(image=-1), "generation.dims.image must be a positive size"),
    (lambda c: c["generation"].update(modalities=["smell"]), "generation.modalities has 'smell'"),
    (lambda c: c["generation"].update(beam=3), "generation.beam is not a known field"),
    (lambda c: c.update(encoders={}), "encoders.image must name the encoder"),
])
def test_generation_checkpoint_schema(tmp_path, change, expected):
    (tmp_path / "decoder").mkdir()
    config = generation_config()
    change(config)
    problems = tasks.check_config(config, tmp_path)
    assert (problems == []) if expected is None else any(expected in p for p in problems), problems


# ---------------------------------------------------------------- file mode of the weights

def test_weights_have_the_mode_of_the_other_files(trained_checkpoint):
    mode = stat.S_IMODE((trained_checkpoint / "config.json").stat().st_mode)
    assert stat.S_IMODE((trained_checkpoint / "model.safetensors").stat().st_mode) == mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_save_weights_follows_the_umask(tmp_path, umask):
    import torch

    old = os.umask(umask)
    try:
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        (tmp_path / "other.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "other.json").stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- resume never mixes runs

BASE = ["--epochs", "3", "--batch-size", "8", "--hidden-size", "16", "--freeze-text", "--schedule", "constant",
        "--warmup-ratio", "0", "--patience", "0"]


@pytest.fixture
def interrupted(prepared, tmp_path, monkeypatch):
    """An output folder holding the resumable state of a run stopped (as by Ctrl-C) after its first epoch."""
    import mmllm.loop as loop

    original = loop.fit_epoch

    def stop_after_first_epoch(*args, **kwargs):
        seen = original(*args, **kwargs)
        state, stop = args[7], args[8]
        if state.epoch == 0:
            stop.hit = True
        return seen

    monkeypatch.setattr(loop, "fit_epoch", stop_after_first_epoch)
    out = tmp_path / "run"
    r = run_cli("finetune", str(prepared), "--output", str(out), *BASE)
    assert r.exit_code == 130 and (out / "resume" / "state.json").is_file(), r.output
    monkeypatch.setattr(loop, "fit_epoch", original)
    return out


def test_resume_refuses_options_that_change_model_or_data(prepared, interrupted, monkeypatch):
    import mmllm.finetuning

    def loaded(*a, **k):
        raise AssertionError("models were loaded before the resume check")

    monkeypatch.setattr(mmllm.finetuning, "build_task", loaded)
    saved = (interrupted / "finetune_config.json").read_text()
    r = run_cli("finetune", str(prepared), "--output", str(interrupted), *BASE, "--resume", "--fusion", "gated",
                "--seed", "1", "--hidden-size", "32")
    line = one_line_error(r)
    assert "--resume" in line and "fusion (auto -> gated)" in line and "seed (0 -> 1)" in line
    assert "hidden_size (16 -> 32)" in line
    assert (interrupted / "finetune_config.json").read_text() == saved
    assert (interrupted / "resume" / "state.json").is_file()


def test_resume_refused_by_the_loop_too(prepared, interrupted):
    """A config built in code (not via the CLI) meets the same check when training starts."""
    from mmllm import finetuning as finetune
    from mmllm.config import FinetuneConfig
    from mmllm.errors import UserError

    cfg = FinetuneConfig(prepared=str(prepared), output=str(interrupted), epochs=3, batch_size=8, hidden_size=16,
                         freeze_text=True, schedule="constant", warmup_ratio=0.0, patience=0, resume=True,
                         task="classify", modalities="text,image")
    with pytest.raises(UserError, match="modalities"):
        finetune.run(cfg)


def test_resume_applies_and_records_schedule_options(prepared, interrupted):
    r = run_cli("finetune", str(prepared), "--output", str(interrupted), *BASE[2:], "--epochs", "2", "--resume",
                "--lr", "0.05")
    assert r.exit_code == 0, r.output
    assert "applying" in r.stderr and "lr 0.001 -> 0.05" in r.stderr
    saved = json.loads((interrupted / "finetune_config.json").read_text())
    assert saved["lr"] == 0.05 and saved["epochs"] == 2 and saved["resume"] is True
    steps = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "lr" in x and "loss" in x]
    first, second = [x["lr"] for x in steps if x["epoch"] == 1], [x["lr"] for x in steps if x["epoch"] == 2]
    assert first and second
    assert all(lr == pytest.approx(1e-3) for lr in first)  # constant schedule: the old rate before the resume
    assert all(lr == pytest.approx(0.05) for lr in second)  # and the new one after it
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 2
