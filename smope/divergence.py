"""Stopping training whose loss diverges, with advice that names what to lower.

A too-high learning rate does not always produce NaN: the loss can also grow to 1e11 and
stay finite while accuracy sits at chance. Both end the run with one clear error.

The rule: training has diverged when a loss is not finite, or when the mean loss of the
last :data:`WINDOW` steps exceeds both :data:`GROWTH` times the first step's loss (taken
before any update) and :data:`FLOOR`. Cross-entropy starts near ln(classes), so the
floor only matters for losses that start near zero.

The advice names the config keys that set the phase's learning rates: each optimizer
parameter group says which one in its :data:`LR_KEY` entry (``"train.lr"``,
``"method.lora_lr"``, ...), where the learner builds it. A group without one is taken as
set by ``train.lr``, the harness's rate.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .errors import ConfigAdviceError
from .runconfig import RunConfig

WINDOW = 10
GROWTH = 100.0
FLOOR = 10.0
# The entry of an optimizer parameter group that names the config key its learning rate comes from.
LR_KEY = "lr_key"
DEFAULT_LR_KEY = "train.lr"


class DivergenceGuard:
    """Watches the loss of one training phase (:meth:`~smope.trainer.Trainer.optimize`) for divergence."""

    def __init__(self, config: RunConfig, description: str, param_groups: list[dict], precision: str | None = None) -> None:
        self.config, self.description = config, description
        # The precision in effect: the trainer's (train.precision with auto resolved for its device).
        self.precision = precision or config.train.precision
        self.group_keys = [group.get(LR_KEY, DEFAULT_LR_KEY) for group in param_groups]
        for key in self.group_keys:
            self.setting(key)  # a group naming no config key fails here, not when the advice is written
        self.first: float | None = None
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.reason = ""

    def diverged(self, loss: torch.Tensor | float) -> bool:
        """Record this step's loss; True when training has diverged (:attr:`reason` says how)."""
        value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            self.reason = f"the training loss became {value}"
            return True
        self.first = value if self.first is None else self.first
        self.recent.append(value)
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == WINDOW and mean > max(GROWTH * self.first, FLOOR):
            self.reason = f"the training loss grew from {self.first:.3g} to {mean:.3g} (mean of the last {WINDOW} steps)"
            return True
        return False

    def lr_keys(self) -> list[str]:
        """The config keys that set this phase's learning rates, each once: train.lr first, then in the groups' order."""
        keys = list(dict.fromkeys(self.group_keys)) or [DEFAULT_LR_KEY]
        return sorted(keys, key=lambda key: key != DEFAULT_LR_KEY)

    def setting(self, key: str) -> float:
        """The value of the config key ``key`` (``"section.name"``)."""
        section, name = key.split(".")
        return getattr(getattr(self.config, section), name)

    def error(self, epoch: int) -> ConfigAdviceError:
        lower = " or ".join(f"{key} (now {self.setting(key):g})" for key in self.lr_keys())
        fp32 = "" if self.precision in ("fp32", "auto") else f", or use train.precision=fp32 (now {self.config.train.precision})"
        return ConfigAdviceError(f"{self.reason} in '{self.description}' (epoch {epoch}): training diverged. Lower {lower}{fp32}")
