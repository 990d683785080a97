"""Batches on the training device: worker counts, and the last step of the input pipeline.

Workers hand over uint8 images; :class:`DeviceBatches` copies each batch to the device
(non-blocking from pinned memory) and only there turns it into the model's float input, so a
224 px image crosses process boundaries and the PCIe bus as 150,528 bytes instead of 602,112.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["MAX_AUTO_WORKERS", "DeviceBatches", "GatheredBatches", "auto_workers", "gathered", "resolve_workers"]

MAX_AUTO_WORKERS = 16
"""``data.num_workers: auto`` never asks for more: beyond it collation, not decoding, limits a process."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_workers(device: torch.device) -> int:
    """Loader workers for ``data.num_workers: auto``.

    On CPU none: the model's own threads need the cores, in-memory caches gain nothing from
    workers, and the numbers of an augmented run then do not depend on the machine's core
    count. On an accelerator, the CPUs of this process's share of the node (``torchrun`` sets
    ``LOCAL_WORLD_SIZE``) less one for the main process, at most :data:`MAX_AUTO_WORKERS`.
    """
    if device.type == "cpu":
        return 0
    per_process = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(per_process - 1, MAX_AUTO_WORKERS))


def resolve_workers(value: int | str, device: torch.device) -> int:
    """The worker count ``data.num_workers`` (validated with the config) asks for."""
    return auto_workers(device) if value == "auto" else int(value)


class DeviceBatches:
    """``(prepare(inputs), labels)`` for each batch of ``loader``: ``prepare`` moves the inputs to the device and finishes them there.

    Labels stay where the loader put them (callers compare them on the CPU or move them).
    """

    def __init__(self, loader: DataLoader, prepare: Callable[[object], torch.Tensor]) -> None:
        self.loader, self.prepare = loader, prepare

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, labels in self.loader:
            yield self.prepare(inputs), labels


class GatheredBatches(Dataset):
    """An in-memory split read one batch per item: ``dataset[[i, j, ...]]`` is one gather, not a stack of samples.

    For cached splits (:class:`~smope.data.prepared.TensorImages`, possibly behind a scenario's
    relabelled subset): the main process gathers a batch faster than workers would pass it
    through shared memory, so no workers start and nothing is copied twice.
    """

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.rows, self.labels = images, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(batch)
        # index_select copies whole rows; advanced indexing (images[rows]) goes element by element, ~6x slower on CPU
        return self.images.index_select(0, self.rows[index]), self.labels[index]


def gathered(data: Dataset) -> GatheredBatches | None:
    """``data`` as :class:`GatheredBatches` when it is an in-memory image tensor, or an untransformed subset of one."""
    images = getattr(data, "images", None)
    if isinstance(images, torch.Tensor):
        return GatheredBatches(images, torch.arange(len(data)), torch.as_tensor(data.targets))
    source = getattr(data, "dataset", None)
    if isinstance(getattr(source, "images", None), torch.Tensor) and getattr(data, "transform", None) is None and hasattr(data, "indices"):
        return GatheredBatches(source.images, torch.as_tensor(data.indices), torch.as_tensor(data.targets))
    return None
