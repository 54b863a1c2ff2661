"""bench/run.py --quick runs and writes every key (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_quick_writes_results(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(out),
                        "--no-markdown"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"startup", "prepare", "cached_epoch", "trainer", "predict", "scaling", "versions"} <= set(res)
    assert res["startup"]["help_s"] > 0 and res["prepare"]["ratio"] > 0 and res["trainer"]["ratio"] > 0
    assert res["predict"]["large"]["records"] == 200 and len(res["scaling"]["prepare_s"]) == 3
    assert set(json.loads(r.stdout.strip().splitlines()[-1])) == {"startup", "prepare", "cached_epoch", "trainer",
                                                                   "predict"}
