"""Turning a dataset into what a run trains on: per-class limits, the backbone's transform, an in-memory cache.

The splits yield uint8 images; :attr:`PreparedData.pixel_norm` says how the trainer turns them
into the model's input on the device (:func:`~smope.data.transforms.normalize_pixels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import distributed
from ..runconfig import RunConfig
from torchvision.transforms import v2

from .cache import node_cache
from .datasets import load_dataset
from .device_pipeline import DeviceArray, DevicePipeline, device_source
from .transforms import PixelNorm, build_transform, image_steps, input_norm


class TensorImages(Dataset):
    """Transformed images of a split held in memory, with the ``targets``/``classes`` a scenario needs."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> None:
        self.images, self.targets, self.classes = images, targets.tolist(), classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


class TransformedView(Dataset):
    """A labelled dataset restricted to some indices, with a transform applied on access."""

    def __init__(self, dataset: Dataset, indices: list[int], transform) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform
        all_targets = np.asarray(dataset.targets)
        self.targets = all_targets[indices].tolist()
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label


def _limit_per_class(targets: list[int], limit: int | None) -> list[int]:
    """The first ``limit`` indices of every class (all indices when ``limit`` is None)."""
    if limit is None:
        return list(range(len(targets)))
    taken: dict[int, int] = {}
    keep = []
    for index, label in enumerate(targets):
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            keep.append(index)
    return keep


@dataclass
class PreparedData:
    train: Dataset
    test: Dataset
    num_classes: int
    split_file: str | Path | None = None  # the fixed split a dataset reads, if any (recorded in provenance.json)
    pixel_norm: PixelNorm = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # (mean, std) the trainer applies to the uint8 images
    source: str | None = None  # where the images were read from when not data.root (an offline fallback copy)


def load_splits(config: RunConfig) -> tuple[Dataset, Dataset]:
    data = config.data
    with distributed.local_main_first():  # one download per machine when data.download is set
        return tuple(load_dataset(data.name, data.root, train, data.download, data.split) for train in (True, False))


def split_transform(config: RunConfig, model: torch.nn.Module, train: bool, uint8: bool = False) -> Callable:
    """The transform of one split for ``model`` (its resolution) and the config's normalisation, resize and augmentation.

    ``uint8`` stops before the float conversion, which the trainer then does on the device.
    """
    data = config.data
    mean, std = input_norm(model, data.normalize)
    return build_transform(_img_size(config, model), mean, std, train, data.augment if train else [], data.test_resize, data.interpolation, uint8)


def _img_size(config: RunConfig, model: torch.nn.Module) -> int:
    return model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else config.model.img_size


def device_split(config: RunConfig, model: torch.nn.Module, raw: Dataset, train: bool) -> Dataset:
    """One split for ``data.pipeline: gpu``: encoded files or a device array, with the steps the device applies to each batch."""
    data = config.data
    augment = data.augment if train else []
    source = device_source(raw, _limit_per_class(list(raw.targets), data.train_per_class if train else data.test_per_class), data.name)
    steps = v2.Compose(image_steps(_img_size(config, model), train, augment, data.test_resize, data.interpolation))
    source.device_pipeline = DevicePipeline(steps, random=bool(augment), array=source if isinstance(source, DeviceArray) else None)
    return source


def prepare_data(config: RunConfig, model: torch.nn.Module, raw_train: Dataset, raw_test: Dataset, num_workers: int = 0) -> PreparedData:
    """Transform both splits for ``model`` to uint8 images and cache them when allowed (``num_workers`` build the caches)."""
    data = config.data
    norm = input_norm(model, data.normalize)
    if data.pipeline == "gpu":  # nothing to cache: the device decodes and resizes each batch
        splits = [device_split(config, model, raw, train) for raw, train in ((raw_train, True), (raw_test, False))]
        return PreparedData(splits[0], splits[1], len(raw_train.classes), getattr(raw_train, "split_file", None), norm, getattr(raw_train, "source", None))
    splits = []
    for raw, train, limit in ((raw_train, True, data.train_per_class), (raw_test, False, data.test_per_class)):
        augment = data.augment if train else []
        view = TransformedView(raw, _limit_per_class(list(raw.targets), limit), split_transform(config, model, train, uint8=True))
        if data.cache and not augment:
            images, labels = node_cache(view, "train" if train else "test", num_workers=num_workers).tensors
            view = TensorImages(images, labels, view.classes)
        splits.append(view)
    return PreparedData(splits[0], splits[1], len(raw_train.classes), getattr(raw_train, "split_file", None), norm, getattr(raw_train, "source", None))
