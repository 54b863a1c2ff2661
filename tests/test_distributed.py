"""DDP on CPU (gloo, 2 processes) computes what one process computes on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT


def test_torchrun_two_processes_matches_one(prepared, tmp_path):
    """No dropout (image+audio only: the text model has its own dropout): same global batches, same weights."""
    common = ["finetune", str(prepared), "--epochs", "3", "--hidden-size", "32", "--lr", "3e-3", "--dropout", "0",
              "--modalities", "image,audio", "--patience", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mmllm", "-q", *common, "--batch-size", "8",
                          "--output", str(tmp_path / "one")], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mmllm", *common, "--batch-size", "4", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    # issue 25: one copy of what a person reads (rank 0's), and no DDP warning about unused parameters
    assert two.stderr.count("schedule:") == 1, two.stderr
    assert two.stderr.count("epoch 1/3") == two.stderr.count("epoch 1: train_loss") == 1, two.stderr
    assert "find_unused_parameters" not in two.stderr and "Warning" not in two.stderr, two.stderr
    a = json.loads(one.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in two.stdout.strip().splitlines() if x.startswith("{")]
    assert len(lines) == 1, "only rank 0 writes the summary"
    b = lines[0]
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["steps"] == b["steps"] and a["best_epoch"] == b["best_epoch"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5) and b["val_accuracy"] == a["val_accuracy"]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
    ea, eb = ([json.loads(x)["val_loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in x] for run in ("one", "two"))
    assert np.allclose(ea, eb, atol=1e-5)  # per-epoch validation (sharded across the 2 ranks) agrees too


# ---------------------------------------------------------------- in-process DDP (torch.multiprocessing, gloo)

N_TRAIN, N_VAL, DIM = 32, 11, 6  # 11 validation rows: the two ranks' shards differ in size (5 and 6)


def tiny_task():
    """A classifier over image/audio features and its train/validation tables (fixed seeds, no dropout)."""
    from mmllm.batches import FeatureTable
    from mmllm.model import ModelConfig, build_model

    g = torch.Generator().manual_seed(1)

    def columns(n):
        return {"id": [str(i) for i in range(n)], "has_image": [True] * n, "has_audio": [i % 3 > 0 for i in range(n)],
                "image_emb": torch.randn(n, DIM, generator=g).numpy(),
                "audio_emb": torch.randn(n, DIM, generator=g).numpy(),
                "label": [["a", "b", "c"][i % 3] for i in range(n)]}

    labels = {"a": 0, "b": 1, "c": 2}
    train = FeatureTable(columns(N_TRAIN), ["image", "audio"], labels)
    val = FeatureTable(columns(N_VAL), ["image", "audio"], labels)
    torch.manual_seed(0)
    model = build_model(ModelConfig(modalities=["image", "audio"], num_labels=3, hidden_size=16, fusion="gated",
                                    dropout=0.0, dims={"image": DIM, "audio": DIM}), None)
    return model, train, val


def train_tiny(dist, batch_size: int, grad_accum: int = 2, epochs: int = 2):
    """fit_epoch of mmllm.loop (DDP-wrapped when world > 1); returns (model, steps, all-reduced backwards, val)."""
    from mmllm import loop
    from mmllm.config import FinetuneConfig
    from mmllm.tasks.classify import validate

    model, train, val = tiny_task()
    cfg = FinetuneConfig(prepared="-", output="-", batch_size=batch_size, grad_accum=grad_accum, lr=3e-3,
                         dropout=0.0, epochs=epochs, weight_decay=0.01, l2=1e-3)
    optimizer = loop.make_optimizer(model, cfg)
    scheduler = loop.make_scheduler(optimizer, cfg, epochs * N_TRAIN // 16, 0)  # 2 steps per epoch, no warmup
    ddp_model, reduced = model, []
    if dist.world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

        def counting_hook(state, bucket):
            if bucket.index() == 0:
                reduced.append(1)  # one all-reduced backward
            return allreduce_hook(state, bucket)

        ddp_model.register_comm_hook(None, counting_hook)
    state = loop.TrainState()
    for _ in range(epochs):
        loop.fit_epoch(ddp_model, model, train, optimizer, scheduler, cfg, dist, state, loop.StopFlag(), None)
        state.epoch += 1
        state.batch_in_epoch = 0
    return model, state.step, len(reduced), validate(model, val, ["a", "b", "c"], "cpu", 4, dist), val


def ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mmllm.runtime import setup_distributed
    from mmllm.tasks.classify import predict_table, validate

    dist = setup_distributed("cpu")
    model, steps, reduced, sharded, val = train_tiny(dist, batch_size=4)
    probs, gold, gates = predict_table(model, val, "cpu", 4, dist=dist)
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "steps": steps,
                    "reduced": reduced, "sharded": sharded, "whole": validate(model, val, ["a", "b", "c"], "cpu", 4),
                    "probs": probs, "gold": gold, "gates": gates}, out)
    # as finetune does (loop.py): no rank tears down gloo while its peer may still be talking to it (CI once saw
    # rank 1 abort with 'terminate called without an active exception' when it destroyed its group first)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_grad_accum_no_sync_and_sharded_validation(tmp_path):
    import torch.multiprocessing as mp

    from mmllm.runtime import Dist

    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    single, steps, _, val_single, _ = train_tiny(Dist(), batch_size=8)  # the same global batches in one process
    assert got["steps"] == steps == 4  # 32 records / (2 x 4 x 2 accumulated) per epoch, 2 epochs
    assert got["reduced"] == steps  # no_sync: only the last micro-batch of each step all-reduces (not 8)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(got["params"][k], v, atol=1e-5, rtol=0, msg=k)
    # validation sharded over the ranks and gathered == validation of the same weights in one process
    assert got["sharded"]["val_accuracy"] == got["whole"]["val_accuracy"]
    assert got["sharded"]["val_loss"] == pytest.approx(got["whole"]["val_loss"], abs=1e-6)
    assert got["probs"].shape == (N_VAL, 3) and got["gates"].shape == (N_VAL, 2)
    assert got["gold"].tolist() == [i % 3 for i in range(N_VAL)]  # gathered in table order
    assert got["sharded"]["val_loss"] == pytest.approx(val_single["val_loss"], abs=1e-5)


def test_shard_covers_every_row_once():
    from mmllm.runtime import Dist, shard

    for n in (0, 1, 5, 11):
        parts = [shard(n, Dist(rank=r, world=3)) for r in range(3)]
        assert [i for p in parts for i in p] == list(range(n))
    assert shard(7, None) == range(7)
