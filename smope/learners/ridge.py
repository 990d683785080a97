"""The random-projection ridge head of RanPAC (McDonnell et al., NeurIPS 2023), shared by ``ranpac``
and by the prompt learners' ``method.head: ridge``.

A feature x (d) is lifted to h = ReLU(x W) with a fixed Gaussian W (d x M); the head is the ridge
regression of one-hot labels on h, W_out = (G + lambda I)^-1 C, from the statistics
G = sum h h^T (M x M) and C = sum h y^T (M x classes). Both are sums over training samples, so
adding each task's data as it comes gives exactly the ridge solution on every task's data at
once: the head cannot forget. lambda is re-chosen after every task from a log-spaced grid, as
RanPAC's release does: fit on 80% of the new task's training features, score the mean squared
error on the other 20%.

Memory: W is d x M floats, G is M x M (float32 storage, 400 MB at M = 10,000; each task's
contribution is summed in float64 before it is added, and the solve runs in float64).

Checkpoints do not hold G. Each holds its own task's features (N_t x d, the input of that task's
contribution to G) with the solved head; loading checkpoints 0..t in turn queues those features,
and G is rebuilt from them, in the same order and with the same arithmetic, only when the next
task's update needs it. Evaluation and prediction never build it. A 10-task run at M = 10,000
thus writes about 30 MB of projection plus the features per task instead of 400 MB of G.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# RanPAC's release, optimise_ridge_parameter: 10^-8 ... 10^8 and an 80/20 split of the task's data.
RIDGE_GRID = tuple(10.0**p for p in range(-8, 9))
HOLDOUT = 0.2
RIDGE_PREFIX = "ridge."  # checkpoint prefix of the projection, statistics and solved head


def ridge_validation_losses(h_fit: torch.Tensor, y_fit: torch.Tensor, h_val: torch.Tensor, y_val: torch.Tensor, grid=RIDGE_GRID) -> torch.Tensor:
    """Held-out mean squared error of the ridge fit on ``(h_fit, y_fit)`` for every lambda of ``grid``.

    One thin SVD h_fit = U S V^T serves the whole grid: the fit is V diag(s / (s^2 + lambda)) U^T y_fit,
    so no M x M system is solved per lambda.
    """
    u, s, vh = torch.linalg.svd(h_fit.double(), full_matrices=False)
    val_in_basis, targets_in_basis = h_val.double() @ vh.T, u.T @ y_fit.double()
    losses = [((val_in_basis * (s / (s * s + ridge))) @ targets_in_basis - y_val).pow(2).mean() for ridge in grid]
    return torch.stack(losses)


def narrow_projection(dim: int, rp_dim: int) -> str | None:
    """A warning when the projection is narrower than the features it lifts, else None.

    RanPAC widens features (M = 10,000 for d = 768) so that classes become linearly separable;
    M < d instead discards directions, and at M far below d the head falls to chance accuracy.
    Measured on configs/tiny.yaml (64-wide features, tasks of 4, 3 and 3 classes) with
    ``method.name=ranpac method.rp_dim=2``: average accuracy 25.17%, 12.59% and 8.39% after
    tasks 1, 2 and 3, about chance on the 4, 7 and 10 classes seen (25%, 14.3%, 10%).
    """
    if rp_dim >= dim:
        return None
    return (
        f"warning: method.rp_dim={rp_dim} is below the backbone's feature width {dim}: the random projection discards "
        f"feature directions and the ridge head can fall to chance accuracy; set method.rp_dim to at least {dim} (RanPAC: 10000)"
    )


class RidgeHead:
    """Random projection, accumulated statistics and the solved head, kept as tensors for checkpoints."""

    def __init__(self, dim: int, num_classes: int, rp_dim: int, generator: torch.Generator | None = None) -> None:
        self.projection = torch.randn(dim, rp_dim, generator=generator)  # from the run's seeded RNG by default
        self.gram: torch.Tensor | None = None  # built on first use (400 MB at M = 10,000)
        self.targets = torch.zeros(rp_dim, num_classes)
        self.weight = torch.zeros(rp_dim, num_classes)
        self.ridge = torch.tensor(float("nan"), dtype=torch.float64)  # the lambda of the last solve
        self.features = torch.zeros(0, dim)  # the last update's features: what the next checkpoint stores
        self.pending: list[torch.Tensor] = []  # loaded tasks' features not yet added to G

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(features @ self.projection.to(features.device, features.dtype))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lift(features) @ self.weight.to(features.device, features.dtype)

    def _add_to_gram(self, features: torch.Tensor) -> torch.Tensor:
        """Add one task's contribution h^T h to G; returns h (float64)."""
        h = self.lift(features.float().cpu()).double()
        if self.gram is None:
            rp_dim = self.projection.shape[1]
            self.gram = torch.zeros(rp_dim, rp_dim)
        self.gram += (h.T @ h).float()
        return h

    def update(self, features: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        """Add one task's training features to G and C, choose lambda on a held-out part of them, solve."""
        for earlier in self.pending:  # tasks restored from checkpoints, in their order
            self._add_to_gram(earlier)
        self.pending = []
        self.features = features.float().cpu()
        h = self._add_to_gram(self.features)
        y = F.one_hot(labels.cpu(), self.targets.shape[1]).double()
        order = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))
        held_out = max(1, round(HOLDOUT * len(h)))
        fit, val = order[held_out:], order[:held_out]
        self.targets += (h.T @ y).float()
        grid = solvable_grid(self.gram)
        losses = ridge_validation_losses(h[fit], y[fit], h[val], y[val], grid)
        self.ridge = torch.tensor(grid[int(losses.argmin())], dtype=torch.float64)
        self.weight = solve_ridge(self.gram, self.targets, float(self.ridge))

    def state_dict(self, prefix: str = RIDGE_PREFIX) -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": getattr(self, name) for name in STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = RIDGE_PREFIX) -> None:
        """Load one checkpoint's head on top of the earlier ones' (checkpoints 0..t, in turn)."""
        for name in STATE:
            setattr(self, name, state[f"{prefix}{name}"].clone())
        self.pending.append(self.features)


STATE = ("projection", "targets", "weight", "ridge", "features")


def solvable_grid(gram: torch.Tensor) -> tuple[float, ...]:
    """The grid values large enough to solve the accumulated system reliably.

    G is stored in float32, so its entries carry rounding errors of about 1e-7 of their size,
    summed over thousands of samples. A lambda far below that noise solves the noise: on a
    2-class task with few images (the CPU benchmarks) the held-out loss favoured 1e-8, and the
    head over all classes collapsed. Values below 1e-5 of G's mean diagonal are left out.
    """
    floor = 1e-5 * float(gram.diagonal().mean())
    return tuple(ridge for ridge in RIDGE_GRID if ridge >= floor) or RIDGE_GRID[-1:]


def solve_ridge(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + lambda I)^-1 C in float64: Cholesky, or LU when a tiny lambda leaves G + lambda I numerically singular."""
    system = gram.double()
    system.diagonal().add_(ridge)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(targets.double(), factor).float()
    return torch.linalg.solve(system, targets.double()).float()
