"""`smope report` and experiments/collect.py on a finished tiny run: files, images, numbers, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from smope import cli
from smope.errors import SmopeError
from smope.metrics import aggregate, summarize
from smope.report import format_mean_std, write_report
from smope.routing import collapse_warnings

ROOT = Path(__file__).resolve().parent.parent
COLLECT = ROOT / "experiments" / "collect.py"
FILES = ["average_accuracy.png", "accuracy_matrix.png", "expert_usage.png", "routing.png", "stability.png", "summary.md"]


@pytest.fixture(scope="module")
def report(finished_run) -> list[Path]:
    return write_report(finished_run)


def test_report_writes_every_file(finished_run, report):
    assert [p.name for p in report] == FILES
    assert all(p.parent == finished_run / "report" and p.stat().st_size > 0 for p in report)


def test_plots_are_valid_images(report):
    for path in report[:-1]:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path.name


def test_summary_holds_the_metrics_and_links_the_plots(finished_run, report):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    summary = report[-1].read_text()
    faa = f"{metrics['final_average_accuracy']:.2f} ± {metrics['final_average_accuracy_std']:.2f}"
    assert format_mean_std(metrics, "final_average_accuracy") == faa
    assert f"| {faa} |" in summary
    assert f"{metrics['trainable_parameters']:,d}" in summary
    assert " | ".join(f"{a:.2f}" for a in metrics["average_accuracy"]) in summary
    for name in FILES[:-1]:
        assert f"]({name})" in summary


def test_usage_plot_is_skipped_without_usage_counts(finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text((finished_run / "metrics.json").read_text())
    assert [p.name for p in write_report(run)] == ["average_accuracy.png", "accuracy_matrix.png", "routing.png", "stability.png", "summary.md"]


def test_summary_has_a_routing_row_per_task(finished_run, report):
    routing = json.loads((finished_run / "metrics.json").read_text())["routing"]["per_seed"][0]
    summary = report[-1].read_text()
    assert "## Routing" in summary and "](routing.png)" in summary
    rows = [line for line in summary.split("## Routing")[1].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(routing["distinct_sets"]) == 3
    heads_with_one_set = sum(np.array(routing["distinct_sets"][0]).ravel() == 1)
    assert f"| {heads_with_one_set} of 8 |" in rows[0]


def stability_rows(summary: str) -> list[str]:
    """The per-task rows of the summary's routing-stability table."""
    section = summary.split("## Routing stability")[1]
    return [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]


def test_summary_shows_routing_stability_from_metrics_json(finished_run, report):
    stability = json.loads((finished_run / "metrics.json").read_text())["routing"]["stability"]["per_seed"][0]
    summary = report[-1].read_text()
    rows = stability_rows(summary)
    assert len(rows) == 3 and "](stability.png)" in summary
    for task, row in enumerate(rows):
        cells = [f"{100 * stability['unchanged'][name][task]:.1f}, {stability['experts_changed'][name][task]:.3f}" for name in ("hflip", "shift", "noise")]
        assert row == f"| {task + 1} | " + " | ".join(cells) + " |"


def test_collapse_marks_the_layers_the_run_warns_about(finished_run, report):
    routing = json.loads((finished_run / "metrics.json").read_text())["routing"]
    records = [{"usage": usage} for usage in routing["per_seed"][0]["task_usage"]]
    warned = {line.split(" in ")[1].split(":")[0] for line in collapse_warnings(records, routing["layers"], routing["top_k"])}
    section = report[-1].read_text().split("### Collapse")[1].split("## ")[0]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in section.splitlines() if line.startswith("| blocks.")}
    assert set(rows) == set(routing["layers"])
    assert {name for name, row in rows.items() if "**" in row} == warned


def test_a_run_from_before_stability_gets_it_from_its_checkpoints(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("report"))
    metrics = json.loads((run / "metrics.json").read_text())
    recorded = metrics["routing"].pop("stability")
    (run / "metrics.json").write_text(json.dumps(metrics))
    paths = write_report(run)
    assert "stability.png" in [p.name for p in paths]
    rows = stability_rows(paths[-1].read_text())
    first = recorded["per_seed"][0]
    assert rows[0].startswith(f"| 1 | {100 * first['unchanged']['hflip'][0]:.1f}, {first['experts_changed']['hflip'][0]:.3f} |")


def test_a_run_without_stability_or_checkpoints_says_why_in_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    del metrics["routing"]["stability"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    paths = write_report(run)
    assert "stability.png" not in [p.name for p in paths]
    why = capsys.readouterr().err.strip().splitlines()
    assert len(why) == 1 and why[0].startswith("routing stability not shown:")
    assert why[0] in paths[-1].read_text()


def test_folder_that_is_not_a_run_says_so(tmp_path):
    """No config.yaml: not a run (smope eval would refuse it too, so it is not suggested)."""
    with pytest.raises(SmopeError, match="is not a run directory") as caught:
        write_report(tmp_path)
    assert "smope eval" not in str(caught.value)


def test_partial_run_is_reported_from_eval_json(finished_run, tmp_path):
    """What 'smope eval' writes for a run stopped after 2 of its 3 tasks."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    finished = json.loads((finished_run / "metrics.json").read_text())["per_seed"][0]
    partial = {"seed": finished["seed"], **summarize(finished["accuracy_matrix"][:2], [100, 100, 100])}
    (run / "eval.json").write_text(json.dumps({**aggregate([partial]), "per_seed": [partial]}))
    summary = write_report(run)[-1].read_text()
    assert "| 2 of 3 |" in summary and "| n/a |" in summary


def test_cli_prints_the_report_paths(finished_run, capsys):
    cli.main(["report", str(finished_run)])
    printed = capsys.readouterr().out.split()
    assert printed == [str(finished_run / "report" / name) for name in FILES]


def test_cli_reports_a_missing_run_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["report", str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_collect_prints_one_row_per_run(finished_run):
    table = subprocess.run([sys.executable, str(COLLECT), str(finished_run.parent)], capture_output=True, text=True, check=True).stdout
    metrics = json.loads((finished_run / "metrics.json").read_text())
    lines = table.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| setting |")
    assert lines[2].startswith(f"| {finished_run.name} | smope | 1 | {format_mean_std(metrics, 'final_average_accuracy')} |")
