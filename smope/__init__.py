"""smope: sparse mixtures of prompt experts for continual learning on frozen ViTs.

The exports load on first use (PEP 562 module ``__getattr__``): ``import smope`` and the
command line's help import neither torch nor peft (which imports transformers); accessing
``smope.attach`` imports the model code, ``smope.SMoPEConfig`` peft.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> submodule that defines it.
_EXPORTS = {
    "MissingExtraError": "errors",
    "SmopeError": "errors",
    "SMoPEConfig": "config",
    "PromptExperts": "layer",
    "PromptedAttention": "layer",
    "SMoPEModel": "model",
    "accumulate_usage": "model",
    "attach": "model",
    "auxiliary_loss": "model",
    "begin_task": "model",
    "count_parameters": "vit",
    "expert_usage": "model",
    "prompted_layers": "model",
    "set_mode": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
