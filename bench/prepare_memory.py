"""prepare memory: peak RSS of `mmllm prepare --no-cache` on few vs many records, every image distinct."""

from __future__ import annotations

from pathlib import Path

from common import ROOT, measure, mmllm_exe, sample_records, write_manifest

TARGET = "peak RSS large/small <= 1.2 (encode and write in chunks)"


def distinct_images(records: list[dict], folder: Path) -> None:
    """Point each record at its own copy of its image with one pixel changed, so every image is decoded and encoded."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, r in enumerate(records):
        img = Image.open(ROOT / "sample_data" / r["image"]).convert("RGB")
        img.putpixel((0, 0), (i % 256, (i // 256) % 256, 7))
        img.save(folder / f"{i}.png")
        r["image"] = str(folder / f"{i}.png")


def run(tmp: Path, small: int, large: int) -> dict:
    """rss_ratio = large peak_rss_mb / small peak_rss_mb."""
    records = sample_records(large)
    distinct_images(records, tmp / "mem_images")
    out = {}
    for name, n in (("small", small), ("large", large)):
        manifest = write_manifest(tmp / f"mem{n}.csv", records[:n])
        m = measure([mmllm_exe(), "-q", "prepare", str(manifest), "--output", str(tmp / f"mem{n}"), "--no-cache",
                     "--no-transcribe"])
        if m["returncode"] != 0:
            raise RuntimeError(f"mmllm prepare on {n} records: {m}")
        out[name] = {"records": n, "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}
    ratio = out["large"]["peak_rss_mb"] / out["small"]["peak_rss_mb"]
    return {**out, "rss_ratio": ratio, "target": TARGET, "met": ratio <= 1.2}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    a, b = r["small"], r["large"]
    return [f"| prepare memory | peak RSS {b['peak_rss_mb']:.0f} MB ({b['records']} records) | "
            f"{a['peak_rss_mb']:.0f} MB ({a['records']} records) | {r['rss_ratio']:.2f} | {r['target']} | "
            f"{r['met']} |"], []
