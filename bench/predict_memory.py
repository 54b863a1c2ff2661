"""predict: peak memory of `mmllm predict` on few vs many records (flat memory), and its streaming throughput."""

from __future__ import annotations

import json
from pathlib import Path

from common import fmt, measure, mmllm_exe, quiet_stdout, quotient

BATCH = 64
TARGET = "peak RSS large/small <= 1.2 (flat memory)"


def text_checkpoint(tmp: Path) -> Path:
    """A small text-only classifier (in-process: no start-up cost counted anywhere)."""
    from mmllm import finetuning as finetune, preparation as prepare
    from mmllm.config import FinetuneConfig, PrepareConfig

    rows = [{"id": i, "text": ["it is big", "it is small", "quite large", "very tiny"][i % 4],
             "label": ["big", "small"][i % 2]} for i in range(64)]
    (tmp / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with quiet_stdout():
        prepare.run(PrepareConfig(input=[str(tmp / "t.jsonl")], output=str(tmp / "tp")))
        finetune.run(FinetuneConfig(prepared=str(tmp / "tp"), output=str(tmp / "tck"), epochs=1))
    return tmp / "tck"


def predict_run(ck: Path, n: int, tmp: Path) -> dict:
    """`mmllm predict` on n JSONL records from stdin, --batch-size 64: each batch's lines are flushed together.

    records_per_s: the records after the first batch over the time from the first to the last output line
    (start-up and the first batch's warm-up left out)."""
    path = tmp / f"in{n}.jsonl"
    words = ["big", "small", "large", "tiny", "huge", "little"]
    path.write_text("".join(json.dumps({"id": i, "text": f"it is {words[i % 6]} number {i}"}) + "\n" for i in range(n)))
    m = measure([mmllm_exe(), "-q", "predict", str(ck), "-", "--batch-size", str(BATCH)], path)
    if m["lines"] != n or m["returncode"] != 0:
        raise RuntimeError(f"mmllm predict on {n} records: {m}")
    streamed_s = m["last_line_s"] - m["first_line_s"]
    return {"records": n, "wall_s": m["wall_s"], "first_line_s": m["first_line_s"], "last_line_s": m["last_line_s"],
            "peak_rss_mb": m["peak_rss_mb"], "records_per_s": quotient(max(0, n - BATCH), streamed_s)}


def run(ck: Path, tmp: Path, small: int, large: int) -> dict:
    """rss_ratio = large peak_rss_mb / small peak_rss_mb; records_per_s_batch = the large run's records_per_s."""
    a, b = predict_run(ck, small, tmp), predict_run(ck, large, tmp)
    ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
    return {"small": a, "large": b, "records_per_s_batch": b["records_per_s"], "rss_ratio": ratio, "target": TARGET,
            "met": ratio <= 1.2}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    a, b = r["small"], r["large"]
    return ([f"| predict memory | peak RSS {b['peak_rss_mb']:.0f} MB ({b['records']} records) | "
             f"{a['peak_rss_mb']:.0f} MB ({a['records']} records) | {r['rss_ratio']:.2f} | {r['target']} | "
             f"{r['met']} |"],
            [f"- predict: {fmt(r['records_per_s_batch'], '.0f')} records/s in batch mode (text-only checkpoint, "
             f"between the first and the last output line), first line after {b['first_line_s']:.2f} s "
             "(includes model start-up)"])
