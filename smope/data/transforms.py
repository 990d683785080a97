"""Image transforms: PIL image -> normalised float tensor at the backbone's input size."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from timm.data import resolve_model_data_config
from torchvision.transforms import InterpolationMode, v2

from smope.errors import SmopeError

__all__ = ["AUGMENTATIONS", "backbone_norm", "build_transform"]

AUGMENTATIONS = ("hflip", "random_resized_crop", "color_jitter")
"""Names accepted in ``augment`` (the ``data.augment`` config key)."""


def _check_augment(augment: Iterable[str] | str) -> list[str]:
    """The augmentation names as a list, refusing unknown ones (a lone string counts as one name)."""
    names = [augment] if isinstance(augment, str) else list(augment)
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise SmopeError(f"unknown augmentation(s) {unknown} in data.augment; valid names: {', '.join(AUGMENTATIONS)}")
    return names


def build_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    augment: Iterable[str] | str = (),
) -> Callable:
    """The transform for one split.

    Test transforms are deterministic: RGB, bicubic resize to ``img_size`` square, normalise.
    Train transforms add the requested augmentations, in a fixed order whatever the order of
    ``augment``; ``random_resized_crop`` replaces the plain resize since it already produces the
    final size. Names are validated even when ``train`` is false so a typo fails early.
    """
    names = _check_augment(augment)
    if not train:
        names = []
    size = (img_size, img_size)
    if "random_resized_crop" in names:
        steps: list[Callable] = [v2.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC, antialias=True)]
    else:
        steps = [v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if "hflip" in names:
        steps.append(v2.RandomHorizontalFlip())
    if "color_jitter" in names:
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    return v2.Compose(
        [
            v2.RGB(),
            *steps,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def backbone_norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` the pretrained backbone was trained with, from timm's model config."""
    config = resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])
