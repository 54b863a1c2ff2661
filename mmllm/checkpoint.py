"""A checkpoint is a folder that describes itself.

    model.safetensors      the weights outside the text model: projections, fusion, head
    text_model/            the trained text model as a complete Hugging Face folder (config, safetensors with
                           LoRA adapters merged, tokenizer): `AutoModel.from_pretrained(ckpt / "text_model")`
    config.json            model config, labels, encoder identities + preprocessing, task
    labels.json            label map (name -> id), a copy of config.json's labels for other tools; those of
                           config.json are the ones used, and loading refuses the two disagreeing
    README.md              the model card (mmllm.modelcard)
    metrics.jsonl, metrics.json, finetune_config.json, training_curves.png   (written by finetune)
    retrieval.safetensors, retrieval.json   a generator's --retrieve memory: training keys and answers
    mmllm-checkpoint.json  the marker that says the folder is mmllm's checkpoint (see mmllm.outputs)
Checkpoints written before text_model/ held weights keep them under `text.` in model.safetensors; both load.
Loading needs nothing else, reads only JSON and safetensors, and never runs remote code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from mmllm import modalities
from mmllm.fusions import FUSIONS
from mmllm.errors import UserError, read_json
from mmllm.model import Classifier, ModelConfig, build_model, classifier, model_fields

FORMAT = "mmllm-checkpoint"
VERSION = 1
MARKER = "mmllm-checkpoint.json"


def write_marker(folder: Path) -> None:
    """Mark `folder` as an mmllm checkpoint (written first, so even an interrupted run is recognised)."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"format": FORMAT, "version": VERSION, "mmllm_version": __import__("mmllm").__version__}
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def is_checkpoint(folder: Path) -> bool:
    """A folder mmllm wrote as a checkpoint: its marker, or (checkpoints older than markers) config.json's format."""
    if (folder / MARKER).is_file():
        return True
    if not (folder / "config.json").is_file():
        return False
    try:
        return read_json(folder / "config.json").get("format") == FORMAT
    except (UserError, AttributeError):
        return False


def save(model: Classifier, folder: Path, info: dict, tokenizer: Any, text_config: Any,
         text_model: torch.nn.Module | None = None) -> dict:
    """Write weights + self-description into `folder` (which the caller renames into place): the text model
    as a Hugging Face folder in text_model/, every other weight in model.safetensors; returns the config.json
    written (the task writes the model card from it). `text_model`: the whole text model to write when the model
    holds only a part of it (its trained top layers)."""
    write_marker(folder)
    net = unwrap(model)
    state = net.state_dict()
    if net.text is not None:
        save_hf_model(text_model if text_model is not None else net.text, folder / "text_model")
        state = {k: v for k, v in state.items() if not k.startswith("text.")}  # stored once, in text_model/
    save_weights(file_tensors(state), folder / "model.safetensors")
    config = {"format": FORMAT, "version": VERSION, "model": net.cfg.to_dict(), **info}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps({n: i for i, n in enumerate(info.get("labels", []))}, indent=2,
                                                   ensure_ascii=False) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / "text_model")
        if net.text is None:
            text_config.save_pretrained(folder / "text_model")
    return config


def save_hf_model(model: torch.nn.Module, folder: Path) -> None:
    """`model` as a complete Hugging Face folder (config.json + safetensors) that `AutoModel` (or
    `AutoModelForCausalLM`) loads without peft: LoRA adapters are merged into the weights they adapt."""
    from mmllm.console import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.save_pretrained(folder, state_dict=merged_state(model))
    except Exception as e:  # noqa: BLE001 - safetensors reports a failed write as SafetensorError
        raise io_error(e, folder) from None


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in the plain model's names; with LoRA, W + scale * B @ A for every adapted weight.
    Computed beside the model, which stays as it is (still adapted, unmerged)."""
    if not hasattr(model, "get_base_model"):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {f"{name}.weight": m.get_delta_weight(m.active_adapters[0]).detach()
              for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        value = value.detach()
        out[key] = (value + deltas[key].to(value.dtype) if key in deltas else value).cpu()
    return out


def save_weights(tensors: dict, path: Path) -> None:
    """safetensors file with the mode every other file gets (safetensors itself creates it 0600)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": FORMAT})
    except Exception as e:  # noqa: BLE001 - safetensors reports a failed write as SafetensorError
        raise io_error(e, path) from None
    os.chmod(path, 0o666 & ~current_umask())


def io_error(e: Exception, path: Path) -> Exception:
    """safetensors' "I/O error: ... (os error N)" as the OSError it is (other errors unchanged)."""
    import re

    found = re.search(r"os error (\d+)", str(e))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) if found else e


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def file_tensors(state: dict) -> dict:
    """Contiguous CPU tensors for safetensors; tied weights (shared storage) are written as separate copies."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def unwrap(model: torch.nn.Module) -> Any:
    return getattr(model, "module", model)


def read_config(folder: str | Path, check: Callable[[dict, Path], list[str]] | None = None) -> dict:
    """A checkpoint's config.json checked by `check` (default: a classifier's, `check_classifier`;
    `tasks.read_config` checks by its task), or a UserError that names every problem."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} is not an mmllm checkpoint (no config.json)")
    config = read_json(path)  # size-capped; corrupt or too deeply nested JSON is one line naming it
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{folder} is not an mmllm checkpoint (config.json has no format '{FORMAT}')")
    if isinstance(config.get("model"), dict):
        config["model"] = model_fields(config["model"])
    problems = (check or check_classifier)(config, folder)
    if problems:
        raise UserError(f"{path}: {'; '.join(problems)} (the file was edited or damaged, or it was trained with a "
                        "plug-in not loaded now: MMLLM_PLUGINS=module; else fine-tune again)")
    check_label_map(config, folder)
    return config


def check_label_map(config: dict, folder: Path) -> None:
    """labels.json (when there is one) must be config.json's labels as {name: id}: config.json's are the ones used,
    so an edit of labels.json alone would be silently ignored."""
    path = folder / "labels.json"
    if not path.is_file():
        return
    given = read_json(path)
    expected = {n: i for i, n in enumerate(config.get("labels", []))}
    if given == expected:
        return
    raise UserError(f"{path} disagrees with {folder / 'config.json'}: {label_map_difference(given, expected)}; "
                    "config.json's labels are the ones used: edit both alike, or restore labels.json from them")


def label_map_difference(given: Any, expected: dict[str, int]) -> str:
    """The first difference of labels.json's content from config.json's {name: id}, in words."""
    if not isinstance(given, dict):
        return "it must map each label name to its id"
    for name, i in expected.items():
        if name not in given:
            return f"'{name}' (id {i} in config.json) is not in it"
        if given[name] != i:
            return f"'{name}' is id {i} in config.json, {json.dumps(given[name])} in labels.json"
    return f"'{next(n for n in given if n not in expected)}' is not a label of config.json"


# ---------------------------------------------------------------- schema of config.json

@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str  # bool, int, number, str, list, dict, fraction ([0, 1))
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    required: bool = False


MAX_WIDTH = 1 << 16
MODEL_RULES = {
    "modalities": Rule("list", required=True), "num_labels": Rule("int", 1, 1 << 20, required=True),
    "hidden_size": Rule("int", 1, MAX_WIDTH), "fusion": Rule("str", choices=FUSIONS), "dropout": Rule("fraction"),
    "text_dim": Rule("int", 1, MAX_WIDTH), "dims": Rule("dict"), "share_projections": Rule("bool"),
    "modality_dropout": Rule("fraction"),
    "freeze_text": Rule("bool"), "lora_r": Rule("int", 0, MAX_WIDTH), "text_model_type": Rule("str"),
    "train_text_layers": Rule("int", 0, 1 << 12),
    "sequence": Rule("bool"), "positions": Rule("bool"), "extra": Rule("dict"),
}
GENERATION_RULES = {
    "modalities": Rule("list", required=True), "dims": Rule("dict", required=True),
    "prefix_tokens": Rule("int", 1, 1024), "hidden_size": Rule("int", 1, MAX_WIDTH), "dropout": Rule("fraction"),
    "lora_r": Rule("int", 0, MAX_WIDTH), "train_decoder": Rule("bool"), "decoder": Rule("str", required=True),
    "decoder_identity": Rule("str"), "precision": Rule("str", choices=("fp32", "bf16")),
    "prompt_format": Rule("str", choices=("chat", "plain", "describe")), "max_new_tokens": Rule("int", 1, 1 << 16),
    "stop": Rule("list"), "media_tokens": Rule("str", choices=("pooled", "sequence")), "seq_lens": Rule("dict"),
    "media_at": Rule("str", choices=("prefix", "placeholder")), "pool": Rule("dict"),
    "decoder_kind": Rule("str", choices=("causal-lm", "vision-language")), "ragged": Rule("list"),
    "system": Rule("str"), "retrieve": Rule("int", 0, 1024),
}
PREPROCESSING_RULES = {
    "max_text_tokens": Rule("int", 1, 1 << 20), "sequence_features": Rule("bool"), "sentence_embedding": Rule("bool"),
    "keep_media": Rule("bool"),
}  # and each modality's options (preprocessing_rules)


def preprocessing_rules() -> dict[str, Rule]:
    return {**PREPROCESSING_RULES, **{o.name: _option_rule(o) for _, o in modalities.options()}}


def _option_rule(o: Any) -> Rule:
    """A modality option's rule (low < value <= high): a whole number when its default is one."""
    if isinstance(o.default, int) and not isinstance(o.default, bool):
        return Rule("int", None if o.low is None else int(o.low) + 1, o.high)
    return Rule("number", o.low if o.low is None else max(o.low, 0.001), o.high)


def check_value(name: str, value: Any, rule: Rule) -> str | None:
    """The problem with one field, or None (None values of optional fields are fine)."""
    if value is None:
        return f"{name} is missing" if rule.required else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and number, "str": isinstance(value, str),
          "number": number and math.isfinite(value), "fraction": number and 0 <= value < 1,
          "list": isinstance(value, list), "dict": isinstance(value, dict)}[rule.kind]
    if not ok:
        expected = {"bool": "true or false", "int": "an integer", "str": "text", "number": "a finite number",
                    "fraction": "a number in [0, 1)", "list": "a list", "dict": "an object"}[rule.kind]
        return f"{name} must be {expected} (got {json.dumps(value)[:40]})"
    if rule.choices and value not in rule.choices:
        return f"{name} '{value}' is not one of {', '.join(rule.choices)}"
    if rule.lo is not None and value < rule.lo:
        return f"{name} must be >= {rule.lo:g} (got {value})"
    if rule.hi is not None and value > rule.hi:
        return f"{name} must be <= {rule.hi:g} (got {value})"
    return None


def check_section(section: Any, name: str, rules: dict[str, Rule], closed: bool = True) -> list[str]:
    """Problems of one object of config.json; `closed`: keys without a rule are refused too."""
    if not isinstance(section, dict):
        return [f"{name} must be an object"]
    problems = [f"{name}.{k} is not a known field" for k in section if k not in rules] if closed else []
    return problems + [p for k, rule in rules.items() if (p := check_value(f"{name}.{k}", section.get(k), rule))]


def check_modalities(mods: Any, name: str) -> list[str]:
    if not isinstance(mods, list):
        return []  # reported by its rule
    bad = [m for m in mods if m not in modalities.roles()]
    if bad:
        return [f"{name} has '{bad[0]}', not one of {', '.join(modalities.roles())}"]
    return [f"{name} lists a modality twice"] if len(set(mods)) != len(mods) else []


def check_config(config: dict) -> list[str]:
    """The problems with the sections of a checkpoint's config.json that every task has: version, labels,
    preprocessing (the task's own sections are checked by the task: `tasks.read_config`)."""
    problems = []
    version = config.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        problems.append(f"version {json.dumps(version)} is not one this mmllm reads (1 to {VERSION})")
    labels = config.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        problems.append("labels must be a list of label names")
    elif len(set(labels)) != len(labels):
        problems.append("labels lists a label twice")
    return problems + check_section(config.get("preprocessing", {}), "preprocessing", preprocessing_rules(),
                                    closed=False)


def check_classifier(config: dict, folder: Path) -> list[str]:
    """Every problem with a classifier checkpoint's config.json: the common sections and its model."""
    return check_config(config) + check_model(config, folder)


def check_model(config: dict, folder: Path) -> list[str]:
    """The problems of a classifier checkpoint's model section: fields, modalities, widths, text model files."""
    labels = config.get("labels", [])
    model = config.get("model")
    problems = check_section(model, "model", MODEL_RULES)
    if problems:
        return problems
    mods = model["modalities"]
    problems += check_modalities(mods, "model.modalities") or ([] if mods else ["model.modalities is empty"])
    if isinstance(labels, list) and model["num_labels"] != len(labels):
        problems.append(f"model.num_labels is {model['num_labels']} but labels has {len(labels)} names")
    if "text" in mods and model.get("text_dim") is None:
        problems.append("model.text_dim is missing (the model uses text)")
    dims = model.get("dims") or {}
    for m in mods:
        if m != "text" and (p := check_value(f"model.dims.{m}", dims.get(m), Rule("int", 1, MAX_WIDTH, required=True))):
            problems.append(f"{p} (the model uses {m})")
    if "text" in mods and not (folder / "text_model").is_dir():
        problems.append("text_model/ (tokenizer and text model config) is missing")
    return problems + check_encoders(config, [m for m in mods if m != "text"])


def check_encoders(config: dict, roles: list[str]) -> list[str]:
    """The encoder identities that raw records are featurized with (eval on manifests, predict)."""
    encoders = config.get("encoders")
    if not isinstance(encoders, dict):
        return ["encoders must be an object"]
    problems = []
    for role in roles:
        entry = encoders.get(role)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "identity")):
            problems.append(f"encoders.{role} must name the encoder (name, identity)")
    return problems


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict, Any]:
    """(model in eval mode, checkpoint config, tokenizer or None). The text model comes from text_model/
    (its Hugging Face weights, LoRA merged), or from model.safetensors in checkpoints of the older layout."""
    folder = Path(folder)
    config = read_config(folder)
    mcfg = ModelConfig(**config["model"])
    state = read_weights(folder / "model.safetensors")
    old_layout = any(k.startswith("text.") for k in state)  # text weights inside model.safetensors
    tokenizer = text_model = None
    if "text" in mcfg.modalities:
        tokenizer, text_model = load_text_model(folder / "text_model", with_weights=not old_layout)
    # the older layout stores LoRA adapters unmerged: rebuild them; text_model/ holds merged weights
    model = build_model(mcfg, text_model) if old_layout else classifier(mcfg, text_model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:200]
        raise UserError(f"{folder}: config.json and model.safetensors disagree ({first.strip()})") from None
    missing = [k for k in missing if old_layout or not k.startswith("text.")]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{folder}: config.json and model.safetensors disagree ({what})")
    return model.to(device).eval(), config, tokenizer


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path.parent}: missing {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a valid safetensors file ({e})") from None


def load_text_model(folder: Path, with_weights: bool) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, text model) of a checkpoint's text_model/; without weights: built from its config."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mmllm.console import quiet_transformers

    quiet_transformers()
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer file ({', '.join(TOKENIZER_FILES)}): the checkpoint is incomplete")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if not with_weights:  # the older layout: the text weights are under `text.` in model.safetensors
            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            weights = weight_shapes([folder.parent / "model.safetensors"], "text.")
            check_config_fits_weights(AutoModel, config, weights, folder / "config.json",
                                      folder.parent / "model.safetensors")
            return tokenizer, AutoModel.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: cannot load its tokenizer or config ({str(e).splitlines()[0][:200]})") from None
    return tokenizer, load_hf_weights(AutoModel, folder)


# a tokenizer saved by transformers has one of these; without any, AutoTokenizer builds an empty vocabulary
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


def load_hf_weights(auto: Any, folder: Path) -> torch.nn.Module:
    """`auto.from_pretrained(folder)` in float32, refusing a folder whose weights are missing or incomplete."""
    from safetensors import SafetensorError

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no model.safetensors (the trained weights): the checkpoint is incomplete")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}: cannot load its config ({str(e).splitlines()[0][:200]})") from None
    check_config_fits_weights(auto, config, weight_shapes(files), folder / "config.json",
                              files[0] if len(files) == 1 else folder)
    try:
        model, info = auto.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32,
                                           output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder}: cannot load its weights ({str(e).splitlines()[0][:200]})") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = sorted(info.get("missing_keys") or [])[:1] or [str(info["mismatched_keys"][0])]
        raise UserError(f"{folder}: config.json and model.safetensors disagree (missing or mismatched {bad[0]})")
    return model


def weight_shapes(files: list[Path], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the tensors named `prefix`... in safetensors files, from their headers alone (the
    prefix removed): nothing is allocated."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        shapes[name[len(prefix):]] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None
    return shapes


def check_config_fits_weights(auto: Any, config: Any, weights: dict[str, tuple[int, ...]], config_path: Path,
                              weights_path: Path) -> None:
    """Refuse, in one line and before anything is allocated, a model config that does not describe these weights
    (an untrusted checkpoint's `num_hidden_layers: 150` beside 2 layers of weights would build 1.5 GB first).

    Layer counts are checked against the number of tensors (each layer holds at least one); then the model is
    built on the meta device (shapes only) and its parameters compared with the weights' header: the same shape
    wherever both name a tensor, and no more parameters than the weights hold."""
    for key, value in config.to_dict().items():
        if isinstance(value, int) and not isinstance(value, bool) and LAYER_COUNT.search(key) and value > len(weights):
            raise UserError(f"{config_path}: {key} {value}, but {weights_path} holds {len(weights)} tensors: the "
                            "config does not describe these weights (edited, or another model's); refused")
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, RuntimeError, KeyError, AttributeError) as e:
        raise UserError(f"{config_path}: cannot build the model it describes ({str(e).splitlines()[0][:200]})") \
            from None
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for name, tensor in model.state_dict().items():
        held = weights.get(name, weights.get(prefix + name, weights.get(name.removeprefix(prefix))))
        if held is not None and tuple(held) != tuple(tensor.shape):
            raise UserError(f"{config_path} and {weights_path} disagree: {name} is {list(tensor.shape)} by the config, "
                            f"{list(held)} in the weights; refused")
    implied = sum(p.numel() for p in model.parameters())
    stored = sum(math.prod(shape) for shape in weights.values())
    if implied > stored:
        raise UserError(f"{config_path} describes a model of {implied:,} parameters, but {weights_path} holds "
                        f"{stored:,}: the config does not describe these weights (edited, or another model's); refused")


# config keys that count layers (num_hidden_layers, n_layer, encoder_layers, num_layers, ...)
LAYER_COUNT = re.compile(r"(^|_)(n_)?(layers?)$|^num_.*layers$")
