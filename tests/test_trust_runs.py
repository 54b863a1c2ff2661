"""Runs that never report a failure as success, and lose nothing (issue 21, sections 1, 2 and 5).

Ctrl-C / SIGTERM during `finetune --overwrite` keep the previous checkpoint whole (the new run's state lives
beside it and --resume finds it there); SIGTERM is handled like Ctrl-C (exit 143) and a resumed run never
repeats a step in metrics.jsonl; an incomplete resume state is refused in one line; a diverging run stops
with one line and writes no NaN; a full disk while saving is one line naming the folder; two prepare runs on
one output: the second is refused."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli, write_image

from mmllm import loop, outputs
from mmllm.errors import UserError


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def image_manifest(folder, n=16):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = ("red", "blue")[i % 2]
        write_image(folder / f"img{i}.png", (200, 30 + i, 30) if label == "red" else (30, 30 + i, 200))
        rows.append({"id": f"r{i}", "image": f"img{i}.png", "label": label})
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "m.jsonl"


@pytest.fixture
def image_data(tiny_models, tmp_path):
    """An image-only prepared dataset and a finished checkpoint trained on it."""
    r = run_cli("prepare", str(image_manifest(tmp_path / "data")), "--output", str(tmp_path / "p"),
                "--image-model", str(tiny_models["image"]), "--val-fraction", "0.25")
    assert r.exit_code == 0, r.output
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "ck"), *FAST, "--epochs", "2")
    assert r.exit_code == 0, r.output
    return tmp_path / "p", tmp_path / "ck"


FAST = ("--hidden-size", "16", "--batch-size", "1", "--patience", "0", "--seed", "3", "--fusion", "concat", "--quiet")


def finetune_cmd(prepared, out, *extra):
    return [sys.executable, "-m", "mmllm", "-q", "finetune", str(prepared), "--output", str(out), *FAST, *extra]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def state_epoch(folder):
    try:
        return json.loads((folder / "resume" / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(predicate, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def strict(text):
    """json.loads that refuses NaN and Infinity."""
    def refuse(name):
        raise ValueError(f"non-finite number {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def strict_json_files(*folders):
    """Every JSON / JSON lines file under `folders` parsed strictly; returns how many were read."""
    n = 0
    for folder in folders:
        for p in folder.rglob("*.json*") if folder.exists() else ():
            text = p.read_text(encoding="utf-8")
            if p.suffix == ".jsonl":
                for line in text.splitlines():
                    strict(line)
            else:
                strict(text)
            n += 1
    return n


def steps_never_repeat(metrics_jsonl):
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    steps = [r["step"] for r in records if "train_loss" not in r]
    epochs = [r["epoch"] for r in records if "train_loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps
    assert epochs == list(range(1, len(epochs) + 1)), epochs
    return steps, epochs


def one_line(stderr):
    """The one error line on stderr (warnings aside), no traceback."""
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------- 1. nothing lost

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupting_overwrite_keeps_the_old_checkpoint_and_resume_finds_the_new_run(image_data, sig, code):
    prepared, ck = image_data
    before = snapshot(ck)
    side = loop.unfinished(ck)
    proc = subprocess.Popen(finetune_cmd(prepared, ck, "--overwrite", "--epochs", "300"), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: state_epoch(side) >= 2, proc), "finetune finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "--resume" in err and f"{ck} is unchanged" in err
    assert snapshot(ck) == before  # the previous checkpoint, byte for byte
    assert (side / "resume" / "state.json").is_file() and not (side / "resume.tmp").exists()
    assert not (ck.parent / f".{ck.name}.lock").exists()
    r = run_cli("finetune", str(prepared), "--output", str(ck), *FAST, "--epochs", "300")
    assert r.exit_code == 2 and "unfinished run" in r.stderr and "--resume" in r.stderr  # not silently started over
    epochs = state_epoch(side) + 1
    resumed = subprocess.run(finetune_cmd(prepared, ck, "--resume", "--epochs", str(epochs)), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not side.exists() and (ck / "model.safetensors").is_file() and not (ck / "resume").exists()
    assert strict(resumed.stdout.splitlines()[-1])["epochs"] == epochs
    steps, _ = steps_never_repeat(ck / "metrics.jsonl")
    assert len(steps) == strict(resumed.stdout.splitlines()[-1])["steps"]


def test_sigterm_finishes_the_step_saves_and_resume_never_repeats_steps(image_data, tmp_path):
    prepared, _ = image_data
    out = tmp_path / "term"
    proc = subprocess.Popen(finetune_cmd(prepared, out, "--epochs", "300"), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: state_epoch(out) >= 1, proc), "finetune finished before SIGTERM"
    time.sleep(0.3)  # inside an epoch: its steps so far must be kept, not lost
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "resume.tmp").exists()
    state = json.loads((out / "resume" / "state.json").read_text())
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == state["step"]  # every logged step is in the saved state
    resumed = subprocess.run(finetune_cmd(prepared, out, "--resume", "--epochs", str(state["epoch"] + 2)), cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps, epochs = steps_never_repeat(out / "metrics.jsonl")
    assert len(epochs) == state["epoch"] + 2 and len(steps) == strict(resumed.stdout.splitlines()[-1])["steps"]


@pytest.fixture
def resume_state(image_data, tmp_path, monkeypatch):
    """A run stopped after its epochs, before the final save: `out/resume` holds a state with a best epoch."""
    prepared, _ = image_data
    out = tmp_path / "stopped"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "finish", interrupted)
        r = run_cli("finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "2")
    assert r.exit_code == 130, r.output
    assert json.loads((out / "resume" / "state.json").read_text())["best"] is not None
    assert (out / "resume" / "best.safetensors").is_file()
    return prepared, out


@pytest.mark.parametrize("name, damage", [("best.safetensors", "delete"), ("model.safetensors", "truncate"),
                                          ("optimizer.pt", "truncate"), ("best.safetensors", "truncate"),
                                          ("state.json", "truncate")])
def test_an_incomplete_resume_state_is_refused_in_one_line(resume_state, name, damage):
    prepared, out = resume_state
    path = out / "resume" / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = run_cli("finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "3", "--resume")
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert str(path) in line and "--resume" in line, line
    assert not (out / "model.safetensors").exists()  # nothing presented as finished


def test_the_intact_resume_state_resumes(resume_state):
    prepared, out = resume_state
    r = run_cli("finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "3", "--resume")
    assert r.exit_code == 0, r.output
    assert strict(r.stdout.splitlines()[-1])["epochs"] == 3 and (out / "model.safetensors").is_file()


def prepare_cmd(models, manifest, out):
    return [sys.executable, "-m", "mmllm", "-q", "prepare", str(manifest), "--output", str(out),
            "--image-model", str(models["image"]), "--batch-size", "1"]


def test_a_second_prepare_on_the_same_new_output_is_refused(tiny_models, tmp_path):
    big = image_manifest(tmp_path / "big", n=600)
    small = image_manifest(tmp_path / "small", n=8)
    out = tmp_path / "prepared"
    first = subprocess.Popen(prepare_cmd(tiny_models, big, out), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (tmp_path / ".prepared.lock").is_file(), first), "the first prepare took no lock"
    second = subprocess.run(prepare_cmd(tiny_models, small, out), cwd=ROOT, env=env(), capture_output=True,
                            text=True, timeout=120)
    still_running = first.poll() is None
    stdout, stderr = first.communicate(timeout=600)
    assert still_running, "the first prepare ended before the second one checked"
    assert second.returncode == 2, second.stderr
    assert "is being written by another mmllm run" in one_line(second.stderr) and not second.stdout
    assert first.returncode == 0, stderr[-2000:]
    assert sum(json.loads(stdout)["counts"].values()) == 600
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert sum(meta["counts"].values()) == 600  # the folder holds the first run's dataset
    assert not (tmp_path / ".prepared.lock").exists()


def test_replace_refuses_an_output_that_appeared_meanwhile(tmp_path):
    kind = outputs.marked_folder("a thing", "mark.json")
    out = tmp_path / "out"
    new = outputs.beside(out, folder=True)
    (new / "mark.json").write_text("{}")
    out.mkdir()
    (out / "mark.json").write_text('{"other": 1}')  # another run's output, written while this one worked
    with pytest.raises(UserError, match="appeared while mmllm was writing"):
        outputs.replace(new, out, kind, overwrite=False)
    assert (out / "mark.json").read_text() == '{"other": 1}' and not new.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".out.lock").write_text(f"{outputs.HOST}-{dead.pid}")
    with outputs.lock(out):
        assert (tmp_path / ".out.lock").read_text() == f"{outputs.HOST}-{os.getpid()}"
        holder = subprocess.run([sys.executable, "-c", f"from mmllm import outputs\nwith outputs.lock({str(out)!r}):"
                                 " pass"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert holder.returncode != 0 and "being written by another mmllm run" in holder.stderr
    assert not (tmp_path / ".out.lock").exists()


# ---------------------------------------------------------------- 2. divergence

@pytest.mark.parametrize("overwrite", [False, True])
def test_a_diverging_run_stops_in_one_line_and_writes_no_nan(image_data, tmp_path, overwrite):
    prepared, ck = image_data
    out = ck if overwrite else tmp_path / "diverged"
    before = snapshot(ck)
    args = ["finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "5", "--lr", "1e30",
            "--grad-clip", "0"] + (["--overwrite"] if overwrite else [])
    r = run_cli(*args)
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert "training diverged" in line and "--lr" in line, line
    assert not r.stdout.strip()  # no summary presented as a result
    assert snapshot(ck) == before  # the previous good checkpoint is as it was
    if not overwrite:
        assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
        assert not (out / "metrics.json").exists()
    assert strict_json_files(out, loop.unfinished(out)) >= 1


def test_json_written_by_finetune_is_strict(image_data):
    _, ck = image_data
    assert strict_json_files(ck) >= 3  # metrics.json, metrics.jsonl, finetune_config.json, config.json ...


def test_a_non_finite_validation_metric_stops_the_run(image_data, tmp_path, monkeypatch):
    prepared, _ = image_data
    from mmllm import tasks

    real = tasks.build_task

    def build(*a, **kw):
        task = real(*a, **kw)
        validate = task.validate
        task.validate = lambda model: {**validate(model), "val_loss": float("nan")}
        return task

    monkeypatch.setattr("mmllm.finetuning.build_task", build)
    out = tmp_path / "nanval"
    r = run_cli("finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "2")
    assert r.exit_code == 2 and "val_loss is nan" in one_line(r.stderr)
    assert not (out / "model.safetensors").exists()
    strict_json_files(out)


# ---------------------------------------------------------------- 5. one line naming the file

def test_disk_full_during_the_final_save_is_one_line_and_the_old_checkpoint_stays(image_data, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    prepared, ck = image_data
    before = snapshot(ck)
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if "resume" not in str(filename):  # the state saves after each epoch succeed; the checkpoint does not
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = run_cli("finetune", str(prepared), "--output", str(ck), *FAST, "--epochs", "2", "--overwrite")
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    side = loop.unfinished(ck)
    assert f"could not write {side}" in line and "No space left on device" in line and f"{ck} is unchanged" in line
    assert snapshot(ck) == before
    assert (side / "resume" / "state.json").is_file()  # the last epoch's state, for --resume once there is room
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    r = run_cli("finetune", str(prepared), "--output", str(ck), *FAST, "--epochs", "2", "--resume")
    assert r.exit_code == 0, r.output
    assert not side.exists() and snapshot(ck) != before


def test_disk_full_while_saving_the_resume_state_is_one_line(image_data, tmp_path, monkeypatch):
    prepared, _ = image_data
    out = tmp_path / "full"

    def full(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("torch.save", full)
    r = run_cli("finetune", str(prepared), "--output", str(out), *FAST, "--epochs", "2")
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert f"could not write {out}" in line and "No space left on device" in line
    assert not (out / "model.safetensors").exists()
