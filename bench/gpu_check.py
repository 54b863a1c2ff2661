"""The CUDA path, end to end, with tiny random models (run by hand on a GPU machine; not part of CI).

    python bench/gpu_check.py OUT_DIR

Builds a tiny BERT, ViT and GPT-2 from configs, writes a small text+image manifest, then runs on the GPU:
prepare, finetune (fp32, bf16, fp16; a frozen text model read from prepare's pooled states with bilinear
fusion), predict, eval, a one-process nccl DDP finetune under torchrun, and a
generate finetune + predict. Writes OUT_DIR/gpu_check.json with each step's exit code, wall time and key
numbers, and exits 1 if any step failed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_models(root: Path) -> dict[str, Path]:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig,
                              ViTImageProcessor, ViTModel)

    torch.manual_seed(0)
    words = "it is big small red blue a thing the one large tiny".split()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(words)] * 10, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")
    out = {"text": root / "bert", "image": root / "vit", "decoder": root / "gpt2"}
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(out["text"])
    fast.save_pretrained(out["text"])
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(out["image"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out["image"])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                               pad_token_id=fast.pad_token_id)).save_pretrained(out["decoder"])
    fast.save_pretrained(out["decoder"])
    return out


def manifest(root: Path, n: int = 96) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color, size = ["red", "blue"][i % 2], ["big", "small"][(i // 2) % 2]
        Image.new("RGB", (40, 40), (200, 30, 30) if color == "red" else (30, 30, 200)).save(root / "img" / f"{i}.png")
        rows.append({"id": f"r{i}", "text": f"it is {size}", "image": f"img/{i}.png", "label": f"{color}-{size}",
                     "target": f"a {size} {color} thing"})
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def step(results: list, name: str, cmd: list[str], stdin: str | None = None, timeout: int = 240) -> dict:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    entry = {"step": name, "rc": p.returncode, "seconds": round(time.perf_counter() - t, 2),
             "last_json": json.loads(lines[-1]) if lines else None}
    if p.returncode != 0:
        entry["stderr_tail"] = p.stderr[-1500:]
    results.append(entry)
    print(json.dumps(entry)[:600], flush=True)
    return entry


def main(out: Path) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "mmllm_gpu_check"
    work.mkdir(parents=True, exist_ok=True)
    m = tiny_models(work / "models")
    csv_path = manifest(work / "data")
    mm = [sys.executable, "-m", "mmllm"]
    res: list = [{"step": "env", "rc": 0, "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}]
    prep = work / "prepared"
    step(res, "prepare", mm + ["prepare", str(csv_path), "--output", str(prep), "--text-model", str(m["text"]),
                               "--image-model", str(m["image"]), "--overwrite"])
    for precision in ("fp32", "bf16", "fp16"):
        step(res, f"finetune-{precision}", mm + ["finetune", str(prep), "--output", str(work / f"ck-{precision}"),
                                                 "--device", "cuda", "--precision", precision, "--epochs", "3",
                                                 "--overwrite"])
    step(res, "finetune-frozen-text", mm + ["finetune", str(prep), "--output", str(work / "ck-frozen"), "--device",
                                            "cuda", "--precision", "bf16", "--freeze-text", "--fusion", "bilinear",
                                            "--epochs", "3", "--overwrite"])
    ck = work / "ck-bf16"
    recs = "".join(json.dumps({"id": f"q{i}", "text": "it is big", "image": str(work / "data" / "img" / f"{i}.png")})
                   + "\n" for i in range(8))
    step(res, "predict-cuda", mm + ["predict", str(ck), "-", "--device", "cuda"], stdin=recs)
    step(res, "eval-cuda", mm + ["eval", "model", str(ck), str(prep), "--split", "test", "--device", "cuda"])
    step(res, "predict-frozen-text-cuda", mm + ["predict", str(work / "ck-frozen"), "-", "--device", "cuda"],
         stdin=recs)
    step(res, "ddp-nccl-1proc", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "1", "-m", "mmllm", "finetune", str(prep), "--output", str(work / "ck-ddp"),
                                 "--device", "cuda", "--epochs", "2", "--overwrite"])
    step(res, "generate-finetune", mm + ["finetune", str(prep), "--task", "generate", "--decoder", str(m["decoder"]),
                                         "--output", str(work / "gen"), "--device", "cuda", "--precision", "bf16",
                                         "--epochs", "2", "--overwrite"])
    step(res, "generate-predict", mm + ["predict", str(work / "gen"), "-", "--device", "cuda"], stdin=recs)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    failed = [r["step"] for r in res if r["rc"] != 0]
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")))
