"""Generic ViT plumbing that the prompt-expert core and the baselines share.

- Attention layouts: how one family of attention modules (timm, transformers 5.x, transformers
  4.x) exposes its heads, its frozen q/k/v and output projections and its call convention.
  They sit in one ordered list, :data:`ATTENTION_LAYOUTS`; a new backbone family is one
  :class:`AttentionLayout` subclass added with :func:`register_layout`, and every wrapper
  (SMoPE's prompted attention, the baselines' prefix attention) then works on it.
- Finding the attention blocks, the classifier head and the pooled feature of a model.
- Parameter counts with one meaning for every method, and readable state-dict mismatches.

Nothing here knows about prompt experts or continual learning.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import SmopeError

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Queries, keys and values, each (B, heads, N, head_dim)."""


class AttentionLayout:
    """How to drive one family of attention modules from outside, with its own frozen weights.

    A wrapper calls :meth:`inputs` on its forward's arguments, computes attention from
    :meth:`project_qkv` with whatever it adds, and returns :meth:`output` of
    :meth:`project_out`, so that to the surrounding block it looks like the wrapped module.
    """

    name = "abstract"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def heads(self, module: nn.Module) -> tuple[int, int]:
        """``(num_heads, head_dim)``."""
        raise NotImplementedError

    def project_qkv(self, module: nn.Module, x: torch.Tensor) -> Projections:
        raise NotImplementedError

    def project_out(self, module: nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output from the attended values ``context`` (B, heads, N, head_dim) and its input ``x``."""
        raise NotImplementedError

    def dropout(self, module: nn.Module) -> float:
        """The attention-probability dropout the module applies in training."""
        return 0.0

    def inputs(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states and the attention mask (or ``None``) from the module's forward arguments."""
        raise NotImplementedError

    def output(self, module: nn.Module, out: torch.Tensor) -> Any:
        """``out`` shaped as the module's forward returns it."""
        return out


class TimmLayout(AttentionLayout):
    """``timm.models.vision_transformer.Attention`` (ViT, DeiT, DINOv2 and friends), q/k norms and gates included."""

    name = "timm"

    def matches(self, module: nn.Module) -> bool:
        from timm.models.vision_transformer import Attention

        return isinstance(module, Attention)

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return module.num_heads, module.head_dim

    def project_qkv(self, module: nn.Module, x: torch.Tensor) -> Projections:
        batch, tokens, _ = x.shape
        qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return module.q_norm(q), module.k_norm(k), v

    def project_out(self, module: nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = module.norm(context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        gate = getattr(module, "gate", None)  # gated attention variants
        if gate is not None:
            out = out * gate(x).sigmoid()
        return module.proj_drop(module.proj(out))

    def dropout(self, module: nn.Module) -> float:
        return module.attn_drop.p

    def inputs(self, module: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if is_causal:
            raise ValueError("wrapped attention does not support causal masks")
        return x, attn_mask


def _is_transformers_vit_attention(module: nn.Module) -> bool:
    return any(cls.__name__ == "ViTAttention" for cls in type(module).__mro__)  # also 4.x's ViTSdpaAttention


def _split_heads(x: torch.Tensor, projections: tuple[nn.Module, ...], num_heads: int, head_dim: int) -> Projections:
    shape = (*x.shape[:-1], num_heads, head_dim)
    return tuple(proj(x).view(shape).transpose(1, 2) for proj in projections)


class Transformers5Layout(AttentionLayout):
    """transformers 5.x's ``ViTAttention``: q_proj / k_proj / v_proj / o_proj; forward returns ``(output, None)``."""

    name = "transformers-5"

    def matches(self, module: nn.Module) -> bool:
        return _is_transformers_vit_attention(module) and all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return module.num_attention_heads, module.head_dim

    def project_qkv(self, module: nn.Module, x: torch.Tensor) -> Projections:
        return _split_heads(x, (module.q_proj, module.k_proj, module.v_proj), *self.heads(module))

    def project_out(self, module: nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return module.o_proj(context.transpose(1, 2).reshape(*x.shape[:-1], -1))

    def dropout(self, module: nn.Module) -> float:
        return module.attention_dropout

    def inputs(self, module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return hidden_states, attention_mask

    def output(self, module: nn.Module, out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return out, None


@functools.cache
def _returns_tuple(cls: type) -> bool:
    """transformers up to about 4.50 return a tuple from ``ViTAttention.forward`` (it takes ``output_attentions``)."""
    return "output_attentions" in inspect.signature(cls.forward).parameters


class Transformers4Layout(AttentionLayout):
    """transformers 4.x's ``ViTAttention``: ``attention`` (query / key / value) and ``output`` (dense, dropout)."""

    name = "transformers-4"

    def matches(self, module: nn.Module) -> bool:
        own = getattr(module, "attention", None)
        return (
            _is_transformers_vit_attention(module)
            and all(hasattr(own, n) for n in ("query", "key", "value"))
            and hasattr(getattr(module, "output", None), "dense")
        )

    def heads(self, module: nn.Module) -> tuple[int, int]:
        return module.attention.num_attention_heads, module.attention.attention_head_size

    def project_qkv(self, module: nn.Module, x: torch.Tensor) -> Projections:
        own = module.attention
        return _split_heads(x, (own.query, own.key, own.value), *self.heads(module))

    def project_out(self, module: nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return module.output(context.transpose(1, 2).reshape(*x.shape[:-1], -1), x)

    def dropout(self, module: nn.Module) -> float:
        own = module.attention
        return own.dropout_prob if hasattr(own, "dropout_prob") else own.dropout.p

    def inputs(self, module: nn.Module, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if head_mask is not None:
            raise ValueError("wrapped attention does not support head_mask")
        return hidden_states, None

    def output(self, module: nn.Module, out: torch.Tensor) -> Any:
        return (out,) if _returns_tuple(type(module)) else out


ATTENTION_LAYOUTS: list[AttentionLayout] = [TimmLayout(), Transformers5Layout(), Transformers4Layout()]
"""Tried in order; the first layout that matches a module drives it."""

SUPPORTED = (
    "timm VisionTransformer family (vit_*, deit_*, vit_*_dinov2, eva-free models built on "
    "timm.models.vision_transformer.Attention) and transformers ViTModel / ViTForImageClassification (4.x and 5.x)"
)


def register_layout(layout: AttentionLayout) -> None:
    """Support another family of attention modules; it is tried before the built-in layouts."""
    ATTENTION_LAYOUTS.insert(0, layout)


def layout_of(module: nn.Module) -> AttentionLayout | None:
    """The layout that drives ``module``, or ``None`` if it is no attention we support."""
    return next((layout for layout in ATTENTION_LAYOUTS if layout.matches(module)), None)


class AttentionWrapper(nn.Module):
    """Base of modules that replace a supported attention module and keep it as ``base_layer``."""

    def __init__(self, base_layer: nn.Module, layout: AttentionLayout | None = None) -> None:
        super().__init__()
        layout = layout or layout_of(base_layer)
        if layout is None:
            raise TypeError(f"{type(base_layer).__name__} is no supported attention module. Supported: {SUPPORTED}")
        self.base_layer = base_layer
        self.layout = layout
        self.num_heads, self.head_dim = layout.heads(base_layer)

    def project_qkv(self, x: torch.Tensor) -> Projections:
        return self.layout.project_qkv(self.base_layer, x)

    def project_out(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.layout.project_out(self.base_layer, context, x)

    def attention_dropout(self) -> float:
        return self.layout.dropout(self.base_layer) if self.training else 0.0


def find_attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every supported (or already wrapped) attention module, in block order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{parent}.") for parent, _ in found):
            continue  # the frozen attention inside a wrapper
        if isinstance(module, AttentionWrapper) or layout_of(module) is not None:
            found.append((name, module))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at dotted path ``name`` was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the classifier head that stays trainable (empty for a feature model)."""
    if hasattr(model, "get_classifier"):  # timm
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [n for n, m in model.named_modules() if m is head]
        return []
    if isinstance(getattr(model, "classifier", None), nn.Module):  # transformers *ForImageClassification
        return ["classifier"] if any(True for _ in model.classifier.parameters()) else []
    return []


def unfreeze_classifier(model: nn.Module) -> nn.Module:
    """Make ``model``'s classifier head trainable (baselines that train it over a frozen backbone); returns ``model``."""
    for name in classifier_names(model):
        model.get_submodule(name).requires_grad_(True)
    return model


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The normalised class-token feature a timm ViT's head sees."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable / prompt / head / frozen / total parameter counts, with one meaning for every method.

    "head" is the trainable part of the classifier head; "prompt" is everything else that
    trains: prompt experts, prompt pools with their keys, LoRA matrices, a fine-tuned backbone.
    """
    head = [p for name in classifier_names(model) for p in model.get_submodule(name).parameters()]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    prompt = sum(p.numel() for p in trainable_outside(model, head))
    return {"trainable": trainable, "prompt": prompt, "head": trainable - prompt, "frozen": total - trainable, "total": total}


def trainable_outside(model: nn.Module, part: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that are not among ``part``: the other side of a head / rest split."""
    inside = {id(p) for p in part}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in inside]


def state_mismatch(expected: dict[str, torch.Size | tuple[int, ...]], got: dict[str, torch.Size | tuple[int, ...]], limit: int = 5) -> str:
    """How tensor names and shapes ``got`` differ from ``expected``; empty when they match.

    One readable line ("missing: a, b; unexpected: c; wrong shape: d (1, 2) vs (2, 2)") for
    the error a user sees when weights or an adapter do not fit a model.
    """
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(
        f"{k} {tuple(got[k])} vs {tuple(expected[k])}" for k in expected.keys() & got.keys() if tuple(got[k]) != tuple(expected[k])
    )
    return "; ".join(
        f"{label}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    )


def check_layers(key: str, layers: list[int], num_blocks: int) -> list[int]:
    """Block indices from config key ``key``, checked against the backbone's ``num_blocks``."""
    bad = [i for i in layers if not 0 <= i < num_blocks]
    if not layers or bad or len(set(layers)) != len(layers):
        raise SmopeError(
            f"config key '{key}' must list distinct block indices in [0, {num_blocks - 1}] (this model has "
            f"{num_blocks} blocks), got {layers}; e.g. {key}=[0]"
        )
    return list(layers)
