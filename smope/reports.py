"""Compute accounting: parameter tables for a method on a backbone, with random weights."""

from __future__ import annotations

from .learners import create_learner
from .vit import count_parameters
from .runconfig import MethodConfig, ModelConfig, RunConfig, TrainConfig


def method_config(
    model: str,
    method: str = "smope",
    num_experts: int = 25,
    top_k: int = 5,
    layers: list[int] | None = None,
    img_size: int | None = None,
) -> RunConfig:
    """A run config that builds ``method`` on ``model`` with random weights on the CPU."""
    method_cfg = MethodConfig(name=method, num_experts=num_experts, top_k=top_k)
    if layers is not None:
        method_cfg.layers = layers
    return RunConfig(
        model=ModelConfig(name=model, img_size=img_size, weights="none"),
        method=method_cfg,
        train=TrainConfig(device="cpu", progress=False),
    )


def parameter_counts(config: RunConfig, num_classes: int) -> dict[str, int]:
    """Trainable / adapter / head / frozen / total parameters of ``config``'s learner.

    "prompt" is whatever is trained besides the classifier head: prompt experts, prompt pools
    with their keys and attention vectors, LoRA matrices; it means the same for every method.
    """
    model = create_learner(config, num_classes).model
    counts = count_parameters(model)
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    head = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) in head_ids)
    return {
        "trainable": counts["trainable"],
        "prompt": counts["trainable"] - head,
        "head": head,
        "frozen": counts["frozen"],
        "total": counts["total"],
    }


def parameter_table(
    model: str,
    num_classes: int,
    method: str = "smope",
    num_experts: int = 25,
    top_k: int = 5,
    layers: list[int] | None = None,
    img_size: int | None = None,
) -> str:
    counts = parameter_counts(method_config(model, method, num_experts, top_k, layers, img_size), num_classes)
    width = max(len(f"{v:,d}") for v in counts.values())
    lines = [f"{method} on {model}, {num_classes} classes", f"  {'component':<10} {'parameters':>{width}}"]
    lines += [f"  {name:<10} {value:>{width},d}" for name, value in counts.items()]
    return "\n".join(lines)
