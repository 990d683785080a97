"""RanPAC, APER, SLCA, SimpleCIL and the ridge head: they run, resume exactly, and the ridge head forgets nothing."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smope import cli, experiment
from smope.cost import method_flops
from smope.learners.ridge import RIDGE_GRID, RidgeHead, ridge_validation_losses
from smope.runconfig import load_config

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")

NEW_METHODS = {
    "ranpac": ["method.name=ranpac"],
    "ranpac-frozen": ["method.name=ranpac", "method.first_task_adapt=false"],
    "aper": ["method.name=aper"],
    # Logit normalisation off: at this size (3-4 classes a task, 2 alignment epochs) it leaves the head
    # near chance; test_slca_alignment_is_the_releases_step checks that path.
    "slca": ["method.name=slca", "method.slca_align_epochs=2", "method.slca_logit_norm=0"],
    "simplecil": ["method.name=simplecil"],
    "aligned-head": ["method.name=aligned-head", "method.align_epochs=2"],
    "smope-ridge": ["method.name=smope", "method.head=ridge"],
    "dense-prompt-ridge": ["method.name=dense-prompt", "method.head=ridge"],
}


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# dense-prompt's ridge head takes smope's code path (PromptLearner): slow, to keep the default suite short.
VARIANTS = [pytest.param(v, marks=pytest.mark.slow) if v == "dense-prompt-ridge" else v for v in sorted(NEW_METHODS)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_new_method_runs_and_resumes_after_an_interruption_to_the_same_metrics(variant, tmp_path, monkeypatch):
    overrides = ["train.lr=0.01", "train.epochs=4", *NEW_METHODS[variant]]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cli.main(["run", TINY, f"output_dir={whole}", *overrides])
    assert metrics(whole)["final_average_accuracy"] > 15.0  # chance is 10% over the 10 digits

    real_evaluate = experiment.evaluate

    def interrupt_at_third_task(learner, scenario, task, progress, *hooks):
        if task == 2:
            raise KeyboardInterrupt
        return real_evaluate(learner, scenario, task, progress, *hooks)

    monkeypatch.setattr(experiment, "evaluate", interrupt_at_third_task)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={resumed}", *overrides])
    assert stopped.value.code == 130
    assert sorted(p.name for p in (resumed / "seed_0").iterdir()) == ["task_000.safetensors", "task_001.safetensors"]
    monkeypatch.setattr(experiment, "evaluate", real_evaluate)
    cli.main(["run", TINY, f"output_dir={resumed}", *overrides])
    assert metrics(resumed)["per_seed"] == metrics(whole)["per_seed"]


def test_ridge_checkpoints_hold_features_not_the_gram_matrix_and_a_resume_rebuilds_it_exactly():
    generator = torch.Generator().manual_seed(0)
    dim, classes, rp_dim = 12, 6, 40
    tasks = [(torch.randn(50, dim, generator=generator) + c, torch.full((50,), c)) for c in range(classes)]
    whole = RidgeHead(dim, classes, rp_dim, torch.Generator().manual_seed(1))
    states, grams = [], []
    for task, (features, labels) in enumerate(tasks):
        whole.update(features, labels, seed=task)
        states.append({k: v.clone() for k, v in whole.state_dict().items()})
        grams.append(whole.gram.clone())
    assert all("ridge.gram" not in state and state["ridge.features"].shape == (50, dim) for state in states)

    resumed = RidgeHead(dim, classes, rp_dim, torch.Generator().manual_seed(2))  # the projection comes from the checkpoint
    for state in states[:3]:
        resumed.load_state_dict(state)
    assert resumed.gram is None and torch.equal(resumed.weight, states[2]["ridge.weight"])  # evaluating needs no G
    for task in range(3, classes):
        resumed.update(*tasks[task], seed=task)
    assert torch.equal(resumed.gram, whole.gram) and torch.equal(resumed.weight, whole.weight)

    legacy = {k: v for k, v in states[2].items() if k != "ridge.features"} | {"ridge.gram": grams[2]}  # older checkpoints held G
    old = RidgeHead(dim, classes, rp_dim)
    old.load_state_dict(legacy)
    for task in range(3, classes):
        old.update(*tasks[task], seed=task)
    assert torch.equal(old.gram, whole.gram) and torch.equal(old.weight, whole.weight)


def test_ridge_head_fitted_task_by_task_is_the_ridge_solution_on_all_tasks_at_once():
    generator = torch.Generator().manual_seed(0)
    dim, classes, rp_dim = 12, 6, 40
    head = RidgeHead(dim, classes, rp_dim, generator)
    tasks = [(torch.randn(50, dim, generator=generator) + c, torch.full((50,), c)) for c in range(classes)]
    chosen = []
    for task, (features, labels) in enumerate(tasks):
        head.update(features, labels, seed=task)
        chosen.append(float(head.ridge))
    assert all(ridge in RIDGE_GRID for ridge in chosen)
    features = torch.cat([f for f, _ in tasks]).double()
    labels = torch.cat([y for _, y in tasks])
    lifted = head.lift(features.float()).double()
    at_once = torch.linalg.solve(lifted.T @ lifted + chosen[-1] * torch.eye(rp_dim, dtype=torch.float64), lifted.T @ torch.eye(classes, dtype=torch.float64)[labels])
    torch.testing.assert_close(head.weight.double(), at_once, rtol=1e-4, atol=1e-5)
    # No forgetting in the head: the first task's training images are still classified by it.
    first_features, first_labels = tasks[0]
    assert (head.logits(first_features).argmax(-1) == first_labels).float().mean() > 0.9


def test_lambda_is_the_grid_value_with_the_smallest_held_out_error():
    generator = torch.Generator().manual_seed(1)
    h, w = torch.randn(60, 30, generator=generator).relu(), torch.randn(30, 4, generator=generator)
    y = h @ w + 3.0 * torch.randn(60, 4, generator=generator)  # noisy: neither end of the grid wins
    fit, val = slice(0, 48), slice(48, 60)
    losses = ridge_validation_losses(h[fit], y[fit], h[val], y[val])
    brute = []
    for ridge in RIDGE_GRID:  # the definition, one linear system per lambda
        weight = torch.linalg.solve(h[fit].T.double() @ h[fit].double() + ridge * torch.eye(30, dtype=torch.float64), h[fit].T.double() @ y[fit].double())
        brute.append(float((h[val].double() @ weight - y[val]).pow(2).mean()))
    torch.testing.assert_close(losses, torch.tensor(brute, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert 0 < int(losses.argmin()) < len(RIDGE_GRID) - 1


def test_bad_head_is_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "method.head=mlp"])
    assert stopped.value.code == 2
    assert "config key 'method.head' must be one of linear, ridge" in capsys.readouterr().err


def test_flops_count_the_random_projection_and_the_second_backbone_pass():
    config = lambda method, *more: load_config(TINY, [f"method.name={method}", "train.device=cpu", *more])  # noqa: E731
    dense = method_flops(config("dense-prompt"), 10).inference.total
    prototype = method_flops(config("prototype"), 10).inference.total
    dim, rp_dim, classes = 64, 256, 10  # configs/tiny.yaml
    head = 2 * dim * classes  # a linear head, and equally the cosine scores against the class means
    ridge = 2 * (dim * rp_dim + rp_dim * classes)
    assert method_flops(config("ranpac"), 10).inference.total == dense - head + ridge
    assert method_flops(config("dense-prompt", "method.head=ridge"), 10).inference.total == dense - head + ridge
    assert method_flops(config("ranpac", "method.first_task_adapt=false"), 10).inference.total == prototype - head + ridge
    # The frozen pass and the adapted pass, then cosine scores on the feature of twice the width.
    assert method_flops(config("aper"), 10).inference.total == (prototype - head) + (dense - head) + 2 * head


def test_slca_with_a_zero_backbone_rate_trains_the_head_only(tmp_path):
    out = tmp_path / "frozen"
    cli.main(["run", TINY, f"output_dir={out}", "train.epochs=1", "method.name=slca", "method.slca_backbone_lr=0", "method.slca_align_epochs=1"])
    run = metrics(out)
    assert run["parameters"]["trainable"] == run["parameters"]["head"] > 0  # no backbone weight is trained or saved
    saved = load_file(out / "seed_0" / "task_001.safetensors")
    assert not any(name.startswith("blocks.") for name in saved) and any(name.startswith("class_stats.") for name in saved)


def test_negative_slca_backbone_rate_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path}", "method.name=slca", "method.slca_backbone_lr=-1e-4"])
    assert stopped.value.code == 2
    assert "method.slca_backbone_lr' must be >= 0" in capsys.readouterr().err


def test_slca_alignment_is_the_releases_step():
    from smope.learners.alignment import ClassStatistics
    from smope.learners.slca import slca_align

    generator = torch.Generator().manual_seed(0)
    stats = ClassStatistics(6, 4, "full")
    stats.update(torch.randn(600, 4, generator=generator) + (torch.arange(6).repeat_interleave(100).unsqueeze(1) + 1) * 10.0, torch.arange(6).repeat_interleave(100))
    head = torch.nn.Linear(4, 6)
    tasks = (range(0, 2), range(2, 4), range(4, 6))
    seen = {}

    class Recorder:  # stands in for the Trainer: keeps what the step loop would run
        def optimize(self, groups, optimizer, multipliers, epochs, steps_per_epoch, batches, loss_fn, description):
            seen.update(optimizer=optimizer, rates=[multipliers[0](s) for s in range(epochs * steps_per_epoch)], steps=steps_per_epoch)
            seen["batches"] = list(batches(0))
            seen["loss"] = loss_fn(*seen["batches"][0])

    slca_align(head, stats, tasks, epochs=5, lr=0.01, samples_per_class=400, logit_norm=0.1, seed=0, trainer=Recorder())
    assert isinstance(seen["optimizer"], torch.optim.SGD) and seen["optimizer"].defaults["momentum"] == 0.9
    assert seen["steps"] == 6 and all(len(labels) == 400 for _, labels in seen["batches"])  # one pass, a batch per class
    expected = [0.5 * (1 + math.cos(math.pi * epoch / 5)) for epoch in range(5)]  # cosine over epochs, flat within one
    assert seen["rates"] == pytest.approx([rate for rate in expected for _ in range(6)])
    features = torch.cat([f for f, _ in seen["batches"]])
    labels = torch.cat([y for _, y in seen["batches"]])
    for label, scale in ((0, 0.9 + 0.1 / 3), (2, 0.9 + 0.2 / 3), (5, 1.0)):  # oldest task's means shrink the most
        assert torch.allclose(features[labels == label].mean(0), scale * stats.mean[label], atol=0.2)
    x, y = seen["batches"][0]
    logits = head(x).detach()
    norms = torch.stack([logits[:, t.start : t.stop].norm(dim=-1) + 1e-7 for t in tasks], -1).mean(-1, keepdim=True)
    assert seen["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits / norms / 0.1, y).item(), rel=1e-5)


def test_aligned_head_is_head_only_plus_the_alignment(tmp_path):
    def accuracy(method: str, *extra: str) -> list[list[float]]:
        out = tmp_path / "-".join((method, *extra))
        cli.main(["run", TINY, f"output_dir={out}", "train.epochs=2", f"method.name={method}", *extra])
        return metrics(out)["accuracy_matrix"]

    head_only, aligned = accuracy("head-only"), accuracy("aligned-head", "method.align_epochs=2")
    assert aligned[0] == head_only[0] and aligned[1:] != head_only[1:]  # the same first task; aligned from the second on
    assert accuracy("aligned-head", "method.align=false") == head_only  # without the alignment it is head-only exactly
