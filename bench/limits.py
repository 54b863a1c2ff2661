"""The limit: achieved GFLOP/s of the frozen encoders in prepare and of the training steps, each against the dense
matmul rate of this machine (bf16 and fp32, measured in the same run).

- peak: torch.matmul of two large square matrices, best of `repeat`, in fp32 and in bf16 (AMX / AVX-512 bf16 where
  the CPU has them), on the threads run.py sets (every core: 2 on the build machines).
- encoders: the embedded text, image and audio encoders as prepare runs them (--precision auto), over one batch of
  sample_data inputs: FLOPs counted by torch.utils.flop_counter.FlopCounterMode over that call, divided by the
  best wall time of the same call; the fraction is against the peak of the precision the encoder ran in. The text
  encoder also over the same texts joined six by six (~60 tokens, `text_long`). Encoders that run in OpenVINO
  (the image encoder in fp32, the text encoder in bf16, where it is installed) have their FLOPs counted on the same
  network in PyTorch.
- training steps: classify (the default text model, MiniLM, fine-tuned in fp32: forward + backward + AdamW on a
  batch of 32 texts of 32 tokens) against the fp32 peak; generate (mmllm's prefix decoder over the embedded
  smollm2-135m, frozen, in the decoder precision `auto` picks, one batch of sample_data targets) against the peak
  of that precision.

Run alone: `python bench/limits.py [--quick]` prints the results JSON; run.py calls `run(tmp, quick)`.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import ENCODERS, ROOT, encoder, openvino_text_from_the_start, sample_records, torch_image_runtime

TARGET = "report only: achieved / peak"


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of `repeat` calls after one warm-up call (the machine is shared: the best is the steadiest)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, as FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peaks(n: int, repeat: int) -> dict:
    """Dense matmul FLOP/s of n x n matrices, fp32 and bf16."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[name] = 2 * n ** 3 / best_time(functools.partial(torch.matmul, a, b), repeat)
    return out


def achieved(fn: Callable[[], object], repeat: int, precision: str, peak: dict) -> dict:
    flops = counted_flops(fn)
    seconds = best_time(fn, repeat)
    rate = flops / seconds
    return {"flops": flops, "seconds": seconds, "flops_per_s": rate, "precision": precision,
            "fraction": rate / peak[precision]}


def encoder_rates(n: int, repeat: int, peak: dict) -> dict:
    """Each embedded encoder's forward over n sample_data inputs, in prepare's default precision (auto), the text
    encoder as a large prepare runs it."""
    with openvino_text_from_the_start():
        return _encoder_rates(n, repeat, peak)


def _encoder_rates(n: int, repeat: int, peak: dict) -> dict:
    from mmllm.encoders import resolve_precision
    from mmllm.media import load_audio, load_image, normalize_text

    precision = resolve_precision("auto")
    records = sample_records(n)
    root = ROOT / "sample_data"
    texts = [normalize_text(r["text"]) for r in records]
    long_texts = [" ".join(texts[i:i + 6]) for i in range(len(texts))]  # ~60 tokens each, as bench/levers.py
    images = [load_image(root / r["image"]) for r in records]
    clips = [load_audio(root / r["audio"], 16000) for r in records]
    calls = {"text": lambda: encoder("text", precision).embed(texts, 128),
             "text_long": lambda: encoder("text", precision).embed(long_texts, 128),
             "image": lambda: encoder("image", precision).encode(images),
             "audio": lambda: encoder("audio", precision).encode(clips)}
    out = {role: {"items": n, **achieved(fn, repeat, precision, peak)} for role, fn in calls.items()}
    text = encoder("text", precision)
    if text.runtime != "torch":  # OpenVINO: FLOPs of the same network in PyTorch (fp32, the same matmuls)
        from mmllm.modalities import load_encoder

        twin = load_encoder("text", ENCODERS["text"], precision="fp32")
        for role, batch in (("text", texts), ("text_long", long_texts)):
            flops = counted_flops(lambda b=batch: twin.embed(b, 128))
            seconds = out[role]["seconds"]
            out[role].update(flops=flops, flops_per_s=flops / seconds, runtime=text.runtime,
                             fraction=flops / seconds / peak[precision])
    image = encoder("image", precision)
    if image.runtime != "torch":  # OpenVINO: FLOPs of the same network in PyTorch, rate against its own precision
        from mmllm.modalities import load_encoder

        with torch_image_runtime():
            twin = load_encoder("image", ENCODERS["image"], precision=image.precision)
        flops = counted_flops(lambda: twin.encode(images))
        seconds = out["image"]["seconds"]
        out["image"].update(flops=flops, flops_per_s=flops / seconds, precision=image.precision,
                            runtime=image.runtime, fraction=flops / seconds / peak[image.precision])
    return out


def classify_step(repeat: int, peak: dict, batch: int = 32, tokens: int = 32) -> dict:
    """A MiniLM fine-tuning step in fp32 (classify's default text model): forward, backward, AdamW."""
    bert = encoder("text").build_model().train()
    ids = torch.randint(1000, 2000, (batch, tokens))
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-5)

    def step():
        bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean().backward()
        opt.step()
        opt.zero_grad()

    return {"records": batch, **achieved(step, repeat, "fp32", peak)}


def generate_step(repeat: int, peak: dict, batch: int) -> dict:
    """One mmllm generate training step (forward, backward, AdamW on the projector) on sample_data targets."""
    import generate_speed

    model, table = generate_speed.mmllm_model(batch), generate_speed.table(batch)
    b = table.batch(range(batch))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(b)["loss"].backward()
        opt.step()
        opt.zero_grad()

    model.train()
    return {"records": batch, **achieved(step, repeat, model.cfg.precision, peak)}


def run(tmp: Path | None = None, quick: bool = False) -> dict:
    """Peaks, encoder rates and step rates, each with its fraction of the matching peak."""
    repeat = 2 if quick else 5
    peak = peaks(512 if quick else 2048, repeat)
    return {"threads": torch.get_num_threads(), "matmul_flops_per_s": peak,
            "encoders": encoder_rates(4 if quick else 32, 1 if quick else 3, peak),
            "classify_step": classify_step(1 if quick else 3, peak, batch=4 if quick else 32),
            "generate_step": generate_step(1 if quick else 3, peak, batch=2 if quick else 32),
            "target": TARGET}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md: every rate with its fraction of the matching peak."""
    p = r["matmul_flops_per_s"]
    lines = [f"- dense matmul peak ({r['threads']} threads): fp32 {p['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
             f"{p['bf16'] / 1e9:.0f} GFLOP/s ({p['bf16'] / p['fp32']:.1f}x)"]
    named = [({"text_long": "text encoder on ~60-token texts"}.get(role, f"{role} encoder") + " (prepare)", e)
             for role, e in r["encoders"].items()]
    named += [("classify training step (MiniLM, fp32)", r["classify_step"]),
              ("generate training step (smollm2-135m prefix decoder)", r["generate_step"])]
    for name, e in named:
        lines.append(f"- {name}: {e['flops_per_s'] / 1e9:.1f} GFLOP/s achieved in {e['precision']}"
                     f"{' (' + e['runtime'] + ')' if e.get('runtime') else ''} = "
                     f"{100 * e['fraction']:.1f}% of the {e['precision']} matmul peak")
    return [], lines


def main() -> None:
    torch.set_num_threads(2)
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    main()
