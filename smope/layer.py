"""Prompt experts and the prompted attention layer (docs/method.md).

A prompted layer reuses the frozen q/k/v projections of the wrapped attention, scores every
prompt expert once per input from the token-averaged query, keeps the top-K per head and
prepends them to the keys and values of one fused ``scaled_dot_product_attention`` call.
The prompt logit of an expert is the same for every query row, so instead of real prompt
keys we prepend zero keys and pass the logits as an additive attention bias.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import SMoPEConfig


MODES = ("sparse", "dense")


class PromptExperts(nn.Module):
    """Prompt keys/values of one block plus the usage state that continual learning needs.

    The bookkeeping lives in buffers, not Python attributes, so that ``state_dict`` and every
    checkpoint carry it: a reloaded model routes exactly as the trained one did.
    """

    def __init__(self, num_heads: int, num_experts: int, head_dim: int, init: str = "uniform") -> None:
        super().__init__()
        shape = (num_heads, num_experts, head_dim)
        self.keys = nn.Parameter(torch.empty(shape))
        self.values = nn.Parameter(torch.empty(shape))
        self.register_buffer("counts", torch.zeros(num_heads, num_experts, dtype=torch.int64))
        self.register_buffer("frequent", torch.zeros(num_heads, num_experts, dtype=torch.bool))
        self.register_buffer("old_keys", torch.zeros(shape))
        self.register_buffer("old_values", torch.zeros(shape))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "uniform") -> None:
        for p in (self.keys, self.values):
            if init == "uniform":
                p.uniform_(0.0, 1.0)
            elif init == "normal":
                p.normal_(0.0, 0.02)
            else:
                p.zero_()

    @property
    def num_experts(self) -> int:
        return self.keys.shape[1]

    def penalty_coefficients(self, training: bool, noise_eps: float, eval_noise: float) -> torch.Tensor:
        """Adaptive-noise coefficient c[h, e] (docs/method.md#adaptive-noise).

        Training pushes away from experts old tasks used often; evaluation pushes away from
        experts no task ever used (before any counts exist this shifts all experts alike).
        """
        if training:
            return self.frequent.to(self.keys.dtype) * noise_eps
        return (self.counts == 0).to(self.keys.dtype) * eval_noise

    @torch.no_grad()
    def add_usage(self, top_experts: torch.Tensor) -> None:
        """Count, per head, how many samples chose each expert. ``top_experts``: (B, H, K)."""
        one_hot = F.one_hot(top_experts, self.num_experts)  # (B, H, K, E)
        self.counts += one_hot.sum(dim=(0, 2))

    @torch.no_grad()
    def begin_task(self) -> None:
        """Flag the frequently used experts and snapshot the keys/values (start of a new task)."""
        used = self.counts > 0
        mean_used = (self.counts * used).sum(-1, keepdim=True) / used.sum(-1, keepdim=True).clamp(min=1)
        self.frequent |= used & (self.counts >= mean_used)
        self.old_keys.copy_(self.keys)
        self.old_values.copy_(self.values)

    def prototype_loss(self, top_k: int) -> torch.Tensor:
        """Keep current keys ranked as the old keys were, for the flagged experts (docs/method.md#losses)."""
        old = self.old_keys
        with torch.no_grad():
            targets = (old @ old.transpose(-1, -2)).topk(top_k, dim=-1).indices  # (H, E, K)
        log_probs = (old @ self.keys.transpose(-1, -2)).log_softmax(-1)  # (H, E, E)
        nll = -log_probs.gather(-1, targets).sum(-1)  # (H, E): summed over the K targets
        rows = self.frequent.to(nll.dtype)
        return ((nll * rows).sum(-1) / rows.sum(-1).clamp(min=1)).sum()


class PromptedAttention(nn.Module):
    """Attention with a sparse mixture of prompt experts; subclasses adapt a backbone's module.

    Subclasses implement :meth:`project_qkv` (the frozen projections, as (B, H, N, d) tensors)
    and :meth:`project_out` (merging heads and the frozen output projection).

    After each forward the layer keeps, for the training loop and for analysis:
    ``last_scores`` (B, H, E) raw expert scores, ``last_selected`` (B, H, K) active experts
    (``None`` in dense mode) and ``aux_loss`` (weighted router + prototype loss, or ``None``).
    """

    def __init__(self, base_layer: nn.Module, config: SMoPEConfig, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.top_k = config.top_k
        self.noise_eps = config.noise_eps
        self.eval_noise = config.eval_noise
        self.router_weight = config.router_weight
        self.proto_weight = config.proto_weight
        self.experts = PromptExperts(num_heads, config.num_experts, head_dim, config.init)
        self.mode = "sparse"
        self.last_scores: torch.Tensor | None = None
        self.last_selected: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    # Backbone-specific pieces -------------------------------------------------------------
    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def project_out(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_dropout(self) -> float:
        return 0.0

    # The method ----------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def route(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Score the experts from the averaged query and pick the active ones.

        Returns the raw scores s (B, H, E), the selected experts (B, H, K) or ``None`` in
        dense mode, and the score range max - min (B, H, 1) used by the noise and router loss.
        """
        scores = torch.einsum("bhd,hed->bhe", q.mean(dim=2), self.experts.keys.to(q.dtype))
        with torch.no_grad():
            spread = scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)
            if self.mode == "dense":
                return scores, None, spread
            coef = self.experts.penalty_coefficients(self.training, self.noise_eps, self.eval_noise)
            selected = (scores - coef.to(scores.dtype) * spread).topk(self.top_k, dim=-1).indices
        return scores, selected, spread

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scores: torch.Tensor,
        selected: torch.Tensor | None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax over [active prompt experts ; tokens] in one fused attention call."""
        batch, heads, _, dim = q.shape
        values = self.experts.values.to(v.dtype)
        if selected is None:
            logits, prompt_values = scores, values.expand(batch, -1, -1, -1)
        else:
            logits = scores.gather(-1, selected)
            heads_index = torch.arange(heads, device=q.device)[None, :, None]
            prompt_values = values[heads_index, selected]  # (B, H, K, d)
        num_prompts = logits.shape[-1]
        keys = torch.cat([k.new_zeros(batch, heads, num_prompts, dim), k], dim=2)
        values_all = torch.cat([prompt_values, v], dim=2)
        bias = F.pad(logits * self.scale, (0, k.shape[2])).unsqueeze(2).to(q.dtype)  # (B, H, 1, P + N)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # scaled_dot_product_attention's convention: True = may attend
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
            bias = bias + F.pad(attn_mask, (num_prompts, 0))
        dropout = self.attention_dropout() if self.training else 0.0
        return F.scaled_dot_product_attention(q, keys, values_all, attn_mask=bias, dropout_p=dropout)

    def router_loss(self, scores: torch.Tensor, selected: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Cross-entropy towards each selected expert, with a margin on the others (docs/method.md#losses)."""
        inactive = torch.ones_like(scores).scatter(-1, selected, 0.0)
        log_probs = (scores + self.noise_eps * spread * inactive).log_softmax(-1)
        return -log_probs.gather(-1, selected).mean(0).sum()

    def auxiliary_loss(self, scores: torch.Tensor, selected: torch.Tensor | None, spread: torch.Tensor) -> torch.Tensor | None:
        if not self.training or selected is None:
            return None
        loss = None
        if self.router_weight > 0:
            loss = self.router_weight * self.router_loss(scores, selected, spread)
        if self.proto_weight > 0:  # zero until experts are flagged; no data-dependent branch for torch.compile
            proto = self.proto_weight * self.experts.prototype_loss(self.top_k)
            loss = proto if loss is None else loss + proto
        return loss

    def prompted_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        scores, selected, spread = self.route(q)
        self.last_scores, self.last_selected = scores.detach(), selected
        self.aux_loss = self.auxiliary_loss(scores, selected, spread)
        context = self.attend(q, k, v, scores, selected, attn_mask)
        return self.project_out(context, x)

    @torch.no_grad()
    def record_usage(self) -> None:
        """Add the top-K of the raw scores of the last forward to the usage counts."""
        if self.last_scores is None:
            raise RuntimeError("record_usage needs a forward pass first")
        self.experts.add_usage(self.last_scores.topk(self.top_k, dim=-1).indices)


def timm_qkv(base: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (B, heads, N, head_dim) of a timm ``Attention`` with its q/k norms."""
    batch, tokens, _ = x.shape
    qkv = base.qkv(x).reshape(batch, tokens, 3, base.num_heads, base.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return base.q_norm(q), base.k_norm(k), v


def timm_out(base: nn.Module, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A timm ``Attention``'s output from the attended values (B, heads, N, head_dim) and its input ``x``."""
    out = base.norm(context.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
    gate = getattr(base, "gate", None)  # gated attention variants
    if gate is not None:
        out = out * gate(x).sigmoid()
    return base.proj_drop(base.proj(out))


class TimmPromptedAttention(PromptedAttention):
    """Wraps ``timm.models.vision_transformer.Attention`` (ViT, DeiT, DINOv2 and friends)."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return timm_qkv(self.base_layer, x)

    def project_out(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return timm_out(self.base_layer, context, x)

    def attention_dropout(self) -> float:
        return self.base_layer.attn_drop.p

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal:
            raise ValueError("prompted attention does not support causal masks")
        return self.prompted_forward(x, attn_mask)


class HFViTPromptedAttention(PromptedAttention):
    """Wraps transformers 5.x's ``ViTAttention`` (q_proj / k_proj / v_proj / o_proj layout)."""

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.base_layer
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return tuple(proj(x).view(shape).transpose(1, 2) for proj in (base.q_proj, base.k_proj, base.v_proj))

    def project_out(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer.o_proj(context.transpose(1, 2).reshape(*x.shape[:-1], -1))

    def attention_dropout(self) -> float:
        return self.base_layer.attention_dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        return self.prompted_forward(hidden_states, attention_mask), None


class HFViT4PromptedAttention(PromptedAttention):
    """Wraps transformers 4.x's ``ViTAttention``: ``attention`` (ViTSelfAttention: query / key / value) and ``output`` (ViTSelfOutput: dense, dropout).

    Releases up to about 4.50 return a tuple from ``ViTAttention.forward`` (its signature has
    ``output_attentions``), later 4.x releases the tensor alone; the wrapper answers as the
    wrapped class does.
    """

    def __init__(self, base_layer: nn.Module, config: SMoPEConfig, num_heads: int, head_dim: int) -> None:
        super().__init__(base_layer, config, num_heads, head_dim)
        self.returns_tuple = "output_attentions" in inspect.signature(type(base_layer).forward).parameters

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        own = self.base_layer.attention
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return tuple(proj(x).view(shape).transpose(1, 2) for proj in (own.query, own.key, own.value))

    def project_out(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer.output(context.transpose(1, 2).reshape(*x.shape[:-1], -1), x)

    def attention_dropout(self) -> float:
        own = self.base_layer.attention
        return own.dropout_prob if hasattr(own, "dropout_prob") else own.dropout.p

    def forward(self, hidden_states: torch.Tensor, head_mask: torch.Tensor | None = None, *args, **kwargs):
        if head_mask is not None:
            raise ValueError("prompted attention does not support head_mask")
        out = self.prompted_forward(hidden_states)
        return (out,) if self.returns_tuple else out
