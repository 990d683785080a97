"""Generated image folders for benchmarks and checks that must run without any dataset or network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["photo", "write_image_folder"]


def photo(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth random RGB image of ``size`` (width, height): decodes and compresses like a photo, unlike noise."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


def write_image_folder(root: Path, classes: int, per_class: int, size: tuple[int, int] = (500, 375), ext: str = ".jpg", first_seed: int = 0) -> Path:
    """``root/class<c>/<i><ext>``: ``per_class`` generated images for each of ``classes`` classes (JPEG quality 90)."""
    for c in range(classes):
        folder = Path(root) / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(first_seed + 1000 * c + i, size).save(folder / f"{i}{ext}", quality=90)
    return Path(root)
