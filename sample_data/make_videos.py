"""Build sample_data/videos/ and sample_data/videos.csv: short clips whose label is the direction of motion.

Each clip shows a coloured square on a grey background that comes closer (grows: "approach") or moves away
(shrinks: "recede"), at a random place, in a random colour. A receding clip is an approaching one played
backwards: every frame of one could be a frame of the other, and both visit the same sizes, so no single frame
and not the mean of the frames decides the label; the order of the frames does. Half of the clips carry a soundtrack (a tone whose
pitch says nothing about the label), so prepare has a soundtrack to read as the record's audio.

Deterministic: same script, same PyAV -> same files. Needs PyAV (pip install av). Run:
python sample_data/make_videos.py
"""

from __future__ import annotations

import csv
import random
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N_CLIPS = 120
SIZE = 48  # pixels, square frames
FRAMES = 8  # = prepare's default --video-frames: each frame is sampled once, whichever way it plays
FPS = 4
SPLITS = [("train", 0.6), ("validation", 0.2), ("test", 0.2)]
RATE = 16000


def frames(rng: random.Random, approach: bool) -> list[np.ndarray]:
    color = np.array([rng.randint(150, 255), rng.randint(0, 90), rng.randint(0, 255)], np.uint8)
    cy, cx = rng.randint(18, SIZE - 18), rng.randint(18, SIZE - 18)
    sides = np.linspace(4, 34, FRAMES).round().astype(int)
    out = []
    for side in sides if approach else sides[::-1]:
        img = np.full((SIZE, SIZE, 3), 110, np.uint8)
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        img[top:top + side, left:left + side] = color
        out.append(img)
    return out


def write_clip(path: Path, images: list[np.ndarray], tone: float | None) -> None:
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"crf": "28", "preset": "veryslow"})
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("aac", rate=RATE, layout="mono") if tone else None
        if audio is not None:
            audio.bit_rate = 16000
        for img in images:
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            t = np.arange(int(RATE * FRAMES / FPS)) / RATE
            samples = (0.2 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
            for start in range(0, samples.size, 1024):
                frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="flt", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)


def main() -> None:
    rng = random.Random(7)
    folder = HERE / "videos"
    folder.mkdir(exist_ok=True)
    rows = []
    for n in range(N_CLIPS):
        label = ("approach", "recede")[n % 2]
        tone = rng.choice([330.0, 440.0, 550.0]) if n % 4 < 2 else None
        name = f"v{n:03d}.mp4"
        write_clip(folder / name, frames(rng, label == "approach"), tone)
        share = (n // 2) / (N_CLIPS // 2)
        split = next(s for s, end in zip([s for s, _ in SPLITS], np.cumsum([f for _, f in SPLITS])) if share < end)
        rows.append({"id": f"v{n:03d}", "video": f"videos/{name}", "label": label, "split": split})
    with open(HERE / "videos.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "video", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
