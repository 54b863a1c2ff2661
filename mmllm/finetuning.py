"""`mmllm finetune`: joint optimization of a task's model over prepared features.

Loads the prepared data, resolves the modalities, builds the `--task`'s Training (mmllm.tasks) and hands it to
the shared training loop (mmllm.loop).
"""

from __future__ import annotations

import torch

from mmllm import loop, outputs
from mmllm.config import FinetuneConfig, default
from mmllm.errors import UserError
from mmllm.features import load_prepared
from mmllm.runtime import Dist, forward_flops, setup_distributed, use_threads
from mmllm.tasks import build_task


def run(cfg: FinetuneConfig) -> int:
    dist = setup_distributed(cfg.device)
    loop.preflight(cfg, dist.device)  # fp16 needs CUDA, --report-to needs its package: say so before models load
    if not dist.main:
        return train(cfg, dist)
    loop.check_output(cfg)  # before any model loads: refuse an --output this run must not write
    with outputs.lock(cfg.output):  # a second finetune on the same --output meanwhile is refused
        return train(cfg, dist)


def train(cfg: FinetuneConfig, dist: Dist) -> int:
    """Load the prepared data, build the --task's Training, run the loop."""
    torch.manual_seed(cfg.seed)
    data, meta = load_prepared(cfg.prepared)
    absent = [split for split in ("train", "validation") if split not in data]
    if absent:
        raise UserError(f"{cfg.prepared} has no {' and no '.join(absent)} split (it has: {', '.join(data)}): "
                        "finetune trains on train and picks the best epoch on validation; prepare again with "
                        "records in both (--val-fraction, or the manifest's split column)")
    modalities = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
    missing = [m for m in modalities if m not in meta["modalities"]]
    if missing and cfg.modalities != default(FinetuneConfig, "modalities"):  # the default: what was prepared
        raise UserError(f"--modalities: {missing[0]} was not prepared (prepared: {', '.join(meta['modalities'])})")
    modalities = [m for m in modalities if m in meta["modalities"]]
    task = build_task(cfg, data, meta, modalities, dist)
    first = list(range(min(len(task.train), cfg.batch_size)))
    previous = torch.get_num_threads()  # the Python API's caller gets its own setting back
    use_threads(cfg.threads, dist.device, lambda: forward_flops(task.model, task.train.batch(first, dist.device)))
    try:
        return loop.train(task, cfg, dist)
    finally:
        torch.set_num_threads(previous)
