"""hide-prompt and norga: per-sample prompts (batch-invariant predictions), task-identity records, NoRGa's gates, refusals."""

from pathlib import Path

import pytest
import torch
from helpers import TINY, read_metrics, run_method, tiny_config

from smope import SmopeError, cli
from smope.checkpoint import load_checkpoint
from smope.cost import method_flops
from smope.experiment import SeedRun
from smope.learners.hide_prompt import GATES, CentroidStatistics, HiDePromptPool
from smope.rundir import RunDir
from smope.methods import NORGA_GATES
from smope.runconfig import load_config

METHODS = ("hide-prompt", "norga")
TWO_TASKS = ["data.num_tasks=2", "data.first_task_classes=5", "train.epochs=2"]


@pytest.fixture(scope="module", params=METHODS)
def two_task_run(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / "run"
    run_method(out, request.param, *TWO_TASKS)
    return request.param, out


def restored(out: Path) -> SeedRun:
    config = RunDir(out).config()
    seed_run = SeedRun(config, config.seeds[0], out)
    seed_run.build()
    seed_run.restore(config.data.num_tasks - 1)
    return seed_run


def test_predictions_do_not_depend_on_the_test_batch(two_task_run):
    """Batch 1 vs one batch mixing both tasks' images: the same prompt per image, the same predictions."""
    _, out = two_task_run
    seed_run = restored(out)
    learner = seed_run.learner
    images = torch.stack([image for image, _ in seed_run.scenario.test_dataset_upto(1)])
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]  # tasks interleaved
    together = learner.logits(images).argmax(-1)
    chosen = learner.model.pool.last_choice.clone()
    assert len(chosen.unique()) == 2  # the batch really mixes prompts (else this test could not fail)
    alone, alone_chosen = [], []
    for image in images:
        alone.append(learner.logits(image[None]).argmax(-1))
        alone_chosen.append(learner.model.pool.last_choice)
    assert torch.equal(torch.cat(alone_chosen), chosen)
    assert torch.equal(torch.cat(alone), together)


def test_each_image_gets_the_prompt_of_its_own_choice():
    """The prefix of image b is the prompt of the task b chose, both halves (the release mixes halves across the batch)."""
    pool = HiDePromptPool([0, 1], pool_size=3, length=4, width=8, query_dim=6, num_classes=6, momentum=0.01).eval()
    for task in range(3):
        pool.add_classes(task, range(2 * task, 2 * task + 2))
    query = torch.randn(5, 6)
    prefixes, _ = pool(query, 5)
    for b, task in enumerate(pool.last_choice.tolist()):
        for i, layer in enumerate(pool.layers):
            keys, values = prefixes[layer]
            assert torch.equal(keys[b], pool.prompts[i, task, :2]) and torch.equal(values[b], pool.prompts[i, task, 2:])


def test_task_identity_accuracy_is_recorded_and_reported(two_task_run):
    method, out = two_task_run
    metrics = read_metrics(out)
    choice = metrics["prompt_choice"]
    counts = choice["per_seed"][0]["choice_counts"]
    test_sizes = restored(out).test_sizes()[:2]
    assert [sum(row) for row in counts] == test_sizes  # every test image chose one task's prompt
    assert choice["task_identity_accuracy"] == pytest.approx([100 * counts[t][t] / test_sizes[t] for t in range(2)], abs=1e-3)
    cli.main(["report", str(out)])
    summary = (out / "report" / "summary.md").read_text()
    assert "## Prompt choice" in summary and f"| mean | {choice['task_identity_accuracy_mean']:.2f} |" in summary


def test_norga_trains_its_gates_on_the_first_task_only(tmp_path):
    out = tmp_path / "run"
    run_method(out, "norga", "train.epochs=2")
    states = [load_checkpoint(out / "seed_0" / f"task_{t:03d}.safetensors")[0] for t in range(3)]
    gates = sorted(k for k in states[0] if k.endswith("gate_scale"))
    assert len(gates) == 2  # one (tau, alpha) per prompted block
    assert all(not torch.equal(states[0][k], torch.ones(2)) for k in gates)  # trained on task 1
    assert all(torch.equal(states[0][k], states[2][k]) for k in gates)  # frozen afterwards
    prompts = [s["pool.prompts"] for s in states]
    assert not torch.equal(prompts[1][:, 2], prompts[2][:, 2])  # task 3's prompt trained
    assert torch.equal(prompts[1][:, :2], prompts[2][:, :2])  # earlier tasks' prompts never change


def test_a_task_starts_from_the_previous_prompt():
    pool = HiDePromptPool([0], pool_size=3, length=2, width=4, query_dim=4, num_classes=6, momentum=0.5)
    pool.begin_task(1)
    assert torch.equal(pool.prompts[:, 1], pool.prompts[:, 0])
    with torch.no_grad():
        pool.prompts[:, 1] += 1
    pool.train()
    expected = 0.5 * pool.prompts[:, 1] + 0.5 * pool.prompts[:, 0]
    assert torch.allclose(pool.current_prompt(), expected)
    pool.store_momentum()
    assert torch.allclose(pool.prompts[:, 1], expected)


def test_centroid_statistics_sample_their_clusters_and_survive_a_checkpoint():
    features = torch.cat([torch.randn(30, 3) + 10, torch.randn(30, 3) - 10])
    labels = torch.tensor([0] * 30 + [1] * 30)
    stats = CentroidStatistics(num_classes=3, dim=3, centroids=4)
    stats.update(features, labels)
    sampled, sampled_labels = stats.sample(range(2), per_class=5, generator=torch.Generator().manual_seed(0))
    assert len(sampled) == 5 * int((stats.var[:2].mean(-1) > 0).sum())
    assert (sampled[sampled_labels == 0].mean(0) > 5).all() and (sampled[sampled_labels == 1].mean(0) < -5).all()
    copy = CentroidStatistics(num_classes=3, dim=3, centroids=4)
    copy.load_state_dict(stats.state_dict("s."), "s.")
    assert torch.equal(copy.mean, stats.mean) and torch.equal(copy.count, stats.count)


@pytest.mark.parametrize("method", METHODS)
def test_training_runs_one_pass_and_inference_two(method):
    """The paper's cost table: training needs no task-identity pass (the task is known), inference does."""
    flops = method_flops(tiny_config(method), 10)
    ratio = flops.inference.without_attention / flops.training.without_attention
    assert 1.9 < ratio < 2.2


def test_every_named_gate_exists():
    assert tuple(GATES) == NORGA_GATES


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.norga_gate=softmax", "method.norga_gate' must be one of sigmoid"),
        ("method.hide_statistics=kmeans", "method.hide_statistics' must be one of centroids"),
        ("method.pool_size=2", "pool_size'=2 must be at least data.num_tasks=3"),
        ("method.hide_prompt_momentum=1.0", "hide_prompt_momentum' must be in"),
    ],
)
def test_settings_the_methods_cannot_honour_are_refused_at_load(override, message):
    method = "hide-prompt" if "norga" not in override else "norga"
    with pytest.raises(SmopeError, match=message):
        load_config(TINY, [f"method.name={method}", override])


def test_prompt_blocks_outside_the_backbone_are_refused():
    with pytest.raises(SmopeError, match="prompt_layers' must list distinct block indices in \\[0, 1\\]"):
        from smope.learners import create_learner

        create_learner(tiny_config("hide-prompt", "method.prompt_layers=[0, 4]"), 10)
