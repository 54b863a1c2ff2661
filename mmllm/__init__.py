"""mmllm: fine-tune pretrained language models together with image and audio inputs.

The Python API (see `mmllm.api`): `mmllm.prepare(...)`, `mmllm.finetune(...)`, `mmllm.evaluate(...)`,
`mmllm.load(checkpoint).predict(records)`, and the typed configs (`mmllm.FinetuneConfig`, ...). Importing
mmllm is light: everything loads on first use. The steps' modules are `mmllm.preparation`, `mmllm.finetuning`,
`mmllm.evaluation` and `mmllm.predict`.
"""

import importlib

__version__ = "0.1.0"

API = ("prepare", "finetune", "evaluate", "load", "Model", "make_config")
CONFIGS = ("PrepareConfig", "FinetuneConfig", "EvalModelConfig", "PredictConfig")


def __getattr__(name):
    if name in API:
        return getattr(importlib.import_module("mmllm.api"), name)
    if name in CONFIGS:
        return getattr(importlib.import_module("mmllm.config"), name)
    raise AttributeError(f"module 'mmllm' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *API, *CONFIGS])
