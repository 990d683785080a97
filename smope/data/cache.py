"""Materialise a transformed dataset once, so small datasets skip per-epoch decoding on CPU.

For MNIST-sized data at a small input size, decoding and resizing every image every epoch can
cost more than the forward pass. :func:`cache_dataset` runs the (deterministic) transform once
and keeps the result as one float tensor. Random augmentation would be frozen into the cache,
so only cache test-style transforms.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from smope.errors import SmopeError

__all__ = ["cache_dataset"]

DEFAULT_MAX_BYTES = 4 * 1024**3


def cache_dataset(
    dataset: Dataset, batch_size: int = 256, num_workers: int = 0, max_bytes: int = DEFAULT_MAX_BYTES
) -> TensorDataset:
    """``dataset`` (yielding ``(tensor, int label)``) as a :class:`TensorDataset` of ``(images, labels)``.

    Refuses, before doing any work beyond the first sample, when the cache would exceed
    ``max_bytes``: caching 224-pixel copies of a large dataset would exhaust memory.
    """
    if len(dataset) == 0:
        return TensorDataset(torch.empty(0), torch.empty(0, dtype=torch.long))
    first, _ = dataset[0]
    needed = len(dataset) * first.numel() * first.element_size()
    if needed > max_bytes:
        raise SmopeError(
            f"caching {len(dataset)} samples of shape {tuple(first.shape)} needs {needed / 1024**3:.1f} GiB "
            f"(limit {max_bytes / 1024**3:.1f} GiB); turn the dataset cache off or use a smaller image size"
        )
    images = torch.empty((len(dataset), *first.shape), dtype=first.dtype)
    labels = torch.empty(len(dataset), dtype=torch.long)
    start = 0
    for batch_images, batch_labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        stop = start + len(batch_labels)
        images[start:stop] = batch_images
        labels[start:stop] = batch_labels
        start = stop
    return TensorDataset(images, labels)
