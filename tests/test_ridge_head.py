"""The ridge head (RanPAC's, and method.head=ridge): its checkpoints, the ridge solution, the choice of lambda, a bad head."""

import pytest
import torch
from helpers import TINY

from smope import cli
from smope.learners.ridge import RIDGE_GRID, RidgeHead, ridge_validation_losses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ridge_checkpoints_hold_features_not_the_gram_matrix_and_a_resume_rebuilds_it_exactly():
    generator = torch.Generator().manual_seed(0)
    dim, classes, rp_dim = 12, 6, 40
    tasks = [(torch.randn(50, dim, generator=generator) + c, torch.full((50,), c)) for c in range(classes)]
    whole = RidgeHead(dim, classes, rp_dim, torch.Generator().manual_seed(1))
    states = []
    for task, (features, labels) in enumerate(tasks):
        whole.update(features, labels, seed=task)
        states.append({k: v.clone() for k, v in whole.state_dict().items()})
    assert all("ridge.gram" not in state and state["ridge.features"].shape == (50, dim) for state in states)

    resumed = RidgeHead(dim, classes, rp_dim, torch.Generator().manual_seed(2))  # the projection comes from the checkpoint
    for state in states[:3]:
        resumed.load_state_dict(state)
    assert resumed.gram is None and torch.equal(resumed.weight, states[2]["ridge.weight"])  # evaluating needs no G
    for task in range(3, classes):
        resumed.update(*tasks[task], seed=task)
    assert torch.equal(resumed.gram, whole.gram) and torch.equal(resumed.weight, whole.weight)


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


