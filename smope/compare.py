"""Several runs side by side: ``smope report RUN_A RUN_B ... --out DIR``.

Researchers compare methods, seeds and settings; this overlays the runs' accuracy curves,
puts their metrics in one Markdown table and names the config keys in which the runs differ,
so the table says what was compared. Like :mod:`smope.report`, it reads only what the runs
wrote (plus FLOPs, counted on a random-weight copy of each model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cost import method_flops
from .errors import SmopeError
from .metrics import format_mean_std
from .report import _figure, _table_row, chance_curve, load_results
from .rundir import EXECUTION_KEYS, RunDir

# Keys that say where and how a run executed, not what it computed (the seeds do count here).
IGNORED_KEYS = {".".join(key) for key in EXECUTION_KEYS if key != ("seeds",)} | {"data.root"}


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; free-form mappings stay whole values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(configs: list[dict]) -> dict[str, list[object]]:
    """Config keys whose values are not the same in every run, with each run's value."""
    flats = [flatten(c) for c in configs]
    keys = sorted(set().union(*flats) - IGNORED_KEYS)
    return {k: [f.get(k) for f in flats] for k in keys if any(f.get(k) != flats[0].get(k) for f in flats)}


def _is_partial(results: dict) -> bool:
    return len(results["accuracy_matrix"]) < results["num_tasks"]


def run_labels(run_dirs: list[Path], results: list[dict]) -> list[str]:
    """The run folders' names (with the parent folder where names repeat), partial runs marked."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    return [
        f"{name} (partial: {len(r['accuracy_matrix'])} of {r['num_tasks']} tasks)" if _is_partial(r) else name
        for name, r in zip(names, results)
    ]


def _curves(results: dict) -> np.ndarray:
    """Per-seed average-accuracy curves of the seeds that got furthest (seeds of a partial run may differ)."""
    curves = [run["average_accuracy"] for run in results["per_seed"]]
    longest = max(map(len, curves))
    return np.array([c for c in curves if len(c) == longest])


def plot_comparison(labels: list[str], results: list[dict], chance: list[list[float] | None], path: Path) -> Path:
    """Average accuracy after each task for every run: mean over seeds with a ±std band, and chance level."""
    figure = _figure(7.5, 4.5)
    ax = figure.add_subplot()
    longest = max(r["num_tasks"] for r in results)
    for label, result in zip(labels, results):
        curves = _curves(result)
        tasks = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        line = ax.plot(tasks, mean, marker="o", label=f"{label} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")[0]
        if len(curves) > 1:
            ax.fill_between(tasks, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    distinct = {tuple(c) for c in chance if c is not None}
    for index, curve in enumerate(sorted(distinct)):
        label = "chance" if len(distinct) == 1 else f"chance ({len(curve)} tasks, {100 / curve[-1]:.0f} classes)"
        ax.plot(np.arange(1, len(curve) + 1), curve, color="grey", linestyle="--", linewidth=1, label=label if index < 3 else None)
    ax.set(xticks=np.arange(1, longest + 1), ylim=(0, 105), xlabel="tasks learned", ylabel="average accuracy on seen tasks (%)")
    ax.set_title("Average accuracy after each task (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    figure.savefig(path, dpi=120)
    return path


def _gflops(run_dir: Path, results: dict) -> tuple[str, str]:
    """Training and inference forward GFLOPs per image, or n/a when the model cannot be rebuilt."""
    if not results.get("num_classes"):
        return "n/a", "n/a"
    try:
        flops = method_flops(RunDir(run_dir).config(), results["num_classes"])
    except (SmopeError, RuntimeError, ValueError):
        return "n/a", "n/a"
    return f"{flops.training.total / 1e9:.3f}", f"{flops.inference.total / 1e9:.3f}"


def comparison_markdown(labels: list[str], results: list[dict], flops: list[tuple[str, str]], differences: dict, plot: Path) -> str:
    header = ["run", "method", "dataset", "tasks", "seeds", "FAA (%)", "CAA (%)", "forgetting", "trainable params", "train GFLOPs/img", "test GFLOPs/img"]
    lines = ["# Comparison of runs", "", "Every metric is mean ± std over the run's seeds.", "", _table_row(header), _table_row(["---"] * len(header))]
    for label, result, (train, test) in zip(labels, results, flops):
        params = result.get("trainable_parameters")
        done = len(result["accuracy_matrix"])
        lines.append(_table_row([
            label,
            result["method"],
            result["dataset"],
            str(done) if done == result["num_tasks"] else f"{done} of {result['num_tasks']}",
            str(len(result["seeds"])),
            *(format_mean_std(result, key) for key in ("final_average_accuracy", "cumulative_average_accuracy", "final_forgetting")),
            "n/a" if params is None else f"{params:,d}",
            train,
            test,
        ]))
    lines += ["", "## Settings that differ", ""]
    if differences:
        lines += [_table_row(["config key", *labels]), _table_row(["---"] * (len(labels) + 1))]
        lines += [_table_row([f"`{key}`", *(f"`{v}`" for v in values)]) for key, values in differences.items()]
    else:
        lines.append("None: the runs share every setting (besides where they ran and wrote).")
    return "\n".join([*lines, "", f"![accuracy curves]({plot.name})", ""])


def compare_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write ``accuracy_curves.png`` and ``comparison.md`` into ``out``; returns their paths."""
    run_dirs = [Path(d) for d in run_dirs]
    results = [load_results(d) for d in run_dirs]
    labels = run_labels(run_dirs, results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chance = [chance_curve(d, r) for d, r in zip(run_dirs, results)]
    plot = plot_comparison(labels, results, chance, out / "accuracy_curves.png")
    configs = [RunDir(d).saved_config() or {} for d in run_dirs]
    flops = [_gflops(d, r) for d, r in zip(run_dirs, results)]
    summary = out / "comparison.md"
    summary.write_text(comparison_markdown(labels, results, flops, differing_keys(configs), plot))
    return [plot, summary]
