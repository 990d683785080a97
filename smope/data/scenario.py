"""Class-incremental scenarios: a dataset's classes shuffled by the run's seed and cut into tasks.

Labels are remapped so that a class's new label is its position in the shuffled order. Task
``t`` then owns one contiguous label range, which is what prompt methods and classifier heads
that grow task by task want (``logits[:, scenario.seen_classes(t)]`` and the like).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from smope.errors import SmopeError

from .datasets import LabelledDataset

__all__ = ["ClassIncrementalScenario", "RemappedSubset", "class_order", "split_classes"]


def class_order(num_classes: int, seed: int) -> list[int]:
    """The original labels in the order the scenario visits them: a permutation fixed by ``seed``.

    It is what ``order = list(range(num_classes)); random.seed(seed); random.shuffle(order)``
    gives, the rule of the published prompt-based continual-learning runs, so seed ``s`` cuts
    the same tasks as their seed ``s`` (given the same label indices, e.g. torchvision's
    CIFAR-100 fine labels). A private generator leaves Python's global ``random`` state alone.
    """
    order = list(range(num_classes))
    random.Random(seed).shuffle(order)
    return order


def split_classes(num_classes: int, num_tasks: int, first_task_classes: int | None = None) -> list[int]:
    """Number of classes in each task.

    The first task gets ``first_task_classes`` if given (a common "big base task" protocol);
    the remaining classes are spread as evenly as possible over the remaining tasks, the first
    of them taking one extra class each when the division is not exact.
    """
    if num_tasks < 1 or num_tasks > num_classes:
        raise SmopeError(f"data.num_tasks={num_tasks} must be between 1 and the dataset's {num_classes} classes")
    if first_task_classes is None:
        head, rest_tasks, rest_classes = [], num_tasks, num_classes
    else:
        rest_tasks, rest_classes = num_tasks - 1, num_classes - first_task_classes
        if first_task_classes < 1 or rest_classes < rest_tasks or (rest_tasks == 0 and rest_classes > 0):
            raise SmopeError(
                f"data.first_task_classes={first_task_classes} does not fit {num_classes} classes in "
                f"data.num_tasks={num_tasks} tasks: it must leave at least one class for each of the other "
                f"{rest_tasks} task(s) (and equal {num_classes} when data.num_tasks=1); change either key"
            )
        head = [first_task_classes]
    base, extra = divmod(rest_classes, rest_tasks) if rest_tasks else (0, 0)
    return head + [base + 1] * extra + [base] * (rest_tasks - extra)


class RemappedSubset(Dataset):
    """Some samples of a dataset, relabelled and transformed: ``(transform(image), new label)``.

    Holds indices into the source dataset rather than copies, like ``torch.utils.data.Subset``,
    and exposes ``targets`` (the new labels) so samplers and caches need not decode images.
    """

    def __init__(
        self,
        dataset: LabelledDataset,
        indices: Sequence[int],
        targets: Sequence[int],
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, _ = self.dataset[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ClassIncrementalScenario:
    """A train and a test dataset cut into ``num_tasks`` tasks of disjoint classes.

    ``seed`` fixes the class order (so different seeds give different scenarios); the order of
    samples inside a task is the source dataset's, hence deterministic.
    """

    def __init__(
        self,
        train: LabelledDataset,
        test: LabelledDataset,
        num_tasks: int,
        seed: int,
        first_task_classes: int | None = None,
        train_transform: Callable[[Any], Any] | None = None,
        test_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if list(train.classes) != list(test.classes):
            raise SmopeError("the train and test splits name different classes; check data.root and data.name")
        self.num_classes = len(train.classes)
        self.class_order = class_order(self.num_classes, seed)
        self.class_names = [train.classes[old] for old in self.class_order]
        self.task_sizes = split_classes(self.num_classes, num_tasks, first_task_classes)
        self._task_ends = list(accumulate(self.task_sizes))
        self._train, self._test = train, test
        self.train_transform, self.test_transform = train_transform, test_transform
        new_label = np.empty(self.num_classes, dtype=np.int64)
        new_label[self.class_order] = np.arange(self.num_classes)
        self._train_targets = self._remap(train, new_label)
        self._test_targets = self._remap(test, new_label)

    @staticmethod
    def _remap(dataset: LabelledDataset, new_label: np.ndarray) -> np.ndarray:
        """The dataset's labels in the shuffled numbering, after checking they are in range."""
        targets = np.asarray(dataset.targets, dtype=np.int64)
        if targets.size and (targets.min() < 0 or targets.max() >= len(new_label)):
            found = f"{targets.min()}..{targets.max()}"
            raise SmopeError(f"dataset labels must lie in 0..{len(new_label) - 1}, found {found}; check the dataset")
        return new_label[targets]

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    def task_classes(self, task: int) -> range:
        """The new labels owned by ``task``."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} out of range 0..{self.num_tasks - 1}")
        return range(self._task_ends[task] - self.task_sizes[task], self._task_ends[task])

    task_range = task_classes

    def seen_classes(self, task: int) -> range:
        """The new labels of tasks ``0..task``: what the model must tell apart after learning ``task``."""
        return range(0, self.task_classes(task).stop)

    def _subset(self, train: bool, labels: range) -> RemappedSubset:
        targets = self._train_targets if train else self._test_targets
        indices = np.flatnonzero((targets >= labels.start) & (targets < labels.stop))
        return RemappedSubset(
            self._train if train else self._test,
            indices,
            targets[indices],
            self.train_transform if train else self.test_transform,
        )

    def train_dataset(self, task: int) -> RemappedSubset:
        """Training samples of ``task`` only (what a continual learner is shown)."""
        return self._subset(True, self.task_classes(task))

    def test_dataset(self, task: int) -> RemappedSubset:
        """Test samples of ``task`` only, for per-task accuracy matrices."""
        return self._subset(False, self.task_classes(task))

    def test_dataset_upto(self, task: int) -> RemappedSubset:
        """Test samples of every task seen so far, for the average accuracy after ``task``."""
        return self._subset(False, self.seen_classes(task))

    def all_train_dataset(self) -> RemappedSubset:
        """Every training sample, for the joint-training upper bound."""
        return self._subset(True, range(self.num_classes))
