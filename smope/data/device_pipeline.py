"""``data.pipeline: gpu``: images decoded and augmented on the training device, not in CPU workers.

A PIL worker spends ~5 ms on one 500x375 JPEG (decode, crop, resize, jitter); a GPU does the
same work for a whole batch in about that time. Here the loader only reads the encoded bytes
(:class:`EncodedFiles`) or the indices of an in-memory array kept on the device as one uint8
tensor (:class:`DeviceArray`, MNIST- and CIFAR-sized data, no workers at all), and
:class:`DevicePipeline` decodes (``torchvision.io.decode_jpeg`` on CUDA) and applies the
same torchvision steps as the CPU pipeline (:func:`~smope.data.transforms.image_steps`),
per image so that each gets its own random crop, flip and jitter. The steps run on uint8
tensors instead of PIL images, so pixels differ slightly from ``data.pipeline: cpu``
(docs/performance.md#data-pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from smope.errors import SmopeError

__all__ = ["DECODED_SUFFIXES", "DeviceArray", "DevicePipeline", "EncodedFiles", "device_pipeline_of", "device_source"]

DECODED_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Files ``data.pipeline: gpu`` decodes (JPEG on the GPU itself, PNG on the CPU then copied)."""

_JPEG_MAGIC = b"\xff\xd8"


class EncodedFiles(Dataset):
    """Image files as their encoded bytes (uint8 1-D tensors), to be decoded on the device."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: list[str]) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        # Not torchvision's read_file: its tensor lives in a closed file mapping, which a loader
        # worker cannot hand to the main process (EBADF while pickling, then the loader waits forever).
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), label


class DeviceArray(Dataset):
    """An in-memory uint8 split as one ``(N, 3, H, W)`` tensor, moved to the device on first use; items are indices into it."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list[str]) -> None:
        pixels = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        if pixels.ndim == 3:  # grey (N, H, W): the CPU pipeline's convert("RGB") repeats the channel
            pixels = pixels[:, None].expand(-1, 3, -1, -1)
        else:
            pixels = pixels.permute(0, 3, 1, 2)
        self.images = pixels.contiguous()
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self._on: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.targets[index]

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.images.to(device)
        return self._on[device]


def _decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Each file's RGB uint8 ``(3, H, W)`` on ``device``: JPEGs decoded by the GPU in one call there, the rest on the CPU."""
    jpegs = [i for i, data in enumerate(encoded) if device.type == "cuda" and bytes(data[:2].tolist()) == _JPEG_MAGIC]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpegs:
        for i, image in zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)):
            images[i] = image
    for i, data in enumerate(encoded):
        if images[i] is None:
            images[i] = decode_image(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return images


def collate_encoded(batch: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encoded files differ in length, so a batch is a list of them and a label tensor."""
    return [data for data, _ in batch], torch.tensor([label for _, label in batch])


class DevicePipeline:
    """Turns a loader batch of :class:`EncodedFiles` bytes or :class:`DeviceArray` indices into uint8 images on the device.

    ``steps`` are :func:`~smope.data.transforms.image_steps`; random ones draw their parameters
    from torch's global generator, like the CPU pipeline without workers.
    """

    def __init__(self, steps: Callable[[torch.Tensor], torch.Tensor], random: bool, array: DeviceArray | None = None) -> None:
        self.steps, self.random, self.array = steps, random, array
        self.collate = None if array is not None else collate_encoded
        self.uses_workers = array is None  # reading files benefits from workers; indexing a device tensor does not

    def __call__(self, batch: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.array is not None:
            images = self.array.on(device).index_select(0, batch.to(device))
            if not self.random:  # same-sized images, deterministic steps: the whole batch at once
                return self.steps(images)
        else:
            images = _decode(batch, device)
        return torch.stack([self.steps(image) for image in images])


def device_pipeline_of(data: Dataset) -> DevicePipeline | None:
    """The :class:`DevicePipeline` of ``data`` or of the dataset it is a view of (a scenario's subsets), if any."""
    while data is not None:
        pipeline = getattr(data, "device_pipeline", None)
        if pipeline is not None:
            return pipeline
        data = getattr(data, "dataset", None)
    return None


def device_source(raw: Dataset, indices: list[int], dataset_name: str) -> EncodedFiles | DeviceArray:
    """The part ``indices`` of a loaded split in the form ``data.pipeline: gpu`` reads, or why it cannot be.

    Image files must be JPEG or PNG; in-memory splits (MNIST-like ``images``, torchvision
    CIFAR's ``data``) must be uint8 arrays.
    """
    targets = [int(raw.targets[i]) for i in indices]
    samples = getattr(raw, "samples", None)
    if samples is not None:
        chosen = [samples[i] for i in indices]
        other = next((path for path, _ in chosen if Path(path).suffix.lower() not in DECODED_SUFFIXES), None)
        if other is not None:
            raise SmopeError(
                f"data.pipeline=gpu decodes JPEG and PNG files only, but {dataset_name} has {Path(other).suffix} files "
                f"(e.g. {other}); use data.pipeline=cpu (PIL reads them)"
            )
        return EncodedFiles(chosen, raw.classes)
    array = getattr(raw, "images", getattr(raw, "data", None))
    if isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim in (3, 4):
        return DeviceArray(array[indices], targets, raw.classes)
    raise SmopeError(
        f"data.pipeline=gpu reads JPEG/PNG files or in-memory uint8 arrays, and {dataset_name} is neither; use data.pipeline=cpu"
    )
