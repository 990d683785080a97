"""Stopping training whose loss diverges, with advice that names what to lower.

A too-high learning rate does not always produce NaN: the loss can also grow to 1e11 and
stay finite while accuracy sits at chance. Both end the run with one clear error.

The rule: training has diverged when a loss is not finite, or when the mean loss of the
last :data:`WINDOW` steps exceeds both :data:`GROWTH` times the first step's loss (taken
before any update) and :data:`FLOOR`. Cross-entropy starts near ln(classes), so the
floor only matters for losses that start near zero.
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
# Config keys that set a learning rate given to the optimizer directly.
LR_KEYS = (("train", "lr"), ("method", "lora_lr"), ("method", "align_lr"), ("method", "slca_backbone_lr"), ("method", "slca_head_lr"))


class DivergenceGuard:
    """Watches the loss of one training phase (:meth:`~smope.trainer.Trainer.optimize`) for divergence."""

    def __init__(self, config: RunConfig, description: str, param_groups: list[dict], precision: str | None = None) -> None:
        self.config, self.description = config, description
        # The precision in effect: the trainer's (train.precision with auto resolved for its device).
        self.precision = precision or config.train.precision
        self.group_lrs = [group["lr"] for group in param_groups]
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
        """The learning-rate keys in effect in this phase (train.lr when none matches exactly)."""
        keys = [f"{section}.{name}" for section, name in LR_KEYS if getattr(getattr(self.config, section), name) in self.group_lrs]
        return keys or ["train.lr"]

    def error(self, epoch: int) -> ConfigAdviceError:
        lower = " or ".join(f"{key} (now {getattr(getattr(self.config, key.split('.')[0]), key.split('.')[1]):g})" for key in self.lr_keys())
        fp32 = "" if self.precision in ("fp32", "auto") else f", or use train.precision=fp32 (now {self.config.train.precision})"
        return ConfigAdviceError(f"{self.reason} in '{self.description}' (epoch {epoch}): training diverged. Lower {lower}{fp32}")
