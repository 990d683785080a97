"""HiDe-Prompt (Wang et al., NeurIPS 2023) and NoRGa (Le et al., NeurIPS 2024): task-identity
inference from the frozen backbone, then one prompt per task (docs/baselines.md#hide-prompt-and-norga).

Read from the official releases (thu-ml/HiDe-Prompt; NoRGa's Minhchuyentoancbn/MoE_PromptCL
builds on it), written anew here:

- Task-identity inference (``trainers/tii_trainer.py``, ``engines/hide_tii_engine.py``,
  ``vits/hide_prompt_vision_transformer.py`` ``MlpMapping``): the frozen ViT's class token goes
  through a residual MLP, ``LayerNorm(x + W2 GELU(W1 x))`` with hidden width 2 d
  (``--original_model_mlp_structure 2``), then a linear head over every class. It trains on
  each task with the other tasks' logits masked, 20 epochs at lr 5e-4 (``--sched constant``;
  Adam in the release, the harness's AdamW here). After each task: statistics of the frozen
  features per class (``--ca_storage_efficient_method``: ``multi-centroid`` by default, 10
  k-means centroids per class with per-dimension variances; ``covariance``; ``variance``), and
  from the second task on the MLP and head realigned on Gaussian samples: SGD with momentum
  0.9 and weight decay 5e-4 at ``--ca_lr`` 0.005, cosine over 30 epochs (``--crct_epochs``)
  stepped per epoch, each epoch as many batches as there are classes of earlier tasks, of
  ``batch_size`` samples drawn per class (per centroid). The release scales this lr by
  batch/256 in the task-identity stage only; smope uses ``method.hide_align_lr`` for both.
- Prompts (``engines/hide_promtp_wtp_and_tap_engine.py``, ``peft/prompt/hide_prompt.py``):
  one E-prompt per task, prefix tuning in blocks 0-4 (``--e_prompt_layer_idx``), length 5
  keys + 5 values on CIFAR-100 and 20 + 20 on ImageNet-R (``--length``; smope's
  ``method.prompt_length`` counts both halves: 10 and 40), uniform(-1, 1) init. Task t > 0
  starts as a copy of task t - 1's prompt; its training forward uses
  ``(1 - m) p_t + m mean(p_0..p_{t-1})`` with the mean detached (``--prompt_momentum`` 0.01),
  and that mix is stored after the task. Loss: cross-entropy over the task's classes plus
  ``--reg`` (0.1 CIFAR-100, 0.5 ImageNet-R) x a contrastive term: the batch's prompted features
  and every stored class mean (centroid) of earlier tasks, similarities / 0.8, each row's
  target itself. ``--larger_prompt_lr``: prompts at lr, the head at lr / 10 (Adam), i.e.
  ``train.prompt_lr_scale`` 10; 50 epochs CIFAR-100, 150 ImageNet-R. After each task the
  statistics of the prompted features with the task's own prompt and, from the second task,
  the head realigned the same way on ``5 x batch_size`` samples per class.
- Inference: the task-identity model predicts a class among those seen, hence a task, and that
  task's prompt runs the second pass. The release reshapes the selected prompts (L, 2, B, ...)
  to (L, B, 2, ...) without moving the axis, so in a batch whose samples chose different
  prompts each sample gets key and value halves of other samples' prompts, and accuracy
  depends on the test batch. Here every sample gets its own prompt (:meth:`HiDePromptPool.forward`).
- NoRGa (``attention.py`` ``NoRGa_Attention``, ``peft/prompt/norga_prompt.py``,
  ``engines/norga_prompt_engine.py``): the scores of the prefix keys become
  ``s + alpha g(tau s)``, alpha and tau per prompted block (``act_scale``, init 1), trained on
  the first task and frozen afterwards. The released scripts (``scripts/*NoRGa.sh``) pass
  ``--gate_act sigmoid`` (the configs' default is tanh), ``--ca_storage_efficient_method
  covariance`` and batch 128; on CIFAR-100 the prompt stage's alignment uses ``--ca_lr 0.05``
  and the config default of 80 epochs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..runconfig import RunConfig
from ..trainer import Trainer
from .alignment import VARIANCE_FLOOR, ClassStatistics, align_head, class_statistics
from .base import TaskContext, cross_entropy_on
from .prefix import Prefix, PrefixAttention, PromptPool, split_prefix
from .prompt_pool import BackboneShape, PromptPoolLearner
from .slca import sgd

CONTRASTIVE_TEMPERATURE = 0.8  # the release's orth_loss
ALIGN_WEIGHT_DECAY = 5e-4  # the release's SGD in train_task_adaptive_prediction
PROMPTED_SAMPLES_SCALE = 5  # the prompt stage's alignment draws 5 x batch_size samples per class
GATES = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu, "softplus": F.softplus, "elu": F.elu}  # every name of NORGA_GATES


class CentroidStatistics:
    """Per class, k-means centroids of its features with each cluster's per-dimension variance.

    The interface of :class:`~smope.learners.alignment.ClassStatistics` (``update``, ``sample``,
    ``stored_means``, checkpoint state of the last update's classes). Clusters of one feature
    (variance 0) are not sampled, as in the release.
    """

    def __init__(self, num_classes: int, dim: int, centroids: int) -> None:
        self.centroids = centroids
        self.mean = torch.zeros(num_classes, centroids, dim)
        self.var = torch.zeros(num_classes, centroids, dim)
        self.count = torch.zeros(num_classes, centroids, dtype=torch.int64)  # features per cluster; 0 = none
        self.latest: list[int] = []

    @property
    def device(self) -> torch.device:
        """Where the statistics live (the CPU: k-means runs there); alignment draws from a generator on it."""
        return self.mean.device

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        from sklearn.cluster import KMeans  # imported when used: sklearn is slow to import

        self.latest = sorted(labels.unique().tolist())
        for label in self.latest:
            rows = features[labels == label].double().numpy()
            clusters = min(self.centroids, len(rows))
            assignment = KMeans(n_clusters=clusters, n_init=10, random_state=0).fit_predict(rows)
            self.mean[label], self.var[label], self.count[label] = 0, 0, 0
            for k in range(clusters):
                members = rows[assignment == k]
                self.mean[label, k] = torch.from_numpy(members.mean(0))
                self.var[label, k] = torch.from_numpy(members.var(0))
                self.count[label, k] = len(members)

    def stored_means(self, classes: range) -> torch.Tensor:
        """Every centroid of ``classes`` (the contrastive term's negatives)."""
        means, count = self.mean[classes.start : classes.stop], self.count[classes.start : classes.stop]
        return means[count > 0]

    def sample(self, classes: range, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` features from each sampled centroid of every class in ``classes``."""
        var = self.var[classes.start : classes.stop]
        usable = var.mean(-1) > 0
        labels = torch.arange(classes.start, classes.stop)[:, None].expand_as(usable)[usable].repeat_interleave(per_class)
        mean = self.mean[classes.start : classes.stop][usable].repeat_interleave(per_class, 0)
        spread = (var[usable] + VARIANCE_FLOOR).sqrt().repeat_interleave(per_class, 0)
        return mean + torch.randn(mean.shape, generator=generator) * spread, labels

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        rows = torch.tensor(self.latest, dtype=torch.int64)
        return {f"{prefix}classes": rows, f"{prefix}mean": self.mean[rows], f"{prefix}var": self.var[rows], f"{prefix}count": self.count[rows]}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        rows = state[f"{prefix}classes"]
        self.latest = rows.tolist()
        self.mean[rows], self.var[rows], self.count[rows] = (state[f"{prefix}{k}"] for k in ("mean", "var", "count"))


Statistics = CentroidStatistics | ClassStatistics


def make_statistics(kind: str, num_classes: int, dim: int, centroids: int) -> Statistics:
    if kind == "centroids":
        return CentroidStatistics(num_classes, dim, centroids)
    return class_statistics(kind, num_classes, dim)


def contrastive_loss(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The release's ``orth_loss``: rows [class means; batch features], similarities / 0.8, each row's target itself.

    It pushes the batch's features away from each other and from the stored class means of
    earlier tasks (the gradient reaches the features only).
    """
    rows = torch.cat([means.to(features), features])
    similarity = rows @ rows.T / CONTRASTIVE_TEMPERATURE
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))


class TaskIdentityHead(nn.Module):
    """The release's ``MlpMapping`` + head: ``head(LayerNorm(x + W2 GELU(W1 x)))``, hidden width 2 d."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.mlp(x)))


class HiDePromptPool(PromptPool):
    """One E-prompt per task, chosen by the task-identity head from the frozen query, per sample.

    In training (and in the statistics pass, :meth:`own_prompt`) every sample uses the current
    task's prompt, mixed with the mean of the earlier ones by ``momentum``; at test time the
    query pass predicts a class among those seen and the prompt of that class's task is used.
    :attr:`last_choice` keeps each test sample's chosen task for the analytics.
    """

    def __init__(self, layers: list[int], pool_size: int, length: int, width: int, query_dim: int, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.layers, self.momentum = layers, momentum
        self.prompts = nn.Parameter(torch.empty(len(layers), pool_size, length, width).uniform_(-1, 1))
        self.task_identity = TaskIdentityHead(query_dim, num_classes)
        self.register_buffer("task", torch.zeros((), dtype=torch.int64))
        self.register_buffer("task_of_class", torch.full((num_classes,), -1, dtype=torch.int64))  # -1: not seen yet
        self.forced = False
        self.last_choice: torch.Tensor | None = None

    def needs_query(self) -> bool:
        return not (self.training or self.forced)

    @torch.no_grad()
    def begin_task(self, task: int) -> None:
        """Task ``task`` starts from the previous task's prompt (the release's shared prompt pool)."""
        self.task.fill_(task)
        if task > 0:
            self.prompts[:, task] = self.prompts[:, task - 1]

    def add_classes(self, task: int, classes: range) -> None:
        self.task_of_class[classes.start : classes.stop] = task

    def current_prompt(self) -> torch.Tensor:
        """The current task's prompt (blocks, length, width) with the momentum towards the earlier ones."""
        task = int(self.task)
        prompt = self.prompts[:, task]
        if task == 0 or self.momentum == 0:
            return prompt
        return (1 - self.momentum) * prompt + self.momentum * self.prompts[:, :task].detach().mean(1)

    @torch.no_grad()
    def store_momentum(self) -> None:
        """After training, the prompt becomes the mix its training forwards used (as in the release)."""
        self.prompts[:, int(self.task)] = self.current_prompt()

    @contextmanager
    def own_prompt(self) -> Iterator[None]:
        """Every sample gets the current task's prompt in eval mode too (the statistics pass)."""
        self.forced = True
        try:
            yield
        finally:
            self.forced = False

    def choose(self, query: torch.Tensor) -> torch.Tensor:
        """Each sample's task: that of the class the task-identity head predicts among the seen ones."""
        logits = self.task_identity(query.to(self.prompts.dtype))
        logits = logits.masked_fill(self.task_of_class < 0, float("-inf"))
        return self.task_of_class[logits.argmax(-1)]

    def forward(self, query: torch.Tensor | None, batch: int) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        if query is None:  # training, or the statistics pass after it (the stored prompt, as the release's)
            prompt = self.current_prompt() if self.training else self.prompts[:, int(self.task)]
            prompts = prompt[:, None].repeat(1, batch, 1, 1)  # not expand: see DualPromptPool.forward
        else:
            self.last_choice = self.choose(query)
            prompts = self.prompts[:, self.last_choice]  # (blocks, B, length, width): each sample its own
        keys, values = split_prefix(prompts.unsqueeze(-3))
        return {layer: (keys[i], values[i]) for i, layer in enumerate(self.layers)}, None


class GatedPrefixAttention(PrefixAttention):
    """NoRGa's non-linear residual gate on the prefix scores: ``s + alpha g(tau s)``, alpha and tau learned."""

    def __init__(self, base_layer: nn.Module, gate: str) -> None:
        super().__init__(base_layer)
        self.gate = gate
        self.gate_scale = nn.Parameter(torch.ones(2))  # tau, alpha (the release's act_scale, init 1)

    def prefix_score_bias(self, q: torch.Tensor, prefix_k: torch.Tensor) -> torch.Tensor:
        scores = (q @ prefix_k.transpose(-2, -1)) * self.head_dim**-0.5
        tau, alpha = self.gate_scale.to(scores.dtype)
        return alpha * GATES[self.gate](tau * scores)


class HiDePromptLearner(PromptPoolLearner):
    """HiDe-Prompt with the published CIFAR-100 settings as defaults (ImageNet-R: experiments/run_baselines.sh)."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        method, dim = config.method, self.model.num_features
        self.tii_stats = make_statistics(method.hide_statistics, num_classes, dim, method.hide_centroids)
        self.stats = make_statistics(method.hide_statistics, num_classes, dim, method.hide_centroids)

    @property
    def pool(self) -> HiDePromptPool:
        return self.model.pool

    def build_pool(self, shape: BackboneShape) -> PromptPool:
        return HiDePromptPool(
            layers=self.layers("prompt_layers", shape),
            pool_size=self.pool_per_task(),
            length=self.config.method.prompt_length,
            width=shape.width,
            query_dim=shape.query_dim,
            num_classes=self.num_classes,
            momentum=self.config.method.hide_prompt_momentum,
        )

    def param_groups(self) -> list[dict]:
        """Prompts at ``train.prompt_lr_scale`` x ``train.lr``, the head at ``train.lr`` (the task-identity head trains apart)."""
        lr = self.config.train.lr
        head = list(self.model.get_classifier().parameters())
        return [{"params": [self.pool.prompts], "lr": lr * self.config.train.prompt_lr_scale, "weight_decay": 0.0, "lr_key": "train.lr"}, {"params": head, "lr": lr, "lr_key": "train.lr"}]

    def train_task(self, ctx: TaskContext) -> None:
        self.pool.add_classes(ctx.task, ctx.classes)
        self.train_task_identity(ctx)
        self.pool.begin_task(ctx.task)
        self.train_prompt(ctx)
        self.pool.store_momentum()

    def train_task_identity(self, ctx: TaskContext) -> None:
        """The MLP head on frozen class tokens, then its statistics and (from task 2) its realignment."""
        method, tii = self.config.method, self.pool.task_identity
        features, labels = self.features_and_labels(ctx.train_data, self.model.query)
        criterion = cross_entropy_on(ctx.classes)
        tii.train()
        groups = [{"params": list(tii.parameters()), "lr": method.hide_tii_lr, "lr_key": "method.hide_tii_lr"}]
        data = TensorDataset(features, labels)
        self.trainer.fit(groups, data, method.hide_tii_epochs, lambda x, y: criterion(tii(x), y), ctx.seed, f"task {ctx.task + 1} identity")
        self.tii_stats.update(features, labels)
        self.realign(tii, self.tii_stats, ctx, self.config.train.batch_size)

    def train_prompt(self, ctx: TaskContext) -> None:
        criterion, weight = cross_entropy_on(ctx.classes), self.config.method.hide_contrastive_weight
        means = self.stats.stored_means(range(ctx.classes.start)).to(self.device)

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.model.train()
            logits, features = self.logits_and_features(images)
            loss = criterion(logits, labels)
            return loss + weight * contrastive_loss(features.float(), means) if weight > 0 else loss

        self.trainer.fit(self.param_groups(), ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}")

    def logits_and_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's forward and the class token its head saw (the prompted pass's feature)."""
        captured: list[torch.Tensor] = []
        handle = self.model.get_classifier().register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        return logits, captured[0]

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(images)[1]

    def after_task(self, ctx: TaskContext) -> None:
        """Statistics of the prompted features with the task's own prompt, then (from task 2) the head realigned."""
        with self.pool.own_prompt():
            self.stats.update(*self.features_and_labels(ctx.train_data, self.pooled_features))
        self.realign(self.model.get_classifier(), self.stats, ctx, PROMPTED_SAMPLES_SCALE * self.config.train.batch_size)

    def realign(self, head: nn.Module, stats: Statistics, ctx: TaskContext, samples_per_class: int) -> None:
        """The release's ``train_task_adaptive_prediction``: SGD, per-epoch cosine, one batch per earlier class."""
        method = self.config.method
        if ctx.task == 0 or method.hide_align_epochs == 0:
            return
        align_head(
            head,
            stats,
            ctx.seen,
            epochs=method.hide_align_epochs,
            lr=method.hide_align_lr,
            lr_key="method.hide_align_lr",
            samples_per_class=samples_per_class,
            batch_size=samples_per_class,
            seed=ctx.seed,
            weight_decay=ALIGN_WEIGHT_DECAY,
            iterations_per_epoch=ctx.classes.start,
            trainer=self.trainer,
            optimizer=sgd,
            per_epoch_cosine=True,
        )

    # Checkpoints: trainable weights, the pool's buffers, both statistics of the task just finished.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.tii_stats.state_dict("tii_stats."), **self.stats.state_dict("class_stats.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.tii_stats.load_state_dict(state, "tii_stats.")
        self.stats.load_state_dict(state, "class_stats.")
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("tii_stats.", "class_stats."))}, strict=False)


class NoRGaLearner(HiDePromptLearner):
    """HiDe-Prompt with NoRGa's gated prefix scores; the gates train on the first task only."""

    def prefix_attention(self, attention: nn.Module) -> PrefixAttention:
        return GatedPrefixAttention(attention, self.config.method.norga_gate)

    def gates(self) -> list[nn.Parameter]:
        return [layer.gate_scale for layer in self.model.prompted.values()]

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if int(self.pool.task) == 0:
            groups[0]["params"] = [*groups[0]["params"], *self.gates()]
        return groups

