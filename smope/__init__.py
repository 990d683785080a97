"""smope: sparse mixtures of prompt experts for continual learning on frozen ViTs."""

from .config import SMoPEConfig
from .errors import MissingExtraError, SmopeError
from .layer import PromptedAttention, PromptExperts
from .model import (
    SMoPEModel,
    accumulate_usage,
    attach,
    auxiliary_loss,
    begin_task,
    count_parameters,
    expert_usage,
    prompted_layers,
    set_mode,
)

__version__ = "0.1.0"

__all__ = [
    "MissingExtraError",
    "PromptExperts",
    "PromptedAttention",
    "SMoPEConfig",
    "SMoPEModel",
    "SmopeError",
    "accumulate_usage",
    "attach",
    "auxiliary_loss",
    "begin_task",
    "count_parameters",
    "expert_usage",
    "prompted_layers",
    "set_mode",
]
