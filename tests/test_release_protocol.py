"""The SMoPE release's remaining protocol details, each an option: scheduler lag, drop_last, after-task routing, head init."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT, TINY, tiny_learner
from torch.utils.data import TensorDataset

from smope.backbones import create_backbone
from smope.cli import main
from smope.errors import SmopeError
from smope.learners import TaskContext
from smope.learners.alignment import RELEASE_ALIGN_START, DiagonalStatistics, align_head
from smope.learners.smope_learner import after_task_noise
from smope.model import expert_usage, prompted_layers
from smope.runconfig import ModelConfig, load_config
from smope.schedule import lr_multipliers
from smope.trainer import Trainer

PAPER = ["cifar100_10tasks", "cub200_10tasks", "imagenet-r_5tasks", "imagenet-r_10tasks", "imagenet-r_20tasks"]


def rates(rule: str, lag: bool, epochs: int, loader_length: int, **kwargs) -> list[float]:
    (multiplier,) = lr_multipliers(rule, [0.005], epochs, loader_length, floor=1e-6, lag=lag, **kwargs)
    return [0.005 * multiplier(step) for step in range(epochs * loader_length)]


def test_lagged_cosine_runs_update_0_at_the_base_and_update_k_at_step_k_minus_1():
    plain = rates("cosine", False, 20, 39, iters_per_epoch=40, hold=80)
    lagged = rates("cosine", True, 20, 39, iters_per_epoch=40, hold=80)
    assert lagged[0] == pytest.approx(0.005)  # the release's first update, before its schedule exists
    assert lagged[1:] == pytest.approx(plain[:-1])
    assert lagged[81] == pytest.approx(0.005) and plain[80] == pytest.approx(0.005)  # the cosine starts one update later


def test_lagged_epoch_cosine_is_one_epoch_late():
    """CUB-200: epochs 0 and 1 at the base rate, the last of 20 at 9.7% of it (not 1.6%)."""
    per_epoch = [rates("epoch_cosine", lag, 20, 5)[::5] for lag in (False, True)]
    plain, lagged = (torch.tensor(r) / 0.005 for r in per_epoch)
    assert lagged[0] == lagged[1] == pytest.approx(1.0)
    assert lagged[1:].tolist() == pytest.approx(plain[:-1].tolist())
    assert float(plain[-1]) == pytest.approx(math.cos(99 * math.pi / 200), abs=1e-9)  # 1.6%
    assert float(lagged[-1]) == pytest.approx(math.cos(99 * math.pi * 18 / (200 * 19)))
    assert 0.096 < float(lagged[-1]) < 0.098


def test_lagged_alignment_takes_its_first_step_at_ten_times_its_rate(monkeypatch):
    seen: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    stats = DiagonalStatistics(4, 3)
    stats.update(torch.randn(40, 3), torch.arange(4).repeat_interleave(10))
    for lag in (False, True):
        seen.clear()
        align_head(torch.nn.Linear(3, 4), stats, range(4), epochs=2, lr=1e-5, samples_per_class=8, batch_size=8, seed=0, lag=lag)
        first, rest = seen[0], seen[1:]
        if lag:
            assert first == pytest.approx(RELEASE_ALIGN_START * 1e-5) and rest[0] == pytest.approx(1e-5)
        else:
            assert first == pytest.approx(1e-5) and rest[0] < 1e-5



def images(n: int) -> TensorDataset:
    return TensorDataset(torch.rand(n, 3, 16, 16), torch.arange(n) % 4)


@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_also_drops_in_the_usage_pass(drop_last):
    learner = tiny_learner(f"train.drop_last={str(drop_last).lower()}", "train.batch_size=32")
    assert len(learner.trainer.loader(images(70), 32, shuffle=True)) == (2 if drop_last else 3)
    assert len(learner.trainer.loader(images(70), 32, shuffle=False)) == 3  # evaluation batches are never dropped
    learner.usage_pass(TaskContext(task=0, classes=range(4), seen=range(4), train_data=images(70), seed=0))
    counted = expert_usage(learner.model).sum(-1) / learner.config.method.top_k  # images per layer and head
    assert bool((counted == (64 if drop_last else 70)).all())


def test_drop_last_that_leaves_no_batch_is_refused():
    learner = tiny_learner("train.drop_last=true", "train.batch_size=32")
    with pytest.raises(SmopeError, match="train.drop_last leaves no batch"):
        learner.trainer.fit([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], images(10), 1, None, 0, "task 1")


def test_after_task_passes_route_with_their_own_noise(monkeypatch):
    learner = tiny_learner("method.eval_noise=0", "method.after_task_eval_noise=2.0", "method.align=false")
    noise_in: list[float] = []
    real_features = Trainer.features_and_labels

    def features_and_labels(self, model, data, forward):
        noise_in.append(prompted_layers(model)[0].eval_noise)
        return real_features(self, model, data, forward)

    monkeypatch.setattr(Trainer, "features_and_labels", features_and_labels)
    ctx = TaskContext(task=0, classes=range(4), seen=range(4), train_data=images(20), seed=0)
    learner.usage_pass(ctx)
    learner.after_task(ctx)
    assert noise_in == [2.0, 2.0]  # the usage pass and the statistics pass
    assert {layer.eval_noise for layer in prompted_layers(learner.model)} == {0.0}  # the test evaluation's
    with after_task_noise(learner.model, 0.5):
        assert {layer.eval_noise for layer in prompted_layers(learner.model)} == {0.5}
    with after_task_noise(learner.model, None):  # null: method.eval_noise
        assert {layer.eval_noise for layer in prompted_layers(learner.model)} == {0.0}
    assert {layer.eval_noise for layer in prompted_layers(learner.model)} == {0.0}


@pytest.mark.parametrize("head_init", ["timm", "torch"])
def test_head_init(head_init):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(name="vit_tiny_patch16_224", weights="none", img_size=16, kwargs={"patch_size": 4, "embed_dim": 64, "depth": 1, "num_heads": 4}, head_init=head_init), 10)
    head = model.get_classifier()
    if head_init == "torch":  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1 / math.sqrt(64)
        assert head.bias.abs().max() > 0 and head.weight.abs().max() <= bound and head.weight.abs().max() > 0.9 * bound
    else:  # timm's ViT: truncated normal weight, zero bias
        assert not head.bias.any()


def test_per_task_pool_smaller_than_the_tasks_is_refused_at_load(capsys):
    with pytest.raises(SmopeError, match=r"'method.pool_size'=4 must be at least data.num_tasks=5 for coda-prompt"):
        load_config(None, ["method.name=coda-prompt", "method.pool_size=4", "data.num_tasks=5"])
    with pytest.raises(SystemExit) as stopped:
        main(["run", TINY, "--dry-run", "method.name=dualprompt", "data.num_tasks=20"])  # published pool: 10
    assert stopped.value.code == 2 and "must be at least data.num_tasks=20 for dualprompt" in capsys.readouterr().err
    load_config(None, ["method.name=vq-prompt", "data.num_tasks=20"])  # VQ-Prompt's pool is shared, not per task
    with pytest.raises(SmopeError, match="'method.vq_temperature' must be > 0"):
        load_config(None, ["method.name=vq-prompt", "method.vq_temperature=0"])


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_take_the_releases_behaviour(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (config.train.schedule_lag, config.train.drop_last, config.model.head_init) == (True, True, "torch")
    assert (config.method.eval_noise, config.method.after_task_eval_noise) == (0.0, 2.0)


def test_defaults_keep_smopes_own_behaviour():
    config = load_config(None)
    assert (config.train.schedule_lag, config.train.drop_last, config.model.head_init, config.method.after_task_eval_noise) == (False, False, "timm", None)
