"""The authors' training protocol: learning-rate rules and classifier alignment's step rule and sampling."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import run
from safetensors.torch import load_file
from torch import nn

from smope.errors import SmopeError
from smope.learners import TaskContext
from smope.learners.alignment import VARIANCE_FLOOR, ClassStatistics, DiagonalStatistics, FullCovarianceStatistics, align_after_task, align_head, class_statistics
from smope.runconfig import load_config
from smope.schedule import lr_multipliers


def _rates(rule: str, base: float, epochs: int, loader_length: int, **kwargs) -> list[float]:
    (multiplier,) = lr_multipliers(rule, [base], epochs, loader_length, floor=1e-6, **kwargs)
    return [base * multiplier(step) for step in range(epochs * loader_length)]


def test_cosine_holds_then_decays_over_the_assumed_epoch_length():
    # ImageNet-R 10 tasks: 40 iterations assumed per epoch, 40 held; a loader of 38 batches.
    rates = _rates("cosine", 0.0025, epochs=20, loader_length=38, iters_per_epoch=40, hold=40)
    assert rates[:40] == pytest.approx([1e-6] * 40)
    span = 40 * 20 - 40
    for step in (40, 41, 300, 700):
        expected = 1e-6 + (0.0025 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - 40) / span))
        assert rates[step] == pytest.approx(expected)
    assert rates[40] == pytest.approx(0.0025)
    assert len(rates) == 760 and rates[-1] < 0.0025 * 0.01  # 760 of the 800 assumed steps: nearly at the floor


def test_cosine_stays_at_the_floor_past_the_assumed_end():
    rates = _rates("cosine", 0.005, epochs=2, loader_length=50, iters_per_epoch=40, hold=0)
    assert rates[80:] == pytest.approx([1e-6] * 20)


def test_a_zero_rate_stays_zero():
    # A frozen group (e.g. method.slca_backbone_lr=0) next to a training one: no division by zero.
    assert _rates("cosine", 0.0, epochs=2, loader_length=5) == [0.0] * 10


def test_step_is_slcas_multistep_decay():
    # SLCA's CIFAR-100 run: 20 epochs, x0.1 from epoch 18 on (torch's MultiStepLR stepped per epoch).
    rates = _rates("step", 0.01, epochs=20, loader_length=3, milestones=[18])
    assert rates[: 18 * 3] == pytest.approx([0.01] * 54) and rates[54:] == pytest.approx([0.001] * 6)
    config = load_config(None, ["train.schedule=step", "train.milestones=[18]"])
    assert (config.train.schedule, config.train.milestones) == ("step", [18])
    with pytest.raises(SmopeError, match="train.milestones is read only by train.schedule=step"):
        load_config(None, ["train.milestones=[18]"])


def test_epoch_cosine_is_cubs_per_epoch_rule():
    epochs, base = 20, 0.005
    rates = _rates("epoch_cosine", base, epochs=epochs, loader_length=7)
    for epoch in range(epochs):
        expected = base * math.cos(99 * math.pi * epoch / (200 * (epochs - 1)))
        assert rates[epoch * 7 : (epoch + 1) * 7] == pytest.approx([expected] * 7)
    assert rates[-1] / base == pytest.approx(math.cos(99 * math.pi / 200))  # 1.6% of the base
    assert rates[-1] / base == pytest.approx(0.0157, abs=1e-3)


def _statistics(covariance: str, seed: int = 0) -> tuple[ClassStatistics, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.3, 1.0]])  # correlated dimensions
    features = torch.cat([torch.randn(400, 3, generator=generator) @ mix.T + c for c in (0.0, 5.0)])
    labels = torch.arange(2).repeat_interleave(400)
    stats = class_statistics(covariance, 2, 3)
    stats.update(features, labels)
    return stats, features


def test_statistics_are_population_variance_and_unbiased_covariance():
    stats, features = _statistics("full")
    diagonal, _ = _statistics("diag")
    rows = features[:400].double()
    assert torch.allclose(stats.mean[0].double(), rows.mean(0), atol=1e-5)
    assert torch.allclose(diagonal.var[0].double(), rows.var(0, unbiased=False), atol=1e-4)
    centred = rows - rows.mean(0)
    assert torch.allclose(stats.cov[0].double(), centred.T @ centred / 399, atol=1e-4)


def test_full_covariance_samples_have_the_given_covariance():
    stats, _ = _statistics("full")
    samples, labels = stats.sample(range(2), 40_000, torch.Generator().manual_seed(1))
    for label in (0, 1):
        drawn = samples[labels == label].double()
        expected = stats.cov[label].double() + VARIANCE_FLOOR * torch.eye(3, dtype=torch.float64)
        assert torch.allclose(torch.cov(drawn.T), expected, atol=0.08 * expected.abs().max().item())
        assert torch.allclose(drawn.mean(0), stats.mean[label].double(), atol=0.05)


def test_diagonal_samples_drop_the_correlations():
    stats, _ = _statistics("diag")
    samples, labels = stats.sample(range(1), 40_000, torch.Generator().manual_seed(1))
    drawn = torch.cov(samples.double().T)
    assert drawn[0, 1].abs() < 0.1 < stats.var[0, 1]  # the true features correlate dims 0 and 1 strongly
    assert torch.allclose(drawn.diagonal(), stats.var[0].double() + VARIANCE_FLOOR, rtol=0.05)


def test_checkpoint_statistics_hold_only_the_last_tasks_classes_and_merge_back():
    stats, features = _statistics("full")
    stats.update(features[400:], torch.ones(400, dtype=torch.int64))  # "task 2" re-estimates class 1
    state = stats.state_dict()
    assert state["class_stats.classes"].tolist() == [1] and state["class_stats.cov"].shape == (1, 3, 3)
    restored = FullCovarianceStatistics(2, 3)
    first = FullCovarianceStatistics(2, 3)
    first.update(features[:400], torch.zeros(400, dtype=torch.int64))
    restored.load_state_dict(first.state_dict())
    restored.load_state_dict(state)
    for label in (0, 1):
        assert torch.equal(restored.cov[label], stats.cov[label]) and torch.equal(restored.mean[label], stats.mean[label])


def test_diagonal_and_full_statistics_keep_the_same_means_counts_and_checkpoint_entries():
    full, _ = _statistics("full")
    diagonal, _ = _statistics("diag")
    assert isinstance(full, FullCovarianceStatistics) and isinstance(diagonal, DiagonalStatistics)
    assert torch.equal(full.mean, diagonal.mean) and torch.equal(full.count, diagonal.count)
    assert torch.allclose(full.cov[1].diagonal() * 399 / 400, diagonal.var[1], rtol=1e-4)  # unbiased vs population
    assert set(full.state_dict()) - {"class_stats.cov"} == set(diagonal.state_dict()) - {"class_stats.var"}


def test_full_statistics_with_a_diagonal_covariance_draw_what_the_diagonal_ones_draw():
    """Both spend the generator's noise in the same order, one class after the other."""
    diagonal, _ = _statistics("diag")
    state = diagonal.state_dict()
    variances = state.pop("class_stats.var")
    full = FullCovarianceStatistics(2, 3)
    full.load_state_dict({**state, "class_stats.cov": torch.diag_embed(variances)})
    drawn, labels = diagonal.sample(range(2), 50, torch.Generator().manual_seed(3))
    drawn_full, labels_full = full.sample(range(2), 50, torch.Generator().manual_seed(3))
    assert torch.equal(labels, labels_full) and torch.allclose(drawn, drawn_full, atol=1e-5)


def test_an_unknown_covariance_is_refused():
    with pytest.raises(ValueError, match="covariance must be 'diag' or 'full', got 'spherical'"):
        class_statistics("spherical", 2, 3)


class _CountingHead(nn.Linear):
    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_alignment_runs_one_batch_per_old_class_each_epoch():
    stats3 = DiagonalStatistics(5, 3)
    stats3.update(torch.randn(50, 3), torch.arange(5).repeat_interleave(10))
    head = _CountingHead(3, 5)
    _CountingHead.calls = 0
    align_head(head, stats3, range(5), epochs=7, lr=1e-3, samples_per_class=16, batch_size=16, seed=0, iterations_per_epoch=3)
    assert _CountingHead.calls == 7 * 3
    _CountingHead.calls = 0
    align_head(head, stats3, range(5), epochs=2, lr=1e-3, samples_per_class=16, batch_size=32, seed=0)
    assert _CountingHead.calls == 2 * math.ceil(5 * 16 / 32)


@pytest.mark.parametrize("steps", ["old_classes", "all_samples"])
def test_a_runs_alignment_follows_its_step_rule(steps):
    """After a task whose classes are 3 and 4, the authors' rule runs 3 batches (old classes) per epoch."""
    stats = DiagonalStatistics(5, 3)
    stats.update(torch.randn(50, 3), torch.arange(5).repeat_interleave(10))
    method = load_config(None, [f"method.align_steps={steps}", "method.align_epochs=4", "method.align_samples_per_class=16"]).method
    ctx = TaskContext(task=1, classes=range(3, 5), seen=range(5), train_data=None, seed=0)
    head = _CountingHead(3, 5)
    _CountingHead.calls = 0
    align_after_task(head, stats, ctx, method, batch_size=8)
    assert _CountingHead.calls == 4 * (3 if steps == "old_classes" else math.ceil(5 * 16 / 8))


def test_full_covariance_checkpoint_holds_the_tasks_own_class_statistics(tmp_path):
    """Each task's checkpoint holds the statistics of its own classes, from which a resume rebuilds them (test_resume.py)."""
    run(tmp_path / "run", "method.align_covariance=full", "train.epochs=1", "method.align_epochs=1")
    stats = load_file(str(tmp_path / "run" / "seed_0" / "task_001.safetensors"))
    assert stats["class_stats.classes"].tolist() == [4, 5, 6] and stats["class_stats.cov"].shape == (3, 64, 64)
