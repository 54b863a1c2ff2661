"""One interface per role: text encoder, image encoder, audio encoder, text decoder.

`modalities.load_encoder(role, name)` builds these; each resolves `name` as a built-in alias, a local Hugging Face
folder or a hub id, and returns an encoder that carries its own preprocessing, reports `dim`, and has a stable
`identity` (name + weight hash) stored with prepared data and checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm import hub
from mmllm.console import log, quiet_transformers
from mmllm.errors import UserError, read_json
from mmllm.media import MAX_ASPECT


# ---------------------------------------------------------------- name resolution

def resolve(name: str, trust_remote_code: bool = False) -> tuple[Path | None, str]:
    """(folder, identity) of a model name. Built-in aliases without weights return (None, name)."""
    if name in hub.ALIASES:
        if not hub.ALIASES[name].source:
            return None, name
        return hub.alias_dir(name), hub.identity_of_alias(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return path, folder_identity(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise UserError(f"unknown model '{name}': not a folder")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name:
        raise UserError(f"unknown model '{name}': not a built-in alias ({', '.join(hub.ALIASES)}), "
                        "not a local folder" + (", and the hub is offline (HF_HUB_OFFLINE=1)"
                                                if os.environ.get("HF_HUB_OFFLINE") == "1" else ""))
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                              "*.jinja", "*.tiktoken"]))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot fetch model '{name}' from the Hugging Face hub: {str(e).splitlines()[0]}") from None
    return folder, f"{name}@{weights_hash(folder)}"


def folder_identity(path: Path) -> str:
    """A local folder's identity: `NAME@hash of its weights`; the alias's own identity when these are the weights
    of a pulled built-in alias (its marker names it, and the weights are those of the alias's folder), so
    `--text-model ~/.cache/mmllm/models/minilm` and `--text-model minilm` are the same model to eval and predict."""
    alias = hub.pulled_alias(path)
    installed = hub.model_dir(alias) if alias is not None else None
    if installed is not None and installed.is_dir() and installed.resolve() == path.resolve():
        return hub.identity_of_alias(alias)  # the alias's own folder, spelled as a path
    digest = weights_hash(path)
    if installed is not None and installed.is_dir() and weights_hash(installed) == digest:
        return hub.identity_of_alias(alias)  # a copy of it
    return f"{path.name}@{digest}"


def weights_hash(folder: Path) -> str:
    """Short sha256 over the weight files of a folder (names, sizes and contents)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    for p in files:
        h.update(p.name.encode())
        h.update(hub.sha256_file(p).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run in hardware: a CUDA GPU with bf16, or a CPU with AMX or AVX-512 bf16."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # AMX bf16 CPUs have AVX-512 bf16 too
    if check is not None and check():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """auto -> bf16 where the hardware runs it natively, else fp32; fp32 and bf16 are kept as given."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def precision_note(requested: str, resolved: str) -> str:
    """One stderr line saying how the frozen encoders run, and why."""
    how = "bf16 autocast + channels_last" if resolved == "bf16" else "fp32"
    why = {"auto": " (auto: " + ("native bf16 here)" if resolved == "bf16" else "no native bf16 here)"),
           "checkpoint": " (as in the checkpoint)"}.get(requested, "")
    return f"frozen encoders: {how}{why}"


def autocast(precision: str, device: str = "cpu"):
    """bf16 autocast for a frozen encoder's forward (weights stay fp32); a no-op for fp32."""
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")


# ---------------------------------------------------------------- text

# OpenVINO's snippets (its JIT of fused element-wise and attention subgraphs) off for the text model: `embed` 1.03-1.21x
# the texts/s of the default on the 32 short sample_data texts, 1.09-1.16x on ~60-token texts and 1.01-1.04x on 512
# fortunes (~42 tokens), the same states (cosine to PyTorch fp32 0.99996 either way); no difference on the image
# encoder (AMX Xeon, 2 cores, 2026-12-07; bench/NOTES.md)
TEXT_OPENVINO_OPTIONS = {"SNIPPETS_MODE": "DISABLE"}
OPENVINO_AFTER_TOKENS = 100_000  # ~1.8 s of OpenVINO compile is paid back after 50k-115k tokens (short to ~50-token
# texts, AMX Xeon, 2 cores): the text model moves to OpenVINO once a process has embedded this many tokens


class TextEncoder:
    """Tokenizer + pretrained text model (trained in finetune); optional frozen mean-pooled embedding."""

    role = "text"

    def __init__(self, name: str, trust_remote_code: bool = False, precision: str = "fp32"):
        from transformers import AutoConfig, AutoTokenizer

        quiet_transformers()
        self.name = name
        self.precision = resolve_precision(precision)  # of the frozen embedding only; training has its own
        self.folder, self.identity = resolve(name, trust_remote_code)
        if self.folder is None:
            raise UserError(f"'{name}' is not a text model")
        self.trust_remote_code = trust_remote_code
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.dim = int(self.config.hidden_size)
        self._model = None
        self.tokens_run = 0  # tokens this encoder has embedded in this process (see OPENVINO_AFTER_TOKENS)
        self.states = True  # featurize computes the pooled states (text_pooled): a frozen text model reads them
        self.runtime  # noqa: B018 - MMLLM_TEXT_RUNTIME as it is when the encoder is made, not at its first use

    def tokenize(self, texts: list[str], max_tokens: int, pairs: list[str | None] | None = None) -> dict:
        """Token ids per text; with `pairs`, a text and its pair are two segments of one input (BERT: [CLS] text
        [SEP] pair [SEP], both truncated to fit), and a record with only one of them is tokenized alone."""
        if pairs is None:
            enc = self.tokenizer(texts, truncation=True, max_length=max_tokens, padding=False)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        firsts = [t or p or "" for t, p in zip(texts, pairs)]
        both = [i for i, (t, p) in enumerate(zip(texts, pairs)) if t and p]
        out = self.tokenize(firsts, max_tokens)
        if both:
            enc = self.tokenizer([texts[i] for i in both], [pairs[i] for i in both], truncation=True,
                                 max_length=max_tokens, padding=False)
            for j, i in enumerate(both):
                out["input_ids"][i], out["attention_mask"][i] = enc["input_ids"][j], enc["attention_mask"][j]
        return out

    def build_model(self, attention: str | None = None) -> torch.nn.Module:
        """The pretrained text model in fp32 (`attention`: a transformers attn_implementation; None: its default)."""
        from transformers import AutoModel

        extra = {"attn_implementation": attention} if attention else {}
        return AutoModel.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code, dtype=torch.float32,
                                         **extra)

    def embed(self, texts: list[str], max_tokens: int = 128) -> np.ndarray:
        """Frozen sentence embeddings (B, D): mean of token states over the mask, L2-normalized."""
        ids = self.tokenize(texts, max_tokens)["input_ids"]
        return l2_normalize(torch.from_numpy(self.pooled(ids))).numpy()

    def pooled(self, input_ids: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """The frozen text model's token states for these exact token ids, mean-pooled over each record's tokens
        (N, D), unnormalized: what a frozen text model gives the fusion, computed once (prepare) instead of in
        every training step. Records are run in batches of similar length (little padding)."""
        return self.pooled_and_trunk(input_ids, 0, batch_size)[0]

    def frozen_model(self) -> torch.nn.Module:
        """The text model as the frozen embedding runs it in PyTorch, built once: eager attention (1.0-1.9x sdpa's
        texts/s on short texts, 1.06-1.12x on ~60 tokens, bench/levers.py, the same states); a model without an
        eager path keeps its default."""
        if self._model is None:
            try:
                self._model = self.build_model("eager").eval()
            except (ValueError, ImportError):
                self._model = self.build_model().eval()
        return self._model

    @functools.cached_property
    def runtime(self) -> str:
        """What runs the frozen embedding of large runs: "openvino" in bf16 where the precision is bf16 and the
        `openvino` package is installed (`pip install 'mmllm[openvino]'`; MMLLM_TEXT_RUNTIME=torch turns it off),
        else "torch". On an AMX Xeon (2 cores) OpenVINO's bf16 gave 1.3-1.7x PyTorch's bf16 autocast texts/s
        on the short sample_data texts and on fortunes (~50 tokens), at cosine 0.99997 to fp32 where autocast gave
        0.99996; but compiling it costs ~1.8 s a process, so a process runs its first OPENVINO_AFTER_TOKENS tokens
        in PyTorch (a small prepare, a predict of a few records never pay the compile)."""
        if (self.precision != "bf16" or self.trust_remote_code
                or os.environ.get("MMLLM_TEXT_RUNTIME", "").lower() == "torch"):
            return "torch"
        return "openvino" if openvino_installed() else "torch"

    @functools.cached_property
    def compiled(self) -> Any:
        """The frozen text model's last hidden states compiled by OpenVINO in bf16 (see `openvino_compiled`), or
        None when this model does not convert (it then runs in PyTorch, said once)."""
        example = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
        try:
            compiled = openvino_compiled(
                self.identity, self.frozen_model,
                lambda net, ids, mask: net(input_ids=ids, attention_mask=mask).last_hidden_state,
                example, [([-1, -1], "i64"), ([-1, -1], "i64")], "bf16", TEXT_OPENVINO_OPTIONS)
        except Exception as e:  # noqa: BLE001 - any conversion failure: the PyTorch path gives the same states
            log(f"text model {self.name}: OpenVINO could not convert it ({type(e).__name__}); it runs in PyTorch")
            self.runtime = "torch"
            return None
        log(f"text model {self.name}: OpenVINO bf16 (MMLLM_TEXT_RUNTIME=torch for PyTorch's bf16 autocast)")
        return compiled

    @torch.inference_mode()
    def pooled_and_trunk(self, input_ids: list[list[int]], trunk_layers: int = 0, batch_size: int = 32
                         ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(pooled states (N, D) as `pooled`, and with `trunk_layers` k > 0 each record's token states after layer
        L-k: (n_i, D) float32 over its real tokens, padding left out), from one forward of the whole model (in
        OpenVINO where `runtime` says so and no trunk states are asked for)."""
        self.tokens_run += sum(len(ids) for ids in input_ids)
        ready = "compiled" in self.__dict__ or self.tokens_run > OPENVINO_AFTER_TOKENS
        compiled = self.compiled if self.runtime == "openvino" and ready and not trunk_layers else None
        model = None if compiled is not None else self.frozen_model()
        pad = self.tokenizer.pad_token_id or 0
        order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
        out = np.zeros((len(input_ids), self.dim), np.float32)
        trunk: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * (len(input_ids) if trunk_layers else 0)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_token_ids([input_ids[i] for i in idx], pad)
            if model is None:
                states = torch.from_numpy(np.asarray(compiled((ids.numpy(), mask.numpy()))[0], dtype=np.float32))
                out[idx] = mean_pool(states, mask).numpy()
                continue
            with autocast(self.precision):
                result = model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(trunk_layers))
            states = result.last_hidden_state.float()  # (B, T, D)
            out[idx] = mean_pool(states, mask).numpy()
            if trunk_layers:
                below = result.hidden_states[-1 - trunk_layers].float()  # (B, T, D): the input of layer L-k+1
                for j, i in enumerate(idx):
                    trunk[i] = below[j, :int(mask[j].sum())].numpy().copy()
        return out, trunk

    def describe(self) -> dict:
        ran = self.runtime if "compiled" in self.__dict__ and self.compiled is not None else "torch"
        return {"name": self.name, "identity": self.identity, "dim": self.dim, "precision": self.precision,
                "runtime": ran, "preprocessing": {"tokenizer": type(self.tokenizer).__name__}}


def pad_token_ids(seqs: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length token ids -> right-padded ids (B, T) and attention mask (B, T). Position 0 is always
    unmasked, so an empty text still has one (padding) position to pool."""
    width = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[j, :len(s)] = 1
    mask[:, 0] = 1
    return ids, mask


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D) mean over unmasked positions."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------- images

def import_openvino() -> Any:
    """openvino, imported. Its import creates absl-py's logging handler on the sys.stderr of that moment; any later
    `logging.config.dictConfig` (uvicorn's, in serve) closes every live handler, and absl's close() closes its
    stream unless it is a std stream: pointed at sys.__stderr__, it is never closed under a redirected stderr (a
    notebook, a test runner)."""
    import sys

    import openvino

    absl = sys.modules.get("absl.logging")
    if absl is not None:
        absl.get_absl_handler().python_handler.stream = sys.__stderr__
    return openvino


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class _Traced(torch.nn.Module):
    """`forward(net, *inputs)` over a network, as the module OpenVINO converts."""

    def __init__(self, net: torch.nn.Module, forward: Any) -> None:
        super().__init__()
        self.net, self.fn = net, forward

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(self.net, *inputs)


def openvino_compiled(identity: str, net: Any, forward: Any, example: Any, inputs: list[tuple[list[int], str]],
                      precision: str, options: dict | None = None) -> Any:
    """`forward(net(), *inputs)` compiled by OpenVINO for this CPU in `precision` ("f32" or "bf16", OpenVINO's
    inference precision), on torch's thread count, with `options` (more of OpenVINO's CPU properties). It is
    converted once (`net()` builds the PyTorch network only then; `inputs`: the shape, -1 where any size goes, and
    element type of each input) and kept in fp32 under MMLLM_HOME/openvino by identity; the precision and the
    options are chosen when it is compiled."""
    ov = import_openvino()
    folder = hub.home() / "openvino"
    xml = folder / (re.sub(r"[^A-Za-z0-9._-]", "-", identity) + "-fp32.xml")  # org/name@hash: one file name
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
              **(options or {})}
    if xml.is_file():
        try:
            return core.compile_model(core.read_model(str(xml)), "CPU", config)
        except Exception:  # noqa: BLE001 - a damaged cache file (truncated, emptied): converted again below
            log(f"{xml} could not be read by OpenVINO: converting the model again")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{xml.stem}.{os.getpid()}.xml"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about shapes it keeps dynamic
            converted = ov.convert_model(_Traced(net(), forward).eval(), example_input=example,
                                         input=[(ov.PartialShape(shape), getattr(ov.Type, kind))
                                                for shape, kind in inputs])
        ov.save_model(converted, str(tmp), compress_to_fp16=False)
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)  # the .xml last: a cached .xml always has its weights
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return core.compile_model(core.read_model(str(xml)), "CPU", config)


class ImageEncoder:
    """Frozen image encoder with its own preprocessing. `encode(list[PIL]) -> pooled (B, D), sequence (B, T, D)`."""

    def __init__(self, name: str, trust_remote_code: bool = False, precision: str = "fp32"):
        quiet_transformers()
        self.name = name
        self.precision = resolve_precision(precision)
        self.folder, self.identity = resolve(name, trust_remote_code)
        if self.folder is None:
            raise UserError(f"'{name}' is not an image model")
        cfg = read_json(self.folder / "config.json")
        self.trust_remote_code = trust_remote_code
        if cfg.get("model_type") == "efficientnet-lite":
            self.kind = "efficientnet-lite"
            self.image_size = int(cfg["image_size"])
            self.mean, self.std = [127 / 255] * 3, [128 / 255] * 3  # TF-Lite training normalization
            self.processor = None
            self.dim, self.seq_len = int(cfg["hidden_size"]), (self.image_size // 32) ** 2
            if self.runtime == "openvino":
                self.precision = "fp32"  # OpenVINO's fp32 is faster than PyTorch's bf16 here (see runtime)
        else:
            from transformers import AutoImageProcessor

            self.kind = "transformers"
            self.processor = AutoImageProcessor.from_pretrained(self.folder, backend="pil",
                                                                trust_remote_code=trust_remote_code)
            self.image_size = _edge(getattr(self.processor, "crop_size", None)) or _edge(self.processor.size) or 224
            self.mean = list(getattr(self.processor, "image_mean", None) or [0.5] * 3)
            self.std = list(getattr(self.processor, "image_std", None) or [0.5] * 3)
            from PIL import Image

            with torch.inference_mode():  # output shapes differ by family: measure them once
                pooled, seq = self.forward(self.preprocess([Image.new("RGB", (self.image_size, self.image_size))]))
            self.dim, self.seq_len = pooled.shape[-1], seq.shape[1]

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """Weights load on first use, so a run served from the feature cache never loads them."""
        if self.kind == "efficientnet-lite":

            from efficientnet_lite_pytorch import EfficientNet
            from safetensors.torch import load_file

            cfg = read_json(self.folder / "config.json")
            model = EfficientNet.from_name(cfg["variant"])
            model.load_state_dict(load_file(str(self.folder / "model.safetensors")))
        else:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code,
                                              dtype=torch.float32)
            model = getattr(model, "vision_model", model)  # CLIP/SigLIP full models: the vision tower
        if self.precision == "bf16" and self.kind == "efficientnet-lite":
            _fold_batchnorm(model)
        if self.kind == "efficientnet-lite":
            _fold_same_padding(model)
        if self.channels_last_for(model):
            model = model.to(memory_format=torch.channels_last)
            for conv in model.modules():
                if isinstance(conv, torch.nn.Conv2d) and conv.groups > 1:
                    conv.forward = _in_fp32(conv.forward)
        return model.eval()

    def channels_last_for(self, model: torch.nn.Module) -> bool:
        """bf16 conv nets run channels_last (oneDNN's fast layout); a ViT's single patch conv gains nothing."""
        return self.precision == "bf16" and sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1

    def preprocess(self, images: list) -> torch.Tensor:
        """RGB PIL images -> (B, 3, H, W) float tensor."""
        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        from PIL import Image

        arrs = []
        for img in images:
            w, h = img.size  # resize the short side, centre crop, as ImageNet evaluation does
            s = self.image_size / min(w, h)
            img = img.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))), Image.BICUBIC)
            left, top = (img.size[0] - self.image_size) // 2, (img.size[1] - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
            arrs.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    @functools.cached_property
    def runtime(self) -> str:
        """What runs the forward: "openvino" for EfficientNet-Lite on a CPU when the `openvino` package is installed
        (`pip install 'mmllm[openvino]'`; MMLLM_IMAGE_RUNTIME=torch turns it off), else "torch". OpenVINO runs it
        in fp32, whatever --precision says: on this network (depthwise convolutions) that is 2.4x PyTorch's bf16
        and 3.2x its fp32 (64 sample_data images, 2 cores) with the fp32 features (cosine 1.0000), where
        OpenVINO's own bf16 gave a cosine of only 0.993 on real images."""
        if self.kind != "efficientnet-lite" or os.environ.get("MMLLM_IMAGE_RUNTIME", "").lower() == "torch":
            return "torch"
        return "openvino" if openvino_installed() else "torch"

    @functools.cached_property
    def compiled(self) -> Any:
        """The feature extractor compiled by OpenVINO in fp32 (see `openvino_compiled`)."""
        size = self.image_size
        compiled = openvino_compiled(self.identity, lambda: self.model,
                                     lambda net, pixels: net.extract_features(pixels), torch.zeros(1, 3, size, size),
                                     [([-1, 3, size, size], "f32")], "f32")
        log(f"image encoder {self.name}: OpenVINO, fp32 whatever --precision says (faster than PyTorch's bf16 on it; "
            "MMLLM_IMAGE_RUNTIME=torch for PyTorch)")
        return compiled

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> pooled (B, D), sequence (B, T, D), both float32 whatever the precision."""
        if self.runtime == "openvino":
            fmap = torch.from_numpy(np.asarray(self.compiled(pixels.float().contiguous().numpy())[0],
                                               dtype=np.float32))  # (B, C, h, w)
            seq = fmap.flatten(2).transpose(1, 2)
            return seq.mean(1), seq
        model = self.model
        if self.channels_last_for(model):
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision):
            if self.kind == "efficientnet-lite":
                fmap = model.extract_features(pixels).float()  # (B, C, h, w)
                seq = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
                return seq.mean(1), seq
            out = model(pixel_values=pixels)
        hidden = out.last_hidden_state.float()
        seq = hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden  # conv nets: (B, C, h, w)
        pooled = getattr(out, "pooler_output", None)
        pooled = seq.mean(1) if pooled is None else pooled.flatten(1).float()
        return pooled, seq

    @torch.inference_mode()
    def encode(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        pooled, seq = self.forward(self.preprocess(images))
        return pooled.float().numpy(), seq.float().numpy()

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "dim": int(self.dim), "seq_len": int(self.seq_len),
                "precision": self.precision, "runtime": self.runtime,
                "preprocessing": {"image_size": self.image_size, "mean": self.mean, "std": self.std,
                                  "resize": "short side, bicubic, centre crop" if self.processor is None
                                  else type(self.processor).__name__,
                                  # media.load_image(min_side=image_size): a new key, so features of large images
                                  # decoded in full before are not reused from the cache
                                  "decode": f"draft/reduce to short side >= image_size, aspect <= {MAX_ASPECT}:1"}}


def _fold_batchnorm(model: torch.nn.Module) -> None:
    """EfficientNet-Lite: each eval-mode BatchNorm folded into the conv before it (fp32 weights, equal to 1e-7).
    One bf16 rounding fewer per layer and one pass over the activations less: faster and closer to fp32."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
             ("_project_conv", "_bn2"))
    for parent in [model, *model._blocks]:
        for conv, bn in pairs:
            c, b = getattr(parent, conv, None), getattr(parent, bn, None)
            if isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d):
                setattr(parent, conv, fuse_conv_bn_eval(c.eval(), b.eval()))
                setattr(parent, bn, torch.nn.Identity())


def _fold_same_padding(model: torch.nn.Module) -> int:
    """TensorFlow-"SAME" convs of stride 1 and odd kernels (EfficientNet-Lite's depthwise convs, 44 of them) pad
    symmetrically, k // 2 on each side whatever the input size: each becomes a plain Conv2d with that padding,
    sharing its weights, instead of an F.pad copy then a conv. The same outputs (bit for bit on sample_data),
    1.07-1.15x images/s. Strided ones pad asymmetrically and stay. Returns how many were replaced."""
    same = ("Conv2dDynamicSamePadding", "Conv2dStaticSamePadding")
    n = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m).__name__ in same and tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1) \
                    and all(k % 2 for k in m.kernel_size) and tuple(m.padding) == (0, 0):
                conv = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, 1,
                                       tuple(k // 2 for k in m.kernel_size), groups=m.groups, bias=m.bias is not None)
                conv.weight, conv.bias = m.weight, m.bias
                setattr(parent, name, conv)
                n += 1
    return n


def _in_fp32(forward):
    """A depthwise (grouped) conv's forward outside autocast. It sums only k*k products, so bf16-rounded weights
    do not average out: EfficientNet-Lite0's pooled features (BN folded) go from cosine 0.996 to 0.9995 of fp32
    on photos; it costs about half of bf16's speed-up on that model."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float())
    return run


def _edge(size: Any) -> int | None:
    """The square edge of an image processor's size (int, dict or SizeDict)."""
    if size is None or isinstance(size, int):
        return size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    value = get("height") or get("shortest_edge")
    return int(value) if value else None


# ---------------------------------------------------------------- audio

class AudioEncoder:
    """Frozen audio encoder. `encode(list[np.ndarray]) -> pooled (B, D), sequences list[(T_i, D)]`.

    Whisper runs on the clip's real frames (padded to whole seconds) by slicing its positional table,
    instead of padding every clip to 30 s.
    """

    SEQ_LEN = 16  # tokens kept per clip for attention fusion (adaptive average pooling over time)
    BATCH_AUDIO_SECONDS = 240.0  # of Whisper windows per encoder call (batched clips of one window length)

    def __init__(self, name: str, trust_remote_code: bool = False, whisper_full_window: bool = False,
                 precision: str = "fp32"):
        quiet_transformers()
        self.name = name
        self.precision = resolve_precision(precision)
        self.folder, self.identity = resolve(name, trust_remote_code)
        self.whisper_full_window = whisper_full_window
        if self.folder is None:  # librosa front-ends
            self.kind = name
            self.precision = "fp32"  # numpy, no network
            self.sample_rate = 16000
            self.params = ({"n_mels": 64, "n_fft": 400, "hop_length": 160} if name == "logmel"
                           else {"n_mfcc": 20, "n_fft": 400, "hop_length": 160, "deltas": True})
            self.dim = 2 * (64 if name == "logmel" else 40)
            return
        from transformers import AutoConfig, AutoFeatureExtractor

        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.processor = AutoFeatureExtractor.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.sample_rate = int(self.processor.sampling_rate)
        self.trust_remote_code = trust_remote_code
        if config.model_type == "whisper":
            self.kind = "whisper"
            self.params = {"n_mels": config.num_mel_bins, "n_fft": self.processor.n_fft,
                           "hop_length": self.processor.hop_length, "window": "real length, whole seconds"
                           if not whisper_full_window else "30 s"}
        else:
            self.kind = "transformers"
            self.params = {"feature_extractor": type(self.processor).__name__}
        self.dim = int(getattr(config, "d_model", None) or config.hidden_size)

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """Weights load on first use, so a run served from the feature cache never loads them."""
        from transformers import AutoModel, WhisperModel

        if self.kind == "whisper":
            return WhisperModel.from_pretrained(self.folder, dtype=torch.float32).encoder.eval()
        return AutoModel.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code,
                                         dtype=torch.float32).eval()

    @torch.inference_mode()
    def encode(self, clips: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.kind in ("logmel", "mfcc"):
            seqs = [self._librosa(c) for c in clips]
            pooled = np.stack([np.concatenate([s.mean(0), s.std(0)]) for s in seqs])
            return pooled.astype(np.float32), seqs
        if self.kind == "whisper":
            seqs = self._whisper(clips)
        else:
            seqs = []
            for c in clips:  # one clip at a time: padding would change the features of the others
                inputs = self.processor(c, sampling_rate=self.sample_rate, return_tensors="pt")
                with autocast(self.precision):
                    seqs.append(self.model(**inputs).last_hidden_state[0].float().numpy())
        pooled = np.stack([s.mean(0) for s in seqs]).astype(np.float32)
        return pooled, seqs

    def _whisper(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """(T', D) encoder states for the real frames of each clip. The clips of one window run as one batch (the
        same shapes: nothing is padded beyond the window each clip has alone), at most BATCH_AUDIO_SECONDS of
        windows per call: 3.0-3.4x the clips/s of one clip per call on sample_data (bench/levers.py, three runs),
        the same features (no attention mask: the rows are independent)."""
        groups: dict[float, list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(whisper_window(len(clip), self.sample_rate, self.whisper_full_window), []).append(i)
        out: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(clips)
        for window, same in groups.items():
            n = int(window * self.sample_rate)
            per_call = max(1, int(self.BATCH_AUDIO_SECONDS // window))  # memory: 8 clips of 30 s at most
            for start in range(0, len(same), per_call):
                idx = same[start:start + per_call]
                feats = self.processor([clips[i][:n] for i in idx], sampling_rate=self.sample_rate,
                                       return_tensors="pt", padding="max_length", max_length=n).input_features
                with autocast(self.precision):
                    x = whisper_states(self.model, feats).float()  # (B, frames/2, D)
                for j, i in enumerate(idx):
                    real = max(1, min(x.shape[1], -(-len(clips[i]) * 50 // self.sample_rate)))  # 50 frames a second
                    out[i] = x[j, :real].numpy()
        return out

    def _librosa(self, clip: np.ndarray) -> np.ndarray:
        import librosa

        if self.kind == "logmel":
            mel = librosa.feature.melspectrogram(y=clip, sr=self.sample_rate, n_fft=400, hop_length=160, n_mels=64)
            return librosa.power_to_db(mel).T.astype(np.float32)  # (frames, 64)
        mfcc = librosa.feature.mfcc(y=clip, sr=self.sample_rate, n_mfcc=20, n_fft=400, hop_length=160)
        width = min(9, mfcc.shape[1] - (1 - mfcc.shape[1] % 2)) if mfcc.shape[1] >= 3 else 0
        delta = librosa.feature.delta(mfcc, width=width) if width >= 3 else np.zeros_like(mfcc)
        return np.concatenate([mfcc, delta]).T.astype(np.float32)  # (frames, 40)

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "dim": int(self.dim), "seq_len": self.SEQ_LEN,
                "precision": self.precision,
                "preprocessing": {"sample_rate": self.sample_rate, "channels": 1, **self.params}}


def whisper_window(samples: int, sample_rate: int, full: bool = False, least: float = 1.0) -> float:
    """Seconds of audio a Whisper encoder sees: the clip's length rounded up to whole seconds (`least` to 30),
    or 30."""
    return 30.0 if full else min(30.0, max(least, math.ceil(samples / sample_rate)))


def whisper_states(enc: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """A WhisperEncoder on log-mels of any window up to 30 s: (B, mels, frames) -> (B, frames/2, D), by using the
    first frames/2 rows of its positional table (the encoder itself insists on 30 s)."""
    x = torch.nn.functional.gelu(enc.conv1(feats))
    x = torch.nn.functional.gelu(enc.conv2(x)).transpose(1, 2)  # (B, frames/2, D)
    x = x + enc.embed_positions.weight[: x.shape[1]]
    for layer in enc.layers:
        out = layer(x, attention_mask=None)
        x = out[0] if isinstance(out, tuple) else out
    return enc.layer_norm(x)


# ---------------------------------------------------------------- speech recognition

class Transcriber:
    """Speech -> text with a Whisper model (`prepare --transcribe`): its encoder on the clip's real length (whole
    seconds, as AudioEncoder, but at least MIN_WINDOW), its decoder greedy, batched by window, and bounded by the
    clip's duration (`token_cap`). A decode that looks like a model that did not recognise the speech (`verdict`:
    no end within the cap, a repetitive text, Whisper's no-speech test) is left empty and counted in `rejected`.
    `transcribe(list[np.ndarray]) -> list[str]`."""

    role = "transcript"
    MAX_TOKENS = 224  # Whisper's own cap on the tokens of one 30 s window
    # per second of the clip's own audio (not of its window): Whisper's own 224 per 30 s, rounded up; read English
    # speech is 4-5 tokens/s (espeak-ng sentences), so only a decoder that runs away reaches it; the floor keeps
    # short clips' words ("seventy-three.")
    TOKENS_PER_SECOND = 8
    MIN_TOKENS = 8
    COMPRESSION_RATIO = 2.4  # Whisper's threshold: a text gzip shrinks more than this repeats itself
    NO_SPEECH = 0.6, -1.0  # Whisper's: P(no speech) above the first and mean log-prob below the second
    # P(no speech) above which the decode is dropped however confident: whisper-tiny.en says "you" of silence with
    # P 0.99 and log-prob -0.7; the 48 English sample_data clips reach 0.61, noise and tones 0.77-0.95
    NO_SPEECH_ALONE = 0.9
    CAPTION = re.compile(r"\s*(?:[(\[][^()\[\]]*[)\]]\s*)+")  # only "(speaking in foreign language)", "[SOUND]", ...
    # whisper-tiny.en on the 48 sample_data clips (0.3-0.6 s of speech): windows of 1-2 s make the decoder repeat
    # itself ("Yes, yes, yes, ...") on 20 clips, 5 s on 3, 10 s and 30 s on none; 10 s costs a third of 30 s
    MIN_WINDOW = 10.0

    def __init__(self, name: str, trust_remote_code: bool = False, precision: str = "fp32"):
        from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

        quiet_transformers()
        self.name = name
        self.precision = resolve_precision(precision)
        self.folder, self.identity = resolve(name, trust_remote_code)
        config = AutoConfig.from_pretrained(self.folder) if self.folder is not None else None
        if getattr(config, "model_type", None) != "whisper":
            raise UserError(f"--transcribe-model: '{name}' is not a Whisper model (a Hugging Face "
                            "WhisperForConditionalGeneration folder or id, or whisper-tiny.en)")
        self.config = config
        self.processor = AutoFeatureExtractor.from_pretrained(self.folder)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"--transcribe-model: {self.folder} has no usable tokenizer ({str(e)[:120]})") from None
        self.sample_rate = int(self.processor.sampling_rate)
        self.prompt = self._prompt()
        self.max_tokens = max(1, min(self.MAX_TOKENS, config.max_target_positions - len(self.prompt)))  # per window
        vocab = config.vocab_size
        eos = config.eos_token_id
        specials = [i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special and i != eos]
        self.suppress = sorted({i for i in specials + list(config.suppress_tokens or []) if 0 <= i < vocab})
        self.begin_suppress = sorted({i for i in config.begin_suppress_tokens or [] if 0 <= i < vocab})
        self.no_speech_id = next((i for i in map(self._token, ("<|nospeech|>", "<|nocaptions|>"))
                                  if i is not None and i != eos), None)
        self.clips = 0  # clips transcribed by this instance (not served from the cache)
        self.rejected: dict[str, int] = {}  # why a decode was left empty -> clips

    def _token(self, text: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(text)
        return i if isinstance(i, int) and i != self.tokenizer.unk_token_id and 0 <= i < self.config.vocab_size \
            else None

    def _prompt(self) -> list[int]:
        """<|startoftranscript|> [<|en|><|transcribe|> on multilingual models] <|notimestamps|>, as far as the
        tokenizer has them."""
        task = [self._token("<|en|>"), self._token("<|transcribe|>")] if self.config.vocab_size >= 51865 else []
        return [self.config.decoder_start_token_id] + [i for i in task + [self._token("<|notimestamps|>")]
                                                       if i is not None]

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """Weights load on first use, so a run served from the cache never loads them."""
        import inspect

        from transformers import WhisperForConditionalGeneration

        model = WhisperForConditionalGeneration.from_pretrained(self.folder, dtype=torch.float32).eval()
        # transformers 5.x names the KV cache `cache`; 4.x `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        return model

    def token_cap(self, samples: int) -> int:
        """The most tokens decoded for a clip of `samples`: TOKENS_PER_SECOND of its audio, at least MIN_TOKENS."""
        seconds = min(samples / self.sample_rate, 30.0)
        return max(1, min(self.max_tokens, max(self.MIN_TOKENS, math.ceil(self.TOKENS_PER_SECOND * seconds))))

    @torch.inference_mode()
    def transcribe(self, clips: list[np.ndarray]) -> list[str]:
        """One transcript per clip, in order ("" for a rejected decode). Clips with the same window are decoded
        together, each to its own cap, so a clip's transcript does not depend on the other clips of the batch."""
        out = [""] * len(clips)
        groups: dict[float, list[int]] = {}
        for i in sorted(range(len(clips)), key=lambda i: len(clips[i])):
            groups.setdefault(whisper_window(len(clips[i]), self.sample_rate, least=self.MIN_WINDOW), []).append(i)
        for window, idx in groups.items():
            decoded = self._greedy([clips[i] for i in idx], window, [self.token_cap(len(clips[i])) for i in idx])
            for i, (ids, stats) in zip(idx, decoded):
                text = " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())
                why = self.verdict(text, **stats)
                if why:
                    self.rejected[why] = self.rejected.get(why, 0) + 1
                out[i] = "" if why else text
        self.clips += len(clips)
        return out

    @classmethod
    def verdict(cls, text: str, ended: bool, logprob: float, no_speech: float | None) -> str | None:
        """Why a decode is not a transcript (None: it is): no end token within the cap, nothing but captions in
        brackets (what an English-only Whisper writes of other languages and of noise), a repetitive text (gzip
        compression ratio), or the no-speech tests (`logprob`: mean log-probability per token)."""
        if not ended:
            return "no end within the token cap"
        if cls.CAPTION.fullmatch(text):
            return "foreign language" if "foreign" in text.lower() else "a sound caption, not speech"
        raw = text.encode()
        if raw and len(raw) / len(zlib.compress(raw)) > cls.COMPRESSION_RATIO:
            return "repetitive text"
        if no_speech is not None and (no_speech > cls.NO_SPEECH_ALONE or
                                      (no_speech > cls.NO_SPEECH[0] and logprob < cls.NO_SPEECH[1])):
            return "no speech"
        return None

    def report(self) -> str | None:
        """The one line that says how many clips were left untranscribed, and why (None: none)."""
        if not self.rejected:
            return None
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
        return (f"{sum(self.rejected.values())} clips not transcribed ({why}): their transcript is empty; "
                f"{self.name} did not recognise the speech (an English-only model on other languages, or noise)")

    @torch.inference_mode()
    def _greedy(self, clips: list[np.ndarray], window: float, caps: list[int]) -> list[tuple[list[int], dict]]:
        """Greedy token ids (prompt and end token left out) of clips that share one window, each stopped at its cap,
        with a KV cache; and per clip {ended, logprob (mean per token, the end included), no_speech}."""
        from transformers.modeling_outputs import BaseModelOutput

        n = int(window * self.sample_rate)
        feats = self.processor([c[:n] for c in clips], sampling_rate=self.sample_rate, return_tensors="pt",
                               padding="max_length", max_length=n).input_features  # (B, mels, frames)
        eos = self.config.eos_token_id
        tokens: list[list[int]] = [[] for _ in clips]
        cap = torch.tensor(caps)  # (B,)
        done = torch.zeros(len(clips), dtype=torch.bool)
        ended = torch.zeros(len(clips), dtype=torch.bool)
        logprob = torch.zeros(len(clips))
        no_speech: list[float | None] = [None] * len(clips)
        step_ids, past = torch.tensor([self.prompt] * len(clips)), None  # (B, P)
        with autocast(self.precision):
            states = BaseModelOutput(last_hidden_state=whisper_states(self.model.model.encoder, feats))
            for step in range(max(caps) + 1):  # cap tokens, then one step for the end token
                out = self.model(encoder_outputs=states, decoder_input_ids=step_ids, use_cache=True,
                                 **{self._cache_arg: past})
                if step == 0 and self.no_speech_id is not None:  # what the model says right after <|startoftranscript|>
                    no_speech = out.logits[:, 0].float().softmax(-1)[:, self.no_speech_id].tolist()
                logits = out.logits[:, -1].float()  # (B, V)
                logits[:, self.suppress] = -math.inf
                if step == 0:
                    logits[:, self.begin_suppress] = -math.inf
                best = logits.argmax(-1)  # (B,)
                at_cap = step >= cap
                live = ~done
                lp = logits.log_softmax(-1).gather(1, best[:, None])[:, 0]
                logprob += torch.where(live & (~at_cap | (best == eos)), lp, 0.0)
                ended |= live & (best == eos)
                nxt = torch.where(done | at_cap, eos, best)  # (B,)
                for b in torch.nonzero(nxt != eos).flatten().tolist():
                    tokens[b].append(int(nxt[b]))
                done |= nxt == eos
                if done.all():
                    break
                step_ids, past = nxt[:, None], getattr(out, "cache", None) or out.past_key_values
        stats = [{"ended": bool(ended[b]), "logprob": float(logprob[b]) / (len(tokens[b]) + int(ended[b])),
                  "no_speech": no_speech[b]} for b in range(len(clips))]
        return list(zip(tokens, stats))

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "precision": self.precision,
                "preprocessing": {"sample_rate": self.sample_rate, "decoding": "greedy", "prompt": self.prompt,
                                  "window": f"real length, whole seconds, {self.MIN_WINDOW:g} to 30 s",
                                  "max_tokens": f"{self.TOKENS_PER_SECOND} per second of audio, at least "
                                                f"{self.MIN_TOKENS}, at most {self.max_tokens}",
                                  "rejected": f"no end within the cap, only bracketed captions, gzip compression "
                                              f"ratio > {self.COMPRESSION_RATIO:g}, P(no speech) > "
                                              f"{self.NO_SPEECH_ALONE:g} or > {self.NO_SPEECH[0]:g} with mean "
                                              f"log-prob < {self.NO_SPEECH[1]:g}: empty"}}


# ---------------------------------------------------------------- decoder

def load_decoder(name: str, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """(causal LM, tokenizer, identity) for --task generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    folder, identity = resolve(name, trust_remote_code)
    if folder is None:
        raise UserError(f"'{name}' is not a causal language model")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, identity


def is_vision_language(name: str, trust_remote_code: bool = False) -> bool:
    """Whether a decoder name is a vision-language model (its config has a vision tower): --task generate then
    trains it through its own processor (mmllm.tasks.generate.vlm)."""
    folder, _ = resolve(name, trust_remote_code)
    if folder is None or not (folder / "config.json").is_file():
        return False
    config = read_json(folder / "config.json")
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


def load_vision_language(name: str, trust_remote_code: bool = False) -> tuple[Any, Any, str]:
    """(image-text-to-text model in fp32, its processor, identity)."""
    from transformers import AutoModelForImageTextToText

    quiet_transformers()
    folder, identity = resolve(name, trust_remote_code)
    try:
        processor = load_processor(folder, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                            dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any failure to read a user's folder (a truncated safetensors file, a
        # broken JSON, a missing piece) is one line that names the folder
        reason = str(e).splitlines()[0] if str(e) else "no message"
        raise UserError(f"cannot load the vision-language decoder '{name}': {type(e).__name__}: {reason}") from None
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, processor, identity


def load_processor(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's AutoProcessor. Where transformers cannot build its video processor (Qwen2-VL's, Qwen2.5-VL's, ...
    need torchvision, which cannot be installed beside mmllm's CPU torch), the same processor class with the
    folder's image processor and tokenizer and no video processor: mmllm feeds such a backbone pictures, never
    videos (`picture_processor`)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ImportError as e:
        if "torchvision" not in str(e).lower():
            raise
        processor = picture_processor(Path(folder), trust_remote_code)
        if processor is None:
            raise
        return processor


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def picture_processor(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's processor class (`processor_class` in its configs) built from its image processor, tokenizer and
    chat template, without the video processor it also declares; None when it declares none or names no class."""
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    configs = [c for c in (_optional_json(folder / f) for f in PROCESSOR_FILES) if isinstance(c, dict)]
    name = next((c["processor_class"] for c in configs if isinstance(c.get("processor_class"), str)), None)
    base = getattr(transformers, name, None) if name else None
    if base is None or "video_processor" not in base.get_attributes():
        return None
    cls = _without_video(base)
    own = _optional_json(folder / PROCESSOR_FILES[0]) or {}
    accepted = inspect.signature(base.__init__).parameters
    extra = {k: v for k, v in own.items() if k in accepted and k not in base.get_attributes() and k != "chat_template"}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    image = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    template = _chat_template(folder, own) or getattr(tokenizer, "chat_template", None)
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=None, chat_template=template, **extra)


def _chat_template(folder: Path, own: dict) -> str | None:
    """A processor folder's chat template: chat_template.jinja, chat_template.json or processor_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    stored = _optional_json(folder / "chat_template.json") or {}
    template = stored.get("chat_template") if isinstance(stored, dict) else None
    return template if isinstance(template, str) else own.get("chat_template")


def _optional_json(path: Path) -> Any:
    """A processor folder's JSON file, None where the folder has none (a damaged one is the UserError of read_json)."""
    return read_json(path) if path.is_file() else None


@functools.cache
def _without_video(base: type) -> type:
    """`base` (a ProcessorMixin class) that accepts no video processor and saves what it has in the folder layout
    AutoProcessor (and picture_processor) read back."""

    class Pictures(base):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory: Any, **kwargs: Any) -> list[str]:
            import json

            out = Path(save_directory)
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(out)
            self.image_processor.save_pretrained(out)
            config = _optional_json(out / PROCESSOR_FILES[1]) or {}
            config["processor_class"] = base.__name__
            (out / PROCESSOR_FILES[1]).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if isinstance(self.chat_template, str):
                (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            return [str(out / PROCESSOR_FILES[1])]

    Pictures.__name__ = Pictures.__qualname__ = base.__name__
    return Pictures


