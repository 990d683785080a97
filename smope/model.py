"""Attaching prompt experts to a backbone, in peft's conventions.

:func:`attach` freezes a timm or transformers ViT, wraps the attention of the chosen blocks
in :class:`~smope.layer.PromptedAttention` and returns a :class:`SMoPEModel`, which behaves
like the backbone (attribute access falls through, as with peft's ``PeftModel``) and adds
peft's ``print_trainable_parameters`` and ``save_pretrained`` / ``from_pretrained`` with
``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import save_safetensors
from .errors import SmopeError
from .layer import PromptedAttention
from .vit import SUPPORTED, classifier_names, count_parameters, find_attention_blocks, layout_of, replace_module, state_mismatch

if TYPE_CHECKING:  # imported where used: the config module imports peft, which imports transformers
    from .config import SMoPEConfig

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft names saved tensors after the tuner's wrapped model: base_model.model.<module path>.
PEFT_KEY_PREFIX = "base_model.model."

class SMoPEModel(nn.Module):
    """A backbone with prompt experts attached; calls and attributes fall through to it."""

    def __init__(self, base_model: nn.Module, config: SMoPEConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.peft_config = config

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # peft conventions -----------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        counts = count_parameters(self)
        return counts["trainable"], counts["total"]

    def print_trainable_parameters(self) -> None:
        """Print peft's line: ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompt keys/values, usage counts, flags, snapshots and the trainable head, peft-named."""
        keep = tuple(f"{n}." for n in self.peft_config.modules_to_save or [])
        state = {}
        for name, tensor in self.base_model.state_dict().items():
            if ".experts." in f".{name}" or name.startswith(keep):
                state[PEFT_KEY_PREFIX + name] = tensor.detach().contiguous()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_config.save_pretrained(str(directory))
        save_safetensors(directory / ADAPTER_WEIGHTS_NAME, self.adapter_state_dict(), {"format": "pt"})

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load weights and state saved by :meth:`save_pretrained` into this (attached) model."""
        path = Path(directory) / ADAPTER_WEIGHTS_NAME
        if not path.is_file():
            raise SmopeError(f"no adapter weights at {path}: expected a directory written by save_pretrained()")
        try:
            saved = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise SmopeError(f"cannot read {path} ({exc}); the file is damaged: save the adapter again") from exc
        self.load_adapter_state_dict(saved, source=str(directory))

    def load_adapter_state_dict(self, saved: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
        """Load tensors named as in :meth:`adapter_state_dict`, after checking they fit this model."""
        own = self.adapter_state_dict()
        problems = state_mismatch({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in saved.items()}, limit=3)
        if problems:
            raise SmopeError(
                f"adapter in {source} does not fit this model ({problems}): "
                "attach with the same SMoPEConfig and backbone it was saved from"
            )
        self.base_model.load_state_dict({k[len(PEFT_KEY_PREFIX):]: v for k, v in saved.items()}, strict=False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike) -> "SMoPEModel":
        """Attach to a fresh backbone with the saved config, then load the saved adapter."""
        config_path = Path(directory) / ADAPTER_CONFIG_NAME
        if not config_path.is_file():
            raise SmopeError(f"no {ADAPTER_CONFIG_NAME} in {directory}: expected a directory written by save_pretrained()")
        from .config import SMoPEConfig

        config = SMoPEConfig.from_pretrained(str(directory))
        check_backbone(model, config.backbone, directory)
        smope_model = attach(model, config)
        smope_model.load_adapter(directory)
        return smope_model


def backbone_facts(model: nn.Module) -> dict:
    """What can be read off a timm (or transformers) ViT: ``model`` (architecture), ``img_size``, ``num_classes``."""
    facts = {}
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if architecture:
        facts["model"] = architecture
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(getattr(model, "config", None), "image_size", None)
    if img_size is not None:
        facts["img_size"] = int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(getattr(model, "config", None), "num_labels", None)
    if num_classes is not None:
        facts["num_classes"] = int(num_classes)
    return facts


def check_backbone(model: nn.Module, recorded: dict | None, source: str | os.PathLike) -> None:
    """Refuse ``model`` when it differs from the backbone an adapter recorded (architecture, input size, classes).

    A prompt's shapes follow only the width and heads, so another input size or head would load
    without a word and predict from position embeddings or classes the adapter never saw.
    """
    if not recorded:
        return
    facts = backbone_facts(model)
    wanted = {key: recorded[key] for key in ("model", "img_size", "num_classes") if recorded.get(key) is not None}
    if wanted.get("model"):
        wanted["model"] = wanted["model"].split(".")[0]  # the architecture, without a weights tag
    differ = [key for key in wanted if key in facts and facts[key] != wanted[key]]
    if differ:
        given = ", ".join(f"{key} {facts[key]}" for key in differ)
        needed = ", ".join(f"{key} {wanted[key]}" for key in differ)
        raise SmopeError(
            f"the adapter in {source} was trained on another backbone ({needed}; this one has {given}): build it as recorded "
            f"in {Path(source) / ADAPTER_CONFIG_NAME} under 'backbone', e.g. smope.backbones.create_backbone(ModelConfig(...), num_classes)"
        )


def attach(model: nn.Module, config: SMoPEConfig | None = None) -> SMoPEModel:
    """Freeze ``model``, wrap the attention of ``config.layers`` and return a :class:`SMoPEModel`.

    The classifier head (or ``config.modules_to_save``) stays trainable. ``config`` is not
    changed: the returned model keeps its own copy, with ``modules_to_save`` filled in. Load
    pretrained backbone weights before attaching: wrapping renames ``attn.qkv`` to ``attn.base_layer.qkv``.
    """
    from .config import SMoPEConfig

    config = SMoPEConfig() if config is None else copy.deepcopy(config)
    if isinstance(model, SMoPEModel):
        raise SmopeError("this model already has prompt experts attached")
    blocks = find_attention_blocks(model)
    if not blocks:
        raise SmopeError(f"{type(model).__name__} has no attention that SMoPE can wrap. Supported: {SUPPORTED}")
    config.check_blocks(len(blocks))
    if config.modules_to_save is None:
        config.modules_to_save = classifier_names(model)

    model.requires_grad_(False)
    for index in config.layers:
        name, attention = blocks[index]
        prompted = PromptedAttention(attention, config, layout_of(attention))
        prompted.to(next(attention.parameters()).device)
        replace_module(model, name, prompted)
    for name in config.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    return SMoPEModel(model, config)


def prompted_layers(model: nn.Module) -> list[PromptedAttention]:
    """The prompted attention layers of ``model``, in block order."""
    return [m for m in model.modules() if isinstance(m, PromptedAttention)]


def _require_layers(model: nn.Module) -> list[PromptedAttention]:
    layers = prompted_layers(model)
    if not layers:
        raise SmopeError("the model has no prompt experts: call smope.attach(model, config) first")
    return layers


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every prompted layer to ``"sparse"`` (top-K) or ``"dense"`` (all experts)."""
    for layer in _require_layers(model):
        layer.set_mode(mode)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted router + prototype losses of the last forward, ``None`` if none."""
    losses = [layer.aux_loss for layer in _require_layers(model) if layer.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def accumulate_usage(model: nn.Module) -> None:
    """Add the last forward's top-K experts to the usage counts (the usage pass, docs/method.md#adaptive-noise)."""
    for layer in _require_layers(model):
        layer.record_usage()


def begin_task(model: nn.Module) -> None:
    """Flag frequent experts and snapshot keys/values: call at the start of every task after the first."""
    for layer in _require_layers(model):
        layer.experts.begin_task()


def expert_usage(model: nn.Module) -> torch.Tensor:
    """Usage counts of every prompted layer, stacked as (layers, heads, experts)."""
    return torch.stack([layer.experts.counts for layer in _require_layers(model)])


def prompt_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for layer in prompted_layers(model):
        yield from layer.experts.parameters()
