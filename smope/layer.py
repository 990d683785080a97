"""Prompt experts and the prompted attention layer (docs/method.md).

A prompted layer reuses the frozen q/k/v projections of the wrapped attention, scores every
prompt expert once per input from the token-averaged query, keeps the top-K per head and
prepends them to the keys and values of one fused ``scaled_dot_product_attention`` call.
The prompt logit of an expert is the same for every query row, so instead of real prompt
keys we prepend zero keys and pass the logits as an additive attention bias.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .vit import AttentionLayout, AttentionWrapper

if TYPE_CHECKING:
    from .config import SMoPEConfig


MODES = ("sparse", "dense")
# Backends that return the gradient of the attention bias, through which the prompt keys learn
# (flash attention takes no bias; cuDNN's does not return its gradient).
TRAINING_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BIAS_ALIGNMENT = 8
"""The bias's row stride is padded to a multiple of this, as the memory-efficient kernel needs, so it is not copied there."""


def expert_counts(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many samples chose each expert, per head: (B, H, K) indices -> (H, E) int64.

    A scatter-add rather than ``F.one_hot``, which reads the indices' minimum on the host on CPU.
    """
    heads = selected.shape[1]
    flat = selected.transpose(0, 1).reshape(heads, -1)
    counts = torch.zeros(heads, num_experts, dtype=torch.int64, device=selected.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat))


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
        self.counts += expert_counts(top_experts, self.num_experts)

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


def flagged_lead(scores: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
    """How far the best flagged expert scores above the best unflagged one: (B, H, E), (H, E) -> (B, H, 1).

    0 where an unflagged expert already leads, or where a head has only flagged or only
    unflagged experts (the shift then moves none or all alike).
    """
    low = torch.finfo(scores.dtype).min
    best_flagged = scores.masked_fill(~flagged, low).amax(-1, keepdim=True)
    best_unflagged = scores.masked_fill(flagged, low).amax(-1, keepdim=True)
    both = (flagged.any(-1) & ~flagged.all(-1))[None, :, None]
    return torch.where(both, (best_flagged - best_unflagged).clamp(min=0), torch.zeros_like(best_flagged))


class PromptedAttention(AttentionWrapper):
    """Attention with a sparse mixture of prompt experts around a backbone's own attention module.

    The wrapped module's :class:`~smope.vit.AttentionLayout` supplies the frozen projections and
    the call convention, so one class serves timm and transformers alike.

    After each forward the layer keeps, for the training loop and for analysis:
    ``last_scores`` (B, H, E) raw expert scores, ``last_selected`` (B, H, K) active experts
    (``None`` in dense mode) and ``aux_loss`` (weighted router + prototype loss, or ``None``).
    """

    def __init__(self, base_layer: nn.Module, config: SMoPEConfig, layout: AttentionLayout | None = None) -> None:
        super().__init__(base_layer, layout)
        self.scale = self.head_dim**-0.5
        self.top_k = config.top_k
        self.noise_eps = config.noise_eps
        self.eval_noise = config.eval_noise
        self.router_weight = config.router_weight
        self.proto_weight = config.proto_weight
        self.balance_weight = config.balance_weight
        self.noise_scale = config.noise_scale
        self.experts = PromptExperts(self.num_heads, config.num_experts, self.head_dim, config.init)
        self.mode = "sparse"
        self.last_scores: torch.Tensor | None = None
        self.last_selected: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x, attn_mask = self.layout.inputs(self.base_layer, *args, **kwargs)
        return self.layout.output(self.base_layer, self.prompted_forward(x, attn_mask))

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
        with torch.autocast(q.device.type, enabled=False):  # which experts are chosen is decided in fp32
            scores = torch.einsum("bhd,hed->bhe", q.float().mean(dim=2), self.experts.keys.float())
        with torch.no_grad():
            spread = scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)
            if self.mode == "dense":
                return scores, None, spread
            selected = self.gate_scores(scores, spread).topk(self.top_k, dim=-1).indices
        return scores, selected, spread

    def gate_scores(self, scores: torch.Tensor, spread: torch.Tensor | None = None) -> torch.Tensor:
        """What the sparse gate takes the top-K of: the raw scores (B, H, E) minus the adaptive-noise shift.

        The shift depends on the layer's mode (training or evaluation) and usage state as
        :meth:`route` applies it; ``spread`` is the scores' range, computed when not given.
        Per-image routes (smope.routes) read the margins of the evaluation gate from this.
        """
        if spread is None:
            spread = scores.amax(-1, keepdim=True) - scores.amin(-1, keepdim=True)
        coef = self.experts.penalty_coefficients(self.training, self.noise_eps, self.eval_noise)
        shift = coef.to(scores.dtype) * spread
        if self.training and self.noise_scale == "lead":
            shift = shift + self.experts.frequent * flagged_lead(scores, self.experts.frequent)
        return scores - shift

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
        width = num_prompts + k.shape[2]
        # (B, H, 1, P + N), a view of a row padded to the alignment: SDPA broadcasts it over the queries as it is.
        padded = -(-width // BIAS_ALIGNMENT) * BIAS_ALIGNMENT
        bias = F.pad((logits * self.scale).unsqueeze(2).to(q.dtype), (0, padded - num_prompts))[..., :width]
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # scaled_dot_product_attention's convention: True = may attend
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
            bias = bias + F.pad(attn_mask, (num_prompts, 0))
        backends = sdpa_kernel(TRAINING_BACKENDS) if torch.is_grad_enabled() else contextlib.nullcontext()
        with backends:
            return F.scaled_dot_product_attention(q, keys, values_all, attn_mask=bias, dropout_p=self.attention_dropout())

    def router_loss(self, scores: torch.Tensor, selected: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """Cross-entropy towards each selected expert, with a margin on the others (docs/method.md#losses)."""
        inactive = torch.ones_like(scores).scatter(-1, selected, 0.0)
        log_probs = (scores + self.noise_eps * spread * inactive).log_softmax(-1)
        return -log_probs.gather(-1, selected).mean(0).sum()

    def balance_loss(self, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing, per head: E x sum_e (share of selections) x (mean gate probability).

        The share is not differentiable, so the gradient lowers the gate probability of the
        experts the batch over-selects. 1 when the batch uses every expert alike, up to E / K when
        all its images take the same K experts; averaged over heads (docs/routing.md#the-options).
        """
        num_experts = scores.shape[-1]
        routed = F.one_hot(selected, num_experts).to(scores.dtype).mean(dim=(0, 2))  # (H, E), sums to 1 per head
        gate = scores.softmax(-1).mean(0)  # the router loss's gate probabilities
        return num_experts * (routed * gate).sum(-1).mean()

    def auxiliary_loss(self, scores: torch.Tensor, selected: torch.Tensor | None, spread: torch.Tensor) -> torch.Tensor | None:
        if not self.training or selected is None:
            return None
        loss = None
        if self.router_weight > 0:
            loss = self.router_weight * self.router_loss(scores, selected, spread)
        if self.proto_weight > 0:  # zero until experts are flagged; no data-dependent branch for torch.compile
            proto = self.proto_weight * self.experts.prototype_loss(self.top_k)
            loss = proto if loss is None else loss + proto
        if self.balance_weight > 0:
            balance = self.balance_weight * self.balance_loss(scores, selected)
            loss = balance if loss is None else loss + balance
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

