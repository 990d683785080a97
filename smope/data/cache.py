"""Materialise a transformed dataset once, so later passes skip decoding and resizing.

For MNIST-sized data at a small input size, decoding and resizing every image every epoch can
cost more than the forward pass. :func:`cache_dataset` runs the (deterministic) transform once
and keeps the result as one tensor, in the transform's dtype: uint8 for the run's transforms
(150,528 bytes per 224 px RGB image; the device normalises them). Random augmentation would be
frozen into the cache, so only cache test-style transforms.

Under ``torchrun`` with several processes per machine, :func:`shared_cache` builds it once per
machine: the first local process writes a memory-mapped file the others map, so the node holds
one copy instead of one per process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from smope import distributed
from smope.errors import SmopeError

__all__ = ["cache_bytes", "cache_dataset", "node_cache", "shared_cache", "shared_cache_dir"]

DEFAULT_MAX_BYTES = 4 * 1024**3
_FIX = "set data.cache=false (images are then decoded on every pass), or use a smaller image size"


def _first(dataset: Dataset) -> torch.Tensor:
    image, _ = dataset[0]
    return image


def cache_bytes(dataset: Dataset) -> int:
    """Bytes a cache of ``dataset`` holds: images in their own dtype, and the int64 labels."""
    if len(dataset) == 0:
        return 0
    first = _first(dataset)
    return len(dataset) * (first.numel() * first.element_size() + 8)


def _check_size(dataset: Dataset, max_bytes: int) -> None:
    needed = cache_bytes(dataset)
    if needed > max_bytes:
        shape, dtype = tuple(_first(dataset).shape), _first(dataset).dtype
        raise SmopeError(
            f"caching {len(dataset)} images of shape {shape} ({dtype}) needs {needed / 1024**3:.2f} GiB, above the "
            f"{max_bytes / 1024**3:.1f} GiB limit; {_FIX}"
        )


def _fill(images: torch.Tensor, dataset: Dataset, batch_size: int, num_workers: int) -> torch.Tensor:
    """Labels of ``dataset``, after writing its transformed images into ``images``."""
    labels = torch.empty(len(dataset), dtype=torch.long)
    start = 0
    for batch_images, batch_labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        stop = start + len(batch_labels)
        images[start:stop] = batch_images
        labels[start:stop] = batch_labels
        start = stop
    return labels


def cache_dataset(
    dataset: Dataset, batch_size: int = 256, num_workers: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
) -> TensorDataset:
    """``dataset`` (yielding ``(tensor, int label)``) as a :class:`TensorDataset` of ``(images, labels)``.

    Refuses, before doing any work beyond the first sample, when the cache would exceed
    ``max_bytes``: caching 224-pixel copies of a large dataset would exhaust memory.
    """
    if len(dataset) == 0:
        return TensorDataset(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    _check_size(dataset, max_bytes)
    first = _first(dataset)
    images = torch.empty((len(dataset), *first.shape), dtype=first.dtype)
    return TensorDataset(images, _fill(images, dataset, batch_size, num_workers))


def shared_cache_dir() -> Path:
    """Where per-machine caches go: ``SMOPE_SHARED_CACHE_DIR``, else /dev/shm (memory), else the temp folder."""
    chosen = os.environ.get("SMOPE_SHARED_CACHE_DIR")
    if chosen:
        return Path(chosen)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _check_room(folder: Path, needed: int) -> None:
    """Refuse a cache the machine's shared folder cannot hold (a full /dev/shm kills processes with SIGBUS)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SmopeError(
            f"the shared data cache needs {needed / 1024**3:.2f} GiB in {folder} but only {free / 1024**3:.2f} GiB is free on this "
            f"machine; {_FIX}, or point SMOPE_SHARED_CACHE_DIR at a folder with room"
        )


def shared_cache(
    dataset: Dataset, name: str, build: bool, batch_size: int = 256, num_workers: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
) -> TensorDataset:
    """:func:`cache_dataset` backed by the memory-mapped file ``name`` in :func:`shared_cache_dir`.

    The process with ``build`` writes it; the others call with ``build=False`` once it is
    written and map the same pages (``torch.from_file(shared=True)``). Labels come from
    ``dataset.targets``, so mapping processes decode nothing.
    """
    if len(dataset) == 0:
        return cache_dataset(dataset)
    _check_size(dataset, max_bytes)
    first = _first(dataset)
    path = shared_cache_dir() / name
    shape = (len(dataset), *first.shape)
    count = len(dataset) * first.numel()
    if build:
        with open(path, "wb") as handle:
            handle.truncate(count * first.element_size())
    images = torch.from_file(str(path), shared=True, size=count, dtype=first.dtype).view(shape)
    if build:
        labels = _fill(images, dataset, batch_size, num_workers)
    else:
        labels = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    return TensorDataset(images, labels)


def node_cache(dataset: Dataset, key: str, batch_size: int = 256, num_workers: int = 0, max_bytes: int = DEFAULT_MAX_BYTES) -> TensorDataset:
    """The cache of ``dataset``: in this process's memory, or once per machine when ``torchrun`` starts several here.

    ``key`` names the split; the file is named after it and torchrun's run id, so concurrent
    runs do not collide, and it is unlinked once every local process has mapped it.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not distributed.is_distributed() or local_world < 2:
        return cache_dataset(dataset, batch_size, num_workers, max_bytes)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
    name = f"smope-cache-{hashlib.sha256(f'{run}:{key}'.encode()).hexdigest()[:16]}.bin"
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    _check_size(dataset, max_bytes)  # every process, before any writes: all refuse together
    _check_room(shared_cache_dir(), cache_bytes(dataset))
    with distributed.local_main_first():
        cached = shared_cache(dataset, name, first, batch_size, num_workers, max_bytes)
    distributed.barrier()  # every local process has mapped the file
    if first:
        (shared_cache_dir() / name).unlink(missing_ok=True)  # the mappings keep the pages
    return cached
