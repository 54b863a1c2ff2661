"""Checkpoints the Hugging Face ecosystem opens: text_model/ and decoder/ load with the Auto classes and
compute what mmllm's model computes; the older layout still loads; the model card; ClassLabel labels;
eval and predict on a folder of class subfolders."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import load_json_lines, run_cli, write_image

SENTENCE = "it is a big red thing"


def text_prepared(tiny_models, root: Path, rows: list[dict] | None = None, name: str = "p") -> Path:
    texts, labels = ["it is big", "it is small", "a tiny one"], ["b", "s", "t"]
    rows = rows or [{"id": i, "text": texts[i % 3], "label": labels[i % 3]} for i in range(24)]
    (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run_cli("prepare", str(root / f"{name}.jsonl"), "--output", str(root / name), "--text-model",
                str(tiny_models["text"]), "--seed", "1")
    assert r.exit_code == 0, r.output
    return root / name


def spy_on_save(monkeypatch, module, name: str) -> dict:
    """Keep a copy of the model that finetune hands to the checkpoint writer (the in-memory trained model)."""
    from mmllm import checkpoint

    seen = {}
    real = getattr(module, name)

    def spy(model, *args, **kwargs):
        seen["model"] = copy.deepcopy(checkpoint.unwrap(model)).eval()
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def finetune(prepared: Path, out: Path, *extra: str) -> dict:
    r = run_cli("finetune", str(prepared), "--output", str(out), "--epochs", "2", "--hidden-size", "16",
                "--lr", "1e-2", "--backbone-lr", "1e-2", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def val_logits(model, prepared: Path, labels: list[str], tokenizer) -> torch.Tensor:
    from mmllm.batches import FeatureTable
    from mmllm.features import load_prepared

    ds, _ = load_prepared(prepared)
    table = FeatureTable.from_split(ds["train"], model.cfg.modalities, {n: i for i, n in enumerate(labels)},
                                    tokenizer.pad_token_id or 0)
    with torch.no_grad():
        return model.eval()(table.batch(range(len(table))))["logits"]


@pytest.fixture(params=[[], ["--lora-r", "2"]], ids=["full", "lora"])
def exported(request, tiny_models, tmp_path, monkeypatch):
    from mmllm import checkpoint

    prepared = text_prepared(tiny_models, tmp_path)
    seen = spy_on_save(monkeypatch, checkpoint, "save")
    finetune(prepared, tmp_path / "ck", *(request.param or ["--no-freeze-text"]))  # "full": the text model trained
    return tmp_path / "ck", prepared, seen["model"], request.param


def test_text_model_loads_with_auto_classes(exported, tiny_models):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    ck, _, trained, extra = exported
    assert sorted(p.name for p in (ck / "text_model").iterdir()) == ["config.json", "model.safetensors",
                                                                     "tokenizer.json", "tokenizer_config.json"]
    assert not any(k.startswith("text.") for k in load_file(str(ck / "model.safetensors")))  # stored once
    model = AutoModel.from_pretrained(ck / "text_model").eval()  # a plain BertModel: no peft, no mmllm
    tokenizer = AutoTokenizer.from_pretrained(ck / "text_model")
    assert type(model).__name__ == "BertModel" and not any("lora" in k for k in model.state_dict())
    enc = tokenizer([SENTENCE], return_tensors="pt")
    with torch.no_grad():
        ours = trained.text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        theirs = model(**enc).last_hidden_state  # (1, T, 32)
        before = AutoModel.from_pretrained(tiny_models["text"]).eval()(**enc).last_hidden_state
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert (before - ours).abs().max() > 1e-3  # the exported weights are the trained ones, not the pretrained
    if extra:  # LoRA: adapters merged into the weights they adapt
        assert any("lora_B" in k for k in trained.text.state_dict())


def test_checkpoint_loads_back_with_equal_predictions(exported):
    from mmllm import checkpoint

    ck, prepared, trained, _ = exported
    model, config, tokenizer = checkpoint.load(ck)
    expected, got = val_logits(trained, prepared, config["labels"], tokenizer), val_logits(model, prepared,
                                                                                           config["labels"], tokenizer)
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_checkpoint_of_the_older_layout_still_loads(exported):
    """Before text_model/ held weights, model.safetensors had the whole model (LoRA unmerged) under `text.`."""
    from mmllm import checkpoint

    ck, prepared, trained, extra = exported
    new, config, tokenizer = checkpoint.load(ck)
    checkpoint.save_weights(checkpoint.file_tensors(trained.state_dict()), ck / "model.safetensors")
    (ck / "text_model" / "model.safetensors").unlink()
    (ck / "README.md").unlink()
    old, _, _ = checkpoint.load(ck)
    assert hasattr(old.text, "peft_config") == bool(extra)  # LoRA adapters rebuilt from the older layout
    assert torch.allclose(val_logits(old, prepared, config["labels"], tokenizer),
                          val_logits(new, prepared, config["labels"], tokenizer), atol=1e-5)
    r = run_cli("predict", str(ck), "-", input=json.dumps({"text": SENTENCE}) + "\n")
    assert r.exit_code == 0 and load_json_lines(r.stdout)[0]["prediction"] in config["labels"], r.output


def test_text_model_without_its_weights_is_refused(exported):
    ck = exported[0]
    (ck / "text_model" / "model.safetensors").unlink()
    r = run_cli("predict", str(ck), "-", input=json.dumps({"text": SENTENCE}) + "\n")
    assert r.exit_code == 2 and "text_model" in r.stderr and "Traceback" not in r.output


def links(card: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", card)


def test_model_card(exported):
    ck, prepared, _, extra = exported
    card = (ck / "README.md").read_text()
    config = json.loads((ck / "config.json").read_text())
    meta = json.loads((prepared / "mmllm-prepared.json").read_text())
    metrics = json.loads((ck / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: mmllm\n")
    for section in ("## Use", "## Labels (3)", "## Data", "## Encoders", "## Metrics", "## Training", "## Files"):
        assert section in card, section
    assert "`--task classify`" in card and "AutoModel.from_pretrained" in card
    for i, name in enumerate(meta["labels"]):
        assert f"| {i} | {name} |" in card
    for split, n in meta["counts"].items():  # data counts from the prepared metadata
        assert f"| {split} | {n} |" in card
    enc = config["encoders"]["text"]
    assert f"`{enc['identity']}`" in card and "not recorded (see the model's own card)" in card
    for key in ("val_loss", "val_accuracy", "val_f1"):  # final validation metrics with their definitions
        assert re.search(rf"\| {key} \| {metrics[key]:.4f} \| \S", card), key
    assert "2TP/(2TP+FP+FN)" in card
    command = re.search(r"```bash\n(mmllm finetune .*)\n```", card).group(1)
    assert f"--output {ck}" in command and "--epochs 2" in command and "--hidden-size 16" in command
    assert ("--lora-r 2" in command) == bool(extra) and "--batch-size" not in command  # defaults left out
    assert "![training curves](training_curves.png)" in card
    targets = links(card)
    assert {"training_curves.png", "metrics.json", "finetune_config.json", "text_model/"} <= set(targets)
    assert all((ck / t).exists() for t in targets), [t for t in targets if not (ck / t).exists()]


def test_license_of_aliases_and_folders(tmp_path):
    from mmllm import modelcard

    assert modelcard.license_of("minilm") == "Apache-2.0" and modelcard.license_of("whisper-tiny.en") == "MIT"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("---\nlanguage: en\nlicense: cc-by-4.0\n---\n# m\n")
    assert modelcard.license_of(str(tmp_path / "m")) == "cc-by-4.0"


# ---------------------------------------------------------------- generation: decoder/


def test_trained_decoder_loads_with_auto_classes(prepared, tiny_decoder, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mmllm.tasks.generate.core as gen

    seen = spy_on_save(monkeypatch, gen, "save_checkpoint")
    out = tmp_path / "gen"
    r = run_cli("finetune", str(prepared), "--output", str(out), "--task", "generate", "--decoder", str(tiny_decoder),
                "--epochs", "1", "--batch-size", "8", "--hidden-size", "32", "--prefix-tokens", "2", "--lr", "1e-2",
                "--backbone-lr", "1e-2", "--lora-r", "2", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    trained = seen["model"]
    assert not any(k.startswith("decoder.") for k in load_file(str(out / "model.safetensors")))
    decoder = AutoModelForCausalLM.from_pretrained(out / "decoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "decoder")
    ids = tokenizer([SENTENCE], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = trained.decoder(input_ids=ids).logits, decoder(input_ids=ids).logits  # (1, T, V)
        before = AutoModelForCausalLM.from_pretrained(tiny_decoder).eval()(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and (before - ours).abs().max() > 1e-4
    card = (out / "README.md").read_text()
    assert "`--task generate`" in card and "| decoder |" in card and "## Metrics" in card
    assert all((out / t).exists() for t in links(card))
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "4", "--no-reliance")
    assert r.exit_code == 0, r.output
    new = json.loads(r.stdout.strip().splitlines()[-1])
    # the older layout: the decoder (LoRA unmerged) inside model.safetensors, decoder/ without weights
    from mmllm.checkpoint import file_tensors, save_weights

    save_weights(file_tensors(trained.state_dict()), out / "model.safetensors")
    (out / "decoder" / "model.safetensors").unlink()
    r = run_cli("eval", "model", str(out), str(prepared), "--max-new-tokens", "4", "--no-reliance")
    assert r.exit_code == 0, r.output
    old = json.loads(r.stdout.strip().splitlines()[-1])
    assert old["bleu"] == pytest.approx(new["bleu"]) and old["examples"] == new["examples"]


# ---------------------------------------------------------------- ClassLabel


def test_label_column_is_a_class_label(tiny_models, tmp_path):
    import datasets

    rows = [{"id": i, "text": ["it is big", "it is small"][i % 2], "label": ["big", "small"][i % 2]} for i in range(20)]
    rows += [{"id": "u1", "text": "it is big", "split": "test"}]  # an unlabeled test record
    for r in rows[:20]:
        r["split"] = "validation" if r["id"] in (0, 1, 2, 3) else "test" if r["id"] in (4, 5) else "train"
    prepared = text_prepared(tiny_models, tmp_path, rows)
    meta = json.loads((prepared / "mmllm-prepared.json").read_text())
    ds = datasets.load_from_disk(str(prepared))
    for split in ds:
        assert ds[split].features["label"] == datasets.ClassLabel(names=["big", "small"])
    test = dict(zip(ds["test"]["id"], ds["test"]["label"]))
    assert test == {"4": 0, "5": 1, "u1": None}  # ids in the order of the sorted names; unlabeled stays null
    assert meta["labels"] == ds["train"].features["label"].names
    # round trip: finetune on the ids, eval on the prepared split equals eval on the raw manifest
    finetune(prepared, tmp_path / "ck")
    r = run_cli("eval", "model", str(tmp_path / "ck"), str(prepared), "--split", "validation", "--no-reliance")
    assert r.exit_code == 0, r.output
    on_prepared = json.loads(r.stdout.strip().splitlines()[-1])
    r = run_cli("eval", "model", str(tmp_path / "ck"), str(tmp_path / "p.jsonl"), "--split", "validation",
                "--no-reliance")
    assert r.exit_code == 0, r.output
    on_raw = json.loads(r.stdout.strip().splitlines()[-1])
    assert on_prepared["n"] == on_raw["n"] == 4
    assert on_prepared["confusion_matrix"] == on_raw["confusion_matrix"]
    assert on_prepared["confusion_matrix"]["labels"] == ["big", "small"]
    assert sum(map(sum, on_prepared["confusion_matrix"]["matrix"])) == 4


def test_merge_renumbers_shards_with_other_labels(tiny_models, tmp_path):
    import datasets

    from mmllm.features import label_strings

    one = [{"id": f"a{i}", "text": "it is big", "label": ["apple", "berry"][i % 2]} for i in range(8)]
    two = [{"id": f"b{i}", "text": "it is small", "label": ["berry", "cherry"][i % 2]} for i in range(8)]
    text_prepared(tiny_models, tmp_path, one, "s1")
    text_prepared(tiny_models, tmp_path, two, "s2")
    r = run_cli("prepare", str(tmp_path / "s1"), str(tmp_path / "s2"), "--merge", "--output", str(tmp_path / "m"))
    assert r.exit_code == 0, r.output
    merged = datasets.load_from_disk(str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "mmllm-prepared.json").read_text())["labels"] == ["apple", "berry", "cherry"]
    given = {r["id"]: r["label"] for r in one + two}
    seen = {}
    for split in merged:
        assert merged[split].features["label"].names == ["apple", "berry", "cherry"]
        seen.update(zip(merged[split]["id"], label_strings(merged[split])))
    assert seen == given  # every record keeps its label name, whatever id its shard gave it


# ---------------------------------------------------------------- class folders in eval / predict


def test_eval_and_predict_on_a_class_folder(tiny_models, tmp_path):
    folder = tmp_path / "photos"
    for cls, rgb in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (folder / cls).mkdir(parents=True)
        for i in range(8):
            write_image(folder / cls / f"{i}.png", tuple(min(255, c + 5 * i) for c in rgb))
    r = run_cli("prepare", str(folder), "--output", str(tmp_path / "p"), "--image-model", str(tiny_models["image"]))
    assert r.exit_code == 0, r.output
    finetune(tmp_path / "p", tmp_path / "ck")
    r = run_cli("eval", "model", str(tmp_path / "ck"), str(folder), "--no-reliance")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 16 and result["split"] == "all"
    assert [sum(row) for row in result["confusion_matrix"]["matrix"]] == [8, 8]  # gold: the folder names
    r = run_cli("predict", str(tmp_path / "ck"), str(folder))
    assert r.exit_code == 0, r.output
    lines = load_json_lines(r.stdout)
    ids = [f"{cls}/{i}.png" for cls in ("blue", "red") for i in range(8)]
    assert [x["id"] for x in lines] == ids
    manifest = tmp_path / "m.jsonl"  # the same files listed in a manifest: the same predictions
    manifest.write_text("\n".join(json.dumps({"id": i, "image": str(folder / i)}) for i in ids) + "\n")
    r = run_cli("predict", str(tmp_path / "ck"), str(manifest))
    assert r.exit_code == 0, r.output
    assert load_json_lines(r.stdout) == lines
    correct = sum(x["prediction"] == x["id"].split("/")[0] for x in lines)
    assert result["accuracy"] == pytest.approx(correct / 16)
