"""``smope run CONFIG --dry-run``: what a run would do, checked before it spends GPU hours.

Prints the resolved config, each seed's class order and each task's classes and image counts,
from the raw dataset alone: no model is created and no weights are loaded (this module does
not import the learners or backbones), and nothing is downloaded. When the data is absent the
class order still comes out, from the dataset's known class count, with one line saying where
the data was looked for.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .backbones import check_block_settings
from .data import DATASETS, KNOWN_NUM_CLASSES, ClassIncrementalScenario, build_transform, class_order, load_dataset, split_classes
from .data.datasets import DOWNLOAD_HINT
from .errors import SmopeError
from .runconfig import RunConfig, dump_config

__all__ = ["dry_run"]


def _check_transforms(config: RunConfig) -> None:
    """The transforms' own checks (augmentation names, interpolation), without a model.

    The input size is the model's when ``model.img_size`` is null, unknown here, so
    ``data.test_resize`` is then checked against it only at run time.
    """
    data = config.data
    img_size = config.model.img_size or data.test_resize or 1
    for train in (True, False):
        build_transform(img_size, (0.0,) * 3, (1.0,) * 3, train, data.augment, data.test_resize, data.interpolation)


def _count(targets: Sequence[int], per_class: int | None) -> int:
    """Images a run uses out of ``targets``: at most ``per_class`` of each class (data.*_per_class)."""
    return sum(n if per_class is None else min(n, per_class) for n in Counter(targets).values())


def _class_folders(train, test) -> list[str]:
    """For an image folder: each class folder's name and images (train and test), and how many of
    them sit in its sub-folders (read as part of the class), so a misplaced folder shows."""
    if getattr(train, "folders", None) is None:
        return []
    total, nested = Counter(), Counter()
    for part in (train, test):
        for path, label in part.samples:
            total[label] += 1
            nested[label] += Path(path).parent != part.folders[label]
    lines = [f"{len(train.classes)} class folders (hidden and system folders skipped; sub-folders count as their class):"]
    for label, name in enumerate(train.classes):
        lines.append(f"  {name}: {total[label]} images" + (f" ({nested[label]} in sub-folders)" if nested[label] else ""))
    return lines


def dry_run(config: RunConfig) -> str:
    """The dry run's report: the config as YAML, then per seed its class order and its tasks."""
    data = config.data
    _check_transforms(config)
    check_block_settings(config)
    lines = [dump_config(config).rstrip()]
    try:
        train, test = (load_dataset(data.name, data.root, part, download=False, split=data.split) for part in (True, False))
        num_classes = len(train.classes)
    except SmopeError as err:
        if data.name not in DATASETS:
            raise
        train = test = None
        num_classes = KNOWN_NUM_CLASSES.get(data.name)
        relative = data.root is not None and not Path(data.root).expanduser().is_absolute()
        where = f" (data.root is relative to {Path.cwd()})" if relative else ""
        message = str(err)
        if data.download and DOWNLOAD_HINT in message:  # the dry run reads with download off; the run itself would fetch it
            message = message.replace(DOWNLOAD_HINT, "") + "; with data.download=true the run downloads it there"
        lines.append(f"data not loaded, so no image counts (a dry run never downloads): {message}{where}")
        if num_classes is None:
            lines.append(f"{data.name} has no fixed number of classes: the class order needs the data")
            return "\n".join(lines)
    lines.extend(_class_folders(train, test))
    for seed in config.seeds:
        if train is None:
            order, sizes = class_order(num_classes, seed), split_classes(num_classes, data.num_tasks, data.first_task_classes)
            counts = [""] * len(sizes)
        else:
            scenario = ClassIncrementalScenario(train, test, data.num_tasks, seed, data.first_task_classes)
            order, sizes = scenario.class_order, scenario.task_sizes
            counts = [
                f", train {_count(scenario.train_dataset(t).targets, data.train_per_class)}"
                f", test {_count(scenario.test_dataset(t).targets, data.test_per_class)}"
                for t in range(scenario.num_tasks)
            ]
        lines.append(f"seed {seed} class order: {' '.join(map(str, order))}")
        lines.extend(f"task {t + 1}: {size} classes{count}" for t, (size, count) in enumerate(zip(sizes, counts)))
    return "\n".join(lines)
