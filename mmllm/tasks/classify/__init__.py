"""`--task classify`: a multimodal classifier over prepared features (the plug-in; its code is in `core`).

This module is what the registry, the configs and the model card read, and imports nothing heavy; training,
checkpoints, prediction and evaluation are in `mmllm.tasks.classify.core`, imported when the task runs (its
names are also reachable from here: `from mmllm.tasks.classify import predict_table`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmllm.fusions import FUSIONS  # noqa: F401 - the --fusion choices, also reachable from here
from mmllm.modalities import TEXT, Option
from mmllm.tasks.base import Task, core_of

AUTO_FUSIONS = ("concat", "gated", "bilinear")  # --fusion auto: trained side by side with linear probes


_core, __getattr__ = core_of(__name__)  # PEP 562: the training and inference code, imported on first use


class Classify(Task):
    name = "classify"
    help = "classify (label column)"
    kind = "classifier"
    learns = "label"
    flag = "--label-column"
    metrics = ("val_loss", "val_accuracy", "val_f1")
    defaults = {"budget_steps": 1500, "min_steps": 300, "min_rel_delta": 0.0}
    options = (
        Option("fusion", "auto", "How modalities are fused: concat (joined vectors), gated (learned weight per "
               "modality), attention (over modality vectors and stored sequences), transformer (a CLS token over "
               "text tokens, image grid and audio frames), bilinear (low-rank products of modality projections; the "
               "last two model interactions). auto: trains concat, gated and bilinear side by side and fits linear "
               "probes on all modalities and on each one alone, then keeps the candidate with the best validation "
               "--monitor (val_loss by default). Image/audio sequences need prepare --sequence-features, else one "
               "pooled token each.", choices=tuple(f for f in FUSIONS if f != "linear") + ("auto",)),
        Option("freeze_text", None, "Keep the pretrained text model frozen: its pooled token states come from "
               "prepare (computed once), so training never runs it. Default: frozen for --task classify unless "
               "--lora-r adapts it; --no-freeze-text fine-tunes it (on 2 CPU cores over 100x slower per step: 5-10 s "
               "vs under 0.04 s on 1000 fortunes).", kind="bool"),
        Option("train_text_layers", 0, "Train only the top K layers of the text model (with --lora-r: LoRA on "
               "them), the pooling and the head, over the token states of the layers below that prepare "
               "--text-trunk-layers K stored: those layers and the embeddings never run (0: off; see "
               "--freeze-text)."),
        Option("share_projections", False, "One projection shared by media of the same width (e.g. image and "
               "video)."),
        Option("modality_dropout", 0.0, "Probability of dropping each modality of a training record.",
               panel="Training"),
        Option("class_weights", "none", "Loss weights per class: none, or auto (inverse class frequency).",
               panel="Training", choices=("none", "auto")),
    )

    def fill(self, cfg: Any) -> None:
        super().fill(cfg)
        if cfg.freeze_text is None:  # LoRA or top layers train: then they run
            mods = [m.strip() for m in str(cfg.modalities).split(",")]
            cfg.freeze_text = not cfg.lora_r and not cfg.train_text_layers and TEXT in mods

    def rules(self, cfg: Any, mods: list[str], explicit: bool) -> list[str]:
        from mmllm.modalities import flag

        problems = []
        if cfg.lora_r and cfg.freeze_text:
            problems.append("--lora-r and --freeze-text: LoRA trains adapters on the text model, --freeze-text keeps "
                            "it fixed; choose one")
        if cfg.train_text_layers and cfg.freeze_text:
            problems.append("--train-text-layers and --freeze-text: the first trains the text model's top layers, "
                            "the second keeps it fixed; choose one")
        if cfg.train_text_layers < 0:
            problems.append(f"--train-text-layers: must be >= 0 (got {cfg.train_text_layers})")
        if explicit and TEXT not in mods:
            problems += [f"{flag(n)}: needs the text modality (--modalities {cfg.modalities})"
                         for n in ("lora_r", "freeze_text", "train_text_layers") if getattr(cfg, n)]
        if explicit and cfg.share_projections and len(set(mods) - {TEXT}) < 2:
            problems.append("--share-projections: shares one projection between media of the same width; needs at "
                            "least two media modalities")
        if explicit and cfg.modality_dropout and len(set(mods)) < 2:
            problems.append("--modality-dropout: needs at least two modalities (one is never dropped)")
        return problems

    def has_column(self, meta: dict) -> bool:
        return bool(meta.get("labels"))

    def build(self, cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Any:
        return _core().build(cfg, data, meta, modalities, dist)

    def check(self, config: dict, folder: Path) -> list[str]:
        return _core().check_config(config, folder)

    def load(self, folder: Path, config: dict, device: Any) -> tuple[Any, Any]:
        from mmllm import checkpoint

        model, _, tokenizer = checkpoint.load(folder, device)
        return model, tokenizer

    def input_flags(self, model: Any) -> dict:
        return {"text_states": model.cfg.cached_text}

    def predict(self, predictor: Any, rows: list[dict], top_k: int, reliance: bool, generation: dict) -> dict:
        return _core().predict_rows(predictor, rows, top_k, reliance)

    def evaluate(self, cfg: Any, config: dict, device: Any) -> dict:
        return _core().evaluate(cfg, device)

    # ------------------------------------------------------------ model card

    def card_training(self, config: dict) -> str | None:
        """How the text model was trained: "lora", "full", "frozen" (also under a linear probe, which reads its
        stored pooled states), or None without a text model."""
        model = config.get("model") or {}
        if TEXT not in model.get("modalities", []):
            return None
        if model.get("fusion") == "linear":
            return "frozen"
        if model.get("lora_r"):
            return "lora"
        return "frozen" if model.get("freeze_text") else "full"

    def card_tags(self, config: dict) -> list[str]:
        return ["pipeline_tag: text-classification"] if TEXT in config["model"]["modalities"] else []

    def card_usage(self, config: dict) -> list[str]:
        text = self.card_training(config)
        if not text:
            return []
        what = {"lora": "The fine-tuned text model alone (LoRA adapters merged into its weights)",
                "full": "The fine-tuned text model alone",
                "frozen": "The text model (its pretrained weights, unchanged: it was not trained)"}[text]
        return ["", f"{what} is a Hugging Face folder:", "",
                "```python", "from transformers import AutoModel, AutoTokenizer",
                'model = AutoModel.from_pretrained("CHECKPOINT/text_model")',
                'tokenizer = AutoTokenizer.from_pretrained("CHECKPOINT/text_model")', "```"]

    def card_notes(self, config: dict, frozen: Any) -> list[str]:
        """The encoders' sentences: how the text model was trained, then `frozen(roles)` for the frozen ones."""
        notes = []
        text = self.card_training(config)
        model = config.get("model") or {}
        lora_r, top = model.get("lora_r"), model.get("train_text_layers")
        if text in ("lora", "full") and top:
            notes.append(f"Only the top {top} layer{'s' if top > 1 else ''} of the text model "
                         f"{'are' if top > 1 else 'is'} fine-tuned"
                         + (f" (with LoRA rank {lora_r}, merged)" if text == "lora" else "")
                         + ", trained over the token states of the frozen layers below them that prepare stored "
                         f"(--text-trunk-layers {top}); text_model/ holds the whole model: the pretrained embeddings "
                         "and lower layers, the trained top layers.")
        elif text == "lora":
            notes.append(f"The text model is fine-tuned with LoRA (rank {lora_r}; only the adapters trained), merged "
                         "into the weights in text_model/.")
        elif text == "full":
            notes.append("The text model is fine-tuned (all its weights; they are in text_model/).")
        elif text == "frozen":
            notes.append("The text model is frozen (not trained); text_model/ holds its pretrained weights.")
        return notes + frozen([r for r in (config.get("encoders") or {}) if r != TEXT or text is None])

    def card_files(self, config: dict) -> dict[str, str]:
        files = {"labels.json": "label name -> id, a copy of config.json's labels (those are used; the two must "
                                "agree)"}
        text = self.card_training(config)
        if text:
            files["text_model/"] = ("the fine-tuned" if text != "frozen" else "the pretrained (frozen)") + \
                " text model and its tokenizer (Hugging Face folder)"
        return files
