"""Prompt-pool baselines: L2P++, DualPrompt and CODA-Prompt (docs/method.md#baselines).

All three pick prompts per input from the query of a prompt-free pass and then run a prompted
pass with prefix tuning (:mod:`smope.learners.prefix`). Their published defaults are the ones
CODA-Prompt's authors ran every baseline with (GT-RIPL/CODA-Prompt, ``experiments/cifar-100.sh``
and ``experiments/imagenet-r.sh`` for the numbers, ``models/zoo.py`` for the block choices):

- L2P++: ``--prompt_param 30 20 -1``: pool 30, prompt length 20, ``-1`` = shallow, i.e. block 0
  only; top-5 prompts per input.
- DualPrompt: ``--prompt_param 10 20 6``: 10 E-prompts (one per task) of length 20 at blocks
  2-4, a G-prompt of length 6 at blocks 0-1; top-1 E-prompt; the task id picks it in training.
- CODA-Prompt: ``--prompt_param 100 8 0.1`` (CIFAR-100): 100 components of length 8 at
  blocks 0-4, orthogonality penalty weight 0.1 (the later ImageNet-R script passes 0.0, since
  new components there start orthogonal to the old ones, as they do here).

Every length is a prefix length: half keys, half values. Unlike SMoPE, these methods have no
classifier alignment in their papers, so none is applied here (they do not read ``method.align*``).
The optimiser is the harness's (AdamW, prompts at ``train.prompt_lr_scale`` x the head's
learning rate), not the release's single-rate Adam, so every method trains under one recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import check_layers, find_attention_blocks
from .base import Learner, TaskContext, training_loss
from .prefix import Prefix, PrefixAttention, PrefixPromptedModel, PromptPool, concat_prefixes, split_prefix


class L2PPool(PromptPool):
    """L2P++: one shared pool; each input takes the ``top_k`` prompts whose keys best match its query.

    Selection is a hard top-k, so the keys learn only from the matching loss: the cosine
    distance between the query and each selected key. Uniform [0, 1) init as in the release.
    """

    def __init__(self, layers: list[int], pool_size: int, length: int, top_k: int, width: int, query_dim: int) -> None:
        super().__init__()
        self.layers, self.top_k = layers, top_k
        self.keys = nn.Parameter(torch.rand(pool_size, query_dim))
        self.prompts = nn.Parameter(torch.rand(len(layers), pool_size, length, width))

    def forward(self, query: torch.Tensor, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        similarity = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T
        best = similarity.topk(self.top_k, dim=-1)
        keys, values = split_prefix(self.prompts[:, best.indices])  # (layers, B, top_k * length / 2, width)
        loss = (1 - best.values).sum(-1).mean() if self.training else None
        return {layer: (keys[i], values[i]) for i, layer in enumerate(self.layers)}, loss


class DualPromptPool(PromptPool):
    """DualPrompt: a task-shared G-prompt plus one task-specific E-prompt per task.

    Training uses the task id to pick the E-prompt, so it needs no query pass (docs/method.md#paper-numbers:
    one pass in training, two at test time). At test time the E-prompt is the one whose key is
    closest (cosine) to the query, among the tasks trained so far. The matching loss
    sum_i (1 - cos(q_i, k_t)) over task t's queries is minimised in closed form by the mean of the
    normalised queries, so :meth:`fit_key` sets each key to that instead of descending to it.
    """

    def __init__(
        self, g_layers: list[int], e_layers: list[int], pool_size: int, e_length: int, g_length: int, width: int, query_dim: int
    ) -> None:
        super().__init__()
        self.g_layers, self.e_layers = g_layers, e_layers
        self.layers = sorted(set(g_layers) | set(e_layers))
        self.g_prompts = nn.Parameter(torch.rand(len(g_layers), g_length, width))
        self.e_prompts = nn.Parameter(torch.rand(len(e_layers), pool_size, e_length, width))
        # Learned, but by :meth:`fit_key` rather than by gradient: training never reads them.
        self.keys = nn.Parameter(torch.zeros(pool_size, query_dim))
        self.register_buffer("task", torch.zeros((), dtype=torch.int64))

    def needs_query(self) -> bool:
        return not self.training

    def begin_task(self, task: int) -> None:
        self.task.fill_(task)

    @torch.no_grad()
    def fit_key(self, queries: torch.Tensor) -> None:
        """Set the current task's key from its training queries (N, query_dim)."""
        self.keys[int(self.task)] = F.normalize(F.normalize(queries.float(), dim=-1).mean(0), dim=0)

    def forward(self, query: torch.Tensor | None, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        if self.training:
            chosen = self.task.expand(batch)
        else:
            chosen = (F.normalize(query, dim=-1) @ self.keys[: int(self.task) + 1].T.to(query.dtype)).argmax(-1)
        e_keys, e_values = split_prefix(self.e_prompts[:, chosen].unsqueeze(-3))
        # repeat, not expand: a view of a parameter taken under no_grad breaks FlopCounterMode's module tracker
        g_keys, g_values = split_prefix(self.g_prompts[:, None, None].repeat(1, batch, 1, 1, 1))
        prefixes: dict[int, Prefix] = {layer: (g_keys[i], g_values[i]) for i, layer in enumerate(self.g_layers)}
        for i, layer in enumerate(self.e_layers):
            prefixes[layer] = concat_prefixes(prefixes.get(layer), (e_keys[i], e_values[i]))
        return prefixes, None


def orthonormal_rows(previous: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` random unit rows orthogonal to each other and to the span of ``previous``.

    CODA-Prompt starts each task's new components orthogonal to the frozen ones (Gram-Schmidt in
    its release; a QR factorisation here). When the width cannot hold that many orthogonal rows
    (tiny test models), the new rows are only normalised.
    """
    fresh = torch.randn(count, previous.shape[-1], device=previous.device, dtype=previous.dtype)
    if len(previous) + count > previous.shape[-1]:
        return F.normalize(fresh, dim=-1)
    q, _ = torch.linalg.qr(torch.cat([previous, fresh]).T)
    return q[:, len(previous) :].T


def orthogonality_penalty(rows: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of the Gram matrix from the identity, summed over blocks. ``rows``: (blocks, M, d)."""
    gram = rows @ rows.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return (gram - eye).square().mean(dim=(-2, -1)).sum()


class CodaPromptPool(PromptPool):
    """CODA-Prompt: each block's prompt is a weighted sum of components, weighted per input.

    Component m has a key K_m, an attention vector A_m and a prompt P_m; its weight for query q
    is cos(q * A_m, K_m), so selection is differentiable end to end. The pool is cut into
    ``pool_size // num_tasks`` components per task: task t trains its own (freshly initialised,
    orthogonal to the old ones), uses the earlier tasks' components frozen, and never sees the
    later ones.
    """

    def __init__(
        self, layers: list[int], pool_size: int, length: int, num_tasks: int, ortho_weight: float, width: int, query_dim: int
    ) -> None:
        super().__init__()
        self.layers, self.ortho_weight = layers, ortho_weight
        self.per_task = pool_size // num_tasks
        self.keys = nn.Parameter(torch.zeros(len(layers), pool_size, query_dim))
        self.attention = nn.Parameter(torch.zeros(len(layers), pool_size, query_dim))
        self.components = nn.Parameter(torch.zeros(len(layers), pool_size, length, width))
        self.register_buffer("task", torch.zeros((), dtype=torch.int64))
        self.begin_task(0)

    @torch.no_grad()
    def begin_task(self, task: int) -> None:
        self.task.fill_(task)
        start, stop = task * self.per_task, (task + 1) * self.per_task
        for weight in (self.keys, self.attention, self.components):
            rows = weight.flatten(2)  # a view: (blocks, pool, d)
            for block in range(len(rows)):
                rows[block, start:stop] = orthonormal_rows(rows[block, :start], stop - start)

    def active(self, weight: torch.Tensor) -> torch.Tensor:
        """The components in use: earlier tasks' (frozen in training) then the current task's."""
        start = int(self.task) * self.per_task
        stop = start + self.per_task
        if not self.training:
            return weight[:, :stop]
        return torch.cat([weight[:, :start].detach(), weight[:, start:stop]], dim=1)

    def forward(self, query: torch.Tensor, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        keys, attention, components = (self.active(w) for w in (self.keys, self.attention, self.components))
        query = query.to(keys.dtype)
        # cos(q * A_m, K_m) for every block and component, without materialising q * A_m
        dots = torch.einsum("bd,lmd->lbm", query, attention * keys)
        norms = torch.einsum("bd,lmd->lbm", query.square(), attention.square()).sqrt() * keys.norm(dim=-1).unsqueeze(1)
        weights = dots / norms.clamp_min(1e-12)
        prompts = torch.einsum("lbm,lmtc->lbtc", weights, components)  # (blocks, B, length, width)
        prefix_keys, prefix_values = split_prefix(prompts.unsqueeze(-3))
        loss = None
        if self.training and self.ortho_weight > 0:
            loss = self.ortho_weight * sum(orthogonality_penalty(w.flatten(2)) for w in (keys, attention, components))
        return {layer: (prefix_keys[i], prefix_values[i]) for i, layer in enumerate(self.layers)}, loss


@dataclass
class BackboneShape:
    num_blocks: int
    width: int  # attention width: num_heads * head_dim (the prefix vectors' size)
    query_dim: int  # class-token feature size


class PromptPoolLearner(Learner):
    """Shared training of the two-pass prefix methods: cross-entropy plus the pool's own loss.

    Its settings are the method's (:class:`~smope.methods.PoolSettings`). The pool is trained
    without weight decay: prompts a task does not use must stay exactly as they were.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        backbone = create_backbone(config.model, num_classes)
        blocks = find_attention_blocks(backbone)
        attention = blocks[0][1]
        shape = BackboneShape(len(blocks), attention.num_heads * attention.head_dim, backbone.num_features)
        self.model = PrefixPromptedModel(backbone, self.build_pool(shape), self.prefix_attention).to(self.device)

    def build_pool(self, shape: BackboneShape) -> PromptPool:
        raise NotImplementedError

    def prefix_attention(self, attention: nn.Module) -> PrefixAttention:
        """The wrapper of a prompted block's attention: plain prefix tuning unless a method changes the scores."""
        return PrefixAttention(attention)

    def layers(self, key: str, shape: BackboneShape) -> list[int]:
        """The blocks of ``method.<key>``, checked against this backbone (as the config's load does)."""
        return check_layers(f"method.{key}", getattr(self.config.method, key), shape.num_blocks)

    def pool_per_task(self) -> int:
        """``method.pool_size``, checked to hold at least one prompt per task (as the config's load does)."""
        self.config.method.check_run(self.config)
        return self.config.method.pool_size

    def param_groups(self) -> list[dict]:
        lr = self.config.train.lr
        head = list(self.model.get_classifier().parameters())
        pool = list(self.model.pool.parameters())
        return [{"params": pool, "lr": lr * self.config.train.prompt_lr_scale, "weight_decay": 0.0, "lr_key": "train.lr"}, {"params": head, "lr": lr, "lr_key": "train.lr"}]

    def train_task(self, ctx: TaskContext) -> None:
        self.model.pool.begin_task(ctx.task)
        loss_fn = training_loss(self.model, ctx.classes, lambda: self.model.aux_loss)
        self.trainer.fit(self.param_groups(), ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Prompts, keys, attention vectors and head (trainable) plus the pool's task id and fitted keys."""
        return {**super().state_dict(), **{f"pool.{name}": b for name, b in self.model.pool.named_buffers()}}


class L2PLearner(PromptPoolLearner):
    def build_pool(self, shape: BackboneShape) -> PromptPool:
        method = self.config.method
        layers = self.layers("prompt_layers", shape)
        return L2PPool(layers, method.pool_size, method.prompt_length, method.pool_top_k, shape.width, shape.query_dim)


class DualPromptLearner(PromptPoolLearner):
    def build_pool(self, shape: BackboneShape) -> PromptPool:
        return DualPromptPool(
            g_layers=self.layers("g_prompt_layers", shape),
            e_layers=self.layers("prompt_layers", shape),
            pool_size=self.pool_per_task(),
            e_length=self.config.method.prompt_length,
            g_length=self.config.method.g_prompt_length,
            width=shape.width,
            query_dim=shape.query_dim,
        )

    def train_task(self, ctx: TaskContext) -> None:
        """Prompts with the task's E-prompt (one pass per step), then the key from one query sweep."""
        super().train_task(ctx)
        queries, _ = self.features_and_labels(ctx.train_data, self.model.query)
        self.model.pool.fit_key(queries.to(self.device))


class CodaPromptLearner(PromptPoolLearner):
    def build_pool(self, shape: BackboneShape) -> PromptPool:
        return CodaPromptPool(
            layers=self.layers("prompt_layers", shape),
            pool_size=self.pool_per_task(),
            length=self.config.method.prompt_length,
            num_tasks=self.config.data.num_tasks,
            ortho_weight=self.config.method.ortho_weight,
            width=shape.width,
            query_dim=shape.query_dim,
        )
