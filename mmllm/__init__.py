"""mmllm: fine-tune pretrained language models together with image and audio inputs.

The Python API (see `mmllm.api`): `mmllm.prepare(...)`, `mmllm.finetune(...)`, `mmllm.evaluate(...)`,
`mmllm.load(checkpoint).predict(records)`, and the typed configs (`mmllm.FinetuneConfig`, ...). Importing
mmllm is light: everything loads on first use.

`mmllm.prepare` and `mmllm.finetune` are also the step modules (`mmllm.prepare.run`, `import mmllm.finetune`):
those two modules are callable, and calling one runs the API function of the same name.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

API = ("prepare", "finetune", "evaluate", "load", "Model", "make_config")
CONFIGS = ("PrepareConfig", "FinetuneConfig", "EvalModelConfig", "PredictConfig")
CALLABLE_STEPS = ("prepare", "finetune")


class _Step(types.ModuleType):
    """A step module that is also the API function of its name: mmllm.prepare(...) == mmllm.api.prepare(...)."""

    def __call__(self, *args, **kwargs):
        from mmllm import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system binds each submodule here (setattr): the step modules become callable
        if name in CALLABLE_STEPS and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _Step
        super().__setattr__(name, value)


def __getattr__(name):
    if name in CALLABLE_STEPS:
        return importlib.import_module(f"mmllm.{name}")  # binding it makes it callable (see _Package)
    if name in API:
        return getattr(importlib.import_module("mmllm.api"), name)
    if name in CONFIGS:
        return getattr(importlib.import_module("mmllm.config"), name)
    raise AttributeError(f"module 'mmllm' has no attribute '{name}'")


sys.modules[__name__].__class__ = _Package
