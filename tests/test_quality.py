"""Regression check of the quality suite (bench/quality.py) on one real dataset, small: the handwritten-digit /
spoken-digit matching task with the real embedded encoders. Its data comes from scikit-learn and Debian's archive
(apt-get download, cached in quality_data/debs); without apt the test is skipped, except under CI, where it must run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow

# The defaults of 2026-11-30 (bilinear fusion, transcripts, frozen text) reach 0.793 on the full-size task (1000
# training records, bench/QUALITY.md) but only 0.45 on this small one (200 training records, 60 test, seeded, one
# thread; the hand baseline 0.417): 200 records are too few to learn the pairing, so this stays a regression
# check of the pipeline with a floor a few points under the measured value.
MIN_ACCURACY = 0.40


def have_debs() -> bool:
    debs = ROOT / "quality_data" / "debs"
    return debs.is_dir() and any(debs.glob("asterisk-core-sounds-*-wav*")) or shutil.which("apt-get") is not None


@pytest.mark.skipif(not have_debs() and not os.environ.get("CI"),  # CI has apt-get: there a missing tool fails
                    reason="needs Debian's asterisk-core-sounds-*-wav (apt-get download)")
def test_quality_digits_match_small(tmp_path, monkeypatch):
    import quality

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        results = quality.run(["digits_match"], tmp_path / "work", tmp_path / "data", n_train=200, n_eval=60,
                              singles=False)
    except SystemExit as e:  # apt-get download failed (no package lists, no network): the data is unobtainable
        if "apt-get download" not in str(e) or os.environ.get("CI"):  # CI reaches Debian's archive: a failure
            raise
        pytest.skip(str(e))
    d = results["datasets"]["digits_match"]
    assert d["counts"] == {"train": 200, "validation": 60, "test": 60}
    assert d["majority"]["accuracy"] == pytest.approx(0.5)  # balanced same/different
    probe, hand = d["linear_probe"], d["hand_baseline"]
    assert probe["chosen"].startswith("logreg C=") and hand["chosen"]
    assert hand["val_accuracy"] >= probe["val_accuracy"]  # the hand baseline's choices include the probe's
    assert d["mmllm"]["accuracy"] >= MIN_ACCURACY
    # issue 26: the defaults never lose to a linear probe on their own features (3 test records of slack: 60 in all)
    assert d["mmllm"]["accuracy"] >= probe["accuracy"] - 0.05, (d["mmllm"], probe)
    md = quality.markdown(results)
    assert "| digits_match |" in md and "hand baseline" in md
