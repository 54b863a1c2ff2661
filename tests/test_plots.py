"""Training curves, the confusion-matrix image, TensorBoard logging and --precision fp16's refusal on CPU."""

import json

import numpy as np
import pytest
from conftest import run_cli


def _history(n: int) -> list[dict]:
    return [{"epoch": e, "step": 3 * e, "train_loss": 1.0 / e, "val_loss": 1.2 / e + 0.1 * (e == n),
             "val_accuracy": 0.5 + 0.05 * e} for e in range(1, n + 1)]


def _integer_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_curves_mark_the_best_epoch_with_whole_epoch_ticks():
    import matplotlib.pyplot as plt

    from mmllm.loop import curves_figure

    fig = curves_figure(_history(7), best_epoch=4)
    for ax in fig.axes:
        ticks = _integer_ticks(ax)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        best_lines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [4, 4]]  # the dashed vertical line
        assert best_lines and best_lines[0].get_linestyle() == "--"
        stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert stars and all(list(s.get_xdata()) == [4] for s in stars)
    loss_axis = fig.axes[0]
    star_y = sorted(float(s.get_ydata()[0]) for s in loss_axis.get_lines() if s.get_marker() == "*")
    assert star_y == pytest.approx(sorted([1.0 / 4, 1.2 / 4]))  # the stars sit on the curves at epoch 4
    plt.close(fig)


def test_one_epoch_curves_are_not_empty(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from mmllm.loop import curves_figure, plot_curves

    fig = curves_figure(_history(1), best_epoch=1)
    curves = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() not in ("*", "None", None, "")]
    assert len(curves) == 3 and all(len(ln.get_xdata()) == 1 for ln in curves)  # one visible point per curve
    assert _integer_ticks(fig.axes[0]) == [1.0]
    plt.close(fig)
    plot_curves(_history(1), tmp_path / "c.png", best_epoch=1)
    image = np.asarray(Image.open(tmp_path / "c.png").convert("L"))
    assert image.shape == (380, 1000)
    assert (image < 200).sum() > 2000  # markers, text and the best-epoch line: not a blank plot


def test_overlapping_series_stay_distinguishable(tmp_path):
    """val_accuracy and val_f1 equal at every epoch (and train_loss = val_loss): each series has its own marker,
    size and dash, so the one drawn first still shows around the one drawn over it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from mmllm.loop import curves_figure, plot_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0 / e, "val_accuracy": 0.5 + 0.05 * e,
                "val_f1": 0.5 + 0.05 * e} for e in range(1, 6)]
    fig = curves_figure(history, best_epoch=5)
    for ax in fig.axes:
        series = [ln for ln in ax.get_lines() if ln.get_label() in ("train loss", "val loss", "val accuracy",
                                                                    "val f1")]
        assert len(series) == 2
        (a, b) = series
        assert list(a.get_ydata()) == list(b.get_ydata())  # drawn on top of each other
        assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
        assert a.get_markersize() > b.get_markersize() and a.get_markerfacecolor() == "none"  # a ring around b
        legend = {t.get_text() for t in ax.get_legend().get_texts()}
        assert {a.get_label(), b.get_label()} <= legend
    plt.close(fig)
    plot_curves(history, tmp_path / "c.png", best_epoch=5)  # the ring shows in the image: the first series' colour
    rgb = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    blue = (abs(rgb - np.array([31, 119, 180])).sum(-1) < 60).sum()  # matplotlib's C0, the first series
    assert blue > 300, blue


def test_confusion_image_grows_with_classes_and_every_count_is_readable(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from mmllm.evaluation import confusion_figure, write_outputs

    sizes = {}
    for n in (2, 12, 60):
        rng = np.random.default_rng(n)
        m = rng.integers(0, 5, (n, n)) + np.diag(rng.integers(50, 120, n))
        fig = confusion_figure(m.tolist(), [f"class-{i}" for i in range(n)])
        ax = fig.axes[0]
        texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t for t in ax.texts}
        assert len(texts) == n * n and all(texts[j, i].get_text() == str(m[i, j]) for i in range(n) for j in range(n))
        for (j, i), t in texts.items():  # dark (high) cells get white text, light cells black
            assert t.get_color() == ("white" if m[i, j] > m.max() / 2 else "black")
            assert t.get_fontsize() >= 4
        sizes[n] = tuple(fig.get_size_inches())
        plt.close(fig)
    assert sizes[2][0] < sizes[12][0] < sizes[60][0] and sizes[12][0] >= 8
    result = {"confusion_matrix": {"labels": ["a", "b", "c"], "matrix": [[9, 1, 0], [0, 7, 3], [2, 0, 8]]}}
    write_outputs(result, tmp_path / "m.json")
    png = Image.open(tmp_path / "m_confusion.png")
    assert png.size[0] >= 500 and png.size[1] >= 400


CONFUSION_600 = r"""
import json, resource, sys, time
import numpy as np
from pathlib import Path
from mmllm.evaluation import write_outputs

n = 600
rng = np.random.default_rng(0)
m = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(5, 400, n))
start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_outputs({"confusion_matrix": {"labels": [f"class-{i}" for i in range(n)], "matrix": m.tolist()}},
              Path(sys.argv[1]) / "m.json")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_confusion_image_of_600_classes_shows_the_top_60_in_bounded_time_and_memory(tmp_path):
    import subprocess
    import sys

    import matplotlib.pyplot as plt
    from PIL import Image

    from mmllm.evaluation import PLOT_CLASSES, confusion_figure

    n = 600
    rng = np.random.default_rng(0)
    m = rng.integers(0, 3, (n, n)) + np.diag(rng.integers(5, 400, n))
    labels = [f"class-{i}" for i in range(n)]
    fig = confusion_figure(m.tolist(), labels)
    ax = fig.axes[0]
    top = sorted(np.argsort(-m.sum(1), kind="stable")[:PLOT_CLASSES])  # the classes with the most gold records
    assert PLOT_CLASSES == 60 and [t.get_text() for t in ax.get_yticklabels()] == [labels[i] for i in top]
    assert len(ax.texts) == 60 * 60 and "60 of 600 classes" in ax.get_title()
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert all(texts[b, a] == str(m[top[a], top[b]]) for a in range(60) for b in range(60))
    assert max(fig.get_size_inches()) < 30
    plt.close(fig)
    r = subprocess.run([sys.executable, "-c", CONFUSION_600, str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    cost = json.loads(r.stdout.strip().splitlines()[-1])
    assert cost["seconds"] < 30 and cost["peak_mb"] < 300, cost  # was: killed at 10 GB drawing 360000 labels
    assert Image.open(tmp_path / "m_confusion.png").size[0] < 3000


@pytest.mark.parametrize("device", ["cpu", "auto"])  # cpu: refused by validate; auto: by the device it resolves to
def test_fp16_refused_on_cpu_before_anything_loads(tmp_path, device):
    import torch

    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto resolves to a GPU here")
    r = run_cli("finetune", str(tmp_path / "not-prepared-yet"), "--output", str(tmp_path / "o"), "--precision", "fp16",
                "--device", device)
    assert r.exit_code == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--precision fp16: needs a CUDA" in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "o"), "--report-to", "tensorboard")
    assert r.exit_code == 2
    assert "pip install 'mmllm[tensorboard]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture
def text_prepared(tiny_models, tmp_path):
    """A small prepared text-only dataset (tiny BERT)."""
    rows = [{"id": i, "text": ["it is big", "it is small", "a red thing"][i % 3], "label": "bsr"[i % 3]}
            for i in range(30)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run_cli("prepare", tmp_path / "m.jsonl", "--output", tmp_path / "p", "--text-model", tiny_models["text"],
                "--max-text-tokens", "16")
    assert r.exit_code == 0, r.output
    return tmp_path / "p"


def test_report_to_tensorboard_writes_event_files(text_prepared, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ck"
    r = run_cli("finetune", str(text_prepared), "--output", str(out), "--epochs", "2", "--hidden-size", "16",
                "--batch-size", "8", "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [rec for rec in logged if "train_loss" in rec]
    steps = [rec for rec in logged if "lr" in rec]
    # issue 25: training and validation on one x-axis, the optimizer step (an epoch at its last step)
    val = [(e.step, e.value) for e in events.Scalars("val/loss")]
    assert [s for s, _ in val] == [rec["step"] for rec in epochs] == [steps[len(steps) // 2 - 1]["step"],
                                                                       steps[-1]["step"]]
    assert [v for _, v in val] == pytest.approx([rec["val_loss"] for rec in epochs], rel=1e-6)
    assert [e.value for e in events.Scalars("train/epoch_loss")] == pytest.approx([rec["train_loss"] for rec in epochs])
    assert [(e.step, e.value) for e in events.Scalars("train/epoch")] == [(rec["step"], rec["epoch"]) for rec in epochs]
    lr = events.Scalars("train/lr")
    assert [e.step for e in lr] == [rec["step"] for rec in steps]
    assert [e.value for e in lr] == pytest.approx([rec["lr"] for rec in steps], rel=1e-5)
    assert not [t for t in events.Tags()["scalars"] if t.startswith("epoch/")]
    assert out_of_order(out / "tensorboard") == []  # what `tensorboard --inspect` reports as outoforder_steps
    from PIL import Image

    assert Image.open(out / "training_curves.png").size == (1000, 380)


def out_of_order(logdir) -> list:
    """`tensorboard --inspect --logdir LOGDIR`'s outoforder_steps of the scalars, over every event file."""
    from tensorboard.backend.event_processing import event_file_inspector as inspector

    found = []
    for unit in inspector.get_inspection_units(str(logdir)):
        scalars = inspector.get_dict_to_print(unit.field_to_obs).get("scalars")
        found += (scalars or {}).get("outoforder_steps", [])
    return found


def test_tensorboard_resumed_run_hides_what_the_interrupted_run_logged_past_its_state(tmp_path):
    """A run killed at step 8 after saving its state at step 5 resumes from 5: TensorBoard shows steps 1..10 once,
    none twice and none backwards (purge_step)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmllm.loop import TensorBoard

    first = TensorBoard(tmp_path)
    for step in range(1, 9):
        first({"step": step, "epoch": 1, "loss": 1.0 / step})
    first.close()
    resumed = TensorBoard(tmp_path, purge_step=6)
    for step in range(6, 11):
        resumed({"step": step, "epoch": 2, "loss": 2.0 / step})
    resumed({"epoch": 2, "step": 10, "train_loss": 0.3, "val_loss": 0.4})
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == list(range(1, 11))
    assert [v for _, v in loss] == pytest.approx([1.0 / s for s in range(1, 6)] + [2.0 / s for s in range(6, 11)])
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(10, pytest.approx(0.4))]
