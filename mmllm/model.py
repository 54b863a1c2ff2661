"""The multimodal model: pretrained text model + projected image/audio features -> fusion -> head.

Built from a `ModelConfig` stored in every checkpoint. `forward(batch, labels)` returns a dict with
`logits` (B, C), `loss` when labels are given, and `gates` (B, M) for gated fusion.

Fusions: concat, gated and attention (over one vector per modality, plus stored image/audio sequences) see each
modality mostly on its own; transformer (a CLS token attending over text token states, image grid and audio
frames) and bilinear (low-rank products of the modality projections, as in LMF) model interactions such as
"does the word in the text name the colour in the picture".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mmllm.fusions import FUSIONS, TOKEN_FUSIONS
from mmllm.modalities import TEXT
from mmllm.encoders import mean_pool


@dataclass
class ModelConfig:
    modalities: list[str]  # text and registered modalities (mmllm.modalities), in the registry's order
    num_labels: int
    hidden_size: int = 256
    fusion: str = "concat"  # concat | gated | attention | transformer | bilinear | linear (a probe)
    dropout: float = 0.1
    text_dim: int | None = None
    dims: dict = field(default_factory=dict)  # width of each medium's features, by modality
    share_projections: bool = False
    modality_dropout: float = 0.0
    freeze_text: bool = False
    lora_r: int = 0
    train_text_layers: int = 0  # k > 0: only the top k layers train, over the trunk states prepare stored
    text_model_type: str | None = None
    sequence: bool = False  # attention/transformer fusion over the stored media token sequences
    positions: bool = False  # a learned embedding of each sequence token's position (order of frames, grid cell)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def text_frozen(self) -> bool:
        """The text model neither trains nor carries LoRA adapters: a fixed function of its tokens."""
        return self.freeze_text and not self.lora_r

    @property
    def cached_text(self) -> bool:
        """Whether the fusion reads only the frozen text model's pooled states, which prepare stores
        (`text_pooled`): then batches carry those and the text model is never run."""
        return "text" in self.modalities and self.text_frozen and self.fusion != "transformer"


def projection(dim: int, hidden: int, dropout: float) -> nn.Module:
    """LayerNorm (features of different encoders live on different scales) -> Linear -> GELU -> Dropout."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))


BILINEAR_RANK = 8  # rank R of the low-rank bilinear fusion


def encoder_stack(hidden: int, dropout: float, layers: int = 2) -> nn.TransformerEncoder:
    """A small pre-norm transformer encoder: 4 heads (1 when the width is not divisible), FFN 2x wide."""
    layer = nn.TransformerEncoderLayer(hidden, nhead=4 if hidden % 4 == 0 else 1, dim_feedforward=2 * hidden,
                                       dropout=dropout, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


class Fusion(nn.Module):
    """(B, M, H) modality vectors + (B, M) presence -> (B, H); gated fusion also returns weights (B, M).

    attention and transformer take tokens (B, T, H), their presence (B, T) and `index` (T,), each token's modality."""

    def __init__(self, kind: str, n: int, hidden: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "concat":
            self.net = nn.Sequential(nn.Linear(n * hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        elif kind == "gated":
            self.gate = nn.Linear(n * hidden, n)
        elif kind in TOKEN_FUSIONS:
            self.modality_embedding = nn.Parameter(torch.zeros(n, hidden))
            self.net = encoder_stack(hidden, dropout)
            if kind == "transformer":
                self.cls = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)  # the token whose final state is read
                self.norm = nn.LayerNorm(hidden)
        elif kind == "bilinear":
            # per modality R projections (the bias plays LMF's appended 1, keeping lower-order terms)
            self.factors = nn.ModuleList(nn.Linear(hidden, BILINEAR_RANK * hidden) for _ in range(n))
            self.norm = nn.Sequential(nn.LayerNorm(hidden), nn.Dropout(dropout))
        else:
            raise ValueError(f"unknown fusion '{kind}' (known: {', '.join(FUSIONS)})")

    def forward(self, x: torch.Tensor, present: torch.Tensor, index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.kind == "concat":
            return self.net(x.flatten(1)), None
        if self.kind == "gated":
            scores = self.gate(x.flatten(1)).masked_fill(~present, float("-inf"))  # (B, M)
            weights = scores.softmax(-1)
            return (weights.unsqueeze(-1) * x).sum(1), weights
        if self.kind == "bilinear":
            return self.norm(self.bilinear(x)), None
        emb = self.modality_embedding if index is None else self.modality_embedding[index]
        if self.kind == "transformer":
            cls = self.cls.expand(x.shape[0], -1, -1)  # (B, 1, H)
            keep = torch.cat([present.new_ones(x.shape[0], 1), present], 1)  # (B, 1 + T)
            h = self.net(torch.cat([cls, x + emb], 1), src_key_padding_mask=~keep)  # (B, 1 + T, H)
            return self.norm(h[:, 0]), None
        h = self.net(x + emb, src_key_padding_mask=~present)  # (B, T, H)
        return mean_pool(h, present), None

    def bilinear(self, x: torch.Tensor) -> torch.Tensor:
        """sum over r of the elementwise product over modalities m of (W_m^r x_m + b_m^r): (B, M, H) -> (B, H)."""
        b, m, h = x.shape
        z = self.factors[0](x[:, 0]).view(b, BILINEAR_RANK, h)  # (B, R, H)
        for i in range(1, m):
            z = z * self.factors[i](x[:, i]).view(b, BILINEAR_RANK, h)
        return z.sum(1)


def modality_feature(batch: dict, m: str) -> torch.Tensor:
    """(B, D_m) the raw feature of modality m in a batch: the text model's pooled states (stored by prepare, or
    pooled from `text_seq`, the states of a text model run on this batch), else prepare's pooled embedding."""
    if m == "text" and "text_pooled" in batch:
        return batch["text_pooled"]  # (B, D_text) from prepare: a frozen text model, computed once
    if m == "text":
        return mean_pool(batch["text_seq"], batch["attention_mask"])  # (B, D_text)
    return batch[f"{m}_emb"]  # (B, D_m) precomputed by prepare


class Classifier(nn.Module):
    """What every classifier shares: the (optional) text model, class weights, the loss."""

    def __init__(self, cfg: ModelConfig, text_model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.text = text_model
        self.class_weights: torch.Tensor | None = None  # set by finetune for --class-weights auto

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.text.parameters() if p.requires_grad] if self.text is not None else []

    def train(self, mode: bool = True) -> Classifier:
        """A frozen text model stays in eval mode (no dropout): it gives the states prepare stored."""
        super().train(mode)
        if self.text is not None and self.cfg.text_frozen:
            self.text.eval()
        return self

    def with_text_states(self, batch: dict) -> dict:
        """The batch plus the text model's token states (B, T, D_text) when the text is not stored pooled: the
        top layers (a TextTop) over the stored trunk states `text_trunk`, or the whole model over token ids."""
        if "text" in self.cfg.modalities and "text_pooled" not in batch:
            if "text_trunk" in batch:  # --train-text-layers: the trunk ran once, in prepare
                states = self.text(batch["text_trunk"], batch["attention_mask"])
            else:
                out = self.text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                states = out.last_hidden_state
            batch = {**batch, "text_seq": states}
        return batch

    def output(self, logits: torch.Tensor, batch: dict, gates: torch.Tensor | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"logits": logits, "gates": gates}
        if batch.get("labels") is not None:
            out["loss"] = nn.functional.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights)
        return out


class LinearProbe(Classifier):
    """`--fusion linear`: a multinomial logistic regression over the stored features. Each modality's feature is
    standardized with the training split's mean and standard deviation (zeros where absent, which is the mean),
    followed by one presence flag per modality, into a single linear layer (B, sum D_m + M) -> (B, C)."""

    def __init__(self, cfg: ModelConfig, text_model: nn.Module | None = None):
        super().__init__(cfg, text_model)
        dims = [modality_dim(cfg, m) for m in cfg.modalities]
        for m, d in zip(cfg.modalities, dims):
            self.register_buffer(f"mean_{m}", torch.zeros(d))
            self.register_buffer(f"std_{m}", torch.ones(d))
        self.head = nn.Linear(sum(dims) + len(dims), cfg.num_labels)

    def raw_features(self, batch: dict, drop: frozenset = frozenset()) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(feature (B, D_m), presence (B,))] per modality, before standardization."""
        batch = self.with_text_states(batch)
        return [(modality_feature(batch, m).float(),
                 batch[f"has_{m}"].bool() & (m not in drop)) for m in self.cfg.modalities]

    def features(self, batch: dict, drop: frozenset = frozenset()) -> torch.Tensor:
        """(B, sum D_m + M) standardized features, zero where a modality is absent, then the presence flags."""
        parts, flags = [], []
        for m, (x, here) in zip(self.cfg.modalities, self.raw_features(batch, drop)):
            z = (x - getattr(self, f"mean_{m}")) / getattr(self, f"std_{m}")
            parts.append(torch.where(here.unsqueeze(-1), z, torch.zeros_like(z)))
            flags.append(here.float())
        return torch.cat(parts + [torch.stack(flags, 1)], 1)

    def forward(self, batch: dict, drop: frozenset = frozenset()) -> dict[str, Any]:
        return self.output(self.head(self.features(batch, drop)), batch)


MAX_POSITIONS = 256  # longest stored media sequence with a position embedding


def modality_dim(cfg: ModelConfig, m: str) -> int:
    return cfg.text_dim if m == TEXT else cfg.dims[m]


def model_fields(model: dict) -> dict:
    """A checkpoint's "model" section in today's fields: the `image_dim` / `audio_dim` of checkpoints written
    before modalities were plug-ins become `dims`."""
    out = dict(model)
    legacy = {k[:-len("_dim")]: out.pop(k) for k in list(out) if k.endswith("_dim") and k != "text_dim"}
    if legacy:
        out["dims"] = {**{k: v for k, v in legacy.items() if v is not None}, **(out.get("dims") or {})}
    return out


def projection_owners(cfg: ModelConfig) -> dict[str, str]:
    """Per modality, the modality whose projection it uses: its own, or with --share-projections the first
    medium of the same width (one projection for, e.g., image and video frames)."""
    owners: dict[str, str] = {}
    for m in cfg.modalities:
        same = [o for o in owners if owners[o] == o and TEXT not in (o, m)
                and modality_dim(cfg, o) == modality_dim(cfg, m)]
        owners[m] = same[0] if cfg.share_projections and same else m
    return owners


class MultimodalClassifier(Classifier):
    def __init__(self, cfg: ModelConfig, text_model: nn.Module | None = None):
        super().__init__(cfg, text_model)
        h = cfg.hidden_size
        self.owner = projection_owners(cfg)
        self.proj = nn.ModuleDict()
        for m in cfg.modalities:
            if self.owner[m] == m:  # else it shares an earlier medium's projection (parameter sharing)
                self.proj[m] = projection(modality_dim(cfg, m), h, cfg.dropout)
        self.placeholder = nn.Parameter(torch.zeros(len(cfg.modalities), h))  # stands in for a missing modality
        if cfg.sequence and cfg.positions:  # without it attention over a sequence cannot tell its order
            self.position = nn.Parameter(torch.zeros(MAX_POSITIONS, h))
        self.fusion = Fusion(cfg.fusion, len(cfg.modalities), h, cfg.dropout)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(h, cfg.num_labels))

    def modality_vectors(self, batch: dict, drop: set[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, H) projected vectors with placeholders where absent, and the (B, M) presence mask (after --drop
        and modality dropout; `attended` makes the mask the fusions attend with)."""
        vecs, present = [], []
        for i, m in enumerate(self.cfg.modalities):
            v = self.proj[self.owner[m]](modality_feature(batch, m))
            here = batch[f"has_{m}"].bool()
            if m in drop:
                here = torch.zeros_like(here)
            vecs.append(torch.where(here.unsqueeze(-1), v, self.placeholder[i].expand_as(v)))
            present.append(here)
        x, present_t = torch.stack(vecs, 1), torch.stack(present, 1)  # (B, M, H), (B, M)
        if self.training and self.cfg.modality_dropout > 0:
            keep = torch.rand(present_t.shape, device=x.device) >= self.cfg.modality_dropout
            keep[keep.sum(1) == 0, 0] = True  # never drop everything
            x = torch.where(keep.unsqueeze(-1), x, self.placeholder.unsqueeze(0).expand_as(x))
            present_t = present_t & keep
        return x, present_t

    @staticmethod
    def attended(present: torch.Tensor) -> torch.Tensor:
        """The mask the fusions attend with: a record with nothing present attends to its placeholders."""
        return present | (present.sum(1, keepdim=True) == 0)

    def sequence_tokens(self, batch: dict, x: torch.Tensor, present: torch.Tensor, real: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each modality's vector followed by its projected token sequence (B, S, H) when there is one:
        tokens (B, T, H), presence (B, T), modality index (T,).

        Image/audio sequences are the stored ones (prepare --sequence-features); the transformer fusion also
        reads the text model's token states, padding excluded. A token of an absent modality is masked (`present`,
        the attended mask) and, when the record has nothing present, a placeholder (`real`: what it has)."""
        tokens, here, index = [], [], []
        for i, m in enumerate(self.cfg.modalities):
            parts, masks = [x[:, i:i + 1]], [present[:, i:i + 1]]  # (B, 1, H), (B, 1)
            if m == "text" and self.cfg.fusion == "transformer":
                parts.append(self.proj["text"](batch["text_seq"]))  # (B, S, H)
                masks.append(batch["attention_mask"].bool() & real[:, i:i + 1])  # its vector stands in when absent
            elif m != "text" and self.cfg.sequence and f"{m}_seq" in batch:
                seq = self.proj[self.owner[m]](batch[f"{m}_seq"])  # (B, S, H)
                if self.cfg.positions:
                    seq = seq + self.position[:seq.shape[1]]
                parts.append(torch.where(real[:, i, None, None], seq, self.placeholder[i].expand_as(seq)))
                masks.append(present[:, i:i + 1].expand(-1, seq.shape[1]))
            tokens += parts
            here += masks
            index += [i] * sum(t.shape[1] for t in parts)
        return torch.cat(tokens, 1), torch.cat(here, 1), torch.tensor(index, device=x.device)

    def forward(self, batch: dict, drop: frozenset = frozenset()) -> dict[str, Any]:
        """batch: token ids, embeddings, presence flags and optional `labels` (B,) -> logits (B, C) [+ loss]."""
        batch = self.with_text_states(batch)
        x, real = self.modality_vectors(batch, drop)
        present = self.attended(real)
        if self.cfg.fusion in TOKEN_FUSIONS:
            fused, gates = self.fusion(*self.sequence_tokens(batch, x, present, real))  # (B, H)
        else:
            fused, gates = self.fusion(x, present)  # (B, H)
        return self.output(self.head(fused), batch, gates)  # logits (B, C)


def weight_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Trainable tensors with dim >= 2 (weights, embeddings); biases and norm scales are excluded."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]


def penalty(model: nn.Module, l2: float, l1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(l2 * sum ||W||^2, l1 * sum |W|) over weight matrices: true penalties added to the loss."""
    zero = torch.zeros((), device=next(model.parameters()).device)
    mats = weight_matrices(model) if (l2 or l1) else []
    l2_term = l2 * sum((p.float() ** 2).sum() for p in mats) if l2 else zero
    l1_term = l1 * sum(p.float().abs().sum() for p in mats) if l1 else zero
    return l2_term, l1_term


def classifier(cfg: ModelConfig, text_model: nn.Module | None = None) -> Classifier:
    """The classifier a config describes (a linear probe or a fusion model), with the text model as given."""
    return (LinearProbe if cfg.fusion == "linear" else MultimodalClassifier)(cfg, text_model)


def build_model(cfg: ModelConfig, text_model: nn.Module | None) -> Classifier:
    """The classifier with the text model frozen, LoRA-adapted or trainable as the config says."""
    if text_model is not None and cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        # the top layers alone (a TextTop, not a transformers model) name their linear layers: all of them
        targets = "all-linear" if hasattr(text_model, "get_input_embeddings") else sorted(
            {name.rsplit(".", 1)[-1] for name, m in text_model.named_modules() if isinstance(m, nn.Linear)})
        text_model = get_peft_model(text_model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                                                           target_modules=targets, lora_dropout=0.0))
    elif text_model is not None and cfg.freeze_text:
        text_model.requires_grad_(False)
    return classifier(cfg, text_model)
