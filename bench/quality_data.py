"""Real public data the project did not make, turned into mmllm manifests for the quality suite (bench/quality.py).

    python bench/quality_data.py [--out quality_data] [--train 1000] [--dataset NAME ...]

Sources, all reachable offline (scikit-learn from PyPI, the rest from Debian's archive with `apt-get download`,
unpacked with `dpkg-deb -x` into quality_data/debs, shared by every OUT: nothing is installed system-wide):
- digits_match (image + audio, classify same/different): handwritten digits of scikit-learn's `load_digits`
  (UCI optical digits, 8x8, written by 43 people) paired with a human voice saying a digit, from the Asterisk PBX
  prompts (asterisk-core-sounds-{en,es,fr,it,ru}-wav: five speakers, five languages). The label says whether the
  spoken digit is the written one, so neither modality alone can beat chance.
- fortunes (text, 4 classes): fortune cookies from Debian's `fortunes` package, labelled by the file they come
  from (computers, politics, science, work): human-written quotations and jokes.
- digits_noise (image + audio, 10 classes): the same handwritten digits labelled by their digit, each paired with
  a random English Asterisk prompt (a human voice saying a sentence that has nothing to do with the digit): the
  audio and its transcript are real recordings that carry nothing for the label.
- prompts (audio -> text, generation): the English Asterisk prompts read by a human (Allison Smith) and their
  transcripts (asterisk-core-sounds-en's core-sounds-en.txt); targets are real sentences, not templates.
- emoji (image -> text, generation): the drawings of Google's Noto Color Emoji font (Debian's
  fonts-noto-color-emoji, rendered with Pillow at the font's 109 px size) described by their Unicode character
  names, lower-cased ("grinning face with smiling eyes", "cherry blossom"): descriptions that people wrote for
  those pictures, phrases rather than sentences; each test picture is one no training record shows.

Each dataset becomes OUT/NAME/manifest.csv with media under OUT/NAME/ and a split column (seeded). Data is never
committed: OUT is git-ignored.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "quality_data"
VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "it": "it_IT_m_Carlo",
          "ru": "ru_RU_f_IvrvoiceRU"}  # asterisk-core-sounds-LANG-wav -> its sounds folder
FORTUNE_CLASSES = ("computers", "politics", "science", "work")
SOUNDS = "usr/share/asterisk/sounds"


def debian_package(name: str, debs: Path) -> Path:
    """The unpacked tree of a Debian package (downloaded once with apt-get download, unpacked with dpkg-deb)."""
    tree = debs / name
    if tree.is_dir():
        return tree
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{name}_*.deb")):
        run = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"apt-get download {name} failed ({run.stderr.strip()[-300:]}); run `apt-get update` first")
    deb = sorted(debs.glob(f"{name}_*.deb"))[-1]
    tmp = debs / f".{name}.tmp"
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(tree)
    return tree


def split_of(i: int, n_train: int, n_val: int) -> str:
    return "train" if i < n_train else "validation" if i < n_train + n_val else "test"


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def digits_match(out: Path, debs: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Handwritten digit image + spoken digit audio; label same/different (balanced)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    clips = {d: [] for d in range(10)}
    for lang, voice in VOICES.items():
        tree = debian_package(f"asterisk-core-sounds-{lang}-wav", debs)
        for d in range(10):
            clips[d].append(tree / SOUNDS / voice / "digits" / f"{d}.wav")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    order = list(range(len(digits.images)))
    rng.shuffle(order)
    n = min(len(order), n_train + 2 * n_eval)
    rows = []
    for i, k in enumerate(order[:n]):
        digit = int(digits.target[k])
        same = i % 2 == 0
        spoken = digit if same else rng.choice([d for d in range(10) if d != digit])
        img = out / "images" / f"d{k:04d}.png"
        pixels = (digits.images[k] * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255, dark ink on white below
        Image.fromarray(255 - pixels).resize((64, 64), Image.NEAREST).convert("RGB").save(img)
        rows.append({"id": f"d{k:04d}", "image": str(img), "audio": str(rng.choice(clips[spoken])),
                     "label": "same" if same else "different", "split": split_of(i, n_train, n_eval)})
    return write_manifest(out / "manifest.csv", rows)


def digits_noise(out: Path, debs: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Handwritten digit image (the label) + an unrelated spoken English prompt (noise for the label)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    wavs = sorted((debian_package("asterisk-core-sounds-en-wav", debs) / SOUNDS / VOICES["en"]).glob("*.wav"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    order = list(range(len(digits.images)))
    rng.shuffle(order)
    rows = []
    for i, k in enumerate(order[:min(len(order), n_train + 2 * n_eval)]):
        img = out / "images" / f"d{k:04d}.png"
        pixels = (digits.images[k] * (255 / 16)).astype(np.uint8)
        Image.fromarray(255 - pixels).resize((64, 64), Image.NEAREST).convert("RGB").save(img)
        rows.append({"id": f"d{k:04d}", "image": str(img), "audio": str(rng.choice(wavs)),
                     "label": str(int(digits.target[k])), "split": split_of(i, n_train, n_eval)})
    return write_manifest(out / "manifest.csv", rows)


def read_fortunes(path: Path) -> list[str]:
    """The fortunes of one file, whitespace-normalized ('%' lines separate them)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [" ".join(f.split()) for f in text.split("\n%\n") if f.strip() and len(f.split()) >= 4]


def fortunes(out: Path, debs: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Fortune cookies labelled by their file: text classification with 4 classes (balanced)."""
    tree = debian_package("fortunes", debs)
    per_class = (n_train + 2 * n_eval) // len(FORTUNE_CLASSES)
    rng = random.Random(seed)
    pools = {}
    for c in FORTUNE_CLASSES:
        pool = sorted(set(read_fortunes(tree / "usr/share/games/fortunes" / f"{c}.u8")))
        rng.shuffle(pool)
        pools[c] = pool[:per_class]
    records = [(c, t) for c in FORTUNE_CLASSES for t in pools[c]]
    rng.shuffle(records)
    n_val = n_eval * len(records) // (n_train + 2 * n_eval)
    n_tr = len(records) - 2 * n_val
    rows = [{"id": f"f{i:04d}", "text": t, "label": c, "split": split_of(i, n_tr, n_val)}
            for i, (c, t) in enumerate(records)]
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out / "manifest.csv", rows)


def prompts(out: Path, debs: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Spoken English prompts -> their transcript (generation); tone and silence files are left out."""
    doc = debian_package("asterisk-core-sounds-en", debs)
    wavs = debian_package("asterisk-core-sounds-en-wav", debs) / SOUNDS / VOICES["en"]
    lines = gzip.open(next(doc.rglob("core-sounds-en.txt.gz")), "rt", encoding="utf-8", errors="replace")
    pairs = []
    for line in lines:
        name, sep, text = line.partition(":")
        text = " ".join(text.split())
        wav = wavs / f"{name.strip()}.wav"
        if sep and text and not text.startswith("[") and not line.startswith(";") and wav.is_file():
            pairs.append((name.strip(), wav, text))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:n_train + 2 * n_eval]
    n_val = max(1, len(pairs) // 10)
    rows = [{"id": name, "audio": str(wav), "target": text, "split": split_of(i, len(pairs) - 2 * n_val, n_val)}
            for i, (name, wav, text) in enumerate(pairs)]
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out / "manifest.csv", rows)


EMOJI_RANGES = ((0x2600, 0x27C0), (0x1F300, 0x1FB00))  # Miscellaneous Symbols, Dingbats, the emoji planes


def emoji(out: Path, debs: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Noto Color Emoji drawings -> their Unicode names (generation); code points the font draws in colour."""
    import unicodedata

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(next(debian_package("fonts-noto-color-emoji", debs).rglob("NotoColorEmoji.ttf"))),
                              109)  # its bitmaps' one size
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs = []
    for start, stop in EMOJI_RANGES:
        for cp in range(start, stop):
            try:
                name = unicodedata.name(chr(cp)).lower()
            except ValueError:
                continue
            img = Image.new("RGB", (136, 128), "white")
            ImageDraw.Draw(img).text((0, 0), chr(cp), font=font, embedded_color=True)
            pixels = np.asarray(img).astype(int)
            if ((pixels.max(2) - pixels.min(2)) > 40).mean() < 0.02:  # not in the font: no colour drawn
                continue
            path = images / f"u{cp:05x}.png"
            img.save(path)
            pairs.append((f"u{cp:05x}", path, name))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:n_train + 2 * n_eval]
    n_val = min(n_eval, max(1, len(pairs) // 8))
    rows = [{"id": key, "image": str(path), "target": name, "split": split_of(i, len(pairs) - 2 * n_val, n_val)}
            for i, (key, path, name) in enumerate(pairs)]
    return write_manifest(out / "manifest.csv", rows)


BUILDERS = {"digits_match": digits_match, "digits_noise": digits_noise, "fortunes": fortunes, "prompts": prompts,
            "emoji": emoji}


def build(name: str, out: Path, n_train: int, n_eval: int) -> Path:
    """OUT/NAME/manifest.csv of one dataset (n_train training records, n_eval each for validation and test)."""
    return BUILDERS[name](out / name, DEFAULT_OUT / "debs", n_train, n_eval)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--train", type=int, default=1000, help="training records per dataset (at most)")
    ap.add_argument("--eval", type=int, default=150, help="validation and test records each (at most)")
    ap.add_argument("--dataset", nargs="*", choices=sorted(BUILDERS), default=sorted(BUILDERS))
    args = ap.parse_args(argv)
    for name in args.dataset:
        print(build(name, args.out, args.train, args.eval))


if __name__ == "__main__":
    main()
