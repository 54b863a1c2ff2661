"""The same finetune command under torchrun with 2 CPU processes (gloo DDP)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_torchrun_two_processes_matches_one(prepared, tmp_path):
    common = ["finetune", str(prepared), "--epochs", "6", "--batch-size", "8", "--hidden-size", "32", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mmllm", "-q", *common, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mmllm", "-q", *common, "--batch-size", "4", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads(one.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in two.stdout.strip().splitlines() if x.startswith("{")]
    assert len(lines) == 1, "only rank 0 writes the summary"
    b = lines[0]
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 0.25  # 12 validation records: within 3 records
    assert (tmp_path / "two" / "model.safetensors").is_file()
