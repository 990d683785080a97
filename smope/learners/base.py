"""What every continual learner shares: the task context, the training loop and evaluation.

A learner owns its network and implements :meth:`Learner.train_task`; the trainer drives
tasks, evaluation, metrics and checkpoints, so methods differ only in what they train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..errors import SmopeError
from ..runconfig import RunConfig
from ..vit import pooled_features
from .divergence import DivergenceGuard
from .schedule import lr_multipliers


@dataclass
class TaskContext:
    """Everything a learner is told about the task at hand (never the test data)."""

    task: int
    classes: range  # labels of this task
    seen: range  # labels of tasks 0..task
    train_data: Dataset
    seed: int
    # Every task's training data, for the joint-training ceiling only (continual learners ignore it).
    all_train_data: Dataset | None = None


def masked_logits(logits: torch.Tensor, classes: range) -> torch.Tensor:
    """Logits of the classes seen so far, with earlier tasks' classes masked out (docs/method.md#protocol)."""
    logits = logits[:, : classes.stop]
    if classes.start == 0:
        return logits
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, : classes.start] = True
    return logits.masked_fill(mask, float("-inf"))


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names; in data-parallel runs CUDA means this process's ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SmopeError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmopeError(f"train.device={name} but torch finds no CUDA device here; use train.device=cpu (or auto)")
    return distributed.process_device(device)


class Learner:
    """Base class of continual-learning methods.

    Subclasses build ``self.model`` in ``__init__`` and implement :meth:`train_task`; they may
    extend :meth:`after_task`, :meth:`logits` and the checkpoint state.
    """

    name = "base"
    optional_state: frozenset[str] = frozenset()  # checkpoint entries older versions did not write
    # Called after every optimiser step of fit() with (description, loss, learning rates): the run's loggers.
    log_step: Callable[[str, float, list[float]], None] | None = None

    def __init__(self, config: RunConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes
        self.device = resolve_device(config.train.device)
        self.model: nn.Module

    # Hooks -------------------------------------------------------------------------------
    def train_task(self, ctx: TaskContext) -> None:
        raise NotImplementedError

    def after_task(self, ctx: TaskContext) -> None:
        """Work between tasks (statistics, alignment); nothing by default."""

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.autocast():
            return self.model(images.to(self.device)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the next task needs, nothing frozen: the trainable parameters and buffers."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.model.state_dict().items() if n in trainable}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.model.load_state_dict(state, strict=False)

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse a checkpoint whose entries are not the ones :meth:`state_dict` writes, naming them.

        A missing entry would otherwise keep its fresh value silently and the run would go on from
        a state it never had. Only names are compared: per-task entries (class statistics) change
        shape from task to task, and the loaders check shapes. ``optional_state`` lists entries
        older checkpoints may lack.
        """
        own = self.state_dict().keys()
        missing = sorted(own - state.keys() - self.optional_state)
        unexpected = sorted(state.keys() - own - self.optional_state)
        problems = "; ".join(
            f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        )
        if problems:
            raise SmopeError(
                f"checkpoint does not fit this {self.name} model ({problems}): it was written by another method, "
                "configuration or version; delete it to rerun that task"
            )

    # Shared machinery ----------------------------------------------------------------------
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature this learner's head sees (class statistics, head training, probes)."""
        return pooled_features(self.model, images)

    @torch.no_grad()
    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`pooled_features` in eval mode, for classifiers kept outside the model (prototypes, ridge)."""
        self.model.eval()
        with self.autocast():
            return self.pooled_features(images.to(self.device)).float()

    def compile(self) -> None:
        """``torch.compile`` the model's forward in place (``train.compile``); parameter names are kept."""
        self.model.compile()

    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def loader(self, data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        """This process's batches of ``data``; ``batch_size`` is the global batch, split over the processes.

        Shuffled loaders are for training: every process takes the same number of steps (see
        :class:`~smope.distributed.ShardSampler`). Unshuffled ones visit each sample once over all
        processes, so whatever is computed from them must be reduced across processes.
        """
        return DataLoader(
            data,
            batch_size=distributed.local_batch_size(batch_size, exact=shuffle),
            sampler=distributed.ShardSampler(len(data), shuffle, seed),
            generator=torch.Generator().manual_seed(seed),  # worker seeds, without drawing from the global RNG
            num_workers=self.config.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def fit(
        self,
        param_groups: list[dict],
        data: Dataset,
        epochs: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        seed: int,
        description: str,
        weight_decay: float | None = None,
    ) -> None:
        """AdamW over ``epochs`` of ``data`` with ``train.schedule``'s learning rates; a diverging loss stops the run."""
        train = self.config.train
        loader = self.loader(data, train.batch_size, shuffle=True, seed=seed)
        steps = max(1, epochs * len(loader))
        optimizer = self.optimizer(param_groups, train.weight_decay if weight_decay is None else weight_decay)
        multipliers = lr_multipliers(
            train.schedule,
            [g["lr"] for g in param_groups],
            epochs,
            len(loader),
            floor=train.min_lr,
            iters_per_epoch=train.iters_per_epoch,
            hold=train.hold_iters,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)
        scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        params = [p for g in param_groups for p in g["params"]]
        bar = tqdm(total=steps, desc=description, disable=not train.progress, leave=False, unit="it")
        guard = DivergenceGuard(self.config, description, param_groups)
        for epoch in range(epochs):
            for images, labels in loader:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with self.autocast():
                    loss = loss_fn(images, labels)
                if guard.diverged(loss):
                    bar.close()
                    raise guard.error(epoch + 1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                # Still scaled: every process then finds the same inf/NaN and skips the same fp16 steps.
                self.sync_gradients(params)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
                if self.log_step is not None:
                    self.log_step(description, loss.item(), schedule.get_last_lr())
        bar.close()

    def optimizer(self, param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
        """The optimizer :meth:`fit` uses: AdamW, unless a method's published recipe says otherwise."""
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)

    def sync_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average the gradients over the processes of a data-parallel run, so all take the same step."""
        distributed.average_gradients(params)

    def features_and_labels(self, data: Dataset, forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` over ``data`` in eval mode without gradients, concatenated in ``data``'s order.

        In a data-parallel run each process computes its shard and every process gets all of
        them, so callers (statistics, keys, head training on features) need no reduction.
        """
        outputs, labels = [], []
        self.model.eval()
        with torch.no_grad():
            for images, batch_labels in self.loader(data, self.config.train.eval_batch_size, shuffle=False):
                with self.autocast():
                    outputs.append(forward(images.to(self.device)).float().cpu())
                labels.append(batch_labels)
        features, targets = torch.cat(outputs), torch.cat(labels)
        return distributed.gather_shards(features, len(data)), distributed.gather_shards(targets, len(data))


def cross_entropy_on(classes: range) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy over the seen classes with earlier tasks masked, as a function of logits."""
    return lambda logits, labels: F.cross_entropy(masked_logits(logits.float(), classes), labels)
