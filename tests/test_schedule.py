"""The training schedule: a step budget, bounded warmup, early stopping that cannot fire before learning."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from mmllm.config import FinetuneConfig
from mmllm.loop import LOSS_FELL, TrainState, early_stopping_update, plan_schedule


def cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(prepared="p", output="o", **kw)


def test_budget_gives_small_data_more_epochs_and_large_data_fewer():
    small = plan_schedule(cfg(batch_size=32), n_train=320, world=1)  # 10 steps an epoch
    large = plan_schedule(cfg(batch_size=32), n_train=320_000, world=1)  # 10,000 steps an epoch
    assert (small.steps_per_epoch, small.epochs, small.total_steps) == (10, 150, 1500)
    assert (large.epochs, large.total_steps) == (2, 20_000)  # never fewer than 2 epochs
    assert small.epochs_from == "--budget-steps"
    tiny = plan_schedule(cfg(batch_size=32), n_train=8, world=1)  # 1 step an epoch: capped at 200 epochs
    assert tiny.epochs == 200


def test_explicit_epochs_max_steps_and_bounded_warmup():
    p = plan_schedule(cfg(epochs=7, batch_size=10, grad_accum=2), n_train=100, world=1)
    assert (p.epochs, p.steps_per_epoch, p.total_steps, p.epochs_from) == (7, 5, 35, "--epochs")
    assert p.warmup_steps == 3  # 10% of 35
    big = plan_schedule(cfg(epochs=100, batch_size=1), n_train=1000, world=1)
    assert big.warmup_steps == 100  # 10% of 100,000 steps, bounded by --max-warmup-steps
    capped = plan_schedule(cfg(epochs=10, batch_size=1, max_steps=50), n_train=100, world=2)
    assert (capped.steps_per_epoch, capped.total_steps) == (50, 50)


def run_epochs(state: TrainState, config: FinetuneConfig, losses_and_vals, warmup: int = 0, steps_per_epoch: int = 10):
    model = torch.nn.Linear(2, 2)
    for train_loss, val_loss in losses_and_vals:
        state.step += steps_per_epoch
        state.epoch += 1
        state.epoch_loss = train_loss
        if state.initial_loss is None:
            state.initial_loss = train_loss
        early_stopping_update(state, model, {"val_loss": val_loss}, config, warmup)
        if state.stopped_early:
            break
    return state


def test_no_stop_inside_warmup_or_before_min_steps():
    c = cfg(patience=2, min_steps=50)
    # the loss falls from the start but val_loss never improves after epoch 1: only epochs after step 50 count
    s = run_epochs(TrainState(), c, [(1.0, 0.5)] + [(0.5, 0.6)] * 10, warmup=20)
    assert s.stopped_early and s.epoch == 7  # steps 60 and 70 are the first two bad epochs that count
    s = run_epochs(TrainState(), cfg(patience=2, min_steps=0), [(1.0, 0.5)] + [(0.5, 0.6)] * 10, warmup=45)
    assert s.stopped_early and s.epoch == 6  # warmup ends at step 45: epochs at 50 and 60 count
    assert "after warmup" in s.stop_reason and "best epoch 1" in s.stop_reason


def test_no_stop_before_the_training_loss_falls():
    c = cfg(patience=2, min_steps=0)
    flat = run_epochs(TrainState(), c, [(0.693, 0.69)] + [(0.693, 0.70)] * 20)
    assert not flat.stopped_early and flat.bad_epochs == 0  # ln 2 all along: nothing learnt, never stop
    fell = run_epochs(TrainState(), c, [(0.693, 0.69)] + [(0.693 * LOSS_FELL * 0.99, 0.70)] * 20)
    assert fell.stopped_early and fell.epoch == 3


@pytest.mark.parametrize("extra, reason", [((), "finished: all"), (("--max-steps", "3"), "stopped: step budget")])
def test_stop_reason_and_schedule_are_saved(prepared, tmp_path, extra, reason):
    out = tmp_path / "ck"
    r = run_cli("finetune", str(prepared), "--output", str(out), "--modalities", "image", "--budget-steps", "6",
                "--hidden-size", "16", *extra)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stop_reason"].startswith(reason)
    sched = metrics["schedule"]
    assert sched["epochs_from"] == "--budget-steps"
    assert sched["epochs"] * sched["steps_per_epoch"] >= 6
    saved = json.loads((out / "finetune_config.json").read_text())
    assert saved["epochs"] == sched["epochs"]  # the saved config is what ran
    assert "schedule:" in r.stderr
