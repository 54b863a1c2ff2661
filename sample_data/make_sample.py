"""Build sample_data/: a small multimodal dataset where the label needs all three modalities.

Each record shows a shape (the image gives its colour: red or blue), plays a spoken word (the audio gives
"yes" or "no", spoken by espeak-ng in varied voices and speeds) and has a sentence (the text gives the size:
large or small, in varied words). The label is the combination, e.g. `red-yes-large`: 8 classes, so any single
modality can get at most 1 bit of the 3 (at best ~25% accuracy), any pair at most ~50%.
The target sentence describes the record for text generation.

Deterministic: same script, same espeak-ng -> same files. Needs `espeak-ng` and `sox` (apt-get install
espeak-ng sox). Run: python sample_data/make_sample.py
"""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
N_RECORDS = 480
SPLITS = [("train", 0.7), ("validation", 0.15), ("test", 0.15)]
COLORS = {"red": [(200, 30, 30), (230, 60, 40), (170, 20, 50)], "blue": [(30, 60, 200), (40, 90, 230), (20, 40, 160)]}
SHAPES = ["circle", "square", "triangle"]
WORDS = ["yes", "no"]
SIZE_WORDS = {"large": ["large", "big", "huge", "giant", "enormous"], "small": ["small", "tiny", "little", "miniature", "petite"]}
TEMPLATES = ["This one is {w}.", "The object looks {w} to me.", "Someone described it as {w}.", "Size note: {w}.",
             "I would call it {w}.", "Honestly, it is rather {w}.", "Compared with the others it is {w}.",
             "The label on the box says {w}."]
VOICES = ["en-us+m1", "en-us+m3", "en-us+f2", "en-gb+m2", "en-gb+f3", "en-gb-scotland+m4", "en-us+f4", "en-gb+m7"]
SPEEDS = [130, 160, 190]


def draw_image(rng: random.Random, color: str, shape: str) -> Image.Image:
    size = 64
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(14, 24)
    cx, cy = rng.randint(r + 2, size - r - 2), rng.randint(r + 2, size - r - 2)
    fill = rng.choice(COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def speak(word: str, voice: str, speed: int, out: Path, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), word], check=True)
        rate = "16000" if fmt == "flac" else "22050"
        # trim leading/trailing silence, mono, resample
        subprocess.run(["sox", "-D", str(wav), "-r", rate, "-c", "1", "-b", "16", str(out),
                        "silence", "1", "0.01", "1%", "reverse", "silence", "1", "0.01", "1%", "reverse"], check=True)


def main() -> None:
    rng = random.Random(1234)
    for sub in ("images", "audio"):
        shutil.rmtree(HERE / sub, ignore_errors=True)
        (HERE / sub).mkdir()
    clips = {}  # (word, voice, speed) -> path: a pool of spoken clips shared by records
    for word in WORDS:
        for vi, voice in enumerate(VOICES):
            for speed in SPEEDS:
                fmt = "wav" if (vi + speed // 10) % 4 == 0 else "flac"
                path = HERE / "audio" / f"{word}_{voice.replace('+', '_')}_{speed}.{fmt}"
                speak(word, voice, speed, path, fmt)
                clips[(word, voice, speed)] = path.relative_to(HERE).as_posix()
    labels = [(c, w, s) for c in COLORS for w in WORDS for s in SIZE_WORDS]
    rows = []
    for i in range(N_RECORDS):
        color, word, size = labels[i % len(labels)]
        shape = rng.choice(SHAPES)
        img = draw_image(rng, color, shape)
        ext = "png" if i % 3 else "jpg"
        img_path = HERE / "images" / f"r{i:03d}.{ext}"
        img.save(img_path, quality=90) if ext == "jpg" else img.save(img_path, optimize=True)
        text = rng.choice(TEMPLATES).format(w=rng.choice(SIZE_WORDS[size]))
        clip = clips[(word, rng.choice(VOICES), rng.choice(SPEEDS))]
        rows.append({"id": f"r{i:03d}", "text": text, "image": img_path.relative_to(HERE).as_posix(), "audio": clip,
                     "label": f"{color}-{word}-{size}",
                     "target": f"a {size} {color} {shape}, the voice says {word}."})
    rng.shuffle(rows)
    start = 0
    for name, frac in SPLITS:
        n = round(frac * N_RECORDS) if name != "test" else N_RECORDS - start
        for row in rows[start:start + n]:
            row["split"] = name
        start += n
    rows.sort(key=lambda r: r["id"])
    with open(HERE / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "image", "audio", "label", "target", "split"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} records, {len(clips)} audio clips to {HERE}")


if __name__ == "__main__":
    main()
