"""Interrupted runs with real subprocesses: kill -9 and Ctrl-C lose nothing and resume exactly."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from conftest import ROOT



def env() -> dict:
    """The environment at call time (the autouse fixture has set this test's MMLLM_HOME)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for(predicate, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill_9_during_prepare_leaves_nothing_and_rerun_reuses_cache(tiny_models, tmp_path, isolated_home):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1500):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"id": i, "image": f"{i}.png", "label": str(i % 3)}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "mmllm", "-q", "prepare", str(tmp_path / "m.jsonl"), "--output", str(out),
           "--image-model", str(tiny_models["image"]), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    features = isolated_home / "features"
    assert wait_for(lambda: features.is_dir() and sum(1 for _ in features.rglob("*.safetensors")) > 300, proc), \
        "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing at the final path
    cached = sum(1 for _ in features.rglob("*.safetensors"))
    assert cached >= 300
    verbose = [c for c in cmd if c != "-q"]  # the features log line: "N encoded, M reused"
    done = subprocess.run(verbose, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum(json.loads(done.stdout)["counts"].values()) == 1500
    assert not list(tmp_path.glob(".prepared.tmp-*"))  # the killed run's temporary folder is cleaned up
    encoded, reused = map(int, re.search(r"features: (\d+) encoded, (\d+) reused", done.stderr).groups())
    assert reused >= cached and encoded == 1500 - reused  # what the killed run encoded is not encoded again
    assert sum(1 for _ in features.rglob("*.safetensors")) == 1500  # one cache file per distinct image
    rerun = subprocess.run(verbose[:3] + ["prepare", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "again"),
                                          "--image-model", str(tiny_models["image"])], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "features: 0 encoded, 1500 reused" in rerun.stderr


def finetune_cmd(prepared, out, *extra):
    return [sys.executable, "-m", "mmllm", "-q", "finetune", str(prepared), "--output", str(out), "--epochs", "12",
            "--batch-size", "1", "--hidden-size", "32", "--patience", "0", "--seed", "5", *extra]


def state_epoch(out):
    try:
        return json.loads((out / "resume" / "state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def test_kill_9_during_finetune_then_resume_matches(prepared, tmp_path):
    full = subprocess.run(finetune_cmd(prepared, tmp_path / "full"), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(finetune_cmd(prepared, out), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert wait_for(lambda: state_epoch(out) >= 2, proc), "finetune finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(finetune_cmd(prepared, out, "--resume"), cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    for key in ("val_loss", "val_accuracy", "val_f1", "steps", "best_epoch"):
        assert a[key] == b[key], key
    # what the killed run logged after its last saved state is dropped on resume: no step is logged twice
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" not in r] == list(range(1, a["steps"] + 1))
    assert [r["epoch"] for r in logged if "train_loss" in r] == list(range(1, 13))


def test_ctrl_c_saves_a_resumable_checkpoint(prepared, tmp_path):
    out = tmp_path / "sigint"
    proc = subprocess.Popen(finetune_cmd(prepared, out), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: state_epoch(out) >= 1, proc), "finetune finished before Ctrl-C"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["step"] > 0
    resumed = subprocess.run(finetune_cmd(prepared, out, "--resume"), cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0 and (out / "model.safetensors").is_file()
