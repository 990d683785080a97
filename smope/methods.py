"""The registry of continual learners: each method's name(s), its class and the ``method.*`` keys it reads.

The registry is plain data (no torch), so a config is checked against it before any model is
built, also by ``smope run --dry-run``. Adding a learner is one file in ``smope/learners/``
and one :class:`MethodSpec` line here; ``method.*`` keys the chosen method does not read are
refused (:func:`unread_method_keys`), because a setting that silently does nothing runs
another experiment than the one the user asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import SmopeError
from .settings import PROMPT_EXPERT_KEYS

# Groups of method.* keys, by the machinery that reads them.
ALIGNMENT = ("align", "align_epochs", "align_lr", "align_samples_per_class", "align_covariance", "align_steps")
HEAD = ("head", "rp_dim")  # the prompt learners' linear (aligned) or ridge head
DENSE_PROMPT = ("num_experts", "top_k", "layers", "init")  # a prompt in dense mode: no routing, noise or routing losses
SMOPE = (*PROMPT_EXPERT_KEYS, "after_task_eval_noise", "warmup_epochs", *ALIGNMENT, *HEAD)
HIDE_PROMPT = (
    "pool_size", "prompt_length", "prompt_layers", "hide_tii_epochs", "hide_tii_lr", "hide_align_epochs", "hide_align_lr",
    "hide_statistics", "hide_centroids", "hide_prompt_momentum", "hide_contrastive_weight",
)  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    """One learner: ``method.name`` (and aliases), where its class lives, and the keys it reads besides ``name``."""

    name: str
    target: str  # "module:Class" under smope.learners, imported only when the learner is built
    reads: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(f"smope.learners.{module}"), cls)


METHODS = (
    MethodSpec("smope", "smope_learner:SMoPELearner", SMOPE),
    MethodSpec("dense-prompt", "smope_variants:DensePromptLearner", (*DENSE_PROMPT, *ALIGNMENT, *HEAD)),
    MethodSpec("l2p", "prompt_pool:L2PLearner", ("pool_size", "prompt_length", "prompt_layers", "pool_top_k")),
    MethodSpec(
        "dualprompt", "prompt_pool:DualPromptLearner", ("pool_size", "prompt_length", "prompt_layers", "g_prompt_length", "g_prompt_layers")
    ),
    MethodSpec("coda-prompt", "prompt_pool:CodaPromptLearner", ("pool_size", "prompt_length", "prompt_layers", "ortho_weight")),
    MethodSpec(
        "vq-prompt",
        "vq_prompt:VQPromptLearner",
        ("pool_size", "prompt_length", "prompt_layers", "vq_temperature", "vq_loss_weight", "vq_commit_weight", *ALIGNMENT),
    ),
    MethodSpec("prototype", "frozen_backbone:PrototypeLearner", (), aliases=("simplecil",)),  # SimpleCIL's published name
    MethodSpec("head-only", "frozen_backbone:HeadOnlyLearner", ()),
    MethodSpec("aligned-head", "frozen_backbone:AlignedHeadLearner", ALIGNMENT),
    MethodSpec("lora", "lora:LoRALearner", ("lora_r", "lora_alpha", "lora_lr")),
    MethodSpec("joint", "smope_variants:JointLearner", SMOPE),
    MethodSpec("ranpac", "ranpac:RanPACLearner", ("rp_dim", "first_task_adapt", *DENSE_PROMPT)),
    MethodSpec("aper", "aper:APERLearner", DENSE_PROMPT),
    MethodSpec(
        "slca", "slca:SLCALearner", ("slca_backbone_lr", "slca_head_lr", "slca_align_epochs", "slca_logit_norm", "align", "align_samples_per_class")
    ),
    MethodSpec("hide-prompt", "hide_prompt:HiDePromptLearner", HIDE_PROMPT),
    MethodSpec("norga", "hide_prompt:NoRGaLearner", (*HIDE_PROMPT, "norga_gate")),
)

# The learners whose model routes each input to its top-K prompt experts (smope.stability.is_gated):
# what per-image routes, routing stability and collapse warnings apply to.
GATED_METHODS = ("smope", "joint")

BY_NAME: dict[str, MethodSpec] = {name: spec for spec in METHODS for name in (spec.name, *spec.aliases)}


def method_names() -> list[str]:
    """Every accepted ``method.name``, aliases included, sorted."""
    return sorted(BY_NAME)


def spec_for(name: str) -> MethodSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise SmopeError(f"unknown method.name '{name}'; choose one of {', '.join(method_names())}") from None


def readers_of(key: str) -> list[str]:
    """The methods (by primary name) that read ``method.<key>``."""
    return [spec.name for spec in METHODS if key in spec.reads]


def unread_method_keys(name: str, keys: set[str] | list[str]) -> list[str]:
    """Those of ``keys`` that method ``name`` does not read, sorted."""
    reads = spec_for(name).reads
    return sorted(key for key in keys if key != "name" and key not in reads)
