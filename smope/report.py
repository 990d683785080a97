"""Plots and a Markdown summary of a run: ``smope report RUN_DIR``.

Everything is read from what a run already wrote (``metrics.json``, or ``eval.json`` of a
partial run, and the last task checkpoint of the first seed), so a report can be made long
after the run, on a machine without the data or a GPU. The files go to ``RUN_DIR/report/``.

Figures use matplotlib's object API on an Agg canvas rather than pyplot: no global backend
switch and no figure registry, so calling this from a notebook or a server leaves its
plotting state alone and leaks no open figures.
"""

from __future__ import annotations

import sys
from itertools import accumulate
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import load_checkpoint
from .data import split_classes
from .errors import SmopeError
from .metrics import format_mean_std
from .model import PEFT_KEY_PREFIX
from .provenance import provenance_markdown
from .prompt_choice import pool_choice_markdown, pool_prompt_choices, prompt_choice_markdown
from .methods import GATED_METHODS, spec_for
from .routing import COLLAPSE_BALANCE, COLLAPSE_UNUSED, collapse_flags, layer_health, summarize_records
from .rundir import RunDir
from .stability import stability_from_checkpoints

COUNTS_SUFFIX = ".experts.counts"
# Summary-table columns of metrics given as mean ± std: (header, metrics.json key).
METRIC_COLUMNS = (
    ("FAA (%)", "final_average_accuracy"),
    ("CAA (%)", "cumulative_average_accuracy"),
    ("forgetting", "final_forgetting"),
    ("BWT", "bwt"),
    ("pooled acc. (%)", "pooled_accuracy"),
)

__all__ = ["format_mean_std", "load_expert_usage", "load_results", "write_report"]


def load_results(run_dir: Path) -> dict:
    """``metrics.json`` of a finished run; for a partial run, ``eval.json`` plus names from ``config.yaml``.

    A partial run has no trainable-parameter count (only the finished run builds the model
    for it), so that field is None there.
    """
    if not run_dir.is_dir():
        raise SmopeError(f"{run_dir} is not a directory: give the output_dir of a run, e.g. 'smope report runs/demo'")
    run = RunDir(run_dir)
    metrics = run.metrics()
    run.refuse_unfinished(metrics is not None, RunDir.METRICS)
    run.check_identity()
    if metrics is not None:
        return metrics
    config_path, config = run.config_path, run.saved_config()
    result = run.eval_result()
    if result is not None and config is not None:
        seeds = [run["seed"] for run in result["per_seed"]]
        partial = {
            "method": config["method"]["name"],
            "dataset": config["data"]["name"],
            "model": config["model"]["name"],
            "num_tasks": config["data"]["num_tasks"],
            "seeds": seeds,
            "trainable_parameters": None,
            **result,
        }
        routing = routing_from_checkpoints(run_dir, seeds)
        return partial if routing is None else {**partial, "routing": routing}
    if config is None:
        raise SmopeError(f"{run_dir} is not a run directory (it has no {RunDir.CONFIG}): give the output_dir of a run, e.g. 'smope report runs/demo'")
    if not run.has_finished_tasks():
        raise SmopeError(f"{run_dir} has no finished task yet, so nothing to report: run 'smope run {config_path} output_dir={run_dir}' first")
    raise SmopeError(
        f"{run_dir} has no {RunDir.METRICS}: finish the run with 'smope run {config_path} output_dir={run_dir}', "
        f"or for a partial run evaluate its checkpoints with 'smope eval {run_dir}'"
    )


def routing_from_checkpoints(run_dir: Path, seeds: list[int]) -> dict | None:
    """metrics.json's ``routing`` rebuilt from each seed's last checkpoint, for a partial run."""
    layout, per_seed = None, []
    run = RunDir(run_dir)
    for seed in seeds:
        tasks = run.finished_tasks(seed)
        if not tasks:
            continue
        _, meta = load_checkpoint(run.checkpoint(seed, tasks[-1]))
        saved = meta.get("routing")
        if saved:
            layout = {k: v for k, v in saved.items() if k != "records"}
            per_seed.append(summarize_records(saved["records"], saved["top_k"], seed))
    return None if layout is None else {**layout, "per_seed": per_seed}


def load_expert_usage(run_dir: Path, seed: int) -> tuple[dict[str, np.ndarray], int] | None:
    """Usage counts summed over heads, ``{layer path: (experts,)}`` in block order, and the task they are from.

    Counts accumulate over tasks, so the last checkpoint of a seed holds the whole run's
    usage. None when the seed has no checkpoint or the method keeps no usage counts.
    """
    run = RunDir(run_dir)
    tasks = run.finished_tasks(seed)
    if not tasks:
        return None
    tensors, _ = load_checkpoint(run.checkpoint(seed, tasks[-1]))
    usage = {
        name.removeprefix(PEFT_KEY_PREFIX).removesuffix(COUNTS_SUFFIX): counts.sum(0).numpy()
        for name, counts in tensors.items()
        if name.endswith(COUNTS_SUFFIX)
    }
    if not usage:
        return None
    return {path: usage[path] for path in sorted(usage, key=_block_order)}, tasks[-1]


def _block_order(path: str) -> list[tuple[int, int | str]]:
    """Sort key that puts blocks.2 before blocks.10 (plain string order would not)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.split(".")]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _run_label(results: dict) -> str:
    seeds = results["seeds"]
    over = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    return f"{results['method']} on {results['dataset']}, {over}"


def plot_average_accuracy(results: dict, path: Path, chance: list[float] | None = None) -> Path:
    """Average accuracy over the seen tasks after each task: mean over seeds, with a ±std band and chance level."""
    curves = np.array([run["average_accuracy"] for run in results["per_seed"]])
    mean, std = curves.mean(0), curves.std(0)  # population std, as in metrics.json
    tasks = np.arange(1, len(mean) + 1)
    figure = _figure(max(5.0, 0.45 * len(tasks) + 2.0), 4.0)
    ax = figure.add_subplot()
    if len(curves) > 1:
        ax.fill_between(tasks, mean - std, mean + std, alpha=0.25, label="± std over seeds")
    ax.plot(tasks, mean, marker="o", label="mean over seeds" if len(curves) > 1 else None)
    for task, value in zip(tasks, mean):
        ax.annotate(f"{value:.1f}", (task, value), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if chance is not None:
        ax.plot(np.arange(1, len(chance) + 1), chance, color="grey", linestyle="--", linewidth=1, label="chance")
    if len(curves) > 1 or chance is not None:
        ax.legend(loc="lower left")
    ax.set(xticks=tasks, ylim=(0, 105), xlabel="tasks learned", ylabel="average accuracy on seen tasks (%)")
    ax.set_title(f"Average accuracy after each task\n{_run_label(results)}")
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


def plot_accuracy_matrix(results: dict, path: Path) -> Path:
    """Heatmap of A[t][j], the accuracy on task j after training task t (mean over seeds)."""
    rows = results["accuracy_matrix"]
    num = len(rows)
    grid = np.full((num, num), np.nan)
    for t, row in enumerate(rows):
        grid[t, : len(row)] = row
    side = max(4.5, 0.5 * num + 2.0)
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=100)
    digits, size = (1, 9) if num <= 10 else (0, 7)  # whole numbers keep 20 x 20 cells legible
    for t, row in enumerate(rows):
        for j, value in enumerate(row):
            ax.text(j, t, f"{value:.{digits}f}", ha="center", va="center", fontsize=size, color="black" if value > 60 else "white")
    ticks = np.arange(num)
    ax.set_xticks(ticks, [str(j + 1) for j in ticks])
    ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    ax.set(xlabel="evaluated task", ylabel="after training task")
    ax.set_title(f"Accuracy on each task (%)\n{_run_label(results)}")
    figure.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    figure.savefig(path, dpi=120)
    return path


def _compact(count: float) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    if count >= 1e4:
        return f"{count / 1e3:.0f}k"
    return f"{count:.0f}"


def plot_expert_usage(usage: dict[str, np.ndarray], seed: int, task: int, path: Path) -> Path:
    """Heatmap of how often each expert of each prompted layer was in the top-K, summed over heads.

    Experts at 0 were never chosen in training; evaluation penalises them (docs/method.md#adaptive-noise).
    """
    counts = np.stack(list(usage.values()))
    num_layers, num_experts = counts.shape
    figure = _figure(max(5.0, 0.42 * num_experts + 2.5), max(2.8, 0.45 * num_layers + 1.8))
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="magma", aspect="auto", vmin=0)
    bright = 0.6 * counts.max()
    for layer in range(num_layers):
        for expert in range(num_experts):
            value = counts[layer, expert]
            ax.text(expert, layer, _compact(value), ha="center", va="center", fontsize=7, color="black" if value > bright else "white")
    ax.set_xticks(np.arange(num_experts))
    ax.set_yticks(np.arange(num_layers), list(usage))
    ax.set(xlabel="expert", ylabel="prompted layer")
    ax.set_title(f"Expert usage: times in the top-K, summed over heads\nseed {seed}, after task {task + 1} (all tasks so far)")
    figure.colorbar(image, ax=ax, label="selections")
    figure.savefig(path, dpi=120)
    return path


def plot_routing(routing: dict, path: Path) -> Path:
    """Per prompted layer: each task's share of selections per expert (top) and the task-overlap matrix (bottom)."""
    seed = routing["per_seed"][0]
    usage = np.array(seed["task_usage"], dtype=np.float64).sum(2)  # (tasks, layers, experts), summed over heads
    overlap = np.array(seed["task_overlap"], dtype=np.float64)  # (layers, tasks, tasks)
    num_tasks, num_layers, num_experts = usage.shape
    share = usage / np.maximum(usage.sum(-1, keepdims=True), 1)
    figure = _figure(max(8.0, 3.2 * num_layers), 2.0 * max(2.5, 0.35 * num_tasks + 1.6))
    axes = figure.subplots(2, num_layers, squeeze=False)
    ticks = np.arange(num_tasks)
    for layer, name in enumerate(routing["layers"]):
        top, bottom = axes[0, layer], axes[1, layer]
        used = top.imshow(share[:, layer], cmap="magma", aspect="auto", vmin=0)
        top.set(title=name, xlabel="expert", ylabel="task" if layer == 0 else None)
        top.set_yticks(ticks, [str(t + 1) for t in ticks])
        common = bottom.imshow(np.ma.masked_invalid(overlap[layer]), cmap="viridis", vmin=0, vmax=1)
        for a in range(num_tasks):
            for b in range(num_tasks):
                if num_tasks <= 10 and np.isfinite(overlap[layer, a, b]):
                    value = overlap[layer, a, b]
                    bottom.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.6 else "white")
        bottom.set_xticks(ticks, [str(t + 1) for t in ticks])
        bottom.set_yticks(ticks, [str(t + 1) for t in ticks])
        bottom.set(xlabel="task", ylabel="task" if layer == 0 else None)
    figure.colorbar(used, ax=axes[0, :].tolist(), label="share of the task's selections")
    figure.colorbar(common, ax=axes[1, :].tolist(), label="routing in common")
    figure.suptitle(
        f"Routing of each task's training images (seed {seed['seed']}, top-{routing['top_k']} of {num_experts} experts per head)\n"
        "top: share of selections per expert, summed over heads; bottom: routing two tasks have in common",
        fontsize=10,
    )
    figure.savefig(path, dpi=120)
    return path


def routing_markdown(routing: dict) -> list[str]:
    """The summary's "Routing" section: per task, averages over layers and heads of the first seed."""
    seed = routing["per_seed"][0]
    entropy = np.array(seed["entropy"], dtype=np.float64)  # (tasks, layers, heads), NaN = no usage
    distinct = np.array(seed["distinct_sets"])
    overlap = np.array(seed["task_overlap"], dtype=np.float64)
    steps = np.array(seed["step_overlap"], dtype=np.float64)  # (layers, tasks, tasks): training steps of t vs usage of a
    tests = seed["test_in_task_experts"]
    header = [
        "task",
        "usage balance",
        "distinct expert sets (median, max)",
        "heads with one set",
        "overlap with earlier tasks",
        "training steps' overlap with earlier tasks",
        "test routing on own experts (%): after task, at end",
    ]
    lines = [
        "## Routing",
        "",
        f"Seed {seed['seed']}; {len(routing['layers'])} prompted layers x {routing['num_heads']} heads, top-{routing['top_k']} of "
        f"{routing['num_experts']} experts. Usage balance is the entropy of the task's expert usage, 0 when every image "
        f"takes the same {routing['top_k']} experts and 1 when all are used alike; a head with one distinct set routes every "
        "image alike. Overlap is the share of routing a task has in common with earlier tasks (1 = the same experts); "
        "the training steps' overlap compares the experts the task's training steps attended to (with the adaptive noise) "
        "with the earlier tasks' usage. "
        "Test routing is the share of a task's test-image selections that fall on experts its training images used.",
        "",
        _table_row(header),
        _table_row(["---"] * len(header)),
    ]
    for task in range(len(distinct)):
        earlier, earlier_steps = overlap[:, task, :task], steps[:, task, :task]
        used = np.isfinite(entropy[task]).any()
        final = tests[-1][task] if task < len(tests[-1]) else None
        cells = [
            str(task + 1),
            f"{np.nanmean(entropy[task]):.2f}" if used else "n/a",
            f"{np.median(distinct[task]):g}, {distinct[task].max()}",
            f"{int((distinct[task] == 1).sum())} of {distinct[task].size}",
            *(f"{np.nanmean(values):.2f}" if task and np.isfinite(values).any() else "-" for values in (earlier, earlier_steps)),
            " / ".join("n/a" if v is None else f"{v:.1f}" for v in (tests[task][task], final)),
        ]
        lines.append(_table_row(cells))
    return [*lines, "", "![routing](routing.png)", ""]


def collapse_markdown(routing: dict) -> list[str]:
    """Which prompted layers crossed the collapse thresholds of the run's warnings, per layer (first seed)."""
    seed = routing["per_seed"][0]
    balance, unused = layer_health(seed["task_usage"], routing["top_k"])  # (tasks, layers)
    flags = [[collapse_flags(b, u) for b, u in zip(*task)] for task in zip(balance, unused)]  # (tasks, layers, 2)
    header = ["layer", "usage balance, last task", "experts never chosen per head", "collapse", "flagged after tasks"]
    lines = [
        "### Collapse",
        "",
        f"A layer is marked, as the run's warnings mark it, when a task's usage balance is below {COLLAPSE_BALANCE} "
        f"or more than {COLLAPSE_UNUSED:.0%} of its experts were never chosen by any task (docs/routing.md#collapse).",
        "",
        _table_row(header),
        _table_row(["---"] * len(header)),
    ]
    for layer, name in enumerate(routing["layers"]):
        low, idle = flags[-1][layer]
        marks = [what for what, flagged in (("**low balance**", low), ("**mostly unused**", idle)) if flagged]
        tasks = [str(task + 1) for task, row in enumerate(flags) if any(row[layer])]
        cells = [
            name,
            f"{balance[-1, layer]:.3f}" if np.isfinite(balance[-1, layer]) else "n/a",
            f"{unused[-1, layer] * routing['num_experts']:.1f} of {routing['num_experts']}",
            ", ".join(marks) or "-",
            ", ".join(tasks) or "-",
        ]
        lines.append(_table_row(cells))
    return [*lines, ""]


def stability_markdown(stability: dict) -> list[str]:
    """The summary's "Routing stability" section: per test task and perturbation, mean over seeds."""
    names = list(stability["perturbations"])
    unchanged, changed = (_seed_mean(stability, key) for key in ("unchanged", "experts_changed"))  # (perturbations, tasks)
    seeds = [run["seed"] for run in stability["per_seed"]]
    header = ["test task", *(f"{name}: unchanged (%), experts changed" for name in names)]
    lines = [
        "## Routing stability",
        "",
        f"After the final task, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (mean): the share of (image, prompted "
        "layer, head) pairs whose top-K expert set stays the same when the test image is perturbed, and the mean number of "
        "experts that change. Perturbations: " + "; ".join(f"{name} = {text}" for name, text in stability["perturbations"].items()) + ".",
        "",
        _table_row(header),
        _table_row(["---"] * len(header)),
    ]
    for task in range(unchanged.shape[1]):
        lines.append(_table_row([str(task + 1), *(f"{100 * unchanged[p, task]:.1f}, {changed[p, task]:.3f}" for p in range(len(names)))]))
    lines.append(_table_row(["mean", *(f"{100 * unchanged[p].mean():.1f}, {changed[p].mean():.3f}" for p in range(len(names)))]))
    return [*lines, "", "![routing stability](stability.png)", ""]


def _seed_mean(stability: dict, key: str) -> np.ndarray:
    """``stability.per_seed[].key``, averaged over seeds: (perturbations, tasks[, layers])."""
    names = list(stability["perturbations"])
    return np.mean([[run[key][name] for name in names] for run in stability["per_seed"]], axis=0)


def plot_stability(stability: dict, layers: list[str], path: Path) -> Path:
    """Share of unchanged top-K sets per test task (left) and per prompted layer (right), one series per perturbation."""
    names = list(stability["perturbations"])
    by_task = 100 * _seed_mean(stability, "unchanged")  # (perturbations, tasks)
    by_layer = 100 * _seed_mean(stability, "unchanged_by_layer").mean(1)  # (perturbations, layers), mean over tasks
    num_tasks = by_task.shape[1]
    figure = _figure(max(9.0, 0.5 * num_tasks + 0.6 * len(layers) + 5.0), 4.0)
    left, right = figure.subplots(1, 2)
    width = 0.8 / len(names)
    tasks = np.arange(num_tasks)
    for p, name in enumerate(names):
        left.bar(tasks + (p - (len(names) - 1) / 2) * width, by_task[p], width, label=name)
        right.plot(np.arange(len(layers)), by_layer[p], marker="o", label=name)
    low = max(0.0, min(by_task.min(), by_layer.min()) - 5)
    left.set_xticks(tasks, [str(t + 1) for t in tasks])
    left.set(ylim=(low, 100.5), xlabel="test task", ylabel="top-K sets unchanged (%)", title="per test task")
    right.set_xticks(np.arange(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    right.set(ylim=(low, 100.5), xlabel="prompted layer", title="per layer (mean over test tasks)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(loc="lower left", fontsize=8)
    seeds = ", ".join(str(run["seed"]) for run in stability["per_seed"])
    figure.suptitle(f"Routing stability after the final task (seed {seeds}): (image, head) pairs keeping their experts", fontsize=10)
    figure.savefig(path, dpi=120)
    return path


def routing_stability_of(run_dir: Path, results: dict) -> tuple[dict | None, str | None]:
    """metrics.json's ``routing.stability``, or for a gated run made before it was recorded, computed from the
    checkpoints (:func:`~smope.stability.stability_from_checkpoints`); else None and one line saying why."""
    routing = results.get("routing")
    if routing is None or spec_for(results["method"]).name not in GATED_METHODS:
        return None, None
    if routing.get("stability") is not None:
        return routing["stability"], None
    try:
        return stability_from_checkpoints(run_dir), None
    except SmopeError as exc:
        return None, f"routing stability not shown: this run's metrics.json has none and it cannot be computed from its checkpoints ({exc})"


def _tasks_cell(results: dict) -> str:
    done = len(results["accuracy_matrix"])
    return str(done) if done == results["num_tasks"] else f"{done} of {results['num_tasks']}"


def chance_curve(run_dir: Path, results: dict) -> list[float] | None:
    """Average accuracy of uniform guessing after each task (percent): 100 / classes seen so far."""
    run = RunDir(run_dir)
    sizes = (run.provenance() or {}).get("dataset", {}).get("task_sizes")
    config = run.saved_config()
    if sizes is None and results.get("num_classes") and config is not None:
        data = config["data"]
        sizes = split_classes(results["num_classes"], data["num_tasks"], data.get("first_task_classes"))
    return None if sizes is None else [100.0 / seen for seen in accumulate(sizes)]


def summary_markdown(results: dict, plots: list[Path], provenance: dict | None = None) -> str:
    """Provenance, the summary table, the average-accuracy row and the plots, as Markdown."""
    params = results["trainable_parameters"]
    cells = [
        results["method"],
        results["dataset"],
        _tasks_cell(results),
        str(len(results["seeds"])),
        *(format_mean_std(results, key) for _, key in METRIC_COLUMNS),
        "n/a" if params is None else f"{params:,d}",
    ]
    header = ["method", "dataset", "tasks", "seeds", *(name for name, _ in METRIC_COLUMNS), "trainable params"]
    curves = np.array([run["average_accuracy"] for run in results["per_seed"]])
    tasks = range(1, curves.shape[1] + 1)
    lines = [
        f"# {results['method']} on {results['dataset']}",
        "",
        f"Backbone {results['model']}; seeds {', '.join(map(str, results['seeds']))}; every metric is mean ± std over the seeds.",
        "",
        *(provenance_markdown(provenance) if provenance else []),
        _table_row(header),
        _table_row(["---"] * len(header)),
        _table_row(cells),
        "",
        "Average accuracy on the seen tasks after each task (%):",
        "",
        _table_row(["after task", *map(str, tasks)]),
        _table_row(["---"] * (len(tasks) + 1)),
        _table_row(["mean", *(f"{a:.2f}" for a in curves.mean(0))]),
    ]
    if len(curves) > 1:
        lines.append(_table_row(["std", *(f"{s:.2f}" for s in curves.std(0))]))
    lines.append("")
    for plot in plots:
        lines += [f"![{plot.stem.replace('_', ' ')}]({plot.name})", ""]
    return "\n".join(lines)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_report(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Write the plots and ``summary.md`` into ``out`` (default ``run_dir/report/``); returns their paths, summary last."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    out = RunDir(run_dir).report_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_average_accuracy(results, out / "average_accuracy.png", chance_curve(run_dir, results)),
        plot_accuracy_matrix(results, out / "accuracy_matrix.png"),
    ]
    seed = results["seeds"][0]
    usage = load_expert_usage(run_dir, seed)
    if usage is not None:
        counts, task = usage
        plots.append(plot_expert_usage(counts, seed, task, out / "expert_usage.png"))
    routing = results.get("routing")
    text = summary_markdown(results, plots, RunDir(run_dir).provenance())
    if routing is not None:
        plots.append(plot_routing(routing, out / "routing.png"))
        text += "\n" + "\n".join(routing_markdown(routing))
        if spec_for(results["method"]).name in GATED_METHODS:
            text += "\n" + "\n".join(collapse_markdown(routing))
    stability, why_not = routing_stability_of(run_dir, results)
    if stability is not None:
        plots.append(plot_stability(stability, routing["layers"], out / "stability.png"))
        text += "\n" + "\n".join(stability_markdown(stability))
    elif why_not is not None:
        print(why_not, file=sys.stderr)
        text += f"\n## Routing stability\n\n{why_not}.\n"
    if results.get("prompt_choice") is not None:
        text += "\n" + "\n".join(prompt_choice_markdown(results["prompt_choice"]))
    if spec_for(results["method"]).name == "vq-prompt":
        try:
            text += "\n" + "\n".join(pool_choice_markdown(pool_prompt_choices(run_dir, seed), seed))
        except SmopeError as exc:  # like the stability section: the rest of the report stands
            text += f"\n## Pool prompt choice\n\npool prompt choice not shown: it cannot be counted from this run's checkpoints ({exc}).\n"
    summary = out / "summary.md"
    summary.write_text(text)
    return [*plots, summary]
