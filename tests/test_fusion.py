"""Fusions: shapes, padding masks, an interaction task that concat cannot learn in the budget, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_prepare_args

from mmllm import checkpoint
from mmllm.fusions import FUSIONS
from mmllm.errors import UserError
from mmllm.model import ModelConfig, build_model


def tiny_model(fusion: str, tiny_models: dict | None = None, sequence: bool = True, hidden: int = 16):
    """text (tiny BERT, width 32) + image (dim 12) + audio (dim 10), or image + audio without tiny_models."""
    from transformers import AutoModel

    torch.manual_seed(0)
    text = AutoModel.from_pretrained(tiny_models["text"]) if tiny_models else None
    mods = ["text", "image", "audio"] if tiny_models else ["image", "audio"]
    return build_model(ModelConfig(modalities=mods, num_labels=3, hidden_size=hidden, fusion=fusion, dropout=0.0,
                                   text_dim=32, dims={"image": 12, "audio": 10}, sequence=sequence), text).eval()


def batch_of(b: int = 4, t: int = 7, s: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """B records: texts of lengths 7, 6, 5, 4 (the rest padding), image/audio vectors and S-token sequences;
    record 1 has no image, record 2 no audio."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t - i for i in range(b)])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()  # (B, T)
    return {"input_ids": torch.randint(5, 20, (b, t), generator=g) * mask, "attention_mask": mask,
            "image_emb": torch.randn(b, 12, generator=g), "audio_emb": torch.randn(b, 10, generator=g),
            "image_seq": torch.randn(b, s, 12, generator=g), "audio_seq": torch.randn(b, s, 10, generator=g),
            "has_text": torch.ones(b, dtype=torch.bool), "has_image": torch.arange(b) != 1,
            "has_audio": torch.arange(b) != 2, "labels": torch.arange(b) % 3}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_gives_logits_loss_and_gradients(fusion, tiny_models):
    model = tiny_model(fusion, tiny_models).train()
    out = model(batch_of())
    assert out["logits"].shape == (4, 3) and torch.isfinite(out["loss"])
    assert (out["gates"].shape == (4, 3)) if fusion == "gated" else out["gates"] is None
    out["loss"].backward()
    fused = model.head if fusion == "linear" else model.fusion  # a probe is one linear layer on the features
    grads = [p.grad for p in fused.parameters()]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("fusion", ["transformer", "attention"])
def test_padding_and_absent_modalities_do_not_change_the_output(fusion, tiny_models):
    model = tiny_model(fusion, tiny_models)
    batch = batch_of()
    with torch.no_grad():
        ref = model(batch)["logits"]
        padded = {**batch, "input_ids": torch.where(batch["attention_mask"].bool(), batch["input_ids"], 11)}
        seq = batch["image_seq"].clone()
        seq[1] = 100.0  # record 1 has no image
        aseq = batch["audio_seq"].clone()
        aseq[2] = -7.0  # record 2 has no audio
        masked = model({**padded, "image_seq": seq, "audio_seq": aseq})["logits"]
        torch.testing.assert_close(masked, ref, rtol=0, atol=1e-5)
        word = batch["input_ids"].clone()
        word[3, 2] = 7 if word[3, 2] != 7 else 8  # a real token of record 3
        image = batch["image_seq"].clone()
        image[0] = torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(5))  # a present image's grid
        changed = model({**batch, "input_ids": word, "image_seq": image})["logits"]
    assert not torch.allclose(changed[0], ref[0], atol=1e-4)  # image sequences reach the fusion
    if fusion == "transformer":  # text tokens reach it too (through the token states, not only the mean)
        assert not torch.allclose(changed[3], ref[3], atol=1e-4)
    torch.testing.assert_close(changed[1:3], ref[1:3], rtol=0, atol=1e-5)


def matching_data(n: int, seed: int, dim: int = 16, noise: float = 1.0) -> dict[str, torch.Tensor]:
    """XOR of two modalities: the image is one of two codes (+ noise), the audio one of two other codes; the
    label is whether the two codes have the same index. Neither modality alone says anything about it."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(2, 2, dim, generator=torch.Generator().manual_seed(1))  # (modality, code, D)
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    return {"image_emb": codes[0, a] + noise * torch.randn(n, dim, generator=g),
            "audio_emb": codes[1, b] + noise * torch.randn(n, dim, generator=g),
            "has_image": torch.ones(n, dtype=torch.bool), "has_audio": torch.ones(n, dtype=torch.bool),
            "labels": (a == b).long()}


def xor_accuracy(fusion: str, steps: int = 20) -> float:
    """Test accuracy after `steps` full-batch AdamW steps (lr 3e-3) on 256 training records."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(modalities=["image", "audio"], num_labels=2, hidden_size=16, fusion=fusion,
                                    dropout=0.0, dims={"image": 16, "audio": 16}), None)
    train, test = matching_data(256, seed=10), matching_data(1000, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(train)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(test)["logits"].argmax(1) == test["labels"]).float().mean())


def test_interaction_fusions_learn_xor_that_concat_does_not_in_the_same_budget():
    """An MLP over concatenated vectors can represent XOR, but starts with no first-order signal to follow;
    products of the modalities (bilinear) or attention between them (transformer) have one from the start."""
    acc = {f: xor_accuracy(f) for f in ("concat", "gated", "transformer", "bilinear")}
    assert acc["concat"] < 0.7 and acc["gated"] < 0.7, acc
    assert acc["bilinear"] > 0.9 and acc["transformer"] > 0.8, acc


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match="unknown fusion 'sum'.*bilinear"):
        build_model(ModelConfig(modalities=["image"], num_labels=2, fusion="sum", dims={"image": 4}), None)


@pytest.fixture
def sequence_prepared(tiny_models, toy_manifest, tmp_path):
    out = tmp_path / "seq"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--sequence-features")
    assert r.exit_code == 0, r.output
    return out


def test_checkpoint_round_trip_and_schema(sequence_prepared, tmp_path):
    import datasets

    from mmllm.batches import FeatureTable

    ds = datasets.load_from_disk(str(sequence_prepared))["test"]
    for fusion in ("transformer", "bilinear"):
        ck = tmp_path / f"ck_{fusion}"
        r = run_cli("finetune", str(sequence_prepared), "--output", str(ck), "--fusion", fusion, "--epochs", "1",
                    "--hidden-size", "16", "--batch-size", "8")
        assert r.exit_code == 0, r.output
        config = json.loads((ck / "config.json").read_text())
        assert config["model"]["fusion"] == fusion and config["model"]["sequence"] is (fusion == "transformer")
        model, config, tok = checkpoint.load(ck)
        again = tmp_path / f"again_{fusion}"
        again.mkdir()
        info = {k: v for k, v in config.items() if k not in ("format", "version", "model")}
        checkpoint.save(model, again, info, tok, model.text.config)
        reloaded, _, _ = checkpoint.load(again)
        table = FeatureTable.from_split(ds, model.cfg.modalities, None, tok.pad_token_id, model.cfg.sequence)
        batch = table.batch(range(len(table)))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(batch)["logits"], model(batch)["logits"], rtol=0, atol=0)
        state = model.state_dict()
        assert any(k.startswith("fusion.cls" if fusion == "transformer" else "fusion.factors.") for k in state)
        # the schema check of config.json knows the new names and still refuses unknown ones
        config["model"]["fusion"] = "sum"
        (again / "config.json").write_text(json.dumps(config))
        with pytest.raises(UserError, match="fusion"):
            checkpoint.load(again)


def test_transformer_without_stored_sequences_uses_pooled_tokens(prepared, tmp_path):
    ck = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(ck), "--fusion", "transformer", "--epochs", "1",
                "--hidden-size", "16", "--batch-size", "8")
    assert r.exit_code == 0, r.output
    assert "no media sequences" in r.stderr and "--sequence-features" in r.stderr
    assert json.loads((ck / "config.json").read_text())["model"]["sequence"] is False
    r = run_cli("eval", "model", str(ck), str(prepared))
    assert r.exit_code == 0, r.output
    assert 0 <= json.loads(r.stdout)["accuracy"] <= 1


@pytest.mark.parametrize("fusion", ["attention", "transformer"])
def test_masking_a_records_only_input_hides_its_sequence(fusion):
    """Reliance masks a modality: with every input of a record masked, a token fusion sees placeholders only, never
    the stored sequence or the text tokens (the answer does not depend on them)."""
    import torch

    from mmllm.model import ModelConfig, build_model

    cfg = ModelConfig(modalities=["video"], num_labels=2, dims={"video": 6}, hidden_size=8, fusion=fusion,
                      sequence=True, positions=True)
    torch.manual_seed(0)
    model = build_model(cfg, None).eval()

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return {"has_video": torch.ones(3, dtype=torch.bool), "video_emb": torch.randn(3, 6, generator=g),
                "video_seq": torch.randn(3, 4, 6, generator=g)}

    with torch.no_grad():
        a = model(batch(1), drop=frozenset({"video"}))["logits"]
        b = model(batch(2), drop=frozenset({"video"}))["logits"]
        c = model(batch(2))["logits"]
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(b, c, atol=1e-4)
