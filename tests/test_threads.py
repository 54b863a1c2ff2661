"""Threads chosen for the work (mmllm.runtime): one for small models over stored features, every core for big
steps, --threads and OMP_NUM_THREADS first; the forward that measures a step leaves the run as it was."""

from __future__ import annotations

import pytest
import torch

from conftest import load_json_lines, run_cli


def test_choose_threads(monkeypatch):
    from mmllm import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 6)
    assert runtime.choose_threads(0, 2.3e8)[0] == 1  # the default fusion candidates on sample_data
    assert runtime.choose_threads(0, runtime.SMALL_STEP_FLOPS * 1.01)[0] == 6
    assert runtime.choose_threads(0, 4e10) == (6, "40 GFLOP per forward: every core")  # a MiniLM batch
    assert runtime.choose_threads(0, None)[0] == 6
    assert runtime.choose_threads(3, 1e6) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.choose_threads(0, 1e6) == (2, "OMP_NUM_THREADS")
    assert runtime.choose_threads(5, 1e6) == (5, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert runtime.choose_threads(0, 1e6)[0] == 1


def test_forward_flops_counts_the_matmuls_and_leaves_the_run_as_it_was():
    from mmllm.runtime import forward_flops

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.drop = torch.nn.Linear(16, 8), torch.nn.Dropout(0.5)

        def forward(self, batch):
            return {"loss": self.drop(self.a(batch["x"])).sum() + torch.rand(()).item() * 0}

    net = Net().train()
    state = torch.get_rng_state()
    assert forward_flops(net, {"x": torch.ones(4, 16)}) == 2 * 4 * 16 * 8
    assert net.training and torch.equal(torch.get_rng_state(), state)
    assert forward_flops(net, {"y": torch.ones(1)}) is None  # a forward that fails: not counted
    assert net.training


def test_finetune_picks_one_thread_for_small_models_and_restores_the_callers(prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    r = run_cli("finetune", prepared, "--output", tmp_path / "ck", "--epochs", "1", "--fusion", "concat")
    assert r.exit_code == 0, r.output
    line = [x for x in r.stderr.splitlines() if x.startswith("threads:")]
    assert len(line) == 1 and line[0].startswith("threads: 1 (") and "GFLOP per forward" in line[0], r.stderr
    assert torch.get_num_threads() == before
    r = run_cli("finetune", prepared, "--output", tmp_path / "ck2", "--epochs", "1", "--fusion", "concat",
                "--threads", "2")
    assert r.exit_code == 0 and "threads: 2 (--threads)" in r.stderr, r.output
    assert load_json_lines(r.stdout)[-1]["steps"] > 0 and torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["-1", "x"])
def test_threads_flag_is_checked(prepared, tmp_path, value):
    r = run_cli("finetune", prepared, "--output", tmp_path / "ck", "--threads", value)
    assert r.exit_code == 2 and "--threads" in r.stderr, r.output
