"""Levers for the frozen encoders, each measured against the way prepare ran them before, in the same run: the
achieved FLOP/s as a fraction of the bf16 matmul peak (bench/limits.py's counting), and the cosine of the pooled
features to fp32. Levers that won are what prepare runs now ("prepare now"); "before" is what it ran.

- text (MiniLM, sample_data texts and the same texts joined into ~60-token inputs): bf16 autocast vs bf16
  weights; sdpa (before) vs eager attention; length-sorted batches of 32 vs 128; OpenVINO bf16 (prepare now, where
  `openvino` is installed and the CPU runs bf16 natively). FLOPs are counted once on the PyTorch network.
- audio (whisper-tiny.en encoder on the sample_data clips, each on its whole-second window): one clip per call
  (before) vs the clips of one window batched (prepare now: same shapes, no padding beyond the window);
  autocast vs bf16 weights; sdpa vs eager.
- image (EfficientNet-Lite0 on the sample_data images): in PyTorch, an F.pad before each stride-1 "SAME" conv
  (before) vs plain convs with symmetric padding, bf16 and fp32; and OpenVINO fp32 (prepare now, where `openvino`
  is installed). FLOPs are counted once on the PyTorch network, whatever runs it.

Run alone: `python bench/levers.py [--quick]` prints the results JSON; `python bench/run.py --only levers` records
it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common import ROOT, openvino_text_from_the_start, sample_records, torch_image_runtime
from limits import best_time, counted_flops, peaks

TARGET = "text >= 25%, audio >= 15% of the bf16 matmul peak (issue 24 section 2), cosine >= 0.999 to fp32"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def text_variants(texts: list[str], repeat: int, peak: float) -> dict:
    from transformers import AutoModel

    from mmllm.encoders import mean_pool, pad_token_ids
    from mmllm.modalities import load_encoder

    enc = load_encoder("text", "minilm", precision="fp32")
    ids = enc.tokenize(texts, 128)["input_ids"]
    pad = enc.tokenizer.pad_token_id or 0

    def pooled(model, batch: int, dtype: torch.dtype | None, autocast: bool) -> np.ndarray:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), enc.dim), np.float32)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                x, mask = pad_token_ids([ids[i] for i in idx], pad)
                states = model(input_ids=x, attention_mask=mask).last_hidden_state.float()
                out[idx] = mean_pool(states, mask).numpy()
        return out

    models = {}
    for attn in ("sdpa", "eager"):
        models[attn] = AutoModel.from_pretrained(enc.folder, dtype=torch.float32, attn_implementation=attn).eval()
    models["sdpa_bf16"] = AutoModel.from_pretrained(enc.folder, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa").eval()
    reference = pooled(models["sdpa"], 32, None, False)
    variants = {"before: sdpa, autocast, batch 32": functools.partial(pooled, models["sdpa"], 32, None, True),
                "eager attention": functools.partial(pooled, models["eager"], 32, None, True),
                "bf16 weights": functools.partial(pooled, models["sdpa_bf16"], 32, None, False),
                "batch 128": functools.partial(pooled, models["sdpa"], 128, None, True),
                "bf16 weights, batch 128": functools.partial(pooled, models["sdpa_bf16"], 128, None, False),
                "fp32": functools.partial(pooled, models["sdpa"], 32, None, False)}
    flops = counted_flops(variants["fp32"])  # the same network whatever runs it (OpenVINO's ops are not counted)
    with openvino_text_from_the_start():  # as a large prepare runs it
        default = load_encoder("text", "minilm", precision="auto")
        default.pooled(ids[:1])  # compiled now, kept after the block
    if default.runtime != "torch":
        variants[f"{default.runtime} {default.precision}"] = functools.partial(default.pooled, ids)
    now = f"{default.runtime} {default.precision}" if default.runtime != "torch" else "eager attention"
    out = {"tokens_mean": float(np.mean([len(i) for i in ids]))}
    for name, fn in variants.items():
        seconds = best_time(fn, repeat)
        out[f"prepare now: {name}" if name == now else name] = {
            "seconds": seconds, "fraction": flops / seconds / peak, "cosine": cosine(fn(), reference)}
    return out


def audio_variants(clips: list[np.ndarray], repeat: int, peak: float) -> dict:
    from transformers import WhisperModel

    from mmllm.encoders import whisper_states, whisper_window
    from mmllm.modalities import load_encoder

    enc = load_encoder("audio", "whisper-tiny.en", precision="fp32")
    encoders = {attn: WhisperModel.from_pretrained(enc.folder, dtype=torch.float32, attn_implementation=attn)
                .encoder.eval() for attn in ("sdpa", "eager")}
    encoders["sdpa_bf16"] = WhisperModel.from_pretrained(enc.folder, dtype=torch.bfloat16,
                                                         attn_implementation="sdpa").encoder.eval()

    def pooled(model, batched: bool, autocast: bool, dtype: torch.dtype) -> np.ndarray:
        groups: dict[float, list[int]] = {}
        for i, c in enumerate(clips):
            groups.setdefault(whisper_window(len(c), enc.sample_rate), []).append(i)
        out = np.zeros((len(clips), enc.dim), np.float32)
        with torch.inference_mode():
            for window, idx in groups.items():
                n = int(window * enc.sample_rate)
                for part in ([idx] if batched else [[i] for i in idx]):
                    feats = enc.processor([clips[i][:n] for i in part], sampling_rate=enc.sample_rate,
                                          return_tensors="pt", padding="max_length", max_length=n).input_features
                    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                        x = whisper_states(model, feats.to(dtype)).float()
                    for j, i in enumerate(part):
                        real = max(1, min(x.shape[1], -(-len(clips[i]) * 50 // enc.sample_rate)))
                        out[i] = x[j, :real].mean(0).numpy()
        return out

    reference = pooled(encoders["sdpa"], False, False, torch.float32)
    variants = {"before: one clip per call, sdpa, autocast": (encoders["sdpa"], False, True, torch.float32),
                "eager attention": (encoders["eager"], False, True, torch.float32),
                "prepare now: clips of one window batched": (encoders["sdpa"], True, True, torch.float32),
                "batched, bf16 weights": (encoders["sdpa_bf16"], True, False, torch.bfloat16),
                "batched, fp32": (encoders["sdpa"], True, False, torch.float32)}
    out = {"clips": len(clips), "audio_s": sum(len(c) for c in clips) / enc.sample_rate}
    for name, (model, batched, ac, dtype) in variants.items():
        fn = functools.partial(pooled, model, batched, ac, dtype)
        flops, seconds = counted_flops(fn), best_time(fn, repeat)
        out[name] = {"seconds": seconds, "fraction": flops / seconds / peak, "cosine": cosine(fn(), reference)}
    return out


def image_variants(images: list, repeat: int, peak: float) -> dict:
    """EfficientNet-Lite0 as prepare runs it (bf16, BatchNorm folded, channels_last, depthwise convs in fp32) with
    its stride-1 "SAME" convs as plain padded convs (now) or with an F.pad before each (before)."""
    import mmllm.encoders as E

    def load(precision: str, fold: bool):
        keep = E._fold_same_padding
        if not fold:
            E._fold_same_padding = lambda model: 0
        try:
            enc = E.load_encoder("image", "efficientnet-lite0", precision=precision)
            assert enc.model is not None  # loaded while the patch holds
        finally:
            E._fold_same_padding = keep
        return enc

    with torch_image_runtime():
        encs = {"before: F.pad, then conv": load("bf16", False), "PyTorch bf16, padded convs": load("bf16", True),
                "PyTorch fp32": load("fp32", True)}
    default = E.load_encoder("image", "efficientnet-lite0", precision="auto")
    if default.runtime != "torch":
        encs[f"prepare now: {default.runtime} {default.precision}"] = default

    def pooled(enc) -> np.ndarray:
        return np.concatenate([enc.encode(images[i:i + 32])[0] for i in range(0, len(images), 32)])

    reference = pooled(encs["PyTorch fp32"])
    flops = counted_flops(functools.partial(pooled, encs["PyTorch fp32"]))  # the same network whatever runs it
    out: dict = {"images": len(images)}
    for name, enc in encs.items():
        fn = functools.partial(pooled, enc)
        seconds = best_time(fn, repeat)
        out[name] = {"seconds": seconds, "fraction": flops / seconds / peak, "cosine": cosine(fn(), reference)}
    return out


def run(tmp: Path | None, quick: bool) -> dict:
    from mmllm.media import load_audio, load_image, normalize_text

    repeat = 1 if quick else 3
    peak = peaks(512 if quick else 2048, 2 if quick else 5)
    records = sample_records(32 if quick else 192)
    texts = [normalize_text(r["text"]) for r in records]
    long_texts = [" ".join(texts[i:i + 6]) for i in range(0, len(texts), 6)] * 6  # ~60 tokens each
    clips = [load_audio(ROOT / "sample_data" / r["audio"], 16000) for r in records[:48]]
    return {"threads": torch.get_num_threads(), "load_before": os.getloadavg()[0], "bf16_peak": peak["bf16"],
            "text_short": text_variants(texts, repeat, peak["bf16"]),
            "text_long": text_variants(long_texts, repeat, peak["bf16"]),
            "audio": audio_variants(clips, repeat, peak["bf16"]),
            "image": image_variants([load_image(ROOT / "sample_data" / r["image"]) for r in records], repeat,
                                    peak["bf16"]), "load_after": os.getloadavg()[0]}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md: one figure line per encoder and input set."""
    lines = []
    for part in ("text_short", "text_long", "audio", "image"):
        if part not in r:
            continue
        v = r[part]
        before = next(k for k in v if k.startswith("before"))
        cells = [f"{k} {100 * x['fraction']:.1f}% ({v[before]['seconds'] / x['seconds']:.2f}x, cos {x['cosine']:.4f})"
                 for k, x in v.items() if isinstance(x, dict)]
        lines.append(f"- encoder levers, {part.replace('_', ' ')} ({r.get('date', 'this run')}, % of the bf16 peak, "
                     f"speed vs before, min cosine to fp32): " + "; ".join(cells))
    lines.append(f"- encoder levers: {r['threads']} threads, bf16 peak {r['bf16_peak'] / 1e9:.0f} GFLOP/s, load "
                 f"average {r['load_before']:.1f} before, {r['load_after']:.1f} after")
    return [], lines


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
