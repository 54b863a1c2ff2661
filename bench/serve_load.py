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

TARGET = "records/s grows with clients; micro-batching / one-at-a-time >= 1.5 at 32 clients"
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


def run(tmp: Path, quick: bool) -> dict:
    ck = text_checkpoint(tmp)
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
    return out


def report(r: dict) -> tuple[list, list[str]]:
    rows = [[f"serve, {b['clients']} clients (micro-batched)", f"{b['records_per_s']} records/s",
             f"p50 {b['p50_ms']} ms / p95 {b['p95_ms']} ms", ""] for b in r["batched"]]
    u = r["unbatched"]
    rows.append(["serve, 32 clients, --max-batch 1", f"{u['records_per_s']} records/s",
                 f"p50 {u['p50_ms']} ms / p95 {u['p95_ms']} ms", f"batching x{fmt(r['batching_speedup_32_clients'])}"])
    return rows, [TARGET]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d), "--quick" in sys.argv), indent=2))
