"""Image transforms: PIL image -> tensor at the backbone's input size, normalised as configured.

Runs hand uint8 tensors from the loader to the device and convert them there with
:func:`normalize_pixels` (4x fewer bytes through workers, caches and host-to-device copies); the
float conversion is torchvision's own, so the floats are bit-identical to a CPU ``ToDtype`` +
``Normalize`` in the transform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from timm.data import resolve_model_data_config
from torchvision.transforms import InterpolationMode, v2

from smope.errors import SmopeError

__all__ = ["AUGMENTATIONS", "INTERPOLATIONS", "PixelNorm", "backbone_norm", "build_transform", "image_steps", "input_norm", "normalize_pixels"]

AUGMENTATIONS = ("hflip", "random_resized_crop", "color_jitter")
"""Names accepted in ``augment`` (the ``data.augment`` config key)."""


def _check_augment(augment: Iterable[str] | str) -> list[str]:
    """The augmentation names as a list, refusing unknown ones (a lone string counts as one name)."""
    names = [augment] if isinstance(augment, str) else list(augment)
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise SmopeError(f"unknown augmentation(s) {unknown} in data.augment; valid names: {', '.join(AUGMENTATIONS)}")
    return names


INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
"""Names accepted in ``interpolation`` (the ``data.interpolation`` config key)."""


def _interpolation(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise SmopeError(f"unknown data.interpolation {name!r}; valid names: {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def image_steps(
    img_size: int, train: bool, augment: Iterable[str] | str = (), test_resize: int | None = None, interpolation: str = "bicubic"
) -> list[Callable]:
    """The resize, crop and augmentation steps of a split, for PIL images or uint8 tensors on any device.

    Test steps are deterministic: the resize goes straight to ``img_size`` square when
    ``test_resize`` is None; otherwise the shorter side goes to ``test_resize`` and the centre
    ``img_size`` square is kept (the usual Resize(256) + CenterCrop(224) evaluation, which keeps
    the aspect ratio). Train steps add the requested augmentations, in a fixed order whatever
    the order of ``augment``; ``random_resized_crop`` replaces the plain resize since it already
    produces the final size. Names are validated even when ``train`` is false so a typo fails early.
    """
    names = _check_augment(augment)
    mode = _interpolation(interpolation)
    if not train:
        names = []
    size = (img_size, img_size)
    if "random_resized_crop" in names:
        steps: list[Callable] = [v2.RandomResizedCrop(size, interpolation=mode, antialias=True)]
    elif test_resize is not None and not train:
        if test_resize < img_size:
            raise SmopeError(
                f"data.test_resize={test_resize} is smaller than the {img_size} px input it is cropped to; "
                f"set it to at least {img_size}, or to null to resize straight to {img_size}"
            )
        steps = [v2.Resize(test_resize, interpolation=mode, antialias=True), v2.CenterCrop(size)]
    else:
        steps = [v2.Resize(size, interpolation=mode, antialias=True)]
    if "hflip" in names:
        steps.append(v2.RandomHorizontalFlip())
    if "color_jitter" in names:
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    return steps


def build_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train: bool,
    augment: Iterable[str] | str = (),
    test_resize: int | None = None,
    interpolation: str = "bicubic",
    uint8: bool = False,
) -> Callable:
    """The transform for one split: RGB, :func:`image_steps`, tensor, normalisation.

    ``uint8`` stops at the uint8 ``(3, H, W)`` tensor: :func:`normalize_pixels` finishes on the device.
    """
    steps = [v2.RGB(), *image_steps(img_size, train, augment, test_resize, interpolation), v2.ToImage()]
    if not uint8:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


PixelNorm = tuple[tuple[float, ...], tuple[float, ...]]
"""``(mean, std)`` per channel, applied to pixels scaled to [0, 1]."""


def normalize_pixels(images: torch.Tensor, norm: PixelNorm) -> torch.Tensor:
    """uint8 images (any leading dims, ``(..., 3, H, W)``) as normalised float32; float inputs pass unchanged.

    The same torchvision kernels as the CPU transform (``ToDtype(scale=True)``, ``Normalize``),
    elementwise, so a batch on any device gets the floats each image would have got alone.
    """
    if images.dtype != torch.uint8:
        return images
    mean, std = norm
    floats = v2.functional.to_dtype(images, torch.float32, scale=True)  # a new tensor, so normalised in place: one allocation and one pass fewer
    return v2.functional.normalize(floats, list(mean), list(std), inplace=True)


def input_norm(model: torch.nn.Module, normalize: str = "backbone") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` inputs are normalised with: the backbone's own, or none at all.

    ``"none"`` (mean 0, std 1) feeds pixels in [0, 1], which is how the published SMoPE runs
    feed even backbones trained on normalised inputs; matching it matters for their numbers.
    """
    if normalize == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if normalize != "backbone":
        raise SmopeError(f"unknown data.normalize {normalize!r}; valid values: backbone, none")
    return backbone_norm(model)


def backbone_norm(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` the pretrained backbone was trained with, from timm's model config."""
    config = resolve_model_data_config(model)
    return tuple(config["mean"]), tuple(config["std"])
