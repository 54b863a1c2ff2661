"""A frozen text model is computed once: prepare stores its pooled states, training and prediction read them."""

import json

import numpy as np
import torch

from conftest import load_json_lines, run_cli, tiny_prepare_args


def prepare(tiny_models, manifest, out, *extra):
    r = run_cli(*tiny_prepare_args(tiny_models, manifest, out), "--precision", "fp32", *extra)
    assert r.exit_code == 0, r.output
    return out


def test_prepare_stores_the_pooled_states_of_the_stored_tokens(tiny_models, toy_manifest, tmp_path):
    import datasets

    from mmllm.encoders import TextEncoder, mean_pool

    out = prepare(tiny_models, toy_manifest, tmp_path / "p")
    assert json.loads((out / "mmllm-prepared.json").read_text())["features"]["text_pooled"] == [32]
    train = datasets.load_from_disk(str(out))["train"]
    stored = np.asarray(train["text_pooled"], dtype=np.float32)
    model = TextEncoder(str(tiny_models["text"])).build_model().eval()
    for i in range(3):  # one record at a time: no padding at all
        ids = torch.tensor([train[i]["input_ids"]])
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        np.testing.assert_allclose(stored[i], mean_pool(states, torch.ones_like(ids))[0].numpy(), atol=1e-5)


def test_a_frozen_text_model_is_never_run_in_training_eval_or_predict(tiny_models, toy_manifest, tmp_path,
                                                                        monkeypatch):
    from transformers import PreTrainedModel

    out = prepare(tiny_models, toy_manifest, tmp_path / "p")
    calls = {"n": 0}
    original = torch.nn.Module.__call__

    def counting(self, *a, **k):
        if isinstance(self, PreTrainedModel) and "input_ids" in k:
            calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(out), "--output", str(ck), "--epochs", "2", "--hidden-size", "16", "--freeze-text",
                "--fusion", "bilinear")
    assert r.exit_code == 0, r.output
    assert "reads its pooled states from the prepared data" in r.output
    assert calls["n"] == 0  # not one forward of the text model in training or validation
    r = run_cli("eval", "model", str(ck), str(out), "--split", "test")
    assert r.exit_code == 0, r.output
    assert calls["n"] == 0
    rec = {"id": "x", "text": "it is big"}
    r = run_cli("predict", str(ck), "-", input=json.dumps(rec) + "\n")
    assert r.exit_code == 0, r.output
    assert "prediction" in load_json_lines(r.stdout)[0]
    assert calls["n"] == 1  # predict featurizes the raw text once (prepare's pooled states), not again in the model
    r = run_cli("finetune", str(out), "--output", str(tmp_path / "trained"), "--epochs", "1", "--hidden-size", "16",
                "--no-freeze-text")
    assert r.exit_code == 0, r.output
    assert calls["n"] >= 1 + 3, r.output  # a trained text model runs in each of the 2 steps and in validation


def test_cached_states_give_the_same_predictions_as_running_the_frozen_model(tiny_models, toy_manifest, tmp_path):
    import datasets

    from mmllm import checkpoint
    from mmllm.batches import FeatureTable
    from mmllm.tasks.classify import predict_table

    out = prepare(tiny_models, toy_manifest, tmp_path / "p")
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(out), "--output", str(ck), "--epochs", "2", "--hidden-size", "16", "--freeze-text",
                "--fusion", "bilinear")
    assert r.exit_code == 0, r.output
    model, config, tokenizer = checkpoint.load(ck, "cpu")
    assert model.cfg.cached_text
    test = datasets.load_from_disk(str(out))["test"]
    mods, labels = model.cfg.modalities, {n: i for i, n in enumerate(config["labels"])}
    cached = FeatureTable.from_split(test, mods, labels, tokenizer.pad_token_id, cached_text=True)
    running = FeatureTable.from_split(test, mods, labels, tokenizer.pad_token_id, cached_text=False)
    assert "text_pooled" in cached.batch([0]) and "input_ids" not in cached.batch([0])
    assert "input_ids" in running.batch([0])
    p_cached = predict_table(model, cached, "cpu", 4)[0]
    p_running = predict_table(model, running, "cpu", 4)[0]
    np.testing.assert_allclose(p_cached, p_running, atol=1e-5)
    model.train()  # training mode: the new layers drop out, the frozen text model does not (as prepare ran it)
    assert model.proj.training and not model.text.training
    assert not any(m.training for m in model.text.modules())


def test_without_stored_states_a_frozen_model_still_trains(tiny_models, toy_manifest, tmp_path):
    """Data prepared before text_pooled existed: the text model runs, and the user is told to prepare again."""
    import datasets

    out = prepare(tiny_models, toy_manifest, tmp_path / "p")
    old = tmp_path / "old"
    ds = datasets.load_from_disk(str(out))
    ds.map(lambda r: r, remove_columns=["text_pooled"]).save_to_disk(str(old))
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    del meta["features"]["text_pooled"]
    (old / "mmllm-prepared.json").write_text(json.dumps(meta))
    r = run_cli("finetune", str(old), "--output", str(tmp_path / "ck"), "--epochs", "1", "--hidden-size", "16",
                "--freeze-text")
    assert r.exit_code == 0, r.output
    assert "prepare again" in r.output
