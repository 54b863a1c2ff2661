"""The top of the text model trained over stored states of its trunk: prepare --text-trunk-layers K stores the
states after layer L-K, finetune --train-text-layers K runs only the top K layers over them, and the checkpoint
holds the whole model again, so predict on raw records runs trunk + trained top layers.

Tolerances (the top layers over the stored states vs the whole model run on each record alone, fp32):
- states stored fp32 (prepare --precision fp32): max |difference| <= 1e-5 (only float rounding of padded batches);
- states computed under bf16 autocast and stored bf16 (--precision bf16 / auto on bf16 hardware): cosine >= 0.999
  per token and max |difference| <= 0.05 (MiniLM, states up to ~6 in size: 0.021 max, cosine 0.99994 measured).
"""

import json

import numpy as np
import pytest
import torch

from conftest import load_json_lines, make_tokenizer, run_cli, tiny_prepare_args

FP32_ATOL = 1e-5
BF16_ATOL, BF16_COSINE = 0.05, 0.999
TEXTS = ["it is big", "the thing is a tiny red one", "no", "a large blue thing is big and it is red yes",
         "small small small tiny one", ""]


def tiny_text_model(kind: str, folder):
    """A 3-layer random BERT or RoBERTa (hidden 32) saved with the project's test tokenizer."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    tok = make_tokenizer()
    size = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=72)
    model = BertModel(BertConfig(**size)) if kind == "bert" else RobertaModel(RobertaConfig(pad_token_id=0, **size))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def check_close(got: torch.Tensor, want: torch.Tensor, precision: str) -> None:
    if precision == "fp32":
        assert (got - want).abs().max().item() <= FP32_ATOL
    else:
        assert (got - want).abs().max().item() <= BF16_ATOL
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item() >= BF16_COSINE


def top_equals_whole(folder, precision: str) -> None:
    """For every K: the top K layers over the states stored for a padded batch of texts of different lengths equal
    the whole model's last_hidden_state of each text run alone."""
    from mmllm.encoders import TextEncoder
    from mmllm.features import trunk_dtype
    from mmllm.text_layers import from_storage, load_top, to_storage

    enc = TextEncoder(str(folder), precision=precision)
    whole = enc.build_model().eval()
    ids = enc.tokenize(TEXTS, 64)["input_ids"]
    for k in range(1, enc.config.num_hidden_layers + 1):
        pooled, trunk = enc.pooled_and_trunk(ids, k)
        top = load_top(enc.folder, enc.config, k).eval()
        for i, seq in enumerate(ids):
            x = torch.tensor([seq])
            stored = from_storage(to_storage(trunk[i], trunk_dtype(enc))).float()[None]  # (1, n, D)
            assert stored.shape == (1, len(seq), enc.dim)  # the real tokens only
            with torch.no_grad():
                want = whole(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0]
                got = top(stored, torch.ones_like(x))[0]
            check_close(got, want, precision)
            check_close(torch.from_numpy(pooled[i]), want.mean(0), precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_top_layers_over_stored_states_equal_the_whole_model(kind, precision, tmp_path):
    top_equals_whole(tiny_text_model(kind, tmp_path / kind), precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_minilm_top_layers_over_stored_states_equal_the_whole_model(precision):
    from mmllm.encoders import resolve

    folder, _ = resolve("minilm")
    if not (folder / "config.json").is_file():
        pytest.skip("minilm is not pulled")
    top_equals_whole(folder, precision)


def prepare(tiny_models, manifest, out, *extra):
    r = run_cli(*tiny_prepare_args(tiny_models, manifest, out), "--no-transcribe", *extra)
    assert r.exit_code == 0, r.output
    return load_json_lines(r.stdout)[-1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_prepare_stores_the_trunk_states_of_the_real_tokens_and_says_their_size(tiny_models, toy_manifest,
                                                                                  tmp_path, precision):
    import datasets

    from mmllm.encoders import TextEncoder
    from mmllm.text_layers import from_storage

    summary = prepare(tiny_models, toy_manifest, tmp_path / "p", "--precision", precision, "--text-trunk-layers", "1")
    meta = json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())
    trunk = meta["text_trunk"]
    assert {k: trunk[k] for k in ("top_layers", "layers", "after_layer", "dtype")} == \
        {"top_layers": 1, "layers": 2, "after_layer": 1, "dtype": precision}
    assert trunk["text_model"] == meta["encoders"]["text"]["identity"]
    assert meta["features"]["text_trunk"] == ["T", 32]
    data = datasets.load_from_disk(str(tmp_path / "p"))
    tokens = sum(len(x) for split in data.values() for x in split["input_ids"])
    per_value = 2 if precision == "bf16" else 4
    assert summary["text_trunk_bytes_per_record"] == round(tokens * 32 * per_value / sum(meta["counts"].values()))
    assert trunk["bytes_per_record"] == summary["text_trunk_bytes_per_record"]
    whole = TextEncoder(str(tiny_models["text"])).build_model().eval()
    train = data["train"]
    for i in range(3):
        ids = torch.tensor([train[i]["input_ids"]])
        stored = from_storage(np.asarray(train[i]["text_trunk"], dtype=np.uint16 if precision == "bf16" else
                                         np.float32)).float()
        assert stored.shape == (ids.shape[1], 32)
        with torch.no_grad():
            want = whole(input_ids=ids, output_hidden_states=True).hidden_states[1][0]  # after layer 1 of 2
        check_close(stored, want, precision)


def test_trunk_states_come_from_the_feature_cache_keyed_by_k(tiny_models, toy_manifest, tmp_path, monkeypatch):
    from mmllm.encoders import TextEncoder

    prepare(tiny_models, toy_manifest, tmp_path / "p1", "--precision", "fp32", "--text-trunk-layers", "1")
    runs = {"n": 0}
    original = TextEncoder.pooled_and_trunk

    def counting(self, ids, k=0, batch_size=32):
        runs["n"] += len(ids)
        return original(self, ids, k, batch_size)

    monkeypatch.setattr(TextEncoder, "pooled_and_trunk", counting)
    prepare(tiny_models, toy_manifest, tmp_path / "p2", "--precision", "fp32", "--text-trunk-layers", "1")
    assert runs["n"] == 0  # computed once: every text's states from the cache
    a, b = (json.loads((tmp_path / p / "mmllm-prepared.json").read_text()) for p in ("p1", "p2"))
    assert a["text_trunk"] == b["text_trunk"]
    prepare(tiny_models, toy_manifest, tmp_path / "p3", "--precision", "fp32", "--text-trunk-layers", "2")
    assert runs["n"] > 0  # another K: other states, computed again


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_trains_the_top_layers_without_running_the_trunk_and_predict_composes_them(
        tiny_models, toy_manifest, tmp_path, monkeypatch, lora):
    import datasets
    from safetensors.torch import load_file
    from transformers import PreTrainedModel
    from transformers.models.bert import modeling_bert

    from mmllm import checkpoint
    from mmllm.batches import FeatureTable, trunk_column
    from mmllm.text_layers import TextTop, layer_stack

    prepare(tiny_models, toy_manifest, tmp_path / "p", "--precision", "fp32", "--text-trunk-layers", "1")
    calls = {"embeddings": 0, "whole": 0}
    embeddings, module_call = modeling_bert.BertEmbeddings.forward, torch.nn.Module.__call__

    def count_embeddings(self, *a, **k):
        calls["embeddings"] += 1
        return embeddings(self, *a, **k)

    def count_whole(self, *a, **k):
        calls["whole"] += isinstance(self, PreTrainedModel) and "input_ids" in k
        return module_call(self, *a, **k)

    monkeypatch.setattr(modeling_bert.BertEmbeddings, "forward", count_embeddings)
    monkeypatch.setattr(torch.nn.Module, "__call__", count_whole)
    ck = tmp_path / "ck"
    extra = ["--lora-r", "2"] if lora else []
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(ck), "--epochs", "3", "--hidden-size", "16",
                "--fusion", "concat", "--train-text-layers", "1", "--backbone-lr", "1e-2", *extra)
    assert r.exit_code == 0, r.output
    assert "top 1 of 2 layers train" in r.output
    assert calls == {"embeddings": 0, "whole": 0}  # neither the embeddings nor the trunk ran in training
    monkeypatch.setattr(torch.nn.Module, "__call__", module_call)
    config = json.loads((ck / "config.json").read_text())
    assert config["model"]["train_text_layers"] == 1 and config["model"]["lora_r"] == (2 if lora else 0)
    # text_model/ is the whole model: the pretrained embeddings and trunk layer, the trained (LoRA-merged) top layer
    saved, base = load_file(str(ck / "text_model" / "model.safetensors")), \
        load_file(str(tiny_models["text"] / "model.safetensors"))
    for name, value in base.items():
        if name.startswith("encoder.layer.1.") and name.endswith("weight") and "LayerNorm" not in name:
            assert not torch.equal(saved[name], value), name  # trained
        elif not name.startswith("encoder.layer.1."):
            assert torch.equal(saved[name], value), name  # frozen
    # the checkpoint's whole model on token ids gives what its top layer gives over the stored trunk states
    model, config, tokenizer = checkpoint.load(ck, "cpu")
    test = datasets.load_from_disk(str(tmp_path / "p"))["test"]
    columns = test.with_format("numpy")[:]
    columns["label"] = [None] * len(test)
    whole = FeatureTable(columns, model.cfg.modalities, None, tokenizer.pad_token_id or 0)
    stored = FeatureTable(columns, model.cfg.modalities, None, text_trunk=trunk_column(test))
    with torch.no_grad():
        by_ids = model(whole.batch(range(len(test))))["logits"]
        model.text, full = TextTop(model.text.config, torch.nn.ModuleList(layer_stack(model.text)[1:])), model.text
        by_states = model(stored.batch(range(len(test))))["logits"]
    assert torch.allclose(by_ids, by_states, atol=FP32_ATOL)
    model.text = full
    # predict on a raw record: the whole text model runs, and gives the same probabilities
    row = next(r for r in __import__("csv").DictReader(open(toy_manifest)) if r["id"] == test[0]["id"])
    rec = {"id": "x", "text": row["text"], "image": str(toy_manifest.parent / row["image"]),
           "audio": str(toy_manifest.parent / row["audio"])}
    r = run_cli("predict", str(ck), "-", "--top-k", "4", input=json.dumps(rec) + "\n")
    assert r.exit_code == 0, r.output
    got = {p["label"]: p["probability"] for p in load_json_lines(r.stdout)[0]["top_k"]}
    want = by_states[0].softmax(-1)
    for i, name in enumerate(config["labels"]):
        assert abs(got[name] - float(want[i])) < 1e-4
    r = run_cli("eval", "model", str(ck), str(tmp_path / "p"), "--no-reliance")
    assert r.exit_code == 0, r.output
    assert "accuracy" in load_json_lines(r.stdout)[-1]


def test_finetune_refuses_data_without_these_trunk_states(tiny_models, toy_manifest, tmp_path):
    prepare(tiny_models, toy_manifest, tmp_path / "none", "--precision", "fp32")
    prepare(tiny_models, toy_manifest, tmp_path / "k1", "--precision", "fp32", "--text-trunk-layers", "1")

    def refused(prepared, *extra) -> str:
        r = run_cli("finetune", str(prepared), "--output", str(tmp_path / "ck"), "--epochs", "1", *extra)
        assert r.exit_code == 2, r.output
        assert not (tmp_path / "ck").exists()
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.output
        return lines[0]

    assert "stores no text trunk states; prepare it again with --text-trunk-layers 1" in \
        refused(tmp_path / "none", "--train-text-layers", "1")
    assert "use --train-text-layers 1, or prepare again with --text-trunk-layers 2" in \
        refused(tmp_path / "k1", "--train-text-layers", "2")
    meta_path = tmp_path / "k1" / "mmllm-prepared.json"
    meta = json.loads(meta_path.read_text())
    meta["text_trunk"]["text_model"] = "another@0123456789ab"
    meta_path.write_text(json.dumps(meta))
    assert "stores trunk states of the text model another@0123456789ab" in \
        refused(tmp_path / "k1", "--train-text-layers", "1")
    assert "--train-text-layers and --freeze-text" in refused(tmp_path / "k1", "--train-text-layers", "1",
                                                              "--freeze-text")
    assert "--train-text-layers: needs the text modality" in \
        refused(tmp_path / "none", "--train-text-layers", "1", "--modalities", "image")


def test_prepare_refuses_more_trunk_layers_than_the_model_has(tiny_models, toy_manifest, tmp_path):
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, tmp_path / "p"), "--text-trunk-layers", "3")
    assert r.exit_code == 2, r.output
    assert "--text-trunk-layers 3: the text model" in r.output and "has 2 layers; use 1 to 2" in r.output
    assert not (tmp_path / "p").exists()


def test_shards_with_trunk_states_merge_and_shards_of_another_k_do_not(tiny_models, toy_manifest, tmp_path):
    import datasets

    shards = []
    for i, k in enumerate(("1", "1", "2")):
        prepare(tiny_models, toy_manifest, tmp_path / f"s{i}", "--precision", "fp32", "--text-trunk-layers", k,
                "--shard-index", str(i % 2), "--num-shards", "2")
        shards.append(tmp_path / f"s{i}")
    r = run_cli("prepare", str(shards[0]), str(shards[1]), "--merge", "--output", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    merged = datasets.load_from_disk(str(tmp_path / "merged"))
    assert all(len(row["text_trunk"]) == len(row["input_ids"]) for row in merged["train"])
    assert json.loads((tmp_path / "merged" / "mmllm-prepared.json").read_text())["text_trunk"]["top_layers"] == 1
    r = run_cli("prepare", str(shards[0]), str(shards[2]), "--merge", "--output", str(tmp_path / "other"))
    assert r.exit_code == 2 and "prepared otherwise" in r.output and "text trunk" in r.output, r.output


def test_an_interrupted_top_layers_run_resumes_to_the_same_result(tiny_models, toy_manifest, tmp_path, monkeypatch):
    import mmllm.loop as loop

    prepare(tiny_models, toy_manifest, tmp_path / "p", "--precision", "fp32", "--text-trunk-layers", "1")
    args = ["--epochs", "3", "--batch-size", "8", "--hidden-size", "16", "--fusion", "concat", "--patience", "0",
            "--train-text-layers", "1", "--backbone-lr", "1e-3"]
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "full"), *args)
    assert r.exit_code == 0, r.output
    whole = load_json_lines(r.stdout)[-1]
    original = loop.fit_epoch

    def stop_after_first_epoch(*a, **k):
        seen = original(*a, **k)
        if a[7].epoch == 0:
            a[8].hit = True  # as Ctrl-C: the state is saved, the run exits 130
        return seen

    monkeypatch.setattr(loop, "fit_epoch", stop_after_first_epoch)
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "cut"), *args)
    assert r.exit_code == 130, r.output
    monkeypatch.setattr(loop, "fit_epoch", original)
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "cut"), *args, "--resume")
    assert r.exit_code == 0, r.output
    resumed = load_json_lines(r.stdout)[-1]
    for key in ("val_loss", "val_accuracy", "steps", "best_epoch"):
        assert resumed[key] == whole[key], key
