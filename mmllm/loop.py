"""The training loop shared by every task: fit / validate per epoch, early stopping, resumable state.

An explicit loop in small functions: fit_epoch -> validate -> early stopping -> save. Runs alone or under
`torchrun` (DDP: gloo on CPU, nccl on GPU; rank 0 writes). A resumable state (weights, optimizer, scheduler,
RNG, step) is written after every epoch and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm import checkpoint, outputs
from mmllm.config import FinetuneConfig, check_resume, fp16_rule, save_resolved
from mmllm.console import emit, log, progress, warn
from mmllm.errors import UserError, read_json
from mmllm.model import penalty
from mmllm.runtime import Dist
from mmllm.tasks import Training

STATE_DIR = "resume"
# an mmllm checkpoint folder, finished or interrupted (a run interrupted before markers existed has resume/)
CHECKPOINT = outputs.Kind("a checkpoint", True, lambda p: checkpoint.is_checkpoint(p)
                          or (p / STATE_DIR / "state.json").is_file(), checkpoint.MARKER,
                          frozenset({checkpoint.MARKER, "README.md", "model.safetensors", "config.json", "labels.json",
                                     "text_model", "decoder", "metrics.jsonl", "metrics.json", "finetune_config.json",
                                     "training_curves.png", "tensorboard", "retrieval.safetensors",
                                     "retrieval.json", STATE_DIR, STATE_DIR + ".tmp",
                                     STATE_DIR + ".old"}))
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS = 2, 200  # bounds of the epochs derived from --budget-steps
# early stopping may act after --min-steps (and the warmup) or after this many epochs, whichever comes first: a small
# dataset (5 steps an epoch) stops a few epochs after its best instead of running 60 epochs to reach 300 steps
MIN_EPOCHS = 10
LOSS_FELL = 0.98  # early stopping waits until the epoch's training loss is below 98% of the first steps' loss


def train(task: Training, cfg: FinetuneConfig, dist: Dist) -> int:
    """The loop: epochs of fit + validate, early stopping, resumable state, final checkpoint (rank 0).

    Ctrl-C or SIGTERM: the step in progress finishes, the resumable state is saved, exit 130 / 143. With
    --overwrite the run writes beside the old checkpoint (`unfinished`), which stays whole until the new one
    is complete; a failed run (diverged, disk full) never replaces it."""
    out = Path(cfg.output)
    folder = output_folder(cfg, out) if dist.main else out
    with failing(folder, out, dist):
        run = start_run(task, cfg, dist, out, folder)
    cfg = run.cfg  # the resolved options: what runs and what finetune_config.json says
    stop = StopFlag()
    start = time.perf_counter()
    try:
        with stop, failing(folder, out, dist):
            trained_records = run_epochs(task, run, cfg, dist, stop, run.folder)
            if stop.hit:
                if dist.main:
                    save_state(run.folder / STATE_DIR, task.model, run.optimizer, run.scheduler, run.state)
                    kept = f"{out} is unchanged; this run's state is in {run.folder / STATE_DIR}" \
                        if run.folder != out else f"resumable state saved in {out / STATE_DIR}"
                    warn(f"interrupted: {kept}; continue with --resume")
                return stop.code
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
    with failing(folder, out, dist):
        finish(task, run, cfg, dist, out, trained_records, time.perf_counter() - start)
    if dist.world > 1:
        torch.distributed.barrier()  # rank 0 saved alone: no rank tears down gloo while a peer may still use it
        torch.distributed.destroy_process_group()
    return 0


@dataclasses.dataclass
class Run:
    """What one training run carries between epochs."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainState
    ddp_model: torch.nn.Module
    plan: Schedule
    folder: Path  # where rank 0 writes: --output, or (--overwrite) a fresh folder that replaces it at the end
    scaler: Any = None  # torch.amp.GradScaler: scales the fp16 loss (disabled for fp32/bf16)
    report: Any = None  # --report-to tensorboard: called with every metrics.jsonl record (rank 0)
    cfg: FinetuneConfig | None = None  # the options resolved by the plan (epochs); the caller's config is untouched


def start_run(task: Training, cfg: FinetuneConfig, dist: Dist, out: Path, folder: Path) -> Run:
    """Optimizer, schedule and state (fresh or resumed); the output folder's metrics log and resolved config."""
    model = task.model
    plan = plan_schedule(cfg, len(task.train), dist.world)
    cfg = dataclasses.replace(cfg, epochs=plan.epochs)  # the saved config says what ran
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, plan.total_steps, plan.warmup_steps)
    state = TrainState()
    if cfg.resume:
        # refuses options that would change the model or the data (the run's own folder: --output or beside it)
        changed = check_resume(dataclasses.replace(cfg, output=str(folder)))
        state = load_state(folder / STATE_DIR, model, optimizer, scheduler)
        if dist.main:
            trim_metrics(folder / "metrics.jsonl", state)
        applied = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items() if k not in ("output", "device"))
        log(f"resumed at epoch {state.epoch}, step {state.step}" + (f"; applying {applied}" if applied else ""))
    ddp_model = model
    if dist.world > 1:
        ddp_model = wrap_ddp(model)
    if dist.main:
        save_resolved(cfg, folder / "finetune_config.json")
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
    resumed = state.step + 1 if cfg.resume else None  # hide what an interrupted run logged past its saved state
    report = TensorBoard(folder / "tensorboard", resumed) if cfg.report_to == "tensorboard" and dist.main else None
    return Run(optimizer, scheduler, state, ddp_model, plan, folder, scaler, report, cfg)


def wrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """DDP over `model`. New layers always take part in the loss (a missing modality is a learned placeholder, not a
    skipped branch), so DDP looks for unused parameters only when a pretrained backbone trains: the text model's
    pooler (mean pooling instead) gets no gradient. PyTorch's warning that it found none is then expected."""
    import warnings

    unused = bool(model.backbone_parameters())
    if unused:
        warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified")
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)


def unfinished(out: Path) -> Path:
    """Where an --overwrite run writes, beside the checkpoint it replaces once it is complete: `CKPT.unfinished`.
    The old checkpoint stays whole meanwhile; an interrupted run's state stays here, and --resume finds it."""
    out = outputs.real(Path(out))
    return out.with_name(out.name + ".unfinished")


def has_state(folder: Path) -> bool:
    """`folder` holds a resumable state (save_state's, or the one it was replacing when killed)."""
    return any((folder / name / "state.json").is_file() for name in (STATE_DIR, STATE_DIR + ".old"))


def check_output(cfg: FinetuneConfig) -> bool:
    """Refuse an --output this run must not write (mmllm.outputs); True when the run writes `unfinished(out)`,
    which replaces --output when the run is complete."""
    out = Path(cfg.output)
    side = unfinished(out)
    side_flag, side_advice = "--output's unfinished run", "move it away"
    if cfg.resume:  # the run's own folder: continued, never replaced
        if has_state(side):  # an interrupted --overwrite run
            outputs.check(side, CHECKPOINT, [cfg.prepared], overwrite=True, flag=side_flag, advice=side_advice)
            return True
        outputs.check(out, CHECKPOINT, [cfg.prepared], overwrite=True)
        return False
    if not cfg.overwrite and (has_state(side) or ((out / STATE_DIR).is_dir() and CHECKPOINT.ours(out))):
        where = side if has_state(side) else out
        raise UserError(f"--output {out} has an unfinished run in {where}: add --resume to continue it, --overwrite "
                        "to start over, or choose another folder")
    replaces = outputs.check(out, CHECKPOINT, [cfg.prepared], cfg.overwrite)
    if replaces:
        outputs.check(side, CHECKPOINT, [cfg.prepared], overwrite=True, flag=side_flag, advice=side_advice)
    return replaces


def output_folder(cfg: FinetuneConfig, out: Path) -> Path:
    """The folder rank 0 writes, marked as a checkpoint from the start: --output itself when it is new, empty
    or resumed there; with --overwrite of a checkpoint (or resuming such a run), `unfinished(out)` beside it."""
    replaces = check_output(cfg)
    folder = unfinished(out) if replaces else out
    if cfg.resume:
        return folder
    if replaces:
        shutil.rmtree(folder, ignore_errors=True)  # an earlier unfinished run of this output: --overwrite starts over
    checkpoint.write_marker(folder)
    return folder


@contextlib.contextmanager
def failing(folder: Path, out: Path, dist: Dist):
    """A run that fails never passes for a finished one and never touches the previous checkpoint: a write that
    fails (disk full, read-only) is one line naming the folder; an `unfinished` folder with nothing to resume
    is removed."""
    try:
        yield
    except BaseException as e:
        if not dist.main:
            raise
        if folder != out and not has_state(folder):
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:
            kept = [f"{out} is unchanged"] if folder != out and out.exists() else []
            if has_state(folder):
                kept.append(f"the last saved state in {folder / STATE_DIR} is kept for --resume")
            raise UserError(f"could not write {folder}: {e.strerror or e}: free space there (or choose another "
                            f"--output) and run again" + "".join(f"; {k}" for k in kept)) from None
        raise


def trim_metrics(path: Path, state: TrainState) -> None:
    """metrics.jsonl without what a killed run logged after its last saved state (steps after state.step,
    epochs after state.epoch, a line cut short): the resumed run logs those again, so no step repeats."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("step", 0) <= state.step and ("train_loss" not in record or record["epoch"] <= state.epoch):
            kept.append(line + "\n")
    with outputs.atomic_file(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


def run_epochs(task: Training, run: Run, cfg: FinetuneConfig, dist: Dist, stop: StopFlag, out: Path) -> int:
    """Epochs until the budget, early stopping or Ctrl-C; returns the number of records trained on."""
    state, model = run.state, task.model
    trained_records = 0
    while (state.epoch < cfg.epochs and not state.stopped_early and not stop.hit
           and not (cfg.max_steps and state.step >= cfg.max_steps)):
        trained_records += fit_epoch(run.ddp_model, model, task.train, run.optimizer, run.scheduler, cfg, dist, state,
                                     stop, out if dist.main else None, scaler=run.scaler, report=run.report)
        if stop.hit:
            break
        val_metrics = task.validate(model)
        for key, value in val_metrics.items():
            if isinstance(value, float):
                check_finite(value, key, state, cfg)
        state.epoch += 1
        state.batch_in_epoch = 0
        record = {"epoch": state.epoch, "step": state.step, "train_loss": state.epoch_loss, **val_metrics}
        state.history.append(record)
        if state.initial_loss is None and state.epoch_losses:
            state.initial_loss = float(np.mean(state.epoch_losses[:5]))
        early_stopping_update(state, model, val_metrics, cfg, run.plan.stop_from)
        if dist.main:
            append_jsonl(out / "metrics.jsonl", record)
            if run.report is not None:
                run.report(record)
            save_state(out / STATE_DIR, model, run.optimizer, run.scheduler, state)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in val_metrics.items() if isinstance(v, float))
            log(f"epoch {state.epoch}: train_loss {state.epoch_loss:.4f}  {shown}"
                + ("  (best)" if state.best_epoch == state.epoch else ""))
    return trained_records


def finish(task: Training, run: Run, cfg: FinetuneConfig, dist: Dist, out: Path, trained_records: int,
           elapsed: float) -> None:
    """Restore the best weights, validate them, write the checkpoint and summary (rank 0)."""
    state, model = run.state, task.model
    if state.best_state is not None:
        model.load_state_dict(state.best_state, strict=False)  # restore the best weights (early stopping)
    final = task.validate(model)
    if not state.stop_reason:
        budget = cfg.max_steps and state.step >= cfg.max_steps
        state.stop_reason = (f"stopped: step budget (--max-steps {cfg.max_steps})" if budget
                             else f"finished: all {cfg.epochs} epochs ({run.plan.epochs_from})")
    log(state.stop_reason)
    summary = {"output": str(out), "epochs": state.epoch, "steps": state.step, "best_epoch": state.best_epoch,
               "monitor": cfg.monitor, "best": state.best, "stopped_early": state.stopped_early,
               "stop_reason": state.stop_reason, "schedule": dataclasses.asdict(run.plan), **final,
               "train_records_per_s": round(trained_records * dist.world / elapsed, 1) if elapsed else None,
               "world_size": dist.world}
    if dist.main:
        # metrics.json first: the model card (written by save) states which epoch's weights these are
        (run.folder / "metrics.json").write_text(json_text(summary, indent=2) + "\n")
        task.save(model, run.folder, final)
        plot_curves(state.history, run.folder / "training_curves.png", state.best_epoch)
        if run.report is not None:
            run.report.close()
        for name in (STATE_DIR, STATE_DIR + ".tmp", STATE_DIR + ".old"):
            shutil.rmtree(run.folder / name, ignore_errors=True)
        if run.folder != out:
            outputs.replace(run.folder, out, CHECKPOINT)
        emit(finite(summary))


@dataclasses.dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    epoch_loss: float = 0.0
    epoch_losses: list = dataclasses.field(default_factory=list)  # step losses of the current epoch
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one
    stopped_early: bool = False
    stop_reason: str = ""
    initial_loss: float | None = None  # mean loss of the first optimizer steps: has training started to learn?
    history: list = dataclasses.field(default_factory=list)
    best_state: dict | None = None


class StopFlag:
    """SIGINT (Ctrl-C) or SIGTERM sets a flag; the loop finishes the current step, saves, and exits with
    `code` (130 or 143: 128 + the signal, as a shell reports it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.hit = False
        self.code = 130
        self._old: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if not self.hit:
                self.code = 128 + signum
            self.hit = True

        try:
            self._old = {s: signal.signal(s, handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def make_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; pretrained backbone at --backbone-lr, new layers at --lr; decay only on matrices."""
    backbone = {id(p) for p in model.backbone_parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, p.dim() >= 2), []).append(p)
    if not any(p.numel() for ps in groups.values() for p in ps):
        raise UserError("nothing to train: every weight of this model is frozen (see --lora-r, --train-decoder, "
                        "--no-freeze-text, --modalities)")
    params = [{"params": ps, "lr": cfg.backbone_lr if is_bb else cfg.lr,
               "weight_decay": cfg.weight_decay if is_matrix else 0.0}
              for (is_bb, is_matrix), ps in sorted(groups.items())]
    try:  # the fused kernel (one pass over all tensors) is ~20% faster per step than foreach, CPU and GPU
        return torch.optim.AdamW(params, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params)


@dataclasses.dataclass
class Schedule:
    """The training budget, fixed before the first step (printed and saved in metrics.json)."""

    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    min_steps: int
    epochs_from: str  # "--epochs" or "--budget-steps"
    stop_from: int = 0  # early stopping may act once this step is passed (see `stop_from`)


def plan_schedule(cfg: FinetuneConfig, n_train: int, world: int) -> Schedule:
    """Epochs from --budget-steps unless --epochs is given (small data: more epochs, large data: fewer)."""
    steps_per_epoch = max(1, math.ceil(math.ceil(n_train / world / cfg.batch_size) / cfg.grad_accum))
    if cfg.epochs is None:
        epochs = min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(cfg.budget_steps / steps_per_epoch)))
        source = "--budget-steps"
    else:
        epochs, source = cfg.epochs, "--epochs"
    total = min(cfg.max_steps, steps_per_epoch * epochs) if cfg.max_steps else steps_per_epoch * epochs
    warmup = min(int(cfg.warmup_ratio * total), cfg.max_warmup_steps)
    start, why = stop_from(warmup, cfg.min_steps, steps_per_epoch)
    plan = Schedule(epochs, steps_per_epoch, total, warmup, cfg.min_steps, source, start)
    if not cfg.patience:
        stopping = "early stopping is off (--patience 0)."
    else:
        stopping = (f"early stopping ends the run {cfg.patience} epochs after the best one (--patience), but not "
                    f"before step {start} ({why}) nor before the training loss falls below {LOSS_FELL:.0%} of "
                    "its start.")
    log(f"schedule: {epochs} epochs ({source}) x {steps_per_epoch} steps = {total} optimizer steps, warmup "
        f"{warmup} steps; {stopping}")
    return plan


def stop_from(warmup: int, min_steps: int, steps_per_epoch: int) -> tuple[int, str]:
    """The step after which early stopping may act, and why: the end of warmup and --min-steps, or MIN_EPOCHS
    epochs when those are fewer steps (small data)."""
    floor, why = max(warmup, min_steps), "--min-steps" if min_steps >= warmup else "the warmup"
    if MIN_EPOCHS * steps_per_epoch < floor:
        return MIN_EPOCHS * steps_per_epoch, f"{MIN_EPOCHS} epochs: fewer steps than {why} {floor}"
    return floor, f"{why} {floor}" if floor else "no minimum"


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total: int, warmup: int):

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


GROUP_BATCHES = 16  # batches per length-sorted group of the shuffled order


def epoch_batches(order: list[int], batch_size: int, grad_accum: int, lengths: list[int] | None
                  ) -> list[list[int]]:
    """Consecutive batches of the shuffled order. With per-record token lengths (a text model or decoder that
    runs in every step), each group of GROUP_BATCHES x batch_size x grad_accum records is first sorted by length
    (stable: ties stay shuffled), so a batch pads to similar lengths instead of to the longest record of the
    split; the groups stay random, and an optimizer step's micro-batches are cut from one group."""
    if lengths is not None:
        size = GROUP_BATCHES * batch_size * grad_accum
        order = [i for g in range(0, len(order), size) for i in sorted(order[g:g + size], key=lengths.__getitem__)]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def fit_epoch(ddp_model, model, train: Any, optimizer, scheduler, cfg: FinetuneConfig, dist: Dist,
              state: TrainState, stop: StopFlag, out: Path | None, scaler: Any = None, report: Any = None) -> int:
    """One pass over the training split; returns the number of records seen."""
    scaler = scaler or torch.amp.GradScaler(dist.device.type, enabled=False)  # fp16: scale the loss (see Run)
    ddp_model.train()
    order = epoch_order(len(train), cfg.seed, state.epoch, dist)
    batches = epoch_batches(order, cfg.batch_size, cfg.grad_accum, getattr(train, "lengths", None))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(dist.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    if state.batch_in_epoch == 0:
        state.epoch_losses = []
    losses, seen = state.epoch_losses, 0
    with progress(f"epoch {state.epoch + 1}/{cfg.epochs}", total=len(batches), unit="batches") as advance:
        advance(state.batch_in_epoch)
        for b in range(state.batch_in_epoch, len(batches)):
            batch = train.batch(batches[b], dist.device)
            last_micro = (b + 1) % cfg.grad_accum == 0 or b == len(batches) - 1
            # DDP: gradients of the earlier micro-batches accumulate locally; only the last one all-reduces
            sync = contextlib.nullcontext() if last_micro or ddp_model is model else ddp_model.no_sync()
            with sync:
                with autocast:
                    ce = ddp_model(batch)["loss"]
                l2_term, l1_term = penalty(model, cfg.l2, cfg.l1)
                loss = ce + l2_term + l1_term  # the L2/L1 penalties are part of the objective
                check_finite(loss.item(), "the training loss", state, cfg)  # never step on (or save) NaN
                scaler.scale(loss / cfg.grad_accum).backward()
            seen += len(batches[b])
            state.batch_in_epoch = b + 1
            if last_micro:
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)  # skipped when a scaled fp16 gradient overflowed
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                losses.append(ce.item())
                if out is not None:
                    step_record = {"step": state.step, "epoch": state.epoch + 1, "loss": loss.item(), "ce": ce.item(),
                                   "l2": l2_term.item(), "l1": l1_term.item(), "lr": scheduler.get_last_lr()[-1]}
                    append_jsonl(out / "metrics.jsonl", step_record)
                    if report is not None:
                        report(step_record)
            advance(1, info=f"loss {ce.item():.4f}")
            # Ctrl-C ends the loop only after an optimizer step: unsaved accumulated gradients are never lost
            if last_micro and (stop.hit or (cfg.max_steps and state.step >= cfg.max_steps)):
                break
    state.epoch_loss = float(np.mean(losses)) if losses else float("nan")
    return seen


def early_stopping_update(state: TrainState, model, metrics: dict, cfg: FinetuneConfig, start: int | None = None
                          ) -> None:
    """Track the best --monitor value; keep its weights; stop once --patience epochs have passed since the best.

    Nothing stops at or before step `start` (the plan's `stop_from`: warmup and --min-steps, at most MIN_EPOCHS
    epochs; default --min-steps) nor before the training loss has fallen below LOSS_FELL x its starting value:
    early stopping cannot fire before learning. Past those, the epochs are counted from the best one, so a run
    whose best came early stops as soon as it may."""
    start = cfg.min_steps if start is None else start
    value = metrics[cfg.monitor]
    lower_is_better = cfg.monitor == "val_loss"
    # an improvement must exceed --min-delta and --min-rel-delta x the best value so far
    margin = max(cfg.min_delta, (cfg.min_rel_delta or 0.0) * abs(state.best)) if state.best is not None else 0.0
    improved = state.best is None or (state.best - value > margin if lower_is_better else value - state.best > margin)
    if improved:
        state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        state.best_state = trainable_state(model)
        return
    state.bad_epochs = since = state.epoch - state.best_epoch
    learning = state.initial_loss is not None and state.epoch_loss < LOSS_FELL * state.initial_loss
    if state.step <= start or not learning:
        return  # too early to judge: warmup, the minimum step count, or a loss that has not fallen yet
    if cfg.patience and since >= cfg.patience:
        state.stopped_early = True
        rel = f" (or {cfg.min_rel_delta:g} x best)" if cfg.min_rel_delta else ""
        waited = f"; stopping could not start before step {start} and a falling training loss" \
            if since > cfg.patience else ""
        state.stop_reason = (f"stopped early at epoch {state.epoch}, {since} epochs since the best (epoch "
                             f"{state.best_epoch}, {cfg.monitor} {state.best:.4g}): no improvement > "
                             f"{cfg.min_delta:g}{rel} since (--patience {cfg.patience}){waited}")


def trainable_state(model: torch.nn.Module) -> dict:
    """Copies of what training changes (trainable parameters and buffers); frozen weights stay as loaded."""
    state = model.state_dict(keep_vars=True)
    return {k: v.detach().cpu().clone() for k, v in state.items()
            if not isinstance(v, torch.nn.Parameter) or v.requires_grad}


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) as None: what mmllm writes is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, **kw: Any) -> str:
    """Strict JSON (never NaN or Infinity) of a record or summary."""
    return json.dumps(finite(obj), allow_nan=False, **kw)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_text(record) + "\n")


def check_finite(value: float, what: str, state: TrainState, cfg: FinetuneConfig) -> None:
    """A non-finite loss or metric ends the run (one line, exit 2) before it is stepped on or saved."""
    if not math.isfinite(value):
        raise UserError(f"training diverged: {what} is {value} at step {state.step + 1} (epoch {state.epoch + 1}) "
                        f"with --lr {cfg.lr:g}: lower --lr (and --backbone-lr) or keep --grad-clip on; no checkpoint "
                        "was written, a previous one at --output is unchanged")


STATE_FILES = ("state.json", "model.safetensors", "optimizer.pt")  # best.safetensors too once an epoch was best


def save_state(folder: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """The resumable state, written beside `folder` and renamed onto it: a kill at any moment leaves the
    previous state or the new one, never a mixture."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a save cut short by kill -9
    tmp.mkdir(parents=True)
    checkpoint.save_weights(trainable_state(model), tmp / "model.safetensors")
    if state.best_state is not None:
        checkpoint.save_weights(state.best_state, tmp / "best.safetensors")
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's generator (dropout on GPU)
    with open(tmp / "optimizer.pt", "wb") as f:  # a file object: a full disk is an OSError, not a C++ message
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng}, f)
    fields = {k: v for k, v in dataclasses.asdict(state).items() if k != "best_state"}
    (tmp / "state.json").write_text(json_text(fields, indent=2))
    old = folder.with_name(folder.name + ".old")  # complete too: load_state falls back on it if killed just here
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, model, optimizer, scheduler) -> TrainState:
    """The interrupted run's weights, optimizer moments, schedule position, RNG and counters. The learning
    rates, weight decay and schedule of this invocation apply from the resumed step on (check_resume has
    refused the options that may not change). A state with a file missing or cut short is refused in one line."""
    from safetensors.torch import load_file

    if not (folder / "state.json").is_file() and (folder.with_name(folder.name + ".old") / "state.json").is_file():
        folder = folder.with_name(folder.name + ".old")  # killed between save_state's two renames
    if not (folder / "state.json").is_file():
        raise UserError(f"--resume: no resumable state in {folder}")

    def broken(name: str, why: str) -> UserError:
        return UserError(f"--resume: {folder / name} {why}: this resume state is incomplete and cannot be "
                         "continued; start over with --overwrite (without --resume)")

    try:
        fields = read_json(folder / "state.json")
        state = TrainState(**fields)
    except (UserError, TypeError) as e:
        raise broken("state.json", f"is unreadable ({type(e).__name__})") from None
    needed = list(STATE_FILES[1:]) + (["best.safetensors"] if state.best is not None else [])
    for name in needed:
        if not (folder / name).is_file():
            why = f"is missing (the state names best epoch {state.best_epoch})" if name == "best.safetensors" \
                else "is missing"
            raise broken(name, why)

    def tensors(name: str) -> dict:
        try:
            return load_file(str(folder / name))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a cut file
            raise broken(name, f"is damaged or cut short ({type(e).__name__})") from None

    weights = tensors("model.safetensors")
    if state.best is not None:
        state.best_state = tensors("best.safetensors")
    try:  # tensors only, no pickle code
        blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a cut zip archive or pickle: RuntimeError, EOFError, UnpicklingError
        raise broken("optimizer.pt", f"is damaged or cut short ({type(e).__name__})") from None
    if not isinstance(blob, dict) or not {"optimizer", "scheduler", "torch_rng"} <= set(blob):
        raise broken("optimizer.pt", "does not hold an optimizer, scheduler and RNG state")
    model.load_state_dict(weights, strict=False)
    wanted = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]  # this run's --lr etc.
    try:
        optimizer.load_state_dict(blob["optimizer"])
    except ValueError as e:
        raise UserError(f"--resume: the optimizer state in {folder} does not fit this model ({e})") from None
    scheduler.load_state_dict(blob["scheduler"])
    scheduler.base_lrs = [lr for lr, _ in wanted]
    for group, (lr, decay), factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = lr, decay
        group["lr"] = lr * factor(scheduler.last_epoch)  # what the schedule gives at the resumed step
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["cuda_rng"])
    return state


def preflight(cfg: FinetuneConfig, device: torch.device) -> None:
    """Refuse, before any model loads, what this run cannot do here: fp16 without CUDA, TensorBoard missing."""
    import importlib.util

    if problem := fp16_rule(cfg.precision, device.type):
        raise UserError(problem)
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--report-to tensorboard: the tensorboard package is not installed; "
                        "pip install 'mmllm[tensorboard]' (or tensorboard)")


class TensorBoard:
    """--report-to tensorboard: every metrics.jsonl record as scalars, all on one x-axis, the optimizer step.
    Each step: train/loss, train/ce, train/l2, train/l1, train/lr; each epoch, at its last step: train/epoch_loss,
    train/epoch and val/<metric> (val/loss, val/accuracy, ...). A resumed run (`purge_step`: the step after the
    saved state) hides what the interrupted one logged past that step, so no series steps backwards.
    View with `tensorboard --logdir OUTPUT/tensorboard`."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    @staticmethod
    def tag(key: str, per_epoch: bool) -> str | None:
        """The scalar's name: val_X -> val/X, an epoch's train_loss -> train/epoch_loss, a step's X -> train/X."""
        if key.startswith("val_"):
            return "val/" + key[4:]
        if per_epoch:
            return {"train_loss": "train/epoch_loss", "epoch": "train/epoch"}.get(key, f"train/{key}")
        return None if key == "epoch" else f"train/{key}"  # a step's epoch: the one in progress, not a value

    def __call__(self, record: dict) -> None:
        per_epoch = "train_loss" in record
        for key, value in record.items():
            tag = self.tag(key, per_epoch) if key != "step" else None
            if tag and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, record["step"])
        if per_epoch:
            self.writer.flush()  # an interrupted run keeps every finished epoch

    def close(self) -> None:
        self.writer.close()


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None) -> None:
    """training_curves.png: losses and validation metrics per epoch (see `curves_figure`)."""
    import matplotlib.pyplot as plt

    if not history:
        return
    fig = curves_figure(history, best_epoch)
    fig.savefig(path, dpi=100)
    plt.close(fig)


SERIES_STYLES = [("o", 9, "-"), ("s", 5, "--"), ("^", 4, ":"), ("D", 3, "-.")]  # (marker, size, line style)


def curves_figure(history: list[dict], best_epoch: int | None = None):
    """Losses (left) and validation metrics (right) per epoch: points with lines (a 1-epoch run shows its
    points), each series its own marker and dash (`SERIES_STYLES`: a series hidden under another still shows),
    whole-number epoch ticks, the best epoch (the weights kept) marked by a dashed line and stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = [(axes[0], ["train_loss", "val_loss"], "loss"),
              (axes[1], [k for k in ("val_accuracy", "val_f1", "val_bleu", "val_chrf") if k in history[0]], "metric")]
    for ax, keys, ylabel in panels:
        for n, key in enumerate(keys):  # series that coincide (accuracy = F1) stay distinguishable: each its own
            values = [h.get(key, float("nan")) for h in history]  # marker, size and dash, the first one hollow
            marker, size, dash = SERIES_STYLES[n % len(SERIES_STYLES)]
            line, = ax.plot(epochs, values, marker=marker, markersize=size, linestyle=dash,
                            markerfacecolor="none" if n == 0 else None, label=key.replace("_", " "))
            if best_epoch in epochs:
                ax.plot([best_epoch], [values[epochs.index(best_epoch)]], marker="*", markersize=13,
                        color=line.get_color(), linestyle="none")
        if best_epoch in epochs:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even for one epoch
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
