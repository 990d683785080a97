"""Routing analytics: which prompt experts each task's images choose, and whether tasks keep them.

SMoPE's claims are about routing: it depends on the input, old tasks keep "their" experts and
adaptive noise steers new tasks to little-used ones. The cumulative usage counts cannot show
any of this, so a :class:`RoutingTracker` records, per task, during the usage pass over the
task's training images (the only place the counts change):

- the task's own usage counts per layer, head and expert (counts after the pass minus before);
- how many distinct expert *sets* the images chose per layer and head (1 = routing ignores the input);

and, at every evaluation, how often each test task's images are routed to experts that task's
training images used. Entropy and task overlap are derived from the counts. The per-task
records go into the task checkpoints, so a resumed run reports the same numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .layer import PromptedAttention, expert_counts
from .model import expert_usage, prompted_layers
from .stability import stability_metrics

_BITS = 62  # experts packed per int64 word of a set code
# Collapse warnings (docs/routing.md#collapse): a prompted layer whose task usage balance is below
# COLLAPSE_BALANCE, or whose experts no task ever chose make up more than COLLAPSE_UNUSED of its experts.
COLLAPSE_BALANCE = 0.1
COLLAPSE_UNUSED = 0.5


def set_codes(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Name each (image, head)'s expert set by a bitmask: (B, H, K) indices -> (B, H, words) int64.

    A set is order-free, so the bitmask of its members identifies it exactly; experts beyond
    62 spill into further words.
    """
    words = -(-num_experts // _BITS)
    one_hot = torch.zeros(*selected.shape[:-1], words * _BITS, dtype=torch.int64, device=selected.device)
    one_hot.scatter_(-1, selected, 1)
    weights = torch.ones(_BITS, dtype=torch.int64, device=selected.device) << torch.arange(_BITS, device=selected.device)
    return (one_hot.view(*selected.shape[:-1], words, _BITS) * weights).sum(-1)


def normalised_entropy(counts: np.ndarray, top_k: int) -> np.ndarray:
    """Usage balance of counts (..., E) in [0, 1]: 0 = the same K experts every time, 1 = all E alike.

    Each image picks K distinct experts, so an expert's share is at most 1/K and the entropy is
    at least log K; it is rescaled from [log K, log E]. NaN where nothing was counted.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / total
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    low, high = math.log(top_k), math.log(counts.shape[-1])
    balance = np.ones_like(entropy) if high <= low else np.clip((entropy - low) / (high - low), 0.0, 1.0)
    return np.where(total[..., 0] > 0, balance, np.nan)


def task_overlap(usage: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """Per layer, the share of routing two tasks have in common: (T, L, H, E) counts -> (L, T, T).

    For tasks a and b and each head, sum over experts of min(share_a, share_b) (1 = the same
    usage, 0 = disjoint experts), averaged over heads. NaN for a task without counts. With
    ``other``, row a is ``usage``'s task a and column b is ``other``'s task b.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        share_a, share_b = (np.asarray(u, dtype=np.float64) / np.asarray(u).sum(-1, keepdims=True) for u in (usage, usage if other is None else other))
    common = np.minimum(share_a[:, None], share_b[None, :]).sum(-1).mean(-1)  # (T, T, L)
    return common.transpose(2, 0, 1)


def layer_health(usage: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per task and layer, from per-task usage (T, L, H, E): usage balance (mean over heads; NaN
    for a task without usage) and the share of experts no task up to then had chosen, both (T, L)."""
    usage = np.asarray(usage, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a task without usage: every head NaN
        balance = np.nanmean(normalised_entropy(usage, top_k), axis=-1)
    unused = (np.cumsum(usage, axis=0) == 0).mean(axis=(-2, -1))
    return balance, unused


def collapse_flags(balance: float, unused: float) -> tuple[bool, bool]:
    """Whether a layer's figures cross the collapse thresholds: (low balance, mostly unused)."""
    return bool(np.isfinite(balance) and balance < COLLAPSE_BALANCE), bool(unused > COLLAPSE_UNUSED)


def collapse_warnings(records: list[dict], names: list[str], top_k: int) -> list[str]:
    """One line per prompted layer whose routing collapsed by the last task of ``records``."""
    balance, unused = layer_health([r["usage"] for r in records], top_k)
    num_experts = np.shape(records[0]["usage"])[-1]
    lines = []
    for name, b, u in zip(names, balance[-1], unused[-1]):
        low, idle = collapse_flags(b, u)
        parts = []
        if low:
            parts.append(f"usage balance {b:.3f} (below {COLLAPSE_BALANCE}): this task's images take nearly the same {top_k} experts whatever the input")
        if idle:
            parts.append(
                f"{u * num_experts:.1f} of {num_experts} experts per head never chosen by any task ({u:.0%}, over {COLLAPSE_UNUSED:.0%}): "
                "no task's images route to them, so they add nothing to what was learned"
            )
        if parts:
            lines.append(f"routing collapse in {name}: {'; '.join(parts)}")
    return lines


def _selection(layer: PromptedAttention) -> torch.Tensor:
    """The experts the last forward used: the top-K actually attended to, or the top-K scores in dense mode."""
    if layer.last_selected is not None:
        return layer.last_selected
    return layer.last_scores.topk(layer.top_k, dim=-1).indices


@contextmanager
def layer_hooks(layers: list[PromptedAttention], make_hook) -> Iterator[None]:
    """Forward hooks ``make_hook(index)`` on every layer, removed on exit."""
    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _expert_sets(codes: list[list[torch.Tensor]], num_heads: int) -> list[list[set]]:
    """Per layer and head, the distinct expert sets among a pass's set codes (per layer, (B, H, words) per forward)."""
    if not codes[0]:
        return [[set() for _ in range(num_heads)] for _ in codes]
    rows = torch.stack([torch.cat(layer) for layer in codes]).cpu().numpy()  # (L, N, H, words): the pass's one copy to the host
    return [[set(map(tuple, np.unique(layer[:, head], axis=0).tolist())) for head in range(num_heads)] for layer in rows]


def _union_over_processes(sets: list[set]) -> list[set]:
    if not distributed.is_distributed():
        return sets
    gathered: list[list[set] | None] = [None] * distributed.world_size()
    dist.all_gather_object(gathered, sets)
    return [set().union(*parts) for parts in zip(*gathered)]


class RoutingTracker:
    """Per-task routing records of one seed's model; inert for a model without prompt experts.

    ``records[t]`` holds task t's ``usage`` (L, H, E) from the usage pass, ``distinct_sets``
    (L, H), ``step_usage`` (L, H, E) from the training steps and ``test_in_task_experts``
    (percent, one value per test task 0..t).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = prompted_layers(model)
        self.names = [n.removeprefix("base_model.") for n, m in model.named_modules() if isinstance(m, PromptedAttention)]
        self.records: list[dict] = []
        self._test_hits: torch.Tensor | None = None
        self._used: torch.Tensor | None = None  # (T, L, H, E) during an evaluation: experts each task used
        self._step_usage: torch.Tensor | None = None
        self.stability: dict | None = None  # after the final task (smope.stability)

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def restore(self, records: list[dict] | None, tasks_done: int) -> None:
        """Records saved with the last finished task; a run written without them stops tracking."""
        if records is not None and len(records) == tasks_done:
            self.records = list(records)
        elif self.enabled:
            self.layers = []  # earlier tasks are unknown: report no routing rather than a partial one

    @contextmanager
    def training_steps(self) -> Iterator[None]:
        """Around a task's training: count the experts the sparse training forwards attended to.

        These selections include the adaptive noise (the usage pass does not), so they show
        where the noise steered the task's training.
        """
        if not self.enabled:
            yield
            return
        device = self.layers[0].experts.keys.device  # counted where the model runs: no sync per step
        counts = torch.zeros(len(self.layers), self.layers[0].num_heads, self.layers[0].experts.num_experts, dtype=torch.int64, device=device)

        def observe(index: int):
            def hook(module: PromptedAttention, args, output) -> None:
                if module.training and module.last_selected is not None:
                    counts[index] += expert_counts(module.last_selected, module.experts.num_experts)

            return hook

        with layer_hooks(self.layers, observe):
            yield
        self._step_usage = distributed.all_reduce_sum(counts).cpu()

    @contextmanager
    def usage_pass(self) -> Iterator[None]:
        """Around the learner's usage pass (:meth:`~smope.learners.Learner.usage_pass`): its counts and expert sets."""
        if not self.enabled:
            yield
            return
        before = expert_usage(self.model).cpu()
        codes: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer, (B, H, words) per forward, on the device

        def observe(index: int):
            def hook(module: PromptedAttention, args, output) -> None:
                if not module.training and module.last_scores is not None:
                    codes[index].append(set_codes(module.last_scores.topk(module.top_k, dim=-1).indices, module.experts.num_experts))

            return hook

        with layer_hooks(self.layers, observe):
            yield
        sets = _expert_sets(codes, self.layers[0].num_heads)
        distinct = [[len(s) for s in _union_over_processes(layer_sets)] for layer_sets in sets]
        usage = (expert_usage(self.model).cpu() - before).tolist()
        steps = torch.zeros_like(before) if self._step_usage is None else self._step_usage
        self.records.append({"usage": usage, "distinct_sets": distinct, "step_usage": steps.tolist(), "test_in_task_experts": []})
        self._step_usage = None

    def begin_evaluation(self, task: int) -> None:
        if self.enabled:
            device = self.layers[0].experts.keys.device
            self._test_hits = torch.zeros(task + 1, 2, dtype=torch.int64, device=device)  # selections in used experts, all
            self._used = torch.stack([torch.tensor(r["usage"], device=device) > 0 for r in self.records])  # (T, L, H, E)

    def observe_test(self, test_tasks: torch.Tensor) -> None:
        """After an evaluation forward on images of ``test_tasks`` (one task per image): count selections of each image's task's experts."""
        if self._test_hits is None:
            return
        tasks = test_tasks.to(self._test_hits.device)
        for index, layer in enumerate(self.layers):
            selected = _selection(layer)  # (B, H, K)
            used = self._used[tasks, index]  # (B, H, E): the experts each image's task used
            inside = used.gather(2, selected).flatten(1).sum(1)
            self._test_hits[:, 0].index_add_(0, tasks, inside)
            self._test_hits[:, 1].index_add_(0, tasks, torch.full_like(tasks, selected[0].numel()))

    def end_evaluation(self) -> None:
        if self._test_hits is None:
            return
        hits = distributed.all_reduce_sum(self._test_hits).cpu().tolist()
        trained = [np.sum(r["usage"]) > 0 for r in self.records]  # the joint ceiling trains at task 0 only
        self.records[-1]["test_in_task_experts"] = [
            100.0 * inside / max(total, 1) if has_usage else None for (inside, total), has_usage in zip(hits, trained)
        ]
        self._test_hits = None

    def latest_scalars(self) -> dict[str, float] | None:
        """The last task's routing in a few numbers, for experiment trackers."""
        if not self.enabled or not self.records:
            return None
        record = self.records[-1]
        usage = np.array([r["usage"] for r in self.records], dtype=np.float64)
        distinct = np.array(record["distinct_sets"])
        values = {
            "routing/usage_balance": normalised_entropy(usage[-1], self.layers[0].top_k),
            "routing/heads_with_one_set": (distinct == 1).astype(np.float64),
            "routing/test_on_own_experts": np.array(record["test_in_task_experts"][-1:], dtype=np.float64),
            "routing/overlap_with_earlier_tasks": task_overlap(usage)[:, -1, :-1],
        }
        # Means over what was measured; a task without usage (the joint ceiling after its first) has none.
        return {k: float(v[np.isfinite(v)].mean()) for k, v in values.items() if np.isfinite(v).any()}

    def summary(self, seed: int) -> dict | None:
        """This seed's part of metrics.json's ``routing``, or None without prompt experts."""
        if not self.enabled or not self.records:
            return None
        return summarize_records(self.records, self.layers[0].top_k, seed)

    def checkpoint_meta(self) -> dict:
        """What a task checkpoint keeps: the layout and every record so far."""
        return {**self.describe(), "records": self.records}

    def describe(self) -> dict:
        """The layout the per-seed arrays are indexed by."""
        first = self.layers[0]
        return {"layers": self.names, "num_heads": first.num_heads, "num_experts": first.experts.num_experts, "top_k": first.top_k}


def summarize_records(records: list[dict], top_k: int, seed: int) -> dict:
    """One seed's arrays in metrics.json's ``routing``, derived from its per-task records."""
    usage = np.array([r["usage"] for r in records])
    steps = np.array([r.get("step_usage", np.zeros_like(usage[0])) for r in records])
    return {
        "seed": seed,
        "task_usage": usage.tolist(),
        "step_usage": steps.tolist(),
        "step_overlap": _json_floats(task_overlap(steps, usage)),
        "distinct_sets": [r["distinct_sets"] for r in records],
        "entropy": _json_floats(normalised_entropy(usage, top_k)),
        "task_overlap": _json_floats(task_overlap(usage)),
        "test_in_task_experts": [r["test_in_task_experts"] for r in records],
    }


def _json_floats(values: np.ndarray) -> list:
    """Nested lists with NaN as None (JSON has no NaN)."""
    return [_json_floats(v) for v in values] if np.ndim(values) > 0 else (None if np.isnan(values) else float(values))


def combine_routing(layout: dict, per_seed: list[dict], stability: list[dict] | None = None) -> dict | None:
    """metrics.json's ``routing`` from the layout and the seeds' summaries (and stability figures); None without any summary."""
    if not per_seed:
        return None
    return {**layout, "per_seed": per_seed, **({"stability": stability_metrics(stability)} if stability else {})}
