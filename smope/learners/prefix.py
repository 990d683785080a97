"""Prefix tuning of a frozen timm ViT and the two-pass model of prompt-pool methods.

L2P, DualPrompt and CODA-Prompt choose their prompts per input from a *query*: the class token
of a first, prompt-free pass of the frozen backbone. A second pass then runs with the chosen
prompts prepended to the keys and values of some attention layers (prefix tuning). That first
pass is the compute SMoPE saves (docs/method.md#overview and #paper-numbers).

A prompt of length L lives directly in a layer's key/value space, after the frozen projections
(as in CODA-Prompt's release): its first L/2 rows are prefix keys, the last L/2 prefix values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..vit import AttentionWrapper, find_attention_blocks, pooled_features, replace_module, unfreeze_classifier

Prefix = tuple[torch.Tensor, torch.Tensor]
"""Prefix keys and values of one block, each (B, P, num_heads * head_dim)."""


def split_prefix(prompts: torch.Tensor) -> Prefix:
    """n prompts per sample (..., n, L, C) -> their keys and values, concatenated (..., n * L/2, C)."""
    half = prompts.shape[-2] // 2
    return prompts[..., :half, :].flatten(-3, -2), prompts[..., half:, :].flatten(-3, -2)


def concat_prefixes(first: Prefix | None, second: Prefix) -> Prefix:
    """Both prefixes prepended to one block (DualPrompt's G- and E-prompts can share a block)."""
    if first is None:
        return second
    return torch.cat([first[0], second[0]], dim=-2), torch.cat([first[1], second[1]], dim=-2)


class PrefixAttention(AttentionWrapper):
    """A backbone's attention with per-sample prefix keys/values prepended (prefix tuning).

    :attr:`prefix` is set by :class:`PrefixPromptedModel` around the prompted pass only; with
    no prefix the wrapped layer runs unchanged, which is the prompt-free query pass.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prefix: Prefix | None = None

    def forward(self, *args, **kwargs):
        if self.prefix is None:
            return self.base_layer(*args, **kwargs)
        x, attn_mask = self.layout.inputs(self.base_layer, *args, **kwargs)
        q, k, v = self.project_qkv(x)
        prefix_k, prefix_v = (p.reshape(len(x), -1, self.num_heads, self.head_dim).transpose(1, 2).to(k.dtype) for p in self.prefix)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (prefix_k.shape[2], 0))
        bias = self.prefix_score_bias(q, prefix_k)
        if bias is not None:  # added to the prefix columns of the attention scores, before the softmax
            bias = F.pad(bias, (0, k.shape[2] - prefix_k.shape[2]))
            attn_mask = bias if attn_mask is None else bias + attn_mask
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout())
        return self.layout.output(self.base_layer, self.project_out(context, x))

    def prefix_score_bias(self, q: torch.Tensor, prefix_k: torch.Tensor) -> torch.Tensor | None:
        """A term added to the scaled scores q.k of the prefix keys (B, H, N, P); none for plain prefix tuning."""
        return None


class PromptPool(nn.Module):
    """Turns the query (or the task id) into the prefixes of the prompted blocks.

    Subclasses set :attr:`layers` (the blocks they prompt) and implement :meth:`forward`,
    returning ``{block: prefix}`` and an auxiliary loss (``None`` when there is none).
    """

    layers: list[int]

    def needs_query(self) -> bool:
        """Whether :meth:`forward` needs the query pass in the current (train/eval) mode."""
        return True

    def begin_task(self, task: int) -> None:
        """Prepare for training ``task`` (task ids, fresh components); nothing by default."""

    def forward(self, query: torch.Tensor | None, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        raise NotImplementedError


class PrefixPromptedModel(nn.Module):
    """A frozen backbone whose forward is the query pass, the pool, then the prompted pass.

    The classifier head stays trainable. ``wrapper`` wraps each prompted block's attention
    (:class:`PrefixAttention`, or a subclass that changes the prefix scores). Attribute access falls through to the backbone (its
    ``patch_embed``, ``get_classifier``, ``pretrained_cfg`` ...), as with :class:`~smope.model.SMoPEModel`.
    """

    def __init__(self, backbone: nn.Module, pool: PromptPool, wrapper: Callable[[nn.Module], PrefixAttention] = PrefixAttention) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        unfreeze_classifier(backbone.requires_grad_(False))
        blocks = find_attention_blocks(backbone)
        self.prompted: dict[int, PrefixAttention] = {}
        for index in sorted(set(pool.layers)):
            name, attention = blocks[index]
            self.prompted[index] = wrapper(attention)
            replace_module(backbone, name, self.prompted[index])
        self.aux_loss: torch.Tensor | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("backbone"), name)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """The prompt-free pass's final normalised class token (no prefix is set outside :meth:`forward`)."""
        return pooled_features(self.backbone, images)

    @contextmanager
    def prompted_pass(self, images: torch.Tensor) -> Iterator[None]:
        """Within the block the prompted blocks carry the pool's prefixes for ``images``."""
        query = self.query(images) if self.pool.needs_query() else None
        prefixes, self.aux_loss = self.pool(query, len(images))
        for index, layer in self.prompted.items():
            layer.prefix = prefixes.get(index)
        try:
            yield
        finally:
            for layer in self.prompted.values():
                layer.prefix = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.prompted_pass(images):
            return self.backbone(images)

    def prompted_features(self, images: torch.Tensor) -> torch.Tensor:
        """The prompted pass's normalised class token: what the head sees (class statistics, alignment)."""
        with self.prompted_pass(images):
            return pooled_features(self.backbone, images)
