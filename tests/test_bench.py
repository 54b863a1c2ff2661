"""bench/run.py --quick: every benchmark runs, each written number is what its docstring says it is, and the tracked
bench/results.json and BENCHMARKS.md are left alone (no timing assertions)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

BENCH = ROOT / "bench"


@pytest.fixture
def bench_run(monkeypatch):
    """bench/run.py as a module (its siblings import as top-level modules, as when run as a script)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import run

    return run


def git_status() -> set[str]:
    """`git status --porcelain bench BENCHMARKS.md` lines (empty on a clean checkout)."""
    return set(subprocess.run(["git", "status", "--porcelain", "--", "bench", "BENCHMARKS.md"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.splitlines())


def tracked_files() -> tuple[bytes, bytes]:
    return (BENCH / "results.json").read_bytes(), (ROOT / "BENCHMARKS.md").read_bytes()


def test_only_a_full_run_without_out_writes_the_tracked_files(bench_run, tmp_path):
    assert bench_run.destinations(False, None) == bench_run.TRACKED
    assert bench_run.destinations(False, str(tmp_path)) == (tmp_path / "results.json", tmp_path / "BENCHMARKS.md")
    results, md = bench_run.destinations(True, None)  # a new temporary folder, outside the repository
    assert results.parent == md.parent and results.parent.is_dir() and not list(results.parent.iterdir())
    assert ROOT not in results.parents
    results.parent.rmdir()
    for folder in (ROOT, BENCH):
        with pytest.raises(SystemExit, match="--quick never writes"):
            bench_run.destinations(True, str(folder))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def check_ratios(res: dict) -> None:
    """Every ratio is the quotient its benchmark documents, every `met` follows its target."""
    s = res["startup"]
    assert close(s["ratio"], s["help_s"] / s["import_typer_s"]) and s["met"] == (s["help_s"] <= 0.5 and s["ratio"] <= 8)
    p = res["prepare"]
    assert close(p["ratio"], p["prepare_s"] / p["encoder_forward_s"]) and p["met"] == (p["ratio"] <= 1.3)
    c = res["cached_epoch"]
    for variant in ("frozen_text", "finetuned_text"):
        v = c[variant]
        assert close(v["speedup"], v["online"]["epoch_s"] / v["cached"]["epoch_s"])
        assert v["accuracy_diff"] == abs(v["online"]["test_accuracy"] - v["cached"]["test_accuracy"])
        assert 0 <= v["cached"]["test_accuracy"] <= 1 and 0 <= v["online"]["test_accuracy"] <= 1
    assert c["speedup"] == c["frozen_text"]["speedup"] and c["accuracy_diff"] == c["frozen_text"]["accuracy_diff"]
    assert c["met"] == (c["speedup"] >= 10 and c["accuracy_diff"] <= 0.01)
    assert c["feature_max_abs_diff"] < 1e-4  # the online baseline computes the features the cache holds
    f = c["frozen_text_states"]
    assert close(f["speedup"], f["running"]["epoch_s"] / f["states"]["epoch_s"])
    assert f["running"] == c["frozen_text"]["cached"]  # the baseline is the frozen run over cached media features
    assert f["accuracy_diff"] == abs(f["running"]["test_accuracy"] - f["states"]["test_accuracy"])
    t = res["trainer"]
    assert close(t["ratio"], t["mmllm_records_per_s"] / t["trainer_records_per_s"]) and t["met"] == (t["ratio"] >= 1)
    assert close(t["mfu_fraction"], t["text_step_flops_per_s"] / t["matmul_flops_per_s"])
    q = res["predict"]
    assert close(q["rss_ratio"], q["large"]["peak_rss_mb"] / q["small"]["peak_rss_mb"])
    assert q["met"] == (q["rss_ratio"] <= 1.2)
    big = q["large"]
    assert close(q["records_per_s_batch"], (big["records"] - 64) / (big["last_line_s"] - big["first_line_s"]))
    sc = res["scaling"]
    assert sc["predict_n"] == [100, 400] and sc["predict_streamed_n"] == [36, 336]  # --quick reuses predict's runs
    assert sc["predict_streamed_s"] == [q[k]["last_line_s"] - q[k]["first_line_s"] for k in ("small", "large")]
    assert close(sc["prepare_slope"], np.polyfit(np.log(sc["n"]), np.log(sc["prepare_s"]), 1)[0])
    assert close(sc["predict_slope"], np.polyfit(np.log([36, 336]), np.log(sc["predict_streamed_s"]), 1)[0])


def check_new_sections(res: dict) -> None:
    """precision: speedups are quotients of the measured rates; serve: rates and the batching quotient."""
    pr = res["precision"]
    for role in ("image", "audio", "text"):
        m = pr[role]
        assert close(m["prepare_speedup"], m["auto"]["prepare_per_s"] / m["fp32"]["prepare_per_s"])
        assert close(m["encoder_speedup"], m["auto"]["encoder_per_s"] / m["fp32"]["encoder_per_s"])
    assert pr["met"] == (pr["image"]["prepare_speedup"] >= 2.5)
    sv = res["serve"]
    assert [b["clients"] for b in sv["batched"]] == [1, 8, 32] and sv["unbatched"]["clients"] == 32
    for b in sv["batched"] + [sv["unbatched"]]:
        assert b["records_per_s"] > 0 and 0 < b["p50_ms"] <= b["p95_ms"]
    ratio = sv["batched"][-1]["records_per_s"] / sv["unbatched"]["records_per_s"]
    assert close(sv["batching_speedup_32_clients"], ratio)
    assert sv["met"] == (sv["batching_speedup_32_clients"] >= 1.5)


@pytest.mark.slow
def test_bench_quick_writes_checked_numbers_beside_the_tracked_files(bench_run, tmp_path):
    status, files = git_status(), tracked_files()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)], capture_output=True,
                       text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tracked_files() == files  # the tracked results are not rewritten
    assert git_status() <= status  # nor anything else changed or added under bench/ (others may commit meanwhile)
    assert sorted(p.name for p in out.iterdir()) == ["BENCHMARKS.md", "results.json"]
    res = json.loads((out / "results.json").read_text())
    benches = ["startup", "prepare", "cached_epoch", "trainer", "predict", "scaling", "precision", "serve", "generate",
               "limits"]  # prepare_memory: full only
    assert list(res) == ["date", "mode", "versions", *benches] and res["mode"] == "quick"
    positive = {"startup": ["help_s", "import_typer_s", "ratio"],
                "prepare": ["prepare_s", "encoder_forward_s", "ratio"],
                "cached_epoch": ["speedup"],
                "trainer": ["mmllm_records_per_s", "trainer_records_per_s", "ratio", "text_step_flops_per_s",
                            "matmul_flops_per_s", "mfu_fraction"],
                "predict": ["records_per_s_batch", "rss_ratio"], "scaling": []}
    for name, keys in positive.items():
        for key in keys + ["bench_seconds"]:
            assert math.isfinite(res[name][key]) and res[name][key] > 0, (name, key, res[name][key])
    assert all(v > 0 and math.isfinite(v) for v in res["prepare"]["records_per_s"].values())
    for variant in ("frozen_text", "finetuned_text"):
        assert all(res["cached_epoch"][variant][k]["epoch_s"] > 0 for k in ("cached", "online"))
    for run in (res["predict"]["small"], res["predict"]["large"]):
        assert 0 < run["first_line_s"] < run["last_line_s"] < run["wall_s"] and run["peak_rss_mb"] > 100
    assert [res["predict"][k]["records"] for k in ("small", "large")] == [100, 400]
    sc = res["scaling"]
    assert sc["n"] == [2, 4, 8] and all(x > 0 for x in sc["prepare_s"] + sc["predict_streamed_s"])
    assert math.isfinite(sc["prepare_slope"]) and math.isfinite(sc["predict_slope"])
    check_ratios(res)
    check_new_sections(res)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {k: res[k]["met"] for k in benches if "met" in res[k]}
    md = (out / "BENCHMARKS.md").read_text()
    rows = sum(len(bench_run.REPORTS[k].report(res[k])[0]) for k in benches)
    assert "mode: quick" in md and "None" not in md and md.count("\n| ") == 1 + rows  # the header and each row
    assert f"{res['predict']['records_per_s_batch']:.0f} records/s in batch mode" in md
    res["predict"]["records_per_s_batch"] = None  # nothing streamed after the first batch: reported, not a crash
    assert "- predict: n/a records/s" in bench_run.render(res)


def fake_peers_result(ludwig: dict | None) -> dict:
    """A bench/peers.py result as run() writes it (numbers made up), with the given Ludwig part."""
    res = {"date": "2026-11-30", "dataset": "digits_match", "train": 300, "eval": 150, "total_s": 397.2,
           "versions": {"python": "3.11.2", "torch": "2.13.0+cpu", "transformers": "5.24.0",
                        "machine": "x86_64, 2 cores"},
           "mmllm": {"accuracy": 0.4867, "macro_f1": 0.4196, "finetune_s": 193.3, "eval_s": 7.8, "epochs": 35,
                     "steps": 350, "stop_reason": "stopped: no val_loss improvement", "prepare_s": 37.5,
                     "wall_s": 238.6, "counts": {"train": 300, "validation": 150, "test": 150}},
           "trainer": {"accuracy": 0.48, "macro_f1": 0.4518, "load_s": 0.4, "train_s": 12.1, "predict_s": 0.9,
                       "epochs": 3.0, "learning_rate": 5e-05, "steps": 30, "best_checkpoint": "checkpoint-10",
                       "val_loss": [0.6969, 0.6993], "wall_s": 58.1}}
    if ludwig is not None:
        res["ludwig"] = ludwig
    return res


def test_peers_report_says_why_a_peer_did_not_run_and_scores_those_that_did(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import peers

    pip = "pip install -c ludwig-constraints.txt ludwig"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    import torchvision\n" \
                "RuntimeError: operator torchvision::nms does not exist\n\nsome pip notice\n"
    assert peers.decisive_line(traceback) == "RuntimeError: operator torchvision::nms does not exist"
    assert peers.decisive_line("ERROR: No matching distribution found for ludwig\n") == \
        "ERROR: No matching distribution found for ludwig"
    assert peers.decisive_line("just this\n\n") == "just this" and peers.decisive_line("") == "(no output)"
    install = {"ok": True, "seconds": 120.8, "command": pip, "versions": {"ludwig": "0.11.0", "torchvision": "0.28.0"}}
    failed = {"install": install, "experiment": {"ok": False, "seconds": 8.4, "command": "ludwig experiment --config c",
                                                 "error": "exit 1: RuntimeError: operator torchvision::nms"}}
    md = peers.markdown(fake_peers_result(failed))
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[0].startswith("| tool |")
    assert "| 238.6 (prepare 37.5, finetune 193.3, eval 7.8) | 48.7 / 42.0 |" in rows[1]
    assert "| 58.1 (mmllm's prepare 37.5 + load 0.4, train 12.1, predict 0.9) | 48.0 / 45.2 |" in rows[2]
    assert "(3 epochs, lr 5e-05)" in rows[2] and "None" not in md
    assert rows[3].startswith("| Ludwig 0.11.0 |") and "could not run | - | - |" in rows[3]
    assert f"`{pip}` took 120.8 s" in rows[3] and "`exit 1: RuntimeError: operator torchvision::nms`" in rows[3]
    assert "could not install" in peers.markdown(fake_peers_result({"install": {**install, "ok": False,
                                                                                "error": "timed out after 600 s"}}))
    assert "| Ludwig | not run (--no-ludwig) |" in peers.markdown(fake_peers_result(None))
    stats = tmp_path / "experiment_run" / "test_statistics.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps({"label": {"accuracy": 0.52, "overall_stats": {"avg_f1_score_macro": 0.5}}}))
    scores = peers.ludwig_scores(tmp_path)
    assert scores == {"accuracy": 0.52, "macro_f1": 0.5}
    ran = {"install": install, "experiment": {"ok": True, "seconds": 300.0, "command": "ludwig experiment", **scores}}
    assert "| 300.0 (+ the transcription in mmllm's prepare) | 52.0 / 50.0 |" in peers.markdown(fake_peers_result(ran))


def test_video_bench_counts_every_sampled_frame_and_reports_one_row(bench_run, tmp_path):
    import video_speed

    r = video_speed.run(tmp_path, quick=True)
    assert r["clips"] == 16 and r["frames"] == 16 * r["frames_per_clip"] == 16 * 8
    for key in ("prepare_s", "decode_s", "image_encoder_s", "prepare_frames_per_s", "image_encoder_frames_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["ratio"] == pytest.approx(r["image_encoder_s"] / r["prepare_s"])  # frames/s of prepare / of encoder
    rows, lines = bench_run.REPORTS["video"].report(r)
    assert len(rows) == 1 and rows[0].count("|") == 7 and f"{r['ratio']:.2f}" in rows[0] and len(lines) == 1


def test_retrieval_baseline_returns_the_nearest_training_target(tiny_models, tmp_path, monkeypatch):
    """bench/quality.py's captioning baseline: a test image identical to a training image gets that image's
    training target (BLEU 100 when every test image has a twin); shuffled targets score lower."""
    from conftest import run_cli, tiny_prepare_args, write_csv, write_image

    monkeypatch.syspath_prepend(str(BENCH))
    import quality

    colors = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 200, 30), "grey": (120, 120, 120)}
    rows = []
    for name, rgb in colors.items():
        write_image(tmp_path / f"{name}.png", rgb)
        for split in ("train", "validation", "test"):
            rows.append({"id": f"{name}-{split}", "image": f"{name}.png", "target": f"a {name} square here",
                         "split": split})
    out = tmp_path / "p"
    assert run_cli(*tiny_prepare_args(tiny_models, write_csv(tmp_path / "m.csv", rows), out)).exit_code == 0
    got = quality.retrieval_baseline(out)
    assert got["n"] == 4 and got["bleu"] == pytest.approx(100.0) and "image" in got["features"]
    mixed = [dict(r, target=f"a {list(colors)[(i + 1) % 4]} square here") if r["split"] == "train" else r
             for i, r in enumerate(rows)]
    out2 = tmp_path / "p2"
    assert run_cli(*tiny_prepare_args(tiny_models, write_csv(tmp_path / "m2.csv", mixed), out2)).exit_code == 0
    assert quality.retrieval_baseline(out2)["bleu"] < 100.0
