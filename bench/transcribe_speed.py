"""Transcription cost per second of audio (`prepare --transcribe` with the embedded whisper-tiny.en), bounded
decoding against the previous rule, in the same run.

- sets: the 48 English sample_data clips (one word each), English and French sentences spoken by espeak-ng (two
  voices each; skipped without espeak-ng), and 3 s of noise and silence.
- bounded: Transcriber.transcribe as prepare calls it (batches of 32, sorted by length, each clip stopped at
  TOKENS_PER_SECOND of its own audio, rejected decodes left empty).
- previous rule: the same greedy decoder with the cap of the previous release, 8 tokens per second of the
  clip's *window* (80 for the 10 s window every clip under 10 s gets), nothing rejected.
- cost: wall seconds of the call divided by the seconds of audio; tokens: decoded per clip (mean and max).

Run alone: `python bench/transcribe_speed.py [--quick]` prints the results JSON; `python bench/run.py --only
transcribe` also records it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, fmt

SHORT = 3  # words: what a foreign or noise clip may still leave ("Numanti.", "We.")
TARGET = f"tokens per clip <= 8 per second of its audio (at least 8); French, noise: empty or <= {SHORT} words"
SENTENCES = {
    "en": ["Could you tell me the way to the railway station?", "please open the door",
           "The quick brown fox jumps over the lazy dog.", "seventy three",
           "I would like two tickets to Boston on Friday morning, please, and a window seat if you have one."],
    "fr": ["Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans.",
           "Le chat dort sur le canapé pendant que la pluie tombe.",
           "Nous allons au marché samedi matin pour acheter des légumes.", "non merci",
           "Je voudrais deux billets pour Lyon vendredi matin, s'il vous plaît."],
}
VOICES = {"en": ("en-us", "en-gb+f3"), "fr": ("fr", "fr+f3")}
OLD_TOKENS_PER_WINDOW_SECOND = 8


def clip_sets(folder: Path, quick: bool) -> dict[str, list[np.ndarray]]:
    from mmllm.media import load_audio

    paths = sorted((ROOT / "sample_data" / "audio").iterdir())
    sets = {"sample_data (English words)": [load_audio(p, 16000) for p in paths[: 8 if quick else None]]}
    if shutil.which("espeak-ng"):
        for lang, said in SENTENCES.items():
            clips = []
            for voice in VOICES[lang]:
                for i, text in enumerate(said[: 2 if quick else None]):
                    path = folder / f"{voice}{i}.wav"
                    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
                    clips.append(load_audio(path, 16000))
            sets[f"espeak-ng {lang} sentences"] = clips
    rng = np.random.default_rng(0)
    sets["noise and silence (3 s)"] = [(0.1 * rng.normal(size=48000)).astype(np.float32), np.zeros(48000, np.float32)]
    return sets


def timed_decode(asr, clips: list[np.ndarray], bounded: bool) -> dict:
    """Wall time and tokens of transcribing `clips` in batches of 32, with the bounded rule or the previous one."""
    from mmllm.encoders import whisper_window

    tokens: list[int] = []
    over = [0]  # clips decoded past their bounded cap
    rejected_before = sum(asr.rejected.values())
    greedy = asr._greedy

    def spy(batch, window, caps):
        if not bounded:  # the previous rule: a cap per second of window, for every clip
            caps = [min(asr.max_tokens, int(OLD_TOKENS_PER_WINDOW_SECOND * window))] * len(batch)
        out = greedy(batch, window, caps)
        tokens.extend(len(ids) for ids, _ in out)
        over[0] += sum(len(ids) > asr.token_cap(len(c)) for (ids, _), c in zip(out, batch))
        return out

    asr._greedy = spy
    if not bounded:
        asr.verdict = lambda text, **stats: None  # the previous rule kept every decode
    try:
        t = time.perf_counter()
        texts = [x for b in range(0, len(clips), 32) for x in asr.transcribe(clips[b:b + 32])]
        wall = time.perf_counter() - t
    finally:
        asr._greedy = greedy
        asr.__dict__.pop("verdict", None)
    audio_s = sum(len(c) for c in clips) / 16000
    windows = sum(whisper_window(len(c), 16000, least=asr.MIN_WINDOW) for c in clips)
    return {"clips": len(clips), "audio_s": round(audio_s, 2), "window_s": windows, "wall_s": round(wall, 3),
            "s_per_audio_s": wall / audio_s, "tokens_mean": float(np.mean(tokens)), "tokens_max": int(max(tokens)),
            "tokens_over_cap": over[0],
            "empty": sum(not x for x in texts), "rejected": sum(asr.rejected.values()) - rejected_before,
            "texts": texts}


def run(tmp: Path | None, quick: bool) -> dict:
    import torch

    from mmllm.encoders import Transcriber

    asr = Transcriber("whisper-tiny.en")
    with tempfile.TemporaryDirectory() as folder:
        sets = clip_sets(Path(folder), quick)
    asr.transcribe([sets["noise and silence (3 s)"][0]])  # load the model and warm up
    asr.rejected.clear()
    out: dict = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0],
                 "tokens_per_second": asr.TOKENS_PER_SECOND, "min_tokens": asr.MIN_TOKENS, "sets": {}}
    for name, clips in sets.items():
        runs: dict[str, list[dict]] = {"bounded": [], "previous": []}
        for _ in range(1 if quick else 2):  # alternating, the faster of each (the machine is shared)
            before = dict(asr.rejected)
            runs["bounded"].append(timed_decode(asr, clips, bounded=True))
            runs["bounded"][-1]["why"] = {k: v - before.get(k, 0) for k, v in asr.rejected.items()
                                          if v - before.get(k, 0)}
            runs["previous"].append(timed_decode(asr, clips, bounded=False))
        best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in runs.items()}
        out["sets"][name] = {**best, "speedup": best["previous"]["wall_s"] / best["bounded"]["wall_s"]}
    out["load_after"] = os.getloadavg()[0]
    foreign = [s["bounded"] for n, s in out["sets"].items() if " fr " in n or n.startswith("noise")]
    out["met"] = all(s["bounded"]["tokens_over_cap"] == 0 for s in out["sets"].values()) and \
        all(len(t.split()) <= SHORT for s in foreign for t in s["texts"])
    return out


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    rows, lines = [], []
    for name, s in r["sets"].items():
        b, p = s["bounded"], s["previous"]
        rows.append(f"| transcription, {name} ({b['clips']} clips, {b['audio_s']:.0f} s of audio) | "
                    f"{b['s_per_audio_s']:.3f} s per audio s, {b['tokens_mean']:.1f} tokens/clip (max "
                    f"{b['tokens_max']}), {b['empty']} empty | previous cap {p['s_per_audio_s']:.3f} s per audio s, "
                    f"{p['tokens_mean']:.1f} tokens/clip (max {p['tokens_max']}) | {fmt(s['speedup'], '.2f')}x | "
                    f"{TARGET} | {r['met']} |")
        if b["why"]:
            kept = [t for t in b["texts"] if t][:4]
            lines.append(f"- transcription, {name}: left empty {b['why']}; kept {kept}; the previous cap "
                         f"wrote {[t[:40] for t in p['texts']][:4]}")
    lines.append(f"- transcription benchmark ({r.get('date', 'this run')}): {r['threads']} threads, load average "
                 f"{r['load_before']:.1f} before, "
                 f"{r['load_after']:.1f} after; cap {r['tokens_per_second']} tokens per second of audio, at least "
                 f"{r['min_tokens']}")
    return rows, lines


def main() -> None:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
