"""The training machinery every learner shares, apart from the methods.

A :class:`Trainer` owns the device, the precision, the data loaders (sharded in
data-parallel runs), the optimiser and learning-rate schedule, the gradient sync, the
divergence guard, the progress bar and the feature passes. Learners say only what to train
(parameter groups and a loss) and what to do between tasks; classifier alignment runs its
steps through the same :meth:`Trainer.optimize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .data.device_pipeline import device_pipeline_of
from .data.loading import DeviceBatches, gathered, resolve_workers
from .data.transforms import PixelNorm, normalize_pixels
from .divergence import DivergenceGuard
from .errors import SmopeError
from .runconfig import RunConfig
from .schedule import lr_multipliers

Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""``epoch -> (inputs, labels)`` batches of that epoch."""
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[dict], float], torch.optim.Optimizer]


class PendingLoss(NamedTuple):
    """A step's loss, still on the device, with what the loggers report beside it."""

    loss: torch.Tensor
    epoch: int
    lrs: list[float]


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for ``train.progress``: None (the default) lets tqdm switch bars off when stderr is not a terminal."""
    return None if progress is None else not progress


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


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision ``train.precision`` means on ``device``: ``auto`` is bf16 on CUDA devices with bf16, fp32 elsewhere.

    CPU runs stay in fp32 under ``auto``: without native bf16 (AVX512-BF16, AMX) it is emulated and slow.
    """
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if has_bf16 else "fp32"
    if requested == "bf16" and not has_bf16:
        name = torch.cuda.get_device_name(device)
        raise SmopeError(f"train.precision=bf16 but {device} ({name}) has no bf16 support; use train.precision=auto, fp16 or fp32")
    return requested


def use_tf32(enabled: bool) -> None:
    """Let fp32 matrix products and convolutions on CUDA run on TF32 tensor cores (``train.tf32``)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def adamw(param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """The harness's optimiser, unless a method's published recipe says otherwise.

    Fused on CUDA: one kernel for all parameters, and its step counters stay on the device
    (the default implementation reads them on the host every step).
    """
    params = [p for group in param_groups for p in group["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay, fused=fused or None)


class Trainer:
    """Runs optimisation and data passes for a learner with a run's ``train.*`` settings."""

    def __init__(self, config: RunConfig, on_step: Callable[[str, float, list[float]], None] | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.train.device)
        self.precision = resolve_precision(config.train.precision, self.device)
        if self.device.type == "cuda":
            use_tf32(config.train.tf32)
        # Called after every optimiser step with (description, loss, learning rates): the run's plugins.
        self.on_step = on_step
        self.num_workers = resolve_workers(config.data.num_workers, self.device)
        # How uint8 batches become model inputs on the device: the prepared data's normalisation.
        self.pixel_norm: PixelNorm | None = None
        # Unshuffled passes over the dataset seen last, kept so repeated passes reuse their workers.
        self._passes: dict[int, DeviceBatches] = {}
        self._passes_over: Dataset | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as model input on the device: copied (non-blocking), then uint8 pixels converted and normalised there."""
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.pixel_norm is None:
                raise RuntimeError("uint8 images reached a trainer without pixel_norm; set it from the prepared data")
            return normalize_pixels(images, self.pixel_norm)
        return images

    def loader(self, data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DeviceBatches:
        """This process's batches of ``data``, inputs on the device; ``batch_size`` is the global batch, split over the processes.

        Shuffled loaders are for training: every process takes the same number of steps (see
        :class:`~smope.distributed.ShardSampler`), without the last partial batch when
        ``train.drop_last`` is set. Unshuffled ones visit each sample once over all processes, so
        whatever is computed from them must be reduced across processes; they are reused while
        ``data`` stays the same (the after-task passes over a task's training data).
        """
        if not shuffle:
            if data is not self._passes_over:
                self._passes, self._passes_over = {}, data
            if batch_size in self._passes:
                return self._passes[batch_size]
        pipeline = device_pipeline_of(data)  # data.pipeline=gpu: the loader reads bytes or indices, the device does the rest
        in_memory = gathered(data) if pipeline is None else None
        workers = 0 if in_memory is not None or (pipeline is not None and not pipeline.uses_workers) else self.num_workers
        local_batch = distributed.local_batch_size(batch_size, exact=shuffle)
        sampler = distributed.ShardSampler(len(data), shuffle, seed)
        drop_last = shuffle and self.config.train.drop_last
        loader = DataLoader(
            data if in_memory is None else in_memory,
            # A cached split is gathered batch by batch: the sampler hands out whole batches of indices.
            batch_size=local_batch if in_memory is None else None,
            sampler=sampler if in_memory is None else BatchSampler(sampler, local_batch, drop_last=drop_last),
            generator=torch.Generator().manual_seed(seed),  # worker seeds, without drawing from the global RNG
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last and in_memory is None,  # a cached split drops it in its BatchSampler
            persistent_workers=workers > 0,  # epochs and repeated passes keep their workers
            prefetch_factor=self.config.data.prefetch if workers > 0 else None,
            collate_fn=None if pipeline is None else pipeline.collate,
        )
        prepare = self.inputs if pipeline is None else lambda batch: self.inputs(pipeline(batch, self.device))
        batches = DeviceBatches(loader, prepare)
        if not shuffle:
            self._passes[batch_size] = batches
        return batches

    def fit(
        self,
        param_groups: list[dict],
        data: Dataset,
        epochs: int,
        loss_fn: LossFn,
        seed: int,
        description: str,
        weight_decay: float | None = None,
        optimizer: OptimizerFactory = adamw,
    ) -> None:
        """``epochs`` over shuffled ``data`` with ``train.schedule``'s learning rates (AdamW unless ``optimizer`` says otherwise)."""
        train = self.config.train
        loader = self.loader(data, train.batch_size, shuffle=True, seed=seed)
        if not len(loader):
            raise SmopeError(
                f"{description}: train.drop_last leaves no batch ({len(data)} training images, train.batch_size={train.batch_size}); "
                "lower train.batch_size or set train.drop_last=false"
            )
        multipliers = lr_multipliers(
            train.schedule,
            [g["lr"] for g in param_groups],
            epochs,
            len(loader),
            floor=train.min_lr,
            iters_per_epoch=train.iters_per_epoch,
            hold=train.hold_iters,
            milestones=train.milestones,
            lag=train.schedule_lag,
        )
        weight_decay = train.weight_decay if weight_decay is None else weight_decay
        self.optimize(param_groups, optimizer(param_groups, weight_decay), multipliers, epochs, len(loader), lambda _: loader, loss_fn, description)

    def optimize(
        self,
        param_groups: list[dict],
        optimizer: torch.optim.Optimizer,
        multipliers: list[Callable[[int], float]],
        epochs: int,
        steps_per_epoch: int,
        batches: Batches,
        loss_fn: LossFn,
        description: str,
    ) -> None:
        """The step loop: precision, gradient scaling and sync, schedule, progress, loggers; a diverging loss stops the run.

        The loss stays on the device: it is read on the host once every ``train.sync_every``
        steps (and at the end), so the host can queue steps ahead of the device. The guard, the
        progress bar and the loggers then see every step's loss; a divergence is caught at
        most ``sync_every`` steps late, before the phase ends.
        """
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        params = [p for g in param_groups for p in g["params"]]
        bar = tqdm(total=max(1, epochs * steps_per_epoch), desc=description, disable=bar_disabled(self.config.train.progress), leave=False, unit="it")
        guard = DivergenceGuard(self.config, description, param_groups, self.precision)
        pending: list[PendingLoss] = []
        try:
            for epoch in range(epochs):
                for inputs, labels in batches(epoch):
                    inputs, labels = self.inputs(inputs), labels.to(self.device, non_blocking=True)
                    with self.autocast():
                        loss = loss_fn(inputs, labels)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    # Still scaled: every process then finds the same inf/NaN and skips the same fp16 steps.
                    distributed.average_gradients(params)
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    pending.append(PendingLoss(loss.detach(), epoch, schedule.get_last_lr()))
                    bar.update()
                    if len(pending) == self.config.train.sync_every:
                        self.read_losses(pending, guard, bar, description)
            self.read_losses(pending, guard, bar, description)
        finally:
            bar.close()

    def read_losses(self, pending: list[PendingLoss], guard: DivergenceGuard, bar: tqdm, description: str) -> None:
        """The losses of the steps since the last read, in one device-to-host copy: divergence guard, progress bar, loggers."""
        if not pending:
            return
        values = torch.stack([step.loss.float() for step in pending]).tolist()
        for value, step in zip(values, pending):
            if guard.diverged(value):
                raise guard.error(step.epoch + 1)
            if self.on_step is not None:
                self.on_step(description, value, step.lrs)
        bar.set_postfix(epoch=pending[-1].epoch + 1, loss=f"{values[-1]:.3f}")
        pending.clear()

    def features_and_labels(
        self, model: nn.Module, data: Dataset, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` over ``data`` with ``model`` in eval mode and no gradients, concatenated in ``data``'s order.

        In a data-parallel run each process computes its shard and every process gets all of
        them, so callers (statistics, keys, head training on features) need no reduction.
        """
        outputs, labels = [], []
        model.eval()
        with torch.no_grad():
            for images, batch_labels in self.loader(data, self.config.train.eval_batch_size, shuffle=False):
                with self.autocast():
                    outputs.append(forward(images).float().cpu())
                labels.append(batch_labels)
        features, targets = torch.cat(outputs), torch.cat(labels)
        return distributed.gather_shards(features, len(data)), distributed.gather_shards(targets, len(data))
