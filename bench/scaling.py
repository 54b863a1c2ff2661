"""Scaling: wall time for N, 2N, 4N records; prepare in-process (encoders loaded once per run), predict as a
command with its start-up and first batch left out."""

from __future__ import annotations

import time
from pathlib import Path

from common import quiet_stdout, sample_records, slope, write_manifest
from predict_memory import BATCH, predict_run

NOTE = ("log-log slope (1.0 = linear); predict: seconds from the first to the last output line against the "
        "records after the first batch")


def prepare_times(tmp: Path, ns: list[int]) -> list[float]:
    from mmllm import preparation as prepare
    from mmllm.config import PrepareConfig

    times = []
    for k in ns:  # k <= 480 keeps every image distinct; no cache, so every record is decoded and encoded
        manifest = write_manifest(tmp / f"s{k}.csv", sample_records(k))
        t = time.perf_counter()
        with quiet_stdout():
            prepare.run(PrepareConfig(input=[str(manifest)], output=str(tmp / f"sp{k}"), cache=False, transcribe=False))
        times.append(time.perf_counter() - t)
    return times


def run(ck: Path, tmp: Path, n: int, predict_n: int | None, measured: dict | None = None) -> dict:
    """prepare_slope over n, 2n, 4n records; predict_slope over predict_n, 2x, 4x records, or (predict_n None)
    over the runs already `measured` by the predict benchmark."""
    ns = [n, 2 * n, 4 * n]
    prep = prepare_times(tmp, ns)
    if predict_n is None:
        runs = [measured["small"], measured["large"]]
    else:
        runs = [predict_run(ck, k, tmp) for k in (predict_n, 2 * predict_n, 4 * predict_n)]
    streamed_n = [r["records"] - BATCH for r in runs]
    streamed_s = [r["last_line_s"] - r["first_line_s"] for r in runs]
    return {"n": ns, "prepare_s": prep, "prepare_slope": slope(ns, prep), "predict_n": [r["records"] for r in runs],
            "predict_streamed_n": streamed_n, "predict_streamed_s": streamed_s,
            "predict_first_line_s": [r["first_line_s"] for r in runs],
            "predict_slope": slope(streamed_n, [max(1e-3, s) for s in streamed_s]), "note": NOTE}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    first = max(r["predict_first_line_s"])
    return [], [f"- scaling (log-log slope, 1 = linear): prepare {r['prepare_slope']:.2f} over {r['n']} records "
                f"({', '.join(f'{x:.1f}' for x in r['prepare_s'])} s), predict {r['predict_slope']:.2f} over "
                f"{r['predict_n']} records (start-up and first batch, up to {first:.1f} s, left out)"]
