"""serve: records/s and p50/p95 latency of `mmllm serve` for 1, 8 and 32 concurrent clients, and micro-batching
(--max-batch 32) against one request at a time (--max-batch 1) at 32 clients, in the same run.

    python bench/serve_load.py [--quick]

Each client sends one-record JSON requests back to back; the server runs the text-only checkpoint of
predict_memory (MiniLM). Latency is per request, client side.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, fmt, mmllm_exe, quotient
from predict_memory import text_checkpoint

TARGET = "micro-batched / one request at a time >= 1.5 (records/s, 32 clients)"
WORDS = ["big", "small", "large", "tiny", "huge", "little"]


def start(ck: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([mmllm_exe(), "-q", "serve", str(ck), "--port", str(port), "--max-batch", str(max_batch),
                             "--batch-wait-ms", "5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(600):
        try:
            requests.get(url + "/health", timeout=1)
            return proc, url
        except requests.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-1000:]) from None
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def load(url: str, clients: int, per_client: int) -> dict:
    """`clients` threads, each sending `per_client` one-record requests back to back."""
    import requests

    def client(c: int) -> list[float]:
        session, lat = requests.Session(), []
        for i in range(per_client):
            t = time.perf_counter()
            r = session.post(url + "/predict", json={"id": f"{c}-{i}", "text": f"it is {WORDS[(c + i) % 6]} {i}"})
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(r.text)
        return lat

    client(0)  # warm-up
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(x for part in pool.map(client, range(clients)) for x in part)
    wall = time.perf_counter() - t
    return {"clients": clients, "requests": len(lat), "records_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1)}


def run(ck: Path, quick: bool) -> dict:
    """Load tests against checkpoint `ck` (predict_memory's text-only checkpoint in run.py)."""
    per = 4 if quick else 20
    out: dict = {"batched": [], "unbatched": None}
    proc, url = start(ck, 32)
    try:
        for clients in (1, 8, 32):
            out["batched"].append(load(url, clients, per))
    finally:
        proc.terminate()
        proc.wait()
    proc, url = start(ck, 1)
    try:
        out["unbatched"] = load(url, 32, per)
    finally:
        proc.terminate()
        proc.wait()
    best, one = out["batched"][-1]["records_per_s"], out["unbatched"]["records_per_s"]
    out["batching_speedup_32_clients"] = quotient(best, one)
    out["target"] = TARGET
    out["met"] = out["batching_speedup_32_clients"] is not None and out["batching_speedup_32_clients"] >= 1.5
    return out


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    b32, one = r["batched"][-1], r["unbatched"]
    met = r["met"]
    rows = [f"| serve records/s, 32 clients, micro-batched vs --max-batch 1 | {b32['records_per_s']:.1f} | "
            f"{one['records_per_s']:.1f} | {fmt(r['batching_speedup_32_clients'], '.2f')} | {TARGET} | {met} |"]
    figures = [f"- serve, {b['clients']} client(s), micro-batched: {b['records_per_s']:.1f} records/s, "
               f"p50 {b['p50_ms']} ms, p95 {b['p95_ms']} ms" for b in r["batched"]]
    figures.append(f"- serve, 32 clients, --max-batch 1: {one['records_per_s']:.1f} records/s, p50 {one['p50_ms']} ms, "
                   f"p95 {one['p95_ms']} ms")
    return rows, figures


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(text_checkpoint(Path(d)), "--quick" in sys.argv), indent=2))
