"""VQ-Prompt (Jiao et al., NeurIPS 2024): a soft mixture of pool prompts snapped to the nearest one.

Facts from the official release (github.com/jiaolifengmi/VQ-Prompt, built on CODA-Prompt's code),
read to understand; this is an implementation of its own on smope's two-pass prefix model
(:mod:`smope.learners.prefix`):

- ``models/zoo.py`` (``VQPrompt``): blocks 0-4 each hold a pool of 10 prompts of length 8 (4
  prefix keys, 4 values) with one key per prompt, all U[0, 1). The query q is the class token of
  the prompt-free pass (after the final LayerNorm; ``ViTZoo.forward``). The weights are
  alpha = softmax(q . K_k / |K_k| / tau): the release normalises the keys but not the query, so
  this is the cosine scaled by |q|, and it is what runs here. The mixture p = sum_k alpha_k P_k
  is replaced by the pool prompt nearest to it (squared L2) with a straight-through gradient,
  p + sg(P_nearest - p), so the keys learn through alpha. Each block adds
  0.4 MSE(p, sg(P_nearest)) + 0.1 MSE(P_nearest, sg(p)).
- ``experiments/*.sh``: ``--prompt_param 10 8 1`` (pool, length, tau) on CIFAR-100 and ImageNet-R,
  ``10 8 5`` on CUB-200. The pool is shared by every task: no per-task slices, nothing frozen.
- ``learners/prompt.py``: cross-entropy with the earlier tasks' logits at -inf plus the prompt
  losses; AdamW with the pool at 5x the head's lr 0.0025 and weight decay 0 (the harness's
  ``train.prompt_lr_scale`` and ``train.lr``); 20 epochs (``configs/*_prompt_vq.yaml``).
- ``trainer.py`` (``_compute_mean``, ``train_task_adaptive_prediction``): after each task the
  mean and per-dimension (population) variance of each new class's *prompted* features
  (``--n_centroids 1``); from the second task on the head is realigned on Gaussian samples of
  every seen class: 10 epochs, as many iterations per epoch as there are old classes, each one
  batch of ``batch_size x ca_batch_size_ratio`` samples of one draw per class (512 on CIFAR-100,
  256 on ImageNet-R and CUB-200), AdamW with weight decay 5e-4, a per-iteration cosine from
  ``ca_lr / 10`` = 1e-5 to 1e-6 (``--ca_lr`` is 1e-4 but the schedule's base is a tenth of it).
  That is :func:`~smope.learners.alignment.align_after_task` with ``method.align_steps=old_classes``
  and diagonal statistics; ``experiments/run_baselines.sh`` passes those published values.

Selection is per sample in training and at test time (docs/baselines.md#batch-invariance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runconfig import RunConfig
from ..trainer import Trainer
from .alignment import KeepsClassStatistics, class_statistics
from .base import TaskContext
from .heads import AlignedLinearHead
from .prefix import Prefix, PromptPool, split_prefix
from .prompt_pool import BackboneShape, PromptPoolLearner


class VQPromptPool(PromptPool):
    """Per block: a pool of prompts with keys; each input gets the pool prompt nearest to its soft mixture."""

    def __init__(
        self, layers: list[int], pool_size: int, length: int, temperature: float, weights: tuple[float, float], width: int, query_dim: int
    ) -> None:
        super().__init__()
        self.layers, self.temperature = layers, temperature
        self.vq_weight, self.commit_weight = weights
        self.keys = nn.Parameter(torch.rand(len(layers), pool_size, query_dim))
        self.prompts = nn.Parameter(torch.rand(len(layers), pool_size, length, width))
        self.chosen: torch.Tensor | None = None  # (blocks, B) pool index of the last forward, for analytics

    def forward(self, query: torch.Tensor, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        query = query.to(self.keys.dtype)
        alpha = torch.softmax(torch.einsum("bd,lkd->lbk", query, F.normalize(self.keys, dim=-1)) / self.temperature, dim=-1)
        mixed = torch.einsum("lbk,lktc->lbtc", alpha, self.prompts)  # (blocks, B, length, width)
        with torch.no_grad():  # the nearest pool prompt, per block and input
            distance = (mixed.unsqueeze(2) - self.prompts.unsqueeze(1)).square().sum((-2, -1))  # (blocks, B, pool)
            self.chosen = distance.argmin(-1)
        blocks = torch.arange(len(self.layers), device=self.chosen.device).unsqueeze(1)
        nearest = self.prompts[blocks, self.chosen]  # (blocks, B, length, width)
        snapped = mixed + (nearest - mixed).detach()  # the forward uses the pool prompt, the gradient reaches alpha
        loss = None
        if self.training:
            per_block = self.vq_weight * (mixed - nearest.detach()).square().mean((1, 2, 3))
            per_block = per_block + self.commit_weight * (nearest - mixed.detach()).square().mean((1, 2, 3))
            loss = per_block.sum()
        keys, values = split_prefix(snapped.unsqueeze(-3))
        return {layer: (keys[i], values[i]) for i, layer in enumerate(self.layers)}, loss


class VQPromptLearner(KeepsClassStatistics, PromptPoolLearner):
    """The pool trained with the masked cross-entropy and the quantisation losses; statistics and alignment after each task."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.stats = class_statistics(config.method.align_covariance, num_classes, self.model.num_features)
        self.output_head = AlignedLinearHead(self.model.get_classifier(), config, self.trainer)

    def build_pool(self, shape: BackboneShape) -> PromptPool:
        method = self.config.method
        return VQPromptPool(
            layers=self.layers("prompt_layers", shape),
            pool_size=method.pool_size,
            length=method.prompt_length,
            temperature=method.vq_temperature,
            weights=(method.vq_loss_weight, method.vq_commit_weight),
            width=shape.width,
            query_dim=shape.query_dim,
        )

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.prompted_features(images)

    def after_task(self, ctx: TaskContext) -> None:
        """Class statistics of the prompted features, then (from the second task) the head realigned on samples of them."""
        features, labels = self.features_and_labels(ctx.train_data, self.pooled_features)
        self.stats.update(features, labels)
        self.output_head.after_task(ctx, features, labels, self.stats)
