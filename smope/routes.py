"""Per-image routes: which prompt experts the gate chose for an image, how narrowly, and whose experts they are.

``smope predict RUN_DIR IMAGE... --routes`` (or ``predict(run, paths, routes=True)``) runs the
model's evaluation forward once per batch and reads, from forward hooks on every prompted
layer, the raw expert scores and the experts the layer attended to. The gate's own
:meth:`~smope.layer.PromptedAttention.gate_scores` (raw scores minus the adaptive-noise shift)
gives the margin: how far the weakest selected expert scores above the first unselected one,
so 0 means a tie a tiny change of the input could flip.

The run's routing records (each task's usage counts from its usage pass, kept in every task
checkpoint) say which tasks' training images chose each selected expert. Per head, a task's
*overlap* is the share of its training selections that fall on the image's chosen experts (1 =
that task's images always took exactly these experts); the head votes for the task of highest
overlap (ties split the vote). The task the routing points to is the one with most votes, and
its *agreement* the share of all heads that voted for it; *one-task heads* is the share of heads
whose vote went to one task alone, low when tasks share their experts (docs/routing.md#per-image-routes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .layer import PromptedAttention
from .methods import GATED_METHODS, spec_for
from .model import prompted_layers
from .routing import layer_hooks
from .rundir import RunDir
from .stability import no_gate, require_gate

if TYPE_CHECKING:
    from .predict import TrainedRun

LOWEST_MARGINS = 3  # heads listed per image in the terminal table


def refuse_gateless(run_dir: str | Path) -> None:
    """Refuse ``--routes`` for a run whose configured method has no gate, from its config.yaml alone (no model built)."""
    method = RunDir(run_dir).config().method.name
    if spec_for(method).name not in GATED_METHODS:
        raise no_gate(method, "--routes")


class GateReader:
    """Reads the gate of a loaded run's model around its evaluation forwards and describes each image's routes."""

    def __init__(self, run: TrainedRun) -> None:
        model = run.learner.model
        require_gate(model, run.config.method.name, "--routes")
        self.run = run
        self.layers = prompted_layers(model)
        self.names = [n.removeprefix("base_model.") for n, m in model.named_modules() if isinstance(m, PromptedAttention)]
        records = (run.routing or {}).get("records")
        self.usage = np.array([r["usage"] for r in records], dtype=np.float64) if records else None  # (T, L, H, E)
        if self.usage is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                self.shares = np.nan_to_num(self.usage / self.usage.sum(-1, keepdims=True))  # a task without usage: 0
        self._captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Around one evaluation forward: keep each layer's raw scores, gate scores and selected experts (B, H, ...)."""
        captured: list = [None] * len(self.layers)

        def observe(index: int):
            def hook(module: PromptedAttention, args, output) -> None:
                captured[index] = (module.last_scores, module.gate_scores(module.last_scores), module.last_selected)

            return hook

        with layer_hooks(self.layers, observe):
            yield
        self._captured = [tuple(t.detach().float().cpu() if t.is_floating_point() else t.cpu() for t in c) for c in captured]

    def image(self, index: int, predicted_label: int) -> dict:
        """The routes of image ``index`` of the captured forward (see the module docstring); tasks numbered from 1."""
        layers, heads_all = [], []
        for layer_index, name in enumerate(self.names):
            scores, gate, selected = (t[index] for t in self._captured[layer_index])  # (H, E), (H, E), (H, K)
            heads = []
            for head in range(scores.shape[0]):
                chosen = selected[head]
                rest = torch.ones_like(gate[head], dtype=torch.bool).index_fill_(0, chosen, False)
                first_out = int(torch.where(rest, gate[head], -torch.inf).argmax()) if rest.any() else None  # None: top_k = num_experts
                entry = {
                    "head": head,
                    "experts": chosen.tolist(),
                    "scores": scores[head, chosen].tolist(),
                    "gate_scores": gate[head, chosen].tolist(),
                    "first_unselected": first_out,
                    "first_unselected_gate_score": None if first_out is None else float(gate[head, first_out]),
                    "margin": None if first_out is None else float(gate[head, chosen].min() - gate[head, first_out]),
                    **self._tasks_of(layer_index, head, chosen.numpy()),
                }
                heads.append(entry)
                heads_all.append((name, entry))
            layers.append({"layer": name, "heads": heads})
        lowest = sorted((item for item in heads_all if item[1]["margin"] is not None), key=lambda item: item[1]["margin"])[:LOWEST_MARGINS]
        return {
            "seed": self.run.seed,
            "after_task": self.run.task + 1,
            "predicted_class_task": self._task_of_label(predicted_label),
            **self._summary([entry for _, entry in heads_all]),
            "lowest_margins": [{"layer": name, "head": e["head"], "margin": e["margin"]} for name, e in lowest],
            "layers": layers,
        }

    def _tasks_of(self, layer: int, head: int, chosen: np.ndarray) -> dict:
        """Which tasks' training images used each chosen expert, each task's overlap, and the head's vote."""
        if self.usage is None:
            return {"used_by": None, "task_overlap": None, "votes_for": None}
        overlap = self.shares[:, layer, head, chosen].sum(-1)  # (T,)
        best = overlap.max()
        return {
            "used_by": [(np.flatnonzero(self.usage[:, layer, head, e] > 0) + 1).tolist() for e in chosen],
            "task_overlap": overlap.tolist(),
            "votes_for": (np.flatnonzero(overlap == best) + 1).tolist() if best > 0 else [],
        }

    def _summary(self, heads: list[dict]) -> dict:
        """The task most heads vote for and the share of heads that do (a tie splits a head's vote)."""
        if self.usage is None:
            return {"task": None, "agreement": None, "single_task_heads": None, "task_votes": None, "mean_task_overlap": None}
        votes = np.zeros(len(self.usage))
        for entry in heads:
            for task in entry["votes_for"]:
                votes[task - 1] += 1 / len(entry["votes_for"])
        share = votes / len(heads)
        return {
            "task": int(share.argmax()) + 1 if share.max() > 0 else None,
            "agreement": float(share.max()),
            "single_task_heads": sum(len(entry["votes_for"]) == 1 for entry in heads) / len(heads),
            "task_votes": share.tolist(),
            "mean_task_overlap": np.mean([e["task_overlap"] for e in heads], axis=0).tolist(),
        }

    def _task_of_label(self, label: int) -> int | None:
        sizes = self.run.task_sizes
        return None if sizes is None else int(np.searchsorted(np.cumsum(sizes), label, side="right")) + 1


def format_routes(results: list[dict]) -> str:
    """The terminal table of ``predict(..., routes=True)``: one row per image."""
    first = results[0]["routes"]
    layer = first["layers"][0]
    lines = [
        f"routes of seed {first['seed']} after task {first['after_task']}: {len(first['layers'])} prompted layers x "
        f"{len(layer['heads'])} heads, top-{len(layer['heads'][0]['experts'])} experts each (tasks numbered from 1; --json for every head)",
    ]
    header = ["image", "class", "prob.", "class's task", "routing points to", "agreement", "one-task heads", "lowest margins (layer/head: margin)"]
    rows = []
    for result in results:
        routes, best = result["routes"], result["predictions"][0]
        lowest = ", ".join(f"{m['layer']}/h{m['head']}: {m['margin']:.3g}" for m in routes["lowest_margins"])
        rows.append([
            result["image"],
            best["class"],
            f"{100 * best['probability']:.1f}%",
            _cell(routes["predicted_class_task"]),
            _cell(routes["task"]),
            "n/a" if routes["agreement"] is None else f"{routes['agreement']:.0%} of heads",
            "n/a" if routes["single_task_heads"] is None else f"{routes['single_task_heads']:.0%}",
            lowest,
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    if first["task"] is None and first["agreement"] is None:
        lines.append("(the run's checkpoints hold no routing records, so which tasks used these experts is unknown)")
    return "\n".join(lines)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)
