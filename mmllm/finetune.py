"""`mmllm finetune`: joint optimization of the multimodal model over prepared features.

An explicit loop in small functions: setup -> fit_epoch / validate -> early stopping -> save.
Runs alone or under `torchrun` / `accelerate launch` (DDP: gloo on CPU, nccl on GPU; rank 0 writes).
A resumable state (weights, optimizer, scheduler, RNG, step) is written after every epoch and on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from mmllm import checkpoint
from mmllm.batches import FeatureTable
from mmllm.config import FinetuneConfig, save_resolved
from mmllm.console import emit, log, progress, warn
from mmllm.errors import UserError
from mmllm.metrics import classification
from mmllm.model import ModelConfig, build_model, penalty
from mmllm.prepare import load_prepared

STATE_DIR = "resume"


# ---------------------------------------------------------------- distributed

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: FinetuneConfig) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if want_cuda else "gloo"
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend)
        device = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        return Dist(torch.distributed.get_rank(), world, device)
    device = torch.device(cfg.device if cfg.device not in ("auto",) else ("cuda" if want_cuda else "cpu"))
    return Dist(0, 1, device)


# ---------------------------------------------------------------- entry point

@dataclasses.dataclass
class Task:
    """What the generic loop needs from a task (classification here, generation in generate.py)."""

    model: torch.nn.Module  # forward(batch) -> {"loss": ...}; backbone_parameters() -> pretrained params
    train: Any  # len(train), train.batch(indices, device) -> dict with "labels"
    validate: Callable[[torch.nn.Module], dict]  # -> {"val_loss": ..., other val_* metrics}
    save: Callable[[torch.nn.Module, Path, dict], None]  # write the checkpoint files into a folder


def run(cfg: FinetuneConfig) -> int:
    dist = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    data, meta = load_prepared(cfg.prepared)
    if "train" not in data or "validation" not in data:
        raise UserError(f"{cfg.prepared} needs train and validation splits (has: {', '.join(data)})")
    modalities = [m.strip() for m in cfg.modalities.split(",") if m.strip()]
    missing = [m for m in modalities if m not in meta["modalities"]]
    if missing and cfg.modalities != "text,image,audio":
        raise UserError(f"--modalities: {missing[0]} was not prepared (prepared: {', '.join(meta['modalities'])})")
    modalities = [m for m in modalities if m in meta["modalities"]]
    if cfg.task == "generate":
        from mmllm.generate import generation_task

        task = generation_task(cfg, data, meta, modalities, dist)
    else:
        task = classification_task(cfg, data, meta, modalities, dist)
    return train(task, cfg, dist)


def classification_task(cfg: FinetuneConfig, data: Any, meta: dict, modalities: list[str], dist: Dist) -> Task:
    if not meta["labels"]:
        raise UserError(f"{cfg.prepared} has no labels: use a label column for --task classify")
    labels = meta["labels"]
    label_to_id = {n: i for i, n in enumerate(labels)}
    tokenizer = text_config = text_model = None
    if "text" in modalities:
        from mmllm.encoders import TextEncoder

        text = TextEncoder(meta["encoders"]["text"]["name"])
        if text.identity != meta["encoders"]["text"]["identity"]:
            raise UserError(f"text model {text.name} is now {text.identity}, prepared with "
                            f"{meta['encoders']['text']['identity']}: prepare again")
        tokenizer, text_config, text_model = text.tokenizer, text.config, text.build_model()
    pad_id = (tokenizer.pad_token_id or 0) if tokenizer is not None else 0
    sequence = cfg.fusion == "attention" and bool(meta["preprocessing"].get("sequence_features"))
    train_table = FeatureTable.from_split(data["train"], modalities, label_to_id, pad_id, sequence)
    val = FeatureTable.from_split(data["validation"], modalities, label_to_id, pad_id, sequence)
    enc = meta["encoders"]
    mcfg = ModelConfig(modalities=modalities, num_labels=len(labels), hidden_size=cfg.hidden_size, fusion=cfg.fusion,
                       dropout=cfg.dropout, text_dim=enc.get("text", {}).get("dim"),
                       image_dim=enc.get("image", {}).get("dim"), audio_dim=enc.get("audio", {}).get("dim"),
                       share_projections=cfg.share_projections, modality_dropout=cfg.modality_dropout,
                       freeze_text=cfg.freeze_text, lora_r=cfg.lora_r,
                       text_model_type=getattr(text_config, "model_type", None), sequence=sequence)
    model = build_model(mcfg, text_model).to(dist.device)
    if cfg.class_weights == "auto":
        model.class_weights = auto_class_weights(train_table.labels, len(labels)).to(dist.device)

    def save(model_: torch.nn.Module, out: Path, metrics: dict) -> None:
        info = {"task": "classify", "labels": labels, "encoders": meta["encoders"], "columns": meta["columns"],
                "preprocessing": meta["preprocessing"], "prepared": str(Path(cfg.prepared).resolve()),
                "metrics": metrics}
        checkpoint.save(model_, out, info, tokenizer, text_config)

    return Task(model, train_table, lambda m: validate(m, val, labels, dist.device, cfg.batch_size), save)


def train(task: Task, cfg: FinetuneConfig, dist: Dist) -> int:
    """The loop: epochs of fit + validate, early stopping, resumable state, final checkpoint (rank 0)."""
    out = Path(cfg.output)
    model = task.model
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / dist.world / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    state = TrainState()
    state_dir = out / STATE_DIR
    if cfg.resume:
        state = load_state(state_dir, model, optimizer, scheduler)
        log(f"resumed at epoch {state.epoch}, step {state.step}")
    elif dist.main and (out / STATE_DIR).exists():
        raise UserError(f"--output {out} holds an unfinished run: add --resume, or choose another folder")
    ddp_model = model
    if dist.world > 1:
        # the text model's pooler (unused: mean pooling instead) has no gradient: DDP must know
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        save_resolved(cfg, out / "finetune_config.json")
    stop = StopFlag()
    start = time.perf_counter()
    trained_records = 0
    try:
        with stop:
            while state.epoch < cfg.epochs and not state.stopped_early and not (cfg.max_steps and
                                                                                 state.step >= cfg.max_steps):
                trained_records += fit_epoch(ddp_model, model, task.train, optimizer, scheduler, cfg, dist, state,
                                             stop, out if dist.main else None)
                if stop.hit:
                    break
                val_metrics = task.validate(model)
                state.epoch += 1
                state.batch_in_epoch = 0
                record = {"epoch": state.epoch, "step": state.step, "train_loss": state.epoch_loss, **val_metrics}
                state.history.append(record)
                early_stopping_update(state, model, val_metrics, cfg)
                if dist.main:
                    append_jsonl(out / "metrics.jsonl", record)
                    save_state(state_dir, model, optimizer, scheduler, state)
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in val_metrics.items() if isinstance(v, float))
                    log(f"epoch {state.epoch}: train_loss {state.epoch_loss:.4f}  {shown}"
                        + ("  (best)" if state.best_epoch == state.epoch else ""))
        if stop.hit:
            if dist.main:
                save_state(state_dir, model, optimizer, scheduler, state)
                warn(f"interrupted: resumable state saved in {state_dir}; continue with --resume")
            return 130
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    if state.best_state is not None:
        model.load_state_dict(state.best_state, strict=False)  # restore the best weights (early stopping)
    final = task.validate(model)
    summary = {"output": str(out), "epochs": state.epoch, "steps": state.step, "best_epoch": state.best_epoch,
               "monitor": cfg.monitor, "best": state.best, "stopped_early": state.stopped_early, **final,
               "train_records_per_s": round(trained_records * dist.world / elapsed, 1) if elapsed else None,
               "world_size": dist.world}
    if dist.main:
        task.save(model, out, final)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(state.history, out / "training_curves.png")
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
        emit(summary)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return 0


# ---------------------------------------------------------------- pieces

@dataclasses.dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_loss: float = 0.0
    epoch_losses: list = dataclasses.field(default_factory=list)  # step losses of the current epoch
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = dataclasses.field(default_factory=list)
    best_state: dict | None = None


class StopFlag:
    """SIGINT sets a flag; the loop finishes the current step, saves, and exits cleanly."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.hit = True

        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def auto_class_weights(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse class frequency, normalized to mean 1."""
    counts = torch.bincount(labels[labels >= 0], minlength=n).float().clamp(min=1)
    w = counts.sum() / (n * counts)
    return w / w.mean()


def make_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; pretrained backbone at --backbone-lr, new layers at --lr; decay only on matrices."""
    backbone = {id(p) for p in model.backbone_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.dim() >= 2), []).append(p)
    params = [{"params": ps, "lr": cfg.backbone_lr if is_bb else cfg.lr,
               "weight_decay": cfg.weight_decay if is_matrix else 0.0}
              for (is_bb, is_matrix), ps in sorted(groups.items())]
    try:  # the fused kernel (one pass over all tensors) is ~20% faster per step than foreach, CPU and GPU
        return torch.optim.AdamW(params, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total: int):
    warmup = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress_ = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress_)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int, dist: Dist) -> list[int]:
    """Deterministic shuffle per epoch; each rank takes every world-th index (like DistributedSampler)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if dist.world > 1:
        order += order[: (-len(order)) % dist.world]  # pad so every rank gets the same number
        order = order[dist.rank::dist.world]
    return order


def fit_epoch(ddp_model, model, train: Any, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist,
              state: TrainState, stop: StopFlag, out: Path | None) -> int:
    """One pass over the training split; returns the number of records seen."""
    ddp_model.train()
    order = epoch_order(len(train), cfg.seed, state.epoch, dist)
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    if state.batch_in_epoch == 0:
        state.epoch_losses = []
    losses, seen = state.epoch_losses, 0
    with progress(f"epoch {state.epoch + 1}/{cfg.epochs}", total=len(batches), unit="batches") as advance:
        advance(state.batch_in_epoch)
        for b in range(state.batch_in_epoch, len(batches)):
            batch = train.batch(batches[b], dist.device)
            with autocast:
                ce = ddp_model(batch)["loss"]
            l2_term, l1_term = penalty(model, cfg.l2, cfg.l1)
            loss = ce + l2_term + l1_term  # the L2/L1 penalties are part of the objective
            (loss / cfg.grad_accum).backward()
            seen += len(batches[b])
            state.batch_in_epoch = b + 1
            if state.batch_in_epoch % cfg.grad_accum == 0 or b == len(batches) - 1:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                losses.append(ce.item())
                if out is not None:
                    append_jsonl(out / "metrics.jsonl", {"step": state.step, "epoch": state.epoch + 1,
                                                         "loss": loss.item(), "ce": ce.item(), "l2": l2_term.item(),
                                                         "l1": l1_term.item(), "lr": scheduler.get_last_lr()[-1]})
            advance(1, info=f"loss {ce.item():.4f}")
            if stop.hit or (cfg.max_steps and state.step >= cfg.max_steps):
                break
    state.epoch_loss = float(np.mean(losses)) if losses else float("nan")
    return seen


@torch.no_grad()
def predict_table(model, table: FeatureTable, device, batch_size: int, drop: frozenset = frozenset()
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(probabilities (N, C), gold ids (N,), mean gate weights or None) over a table."""
    model.eval()
    probs, golds, gates = [], [], []
    for batch in table.batches(batch_size, device):
        gold = batch.pop("labels", None)
        out = model(batch, drop=drop)
        probs.append(out["logits"].float().softmax(-1).cpu())
        if gold is not None:
            golds.append(gold.cpu())
        if out["gates"] is not None:
            gates.append(out["gates"].float().cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, model.cfg.num_labels))
    g = torch.cat(golds).numpy() if golds else np.full(len(p), -100)
    return p, g, (torch.cat(gates).numpy() if gates else None)


def validate(model, val: FeatureTable, labels: list[str], device, batch_size: int) -> dict:
    probs, gold, _ = predict_table(model, val, device, batch_size)
    keep = gold >= 0
    logp = np.log(np.clip(probs[keep], 1e-12, 1))
    cw = model.class_weights
    w = cw.cpu().numpy()[gold[keep]] if cw is not None else np.ones(keep.sum())
    loss = float(-(w * logp[np.arange(keep.sum()), gold[keep]]).sum() / max(w.sum(), 1e-12))
    m = classification(gold, probs.argmax(1), labels)
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_f1": m["macro_f1"]}


def early_stopping_update(state: TrainState, model, metrics: dict, cfg: FinetuneConfig) -> None:
    """Track the best --monitor value; keep its weights; stop after --patience epochs without improvement."""
    value = metrics[cfg.monitor]
    lower_is_better = cfg.monitor == "val_loss"
    improved = state.best is None or (state.best - value > cfg.min_delta if lower_is_better
                                      else value - state.best > cfg.min_delta)
    if improved:
        state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        state.best_state = trainable_state(model)
    else:
        state.bad_epochs += 1
        if cfg.patience and state.bad_epochs >= cfg.patience:
            state.stopped_early = True
            log(f"early stopping: no {cfg.monitor} improvement > {cfg.min_delta} for {cfg.patience} epochs; "
                f"best epoch {state.best_epoch}")


def trainable_state(model: torch.nn.Module) -> dict:
    """Copies of what training changes (trainable parameters and buffers); frozen weights stay as loaded."""
    state = model.state_dict(keep_vars=True)
    return {k: v.detach().cpu().clone() for k, v in state.items()
            if not isinstance(v, torch.nn.Parameter) or v.requires_grad}


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- resumable state (safetensors + weights-only torch)

def save_state(folder: Path, model, optimizer, scheduler, state: TrainState) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(tmp / "model.safetensors"))
    if state.best_state is not None:
        save_file(state.best_state, str(tmp / "best.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    fields = {k: v for k, v in dataclasses.asdict(state).items() if k != "best_state"}
    (tmp / "state.json").write_text(json.dumps(fields, indent=2))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def load_state(folder: Path, model, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file():
        raise UserError(f"--resume: no resumable state in {folder}")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)  # tensors only, no pickle code
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    state = TrainState(**json.loads((folder / "state.json").read_text()))
    if (folder / "best.safetensors").is_file():
        state.best_state = load_file(str(folder / "best.safetensors"))
    return state


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a.set_xlabel("epoch")
    a.legend()
    shown = [k for k in ("val_accuracy", "val_f1", "val_bleu", "val_chrf") if k in history[0]]
    for key in shown:
        b.plot(epochs, [h[key] for h in history], label=key)
    b.set_xlabel("epoch")
    if shown:
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
