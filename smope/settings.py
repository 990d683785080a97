"""The prompt-expert settings (one definition of their fields, defaults and checks) and the range checks of every setting.

:class:`~smope.config.SMoPEConfig` (the peft adapter config) and the ``method`` settings of
the learners built on prompt experts (:mod:`smope.methods`) both inherit these fields, so a
default or a range is written once. This module imports neither torch nor peft.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSettingError, SmopeError


def at_least(key: str, value: float, low: float) -> None:
    """Refuse config key ``key`` below ``low``, naming it."""
    if value < low:
        raise SmopeError(f"config key '{key}' must be >= {low}, got {value}")


def above(key: str, value: float, low: float = 0) -> None:
    """Refuse config key ``key`` at or below ``low``, naming it."""
    if value <= low:
        raise SmopeError(f"config key '{key}' must be > {low}, got {value}")


def one_of(key: str, value: Any, choices: Collection[str]) -> None:
    """Refuse config key ``key`` outside ``choices``, listing them."""
    if value not in choices:
        raise SmopeError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")


INIT_CHOICES = ("uniform", "normal", "zeros")
# What the training penalty of flagged experts is measured in (docs/routing.md#the-options).
NOISE_SCALES = ("range", "lead")


@dataclass
class PromptExpertSettings:
    """Hyper-parameters of a sparse mixture of prompt experts (docs/method.md).

    Args:
        num_experts: prompt experts per head and prompted block (N_p).
        top_k: experts active per input, head and block (K).
        layers: indices of the prompted transformer blocks.
        noise_eps: adaptive-noise coefficient for frequently used experts during training (eps).
        eval_noise: penalty coefficient at evaluation for experts never used in training. The
            method's rule is 2.0; 0 is plain top-K routing, which is how the paper's reported
            numbers were computed (its checkpoints lost the usage counts on reload).
        router_weight: weight of the router loss (alpha_router).
        proto_weight: weight of the prototype loss (alpha_proto).
        init: initialisation of the prompt keys and values ("uniform" is U[0, 1), the reference).
        balance_weight: weight of the auxiliary load-balancing loss on each training batch's
            per-head expert usage (Switch Transformer style); 0, the paper's method, turns it off.
        noise_scale: what the training penalty of flagged experts is measured in: "range" (the
            paper's eps x score range) or "lead" (their lead over the best unflagged expert, plus
            eps x the range), which always lets the best unflagged expert in.
    """

    num_experts: int = field(default=25, metadata={"help": "prompt experts per head and prompted block (N_p)"})
    top_k: int = field(default=5, metadata={"help": "experts active per input, head and block (K)"})
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5], metadata={"help": "indices of the prompted transformer blocks"})
    noise_eps: float = field(
        default=0.4, metadata={"help": "adaptive-noise coefficient for frequently used experts in training (eps), in [0, 1] ([losses](method.md#losses))"}
    )
    eval_noise: float = field(
        default=2.0,
        metadata={"help": "evaluation penalty for experts never used in training; 0 = plain top-K routing (how the paper's numbers were computed)"},
    )
    router_weight: float = field(default=1e-5, metadata={"help": "weight of the router loss (alpha_router; [losses](method.md#losses))"})
    proto_weight: float = field(default=1e-5, metadata={"help": "weight of the prototype loss (alpha_proto; [losses](method.md#losses))"})
    init: str = field(default="uniform", metadata={"help": "initialisation of the prompt keys and values: `uniform` (U[0, 1), the reference), `normal` or `zeros`"})
    balance_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a Switch-style load-balancing loss on each training batch's per-head expert usage; 0 = the paper's method"},
    )
    noise_scale: str = field(
        default="range",
        metadata={
            "help": "what the training penalty of flagged experts is measured in: `range` (the paper's eps x the head's score range) or `lead` "
            "(their lead over the best unflagged expert, plus eps x the range, which always lets the best unflagged expert in)"
        },
    )

    def check_settings(self) -> None:
        """Raise :class:`~smope.errors.InvalidSettingError` naming the first setting out of range."""
        check_prompt_shape(self)
        if not 0.0 <= self.noise_eps <= 1.0:
            raise InvalidSettingError(f"noise_eps must be in [0, 1], got {self.noise_eps}")
        if self.eval_noise < 0:
            raise InvalidSettingError(f"eval_noise must be >= 0, got {self.eval_noise}")
        for name in ("router_weight", "proto_weight", "balance_weight"):
            if getattr(self, name) < 0:
                raise InvalidSettingError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.noise_scale not in NOISE_SCALES:
            raise InvalidSettingError(f"noise_scale must be one of {NOISE_SCALES}, got {self.noise_scale!r}")

    def check_blocks(self, num_blocks: int) -> None:
        """Check the block indices against a model with ``num_blocks`` attention blocks."""
        bad = [i for i in self.layers if i >= num_blocks]
        if bad:
            raise InvalidSettingError(
                f"layers {bad} do not exist: this model has {num_blocks} blocks, so layers must be in [0, {num_blocks - 1}]"
            )

    def prompt_expert_settings(self) -> dict:
        """These fields alone, as keyword arguments (e.g. for :class:`~smope.config.SMoPEConfig`)."""
        return {name: getattr(self, name) for name in PROMPT_EXPERT_KEYS}


PROMPT_EXPERT_KEYS = tuple(PromptExpertSettings.__dataclass_fields__)
DENSE_PROMPT_KEYS = ("num_experts", "top_k", "layers", "init")  # what a prompt in dense mode reads: no routing, noise or routing losses


def check_prompt_shape(settings) -> None:
    """The checks of :data:`DENSE_PROMPT_KEYS` on any object holding them (the prompt experts' shape and init)."""
    if settings.num_experts < 1:
        raise InvalidSettingError(f"num_experts must be >= 1, got {settings.num_experts}")
    if not 1 <= settings.top_k <= settings.num_experts:
        raise InvalidSettingError(f"top_k must be in [1, num_experts={settings.num_experts}], got {settings.top_k}")
    if settings.init not in INIT_CHOICES:
        raise InvalidSettingError(f"init must be one of {INIT_CHOICES}, got {settings.init!r}")
    if not settings.layers:
        raise InvalidSettingError("layers must list at least one block index, e.g. [0, 1, 2, 3, 4, 5]")
    if len(set(settings.layers)) != len(settings.layers) or min(settings.layers) < 0:
        raise InvalidSettingError(f"layers must be distinct block indices >= 0, got {settings.layers}")
