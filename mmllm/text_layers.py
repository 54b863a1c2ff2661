"""The text model split after layer L-k: a frozen trunk (embeddings + layers 1..L-k) whose token states prepare
stores once (`prepare --text-trunk-layers k`), and the top k layers that `finetune --train-text-layers k` trains
over those states without ever loading the trunk.

    trunk states = hidden_states[L-k] of the whole model  (B, T, D): the input of layer L-k+1
    TextTop(trunk states, mask) = last_hidden_state        (B, T, D): what the whole model gives

Only BERT-family models (a plain stack `encoder.layer` whose last output is `last_hidden_state`) split this way;
`check_split` refuses any other in one line. A checkpoint holds the whole model again (`compose`), so predict on raw
records runs trunk + trained top layers as one Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmllm.errors import UserError

# model types whose encoder is a plain stack `encoder.layer` (no relative-position bias computed outside the layers,
# no final norm after them): the top layers over stored states give exactly the whole model's last_hidden_state
SPLITTABLE = ("bert", "roberta", "xlm-roberta")


def num_layers(config: Any) -> int:
    return int(config.num_hidden_layers)


def check_split(config: Any, k: int, flag: str, name: str) -> None:
    """Refuse a k the text model cannot be split at, or a model that does not split, naming `flag`."""
    kind = getattr(config, "model_type", None)
    if kind not in SPLITTABLE:
        raise UserError(f"{flag} {k}: the text model '{name}' ({kind}) cannot be split into a stored trunk and "
                        f"trained top layers (supported: {', '.join(SPLITTABLE)} models); use 0")
    if not 1 <= k <= num_layers(config):
        raise UserError(f"{flag} {k}: the text model '{name}' has {num_layers(config)} layers; use 1 to "
                        f"{num_layers(config)} (0: off)")


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT-family model, bottom first."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} has no encoder.layer stack: its layers cannot be run apart")
    return layers


class TextTop(nn.Module):
    """The top k layers of a text model: stored trunk states (B, T, D) + mask (B, T) -> last_hidden_state
    (B, T, D), with the attention mask the whole model would build (its own attention implementation)."""

    def __init__(self, config: Any, layers: nn.ModuleList):
        super().__init__()
        self.config = config
        self.layers = layers

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=states, attention_mask=attention_mask)
        for layer in self.layers:
            out = layer(states, mask)
            states = out[0] if isinstance(out, tuple) else out
        return states


def load_top(folder: Path, config: Any, k: int) -> TextTop:
    """The top k layers of the text model in `folder`, with their pretrained weights: only their tensors are read
    from the safetensors files (the embeddings and the trunk's layers are never loaded)."""
    from safetensors import safe_open
    from transformers import AutoModel

    with torch.device("meta"):  # shapes only: the layers' modules, nothing allocated
        whole = AutoModel.from_config(config)
    layers = layer_stack(whole)
    first = len(layers) - k
    top = TextTop(whole.config, nn.ModuleList(layers[first:]))
    top.to_empty(device="cpu")
    prefix = f"{getattr(whole, 'base_model_prefix', '')}."
    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                key = name.removeprefix(prefix)
                if key.startswith("encoder.layer."):
                    index, rest = key[len("encoder.layer."):].split(".", 1)
                    if int(index) >= first:
                        state[f"layers.{int(index) - first}.{rest}"] = f.get_tensor(name).float()
    missing, unexpected = top.load_state_dict(state, strict=False)
    problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else \
        "buffers" if any(True for _ in top.buffers()) else None
    if problem:
        raise UserError(f"{folder}: the weights of its top {k} layers cannot be read apart ({problem})")
    return top


def compose(whole: nn.Module, top_state: dict[str, torch.Tensor]) -> nn.Module:
    """`whole` (the pretrained text model) with its top layers replaced by trained ones (`top_state`: a TextTop's
    state dict, LoRA merged): the model a checkpoint stores and predict runs on raw records."""
    layers = layer_stack(whole)
    k = 1 + max(int(name.split(".")[1]) for name in top_state)
    first = len(layers) - k
    for i in range(k):
        own = {name.split(".", 2)[2]: v for name, v in top_state.items() if name.startswith(f"layers.{i}.")}
        layers[first + i].load_state_dict(own, strict=True)
    return whole


# ---------------------------------------------------------------- stored states (Arrow, the feature cache)

STORAGE = {"bf16": "uint16", "fp32": "float32"}  # bf16 states are stored as their bit patterns


def to_storage(states: np.ndarray, dtype: str) -> np.ndarray:
    """float32 states -> what is stored: float32 as is, or bf16 (round to nearest even) as uint16 bit patterns."""
    if dtype == "fp32":
        return np.ascontiguousarray(states, dtype=np.float32)
    bits = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
    return bits.numpy().view(np.uint16)


def from_storage(values: np.ndarray) -> torch.Tensor:
    """Stored states -> a tensor: float32, or bfloat16 from uint16 bit patterns."""
    values = np.require(values, requirements=["C", "W"])  # Arrow's buffers are read-only: then one copy
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values.astype(np.float32, copy=False))
