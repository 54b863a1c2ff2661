"""The training schedule: a step budget, bounded warmup, early stopping that cannot fire before learning."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from mmllm.config import FinetuneConfig
from mmllm.loop import LOSS_FELL, MIN_EPOCHS, TrainState, early_stopping_update, plan_schedule, stop_from


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


def run_epochs(state: TrainState, config: FinetuneConfig, losses_and_vals, start: int | None = None,
               steps_per_epoch: int = 10):
    model = torch.nn.Linear(2, 2)
    for train_loss, val_loss in losses_and_vals:
        state.step += steps_per_epoch
        state.epoch += 1
        state.epoch_loss = train_loss
        if state.initial_loss is None:
            state.initial_loss = train_loss
        early_stopping_update(state, model, {"val_loss": val_loss}, config, start)
        if state.stopped_early:
            break
    return state


def test_no_stop_inside_warmup_or_before_min_steps():
    c = cfg(patience=2, min_steps=50)
    # the loss falls from the start but val_loss never improves after epoch 1: nothing stops at or before step 50
    s = run_epochs(TrainState(), c, [(1.0, 0.5)] + [(0.5, 0.6)] * 10)
    assert s.stopped_early and s.epoch == 6  # step 60: the first epoch past the minimum, 5 epochs since the best
    assert s.stop_reason.startswith("stopped early at epoch 6, 5 epochs since the best (epoch 1, val_loss 0.5)")
    assert "could not start before step 50" in s.stop_reason  # why it ran past --patience
    s = run_epochs(TrainState(), cfg(patience=2, min_steps=0), [(1.0, 0.5)] + [(0.5, 0.6)] * 10,
                   start=stop_from(45, 0, 10)[0])
    assert s.stopped_early and s.epoch == 5  # warmup ends at step 45: step 50 is past it, 4 epochs since the best


def test_no_stop_before_the_training_loss_falls():
    c = cfg(patience=2, min_steps=0)
    flat = run_epochs(TrainState(), c, [(0.693, 0.69)] + [(0.693, 0.70)] * 20)
    assert not flat.stopped_early and flat.bad_epochs == 20  # ln 2 all along: nothing learnt, never stop
    fell = run_epochs(TrainState(), c, [(0.693, 0.69)] + [(0.693 * LOSS_FELL * 0.99, 0.70)] * 20)
    assert fell.stopped_early and fell.epoch == 3


def test_small_data_stops_within_patience_of_its_best():
    """Issue 25: 5 steps an epoch with --min-steps 300 ran 65 epochs for a best at epoch 12. The minimum is now
    at most MIN_EPOCHS epochs, and patience counts from the best epoch: the run stops `patience` epochs after its
    best (here 3) once the minimum is reached, and the message says how many epochs have passed since the best."""
    c = cfg(patience=5, min_steps=300)
    plan = plan_schedule(c, n_train=160, world=1)  # 5 steps an epoch, 200 epochs, warmup 100 steps
    assert (plan.steps_per_epoch, plan.warmup_steps, plan.min_steps) == (5, 100, 300)
    assert plan.stop_from == MIN_EPOCHS * 5 == 50  # not 300: ten epochs are fewer steps
    vals = [1.0, 0.8, 0.6] + [0.7 + 0.01 * i for i in range(60)]  # best at epoch 3, worse ever after
    s = run_epochs(TrainState(), c, [(1.0, vals[0])] + [(0.5, v) for v in vals[1:]], plan.stop_from, 5)
    assert s.best_epoch == 3 and s.stopped_early
    assert s.epoch == MIN_EPOCHS + 1  # step 55: the first epoch past the minimum; 8 epochs since the best
    assert s.stop_reason.startswith("stopped early at epoch 11, 8 epochs since the best (epoch 3, val_loss 0.6): "
                                    "no improvement > 0 since (--patience 5)")
    late = [1.0] + [0.9 - 0.01 * i for i in range(14)] + [0.9] * 40  # keeps improving until epoch 15
    s = run_epochs(TrainState(), c, [(1.0, late[0])] + [(0.5, v) for v in late[1:]], plan.stop_from, 5)
    assert (s.best_epoch, s.epoch) == (15, 20) and s.stopped_early  # past the minimum: exactly --patience after
    assert s.stop_reason.startswith("stopped early at epoch 20, 5 epochs since the best (epoch 15, ")
    assert "could not start" not in s.stop_reason
    # a larger dataset keeps --min-steps: 32 steps an epoch x 10 epochs is more than 300
    assert plan_schedule(c, n_train=1024, world=1).stop_from == 300
    assert stop_from(100, 0, 100) == (100, "the warmup 100")


def test_the_plan_line_says_when_early_stopping_may_act(capsys):
    plan_schedule(cfg(patience=5, min_steps=300), n_train=160, world=1)
    line = capsys.readouterr().err.replace("\n", " ")
    assert "early stopping ends the run 5 epochs after the best one (--patience), but not before step 50 " \
           "(10 epochs: fewer steps than --min-steps 300)" in line
    assert line.rstrip().endswith("its start.")  # a whole sentence
    plan_schedule(cfg(patience=0), n_train=160, world=1)
    assert "early stopping is off (--patience 0)." in capsys.readouterr().err


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
