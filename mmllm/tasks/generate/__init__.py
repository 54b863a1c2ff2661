"""`--task generate`: text generation by a pretrained decoder conditioned on the other inputs (the plug-in; its code
is in `core`).

This module is what the registry, the configs and the model card read, and imports nothing heavy; training,
checkpoints, prediction and evaluation are in `mmllm.tasks.generate.core`, imported when the task runs (its
names are also reachable from here: `from mmllm.tasks.generate import GenTable`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mmllm.modalities import Option
from mmllm.tasks.base import Task, core_of


_core, __getattr__ = core_of(__name__)  # PEP 562: the training and inference code, imported on first use


def _vlm() -> Any:
    """The vision-language backbone's code (above core), imported when such a decoder runs, as core is."""
    return importlib.import_module(f"{__name__}.vlm")


class Generate(Task):
    name = "generate"
    help = "generate (target column)"
    kind = "text generator"
    learns = "target"
    flag = "--target-column"
    metrics = ("val_loss", "val_bleu")
    # a frozen decoder learns short answers in far fewer steps than a classifier, and its val_loss keeps creeping
    # towards 0
    defaults = {"budget_steps": 80, "min_steps": 40, "min_rel_delta": 0.01}
    generates = True
    reads_prompt = True
    options = (
        Option("decoder", "smollm2-135m", "Decoder for --task generate: a causal LM or a vision-language model "
               "(LoRA rank 8 unless --lora-r / --train-decoder); alias, local folder or hub id."),
        Option("prefix_tokens", 4, "Prefix tokens per modality fed to the decoder (--task generate)."),
        Option("media_tokens", "pooled", "Decoder tokens of each medium (--task generate): pooled vector -> "
               "--prefix-tokens, or one per stored sequence vector (prepare --sequence-features).",
               choices=("pooled", "sequence")),
        Option("image_tokens", 0, "With --media-tokens sequence: the image's stored grid average-pooled to N "
               "decoder tokens (a square N pools the square grid in 2-D: 4 = 2x2, 16 = 4x4; 0: every stored "
               "vector)."),
        Option("retrieve", 0, "Retrieval-augmented generation (--task generate): each prompt also carries the "
               "answers of the K training records most similar by their frozen media features (0: off)."),
        Option("decoder_precision", "auto", "Weights of a frozen decoder (--task generate): bf16 or fp32; auto: bf16 "
               "where the CPU has native bf16 (AMX, AVX-512 bf16) or on a GPU. The projector and the loss stay "
               "fp32.", choices=("auto", "fp32", "bf16")),
        Option("train_decoder", False, "Fine-tune the whole decoder, not only the projector (--task generate)."),
        Option("max_new_tokens", None, "Longest generated text during validation (--task generate; default: from "
               "the training answers' lengths).", panel="Training", kind="int"),
    )

    def rules(self, cfg: Any, mods: list[str], explicit: bool) -> list[str]:
        problems = []
        if cfg.lora_r and cfg.train_decoder:
            problems.append("--lora-r and --train-decoder: LoRA trains adapters, --train-decoder the whole decoder; "
                            "choose one")
        if cfg.decoder_precision == "bf16" and (cfg.lora_r or cfg.train_decoder):
            problems.append("--decoder-precision bf16: only for a frozen decoder (not with --lora-r or "
                            "--train-decoder); use --precision bf16 for autocast")
        if cfg.prefix_tokens < 1:
            problems.append(f"--prefix-tokens: must be >= 1 (got {cfg.prefix_tokens})")
        if cfg.retrieve < 0:
            problems.append(f"--retrieve: must be >= 0 (got {cfg.retrieve})")
        if cfg.image_tokens < 0:
            problems.append(f"--image-tokens: must be >= 0 (got {cfg.image_tokens})")
        elif cfg.image_tokens and cfg.media_tokens != "sequence":
            problems.append("--image-tokens pools the image's stored grid: it needs --media-tokens sequence (the "
                            "pooled vector is --prefix-tokens tokens)")
        return problems

    def has_column(self, meta: dict) -> bool:
        return bool(meta.get("has_target"))

    def build(self, cfg: Any, data: Any, meta: dict, modalities: list[str], dist: Any) -> Any:
        from mmllm.encoders import is_vision_language

        if is_vision_language(cfg.decoder):  # a backbone that reads the images itself (vlm, above core)
            return _vlm().build(cfg, data, meta, modalities, dist)
        return _core().build(cfg, data, meta, modalities, dist)

    def check(self, config: dict, folder: Path) -> list[str]:
        return _core().check_config(config, folder)

    def load(self, folder: Path, config: dict, device: Any) -> tuple[Any, Any]:
        if _vision_language(config):
            return _vlm().load(Path(folder), _core().GenConfig(**config["generation"]), device)
        return _core().load_checkpoint(Path(folder), config, device)

    def input_flags(self, model: Any) -> dict:
        return {"transcripts": model.reads_transcripts, "media_features": model.reads_features}

    def predict(self, predictor: Any, rows: list[dict], top_k: int, reliance: bool, generation: dict) -> dict:
        return _core().predict_rows(predictor, rows, reliance, generation)

    def evaluate(self, cfg: Any, config: dict, device: Any) -> dict:
        return _core().evaluate(cfg, config, device, self.load(Path(cfg.checkpoint), config, device))

    # ------------------------------------------------------------ model card

    def card_modalities(self, config: dict) -> list[str]:
        return list(config["generation"]["modalities"]) or ["text prompts"]

    def card_training(self, config: dict) -> str | None:
        """How the decoder was trained: "lora", "full" or "frozen"."""
        gen = config.get("generation") or {}
        return "lora" if gen.get("lora_r") else "full" if gen.get("train_decoder") else "frozen"

    def card_usage(self, config: dict) -> list[str]:
        trained = self.card_training(config)
        if trained not in ("lora", "full"):
            return []
        merged = " (LoRA adapters merged)" if trained == "lora" else ""
        if _vision_language(config):
            return ["", f"`decoder/` is the trained vision-language model{merged} with its processor, a Hugging Face "
                    "folder for `AutoModelForImageTextToText` and `AutoProcessor`."]
        return ["", f"`decoder/` is the trained decoder{merged}, a Hugging Face folder for `AutoModelForCausalLM`; the "
                "image/audio prefix projector stays in model.safetensors."]

    def card_encoder_rows(self, config: dict, license_of: Any, md: Any) -> list[str]:
        gen = config["generation"]
        return [f"| decoder | `{md(gen['decoder'])}` | `{gen.get('decoder_identity', '')}` | "
                f"{md(license_of(gen['decoder']))} | | |"]

    def card_notes(self, config: dict, frozen: Any) -> list[str]:
        trained = self.card_training(config)
        if _vision_language(config):
            seen = ", ".join(config["generation"]["modalities"])
            return [f"The decoder is a vision-language model: it encodes the {seen}s itself with its processor (from "
                    "the files' bytes, prepare --keep-media), not with mmllm's frozen encoders' features.",
                    "Fine-tuned with LoRA (rank {}) on its language model, merged into the weights in decoder/; the "
                    "vision tower and connector are unchanged.".format(config["generation"]["lora_r"])
                    if trained == "lora" else "Fine-tuned (all its weights; they are in decoder/)."]
        notes = frozen(list(config.get("encoders") or {}))
        if trained == "lora":
            notes.append(f"The decoder is fine-tuned with LoRA (rank {config['generation']['lora_r']}), merged into "
                         "the weights in decoder/.")
        elif trained == "full":
            notes.append("The decoder is fine-tuned (all its weights; they are in decoder/).")
        else:
            notes.append("The decoder is frozen (not trained) and referenced by identity; decoder/ holds its "
                         "tokenizer and config.")
        if config["generation"].get("retrieve"):
            notes.append(f"Retrieval-augmented: each prompt carries the answers of the "
                         f"{config['generation']['retrieve']} most similar training records (by the frozen "
                         "features), from the memory in retrieval.safetensors and retrieval.json.")
        return notes

    def card_files(self, config: dict) -> dict[str, str]:
        if _vision_language(config):
            return {"decoder/": "the trained vision-language model and its processor (Hugging Face folder)"}
        trained = self.card_training(config)
        files = {"decoder/": "the trained decoder and its tokenizer (Hugging Face folder)" if trained != "frozen"
                 else "the decoder's tokenizer and config (the frozen weights are referenced by identity)"}
        if config["generation"].get("retrieve"):
            files.update({"retrieval.safetensors": "the training records' normalised features (--retrieve)",
                          "retrieval.json": "the training records' answers (--retrieve)"})
        return files


def _vision_language(config: dict) -> bool:
    return (config.get("generation") or {}).get("decoder_kind") == "vision-language"
