"""Golden values: tiny models with fixed seeds, asserted to 1e-5 against numbers recorded once.

A change in the loop, the optimizer groups, the schedule, the models or the penalties moves these numbers.
If the change is intended, regenerate: `MMLLM_GOLDEN_PRINT=1 .venv/bin/python -m pytest -q -s tests/test_golden.py`
prints the new values (and still fails on the old ones); paste them here and say why in the commit message.
"""

import os

import pytest
import torch

from mmllm import loop
from mmllm.config import FinetuneConfig
from mmllm.model import ModelConfig, build_model, penalty
from mmllm.runtime import Dist

TOL = 1e-5


def check(name: str, got: list[float], expected: list[float]) -> None:
    if os.environ.get("MMLLM_GOLDEN_PRINT"):  # prints the values to paste; the check below still runs
        print(f"\n{name} = {[round(x, 7) for x in got]}")
    assert got == pytest.approx(expected, abs=TOL), name


class Table:
    """A training table of fixed tensors: len() and batch(indices, device), as the loop expects."""

    def __init__(self, **columns: torch.Tensor):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def batch(self, idx, device="cpu") -> dict:
        t = torch.as_tensor(list(idx))
        return {k: v[t].to(device) for k, v in self.columns.items()}


def five_steps(model, table, **options) -> list[float]:
    """The cross-entropy of 5 optimizer steps of mmllm.loop.fit_epoch (40 records, batches of 8)."""
    cfg = FinetuneConfig(prepared="-", output="-", batch_size=8, epochs=1, seed=0, **options)
    optimizer = loop.make_optimizer(model, cfg)
    scheduler = loop.make_scheduler(optimizer, cfg, 5, 1)  # 1 warmup step, then the --schedule
    state = loop.TrainState()
    loop.fit_epoch(model, model, table, optimizer, scheduler, cfg, Dist(), state, loop.StopFlag(), None)
    assert state.step == 5
    return list(state.epoch_losses)


def classify_setup():
    g = torch.Generator().manual_seed(0)
    n, dim = 40, 6
    table = Table(image_emb=torch.randn(n, dim, generator=g), audio_emb=torch.randn(n, dim, generator=g),
                  has_image=torch.ones(n, dtype=torch.bool), has_audio=torch.arange(n) % 4 > 0,
                  labels=torch.randint(0, 3, (n,), generator=g))
    torch.manual_seed(0)
    model = build_model(ModelConfig(modalities=["image", "audio"], num_labels=3, hidden_size=16, fusion="gated",
                                    dropout=0.0, dims={"image": dim, "audio": dim}), None)
    return model, table


def test_classify_loss_trajectory():
    model, table = classify_setup()
    got = five_steps(model, table, lr=1e-2, l2=1e-3, weight_decay=0.01, schedule="cosine", grad_clip=1.0)
    check("classify", got, [1.0871964, 1.1871918, 1.2308012, 1.2048357, 1.0993222])


def test_generate_loss_trajectory():
    from transformers import GPT2Config, GPT2LMHeadModel

    from mmllm.tasks.generate import GenConfig, PrefixDecoder, prepare_decoder

    g = torch.Generator().manual_seed(0)
    n, dim, vocab, prompt, target = 40, 6, 50, 3, 4
    ids = torch.randint(3, vocab, (n, prompt + target), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, prompt:] = ids[:, prompt:]  # the loss covers the target tokens only
    table = Table(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                  image_emb=torch.randn(n, dim, generator=g), has_image=torch.arange(n) % 5 > 0)
    torch.manual_seed(0)
    decoder = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0))
    cfg = GenConfig(modalities=["image"], dims={"image": dim}, prefix_tokens=2, hidden_size=16, dropout=0.0)
    model = PrefixDecoder(cfg, prepare_decoder(decoder, cfg))
    got = five_steps(model, table, lr=5e-3, schedule="linear")
    check("generate", got, [3.9123881, 3.8859923, 3.9203935, 3.9321051, 3.9243882])


def test_penalty_values():
    model, _ = classify_setup()
    l2, l1 = penalty(model, 0.1, 0.01)
    check("penalty", [l2.item(), l1.item()], [1.8264494, 0.8560023])  # 0.1 * sum W^2, 0.01 * sum |W| over matrices
    zero_l2, zero_l1 = penalty(model, 0.0, 0.0)
    assert zero_l2.item() == 0.0 and zero_l1.item() == 0.0
