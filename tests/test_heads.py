"""The prompt learners' heads (smope.learners.heads): which one method.head builds, what each does after a task, how each predicts."""

import pytest
import torch
from helpers import tiny_learner

from smope.learners.alignment import DiagonalStatistics
from smope.learners.base import TaskContext
from smope.learners.heads import AlignedLinearHead, RidgeOutputHead

pytestmark = pytest.mark.usefixtures("one_thread")


def _task(learner, task: int) -> tuple[TaskContext, torch.Tensor, torch.Tensor, DiagonalStatistics]:
    """Task ``task`` (classes 2 task and 2 task + 1): its features and labels, and statistics of every class seen."""
    classes = range(2 * task, 2 * task + 2)
    labels = torch.arange(classes.stop).repeat_interleave(20)
    features = torch.randn(len(labels), learner.model.num_features, generator=torch.Generator().manual_seed(task)) + labels[:, None]
    stats = DiagonalStatistics(learner.num_classes, learner.model.num_features)
    stats.update(features, labels)
    new = labels >= classes.start
    return TaskContext(task=task, classes=classes, seen=range(classes.stop), train_data=None, seed=0), features[new], labels[new], stats


def test_method_head_builds_the_aligned_linear_head_or_the_ridge_head():
    linear = tiny_learner("train.epochs=1")
    assert isinstance(linear.output_head, AlignedLinearHead) and linear.output_head.classifier is linear.model.get_classifier()
    assert linear.ridge is None and linear.output_head.state_dict() == {}
    ridge = tiny_learner("train.epochs=1", "method.head=ridge")
    assert isinstance(ridge.output_head, RidgeOutputHead) and ridge.ridge is ridge.output_head.ridge
    assert ridge.ridge.projection.shape == (ridge.model.num_features, 256)  # method.rp_dim of configs/tiny.yaml


@pytest.mark.parametrize("align", [True, False])
def test_the_linear_head_is_realigned_from_the_second_task_only_and_only_with_method_align(align):
    # all_samples: the first task would have alignment steps too (the authors' rule gives it none, as it has no old classes)
    learner = tiny_learner("train.epochs=1", "method.align_epochs=2", "method.align_steps=all_samples", f"method.align={str(align).lower()}")
    classifier = learner.model.get_classifier()
    for task in (0, 1):
        before = classifier.weight.detach().clone()
        learner.output_head.after_task(*_task(learner, task))
        assert torch.equal(classifier.weight, before) == (task == 0 or not align)


def test_the_ridge_head_is_solved_after_every_task_and_predicts_without_the_linear_head():
    learner = tiny_learner("train.epochs=1", "method.head=ridge")
    classifier = learner.model.get_classifier()
    before = classifier.weight.detach().clone()
    for task in (0, 1):
        learner.output_head.after_task(*_task(learner, task))
        assert learner.ridge.weight[:, : 2 * task + 2].abs().sum() > 0  # the task's classes have a solution
    assert torch.equal(classifier.weight, before)  # no alignment
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(learner.logits(images), learner.ridge.logits(learner.eval_features(images)))
    assert set(learner.output_head.state_dict()) == {"ridge.projection", "ridge.targets", "ridge.weight", "ridge.ridge", "ridge.features"}
