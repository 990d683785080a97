"""Datasets, class-incremental scenarios, transforms and a tensor cache."""

from .cache import cache_dataset
from .datasets import (
    DATASETS,
    FASHION_MNIST_DEBIAN_DIR,
    IMAGENET_R_SPLIT_FILE,
    KNOWN_NUM_CLASSES,
    SPLIT_SEED,
    ArrayDataset,
    FileDataset,
    LabelledDataset,
    load_dataset,
    split_per_class,
)
from .scenario import ClassIncrementalScenario, RemappedSubset, class_order, split_classes
from .transforms import AUGMENTATIONS, INTERPOLATIONS, PixelNorm, backbone_norm, build_transform, input_norm, normalize_pixels

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGENET_R_SPLIT_FILE",
    "INTERPOLATIONS",
    "KNOWN_NUM_CLASSES",
    "SPLIT_SEED",
    "ArrayDataset",
    "ClassIncrementalScenario",
    "FileDataset",
    "LabelledDataset",
    "PixelNorm",
    "RemappedSubset",
    "backbone_norm",
    "build_transform",
    "cache_dataset",
    "class_order",
    "input_norm",
    "load_dataset",
    "normalize_pixels",
    "split_classes",
    "split_per_class",
]
