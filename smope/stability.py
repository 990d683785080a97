"""Routing stability: does an image keep its experts when it is flipped, shifted or slightly noisy?

An input-dependent gate is only trustworthy if near-identical inputs take the same experts.
After the final task, every test task's images go through the model once as they are and once
per :data:`PERTURBATIONS`; for each (image, prompted layer, head) the evaluation-time top-K set
is compared with the unperturbed one. metrics.json's ``routing.stability`` keeps, per seed and
test task, the share of pairs whose set is unchanged and the mean number of experts that
changed (docs/routing.md#stability). Runs written before stability was recorded get it from
their last checkpoints (:func:`stability_from_checkpoints`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from . import distributed
from .errors import SmopeError
from .layer import PromptedAttention
from .methods import GATED_METHODS
from .model import prompted_layers

SHIFT = 0.05  # of the image side, at least one pixel
NOISE = 0.05  # of each image's own pixel standard deviation
NOISE_SEED = 0
PERTURBATIONS: dict[str, str] = {
    "hflip": "horizontal flip",
    "shift": f"shifted right and down by {SHIFT:.0%} of the side (at least 1 px), zero fill",
    "noise": f"Gaussian pixel noise, std {NOISE:.0%} of the image's own pixel std",
}


def perturb(images: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """One of :data:`PERTURBATIONS` applied to a batch of transformed images (B, C, H, W)."""
    if name == "hflip":
        return TF.horizontal_flip(images)
    if name == "shift":
        pixels = max(1, round(SHIFT * images.shape[-1]))
        return TF.affine(images, angle=0.0, translate=[pixels, pixels], scale=1.0, shear=[0.0, 0.0])
    if name == "noise":
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        return images + NOISE * images.std(dim=(1, 2, 3), keepdim=True) * noise
    raise ValueError(f"unknown perturbation {name!r}; one of {list(PERTURBATIONS)}")


def is_gated(model: torch.nn.Module) -> bool:
    """Whether the model routes: prompted layers in sparse mode (dense prompts attend to every expert)."""
    layers = prompted_layers(model)
    return bool(layers) and all(layer.mode == "sparse" for layer in layers)


def no_gate(method: str, what: str) -> SmopeError:
    """The one-line error for ``what`` asked of a run whose method (``method.name``) has no gate, naming those that have one."""
    return SmopeError(f"method.name={method} has no gate (no sparse prompt experts): {what} applies to {' and '.join(GATED_METHODS)} runs")


def require_gate(model: torch.nn.Module, method: str, what: str) -> None:
    """Raise :func:`no_gate`'s error when ``model`` (of ``method.name=method``) does not route."""
    if not is_gated(model):
        raise no_gate(method, what)


def selections(layers: list[PromptedAttention]) -> torch.Tensor:
    """Each layer's evaluation-time experts of the last forward as membership masks: (L, B, H, E)."""
    return torch.stack([F.one_hot(layer.last_selected, layer.experts.num_experts).sum(-2) for layer in layers])


@torch.no_grad()
def routing_stability(features: Callable[[torch.Tensor], object], model: torch.nn.Module, test_sets: list, loader) -> dict:
    """Share of unchanged (image, head) sets and mean experts changed, per test task and perturbation.

    ``features(images)`` runs the model's evaluation forward; ``loader(dataset)`` yields this
    process's (images, labels) batches, so the counts are summed over processes.
    """
    layers = prompted_layers(model)
    device = layers[0].experts.keys.device
    names = list(PERTURBATIONS)
    counts = torch.zeros(len(test_sets), len(names), len(layers), 3, dtype=torch.int64, device=device)  # unchanged, changed experts, pairs
    for task, dataset in enumerate(test_sets):
        generator = torch.Generator().manual_seed(NOISE_SEED + task)
        for images, _ in loader(dataset):
            features(images)
            plain = selections(layers)
            for p, name in enumerate(names):
                features(perturb(images, name, generator))
                changed = layers[0].top_k - (plain * selections(layers)).sum(-1)  # (L, B, H)
                counts[task, p, :, 0] += (changed == 0).flatten(1).sum(-1)
                counts[task, p, :, 1] += changed.flatten(1).sum(-1)
                counts[task, p, :, 2] += changed[0].numel()
    counts = distributed.all_reduce_sum(counts).cpu().double()
    pairs = counts[..., 2].clamp(min=1)
    unchanged_by_layer = counts[..., 0] / pairs  # (T, P, L)
    unchanged = counts[..., 0].sum(-1) / pairs.sum(-1)  # (T, P)
    changed = counts[..., 1].sum(-1) / pairs.sum(-1)
    return {
        "unchanged": {name: unchanged[:, p].tolist() for p, name in enumerate(names)},
        "experts_changed": {name: changed[:, p].tolist() for p, name in enumerate(names)},
        "unchanged_by_layer": {name: unchanged_by_layer[:, p].tolist() for p, name in enumerate(names)},
    }


def stability_metrics(per_seed: list[dict]) -> dict:
    """metrics.json's ``routing.stability``: what was perturbed and each seed's figures."""
    return {"perturbations": dict(PERTURBATIONS), "per_seed": per_seed}


def stability_from_checkpoints(run_dir: str | Path) -> dict:
    """``routing.stability`` of a finished run from its last task checkpoints (runs written before it was recorded).

    Needs the run's data and backbone weights; raises :class:`SmopeError` saying why when it cannot.
    """
    from .experiment import SeedRun  # the experiment engine imports this module
    from .rundir import RunDir

    run = RunDir(run_dir)
    config = run.config()
    config = replace(config, train=replace(config.train, progress=False))
    per_seed, data = [], None
    for seed in config.seeds:
        seed_run = SeedRun(config, seed, run, data)
        chain = seed_run.chain()
        if not chain.length or chain.problem:
            continue
        if chain.length < config.data.num_tasks:
            raise SmopeError(f"seed {seed} of {run_dir} stopped after task {chain.length}: stability is measured after the final task, so finish the run first")
        seed_run.build(restore=chain.length - 1)
        data = seed_run.data
        require_gate(seed_run.learner.model, config.method.name, "routing stability")
        per_seed.append({"seed": seed, **seed_run.stability()})
    if not per_seed:
        raise SmopeError(f"{run_dir} has no complete chain of task checkpoints: nothing to measure stability on")
    return stability_metrics(per_seed)
