"""End-to-end runs of the tiny config through the CLI: outputs, learning, eval, a damaged checkpoint, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY, read_metrics, run

from safetensors.torch import load_file

from smope import cli
from smope.data import load_dataset


def test_run_writes_every_output_and_learns(finished_run, capsys):
    out = finished_run
    for name in ("config.yaml", "metrics.json", "metrics.csv", "log.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "seed_0").iterdir()) == [f"task_{t:03d}.safetensors" for t in range(3)]
    metrics = read_metrics(out)
    matrix = metrics["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    for key in ("final_average_accuracy", "cumulative_average_accuracy", "final_forgetting"):
        assert key in metrics and key in metrics["per_seed"][0]
    assert metrics["final_average_accuracy"] > 15.0  # chance is 10% over the 10 digits
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    routing = metrics["routing"]
    assert routing["layers"] == ["blocks.0.attn", "blocks.1.attn"] and (routing["num_heads"], routing["num_experts"], routing["top_k"]) == (4, 6, 2)
    seed = routing["per_seed"][0]
    assert np.array(seed["task_usage"]).shape == (3, 2, 4, 6) and np.array(seed["distinct_sets"]).shape == (3, 2, 4)
    assert np.array(seed["task_overlap"]).shape == (2, 3, 3) and [len(row) for row in seed["test_in_task_experts"]] == [1, 2, 3]
    images = sum(np.array(u)[0, 0].sum() // 2 for u in seed["task_usage"])  # top-2: two selections per image
    assert images == len(load_dataset("digits", None, train=True))  # every training image, once
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3 + 3
    stats = [load_file(out / "seed_0" / f"task_{t:03d}.safetensors") for t in range(3)]  # each task's after-task step
    assert sorted(torch.cat([s["class_stats.classes"] for s in stats]).tolist()) == list(range(10))
    assert sum(int(s["class_stats.count"].sum()) for s in stats) == images


def copy_of(run: Path, tmp_path: Path) -> Path:
    """A test that writes into a run works on its own copy: the module's run stays as it finished."""
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_eval_reproduces_the_metrics(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    cli.main(["eval", str(out)])
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["accuracy_matrix"] == read_metrics(finished_run)["accuracy_matrix"]


def test_damaged_last_checkpoint_is_recomputed_and_nothing_is_lost(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "seed_0" / "task_002.safetensors").unlink()
    (out / "seed_0" / "task_001.safetensors").write_bytes(b"\0garbage")
    cli.main(["run", TINY, f"output_dir={out}"])
    message = capsys.readouterr().out
    assert "task_001.safetensors is damaged" in message and "recomputing from task 2" in message
    assert read_metrics(out) == read_metrics(finished_run)
    assert [json.loads(line)["task"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("train.epochs=many", "config key 'train.epochs' must be int"),
        ("data.name=imagefolder", "data.root"),
        ("method.top_k=99", "top_k"),
        ("model.name=vit_nonexistent_patch16", "unknown model.name"),
    ],
)
def test_bad_input_gives_one_clear_error(override, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", override])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert "Traceback" not in err


def test_missing_data_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "data.name=cub200", f"data.root={missing}"])
    assert str(missing) in capsys.readouterr().err


def test_changed_config_does_not_mix_with_an_old_run(finished_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", TINY, f"output_dir={finished_run}", "train.lr=0.5"])
    assert "different configuration (differs in: train.lr)" in capsys.readouterr().err


def test_a_key_added_since_the_run_resumes_at_its_default(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["method"]["align_steps"]  # as written by a version without that key
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    cli.main(["run", TINY, f"output_dir={out}"])
    captured = capsys.readouterr()
    assert "resuming after task 3" in captured.out + captured.err


def test_params_command_prints_the_paper_count(capsys):
    cli.main(["params", "--model", "vit_base_patch16_224", "--num-classes", "200"])
    out = capsys.readouterr().out
    assert "384,200" in out and "230,400" in out


def test_the_loop_calls_the_plugin_hooks_in_protocol_order_and_one_usage_pass_per_task(tmp_path, monkeypatch):
    from smope.experiment import RunPlugin, SeedRun
    from smope.learners.smope_learner import PromptLearner

    calls = []
    original_usage_pass = PromptLearner.usage_pass

    class Recorder(RunPlugin):
        def before_task(self, run, ctx):
            calls.append(("before_task", ctx.task))

        def after_training(self, run, ctx):
            calls.append(("after_training", ctx.task))

        def before_usage_pass(self, run, ctx):
            calls.append(("before_usage_pass", ctx.task))

        def after_usage_pass(self, run, ctx):
            calls.append(("after_usage_pass", ctx.task))

        def after_evaluation(self, run, task, accuracy):
            calls.append(("after_evaluation", task))

        def after_task(self, run, task, rows, seconds):
            calls.append(("after_task", task))

    def usage_pass(learner, ctx):
        calls.append(("usage_pass", ctx.task))
        original_usage_pass(learner, ctx)

    original_hook = SeedRun.hook

    def hook(run, name, *args):
        if not any(isinstance(p, Recorder) for p in run.plugins):
            run.plugins.append(Recorder())
        original_hook(run, name, *args)

    monkeypatch.setattr(PromptLearner, "usage_pass", usage_pass)
    monkeypatch.setattr(SeedRun, "hook", hook)
    metrics = run(tmp_path / "run", "data.num_tasks=2")
    per_task = ["before_task", "after_training", "before_usage_pass", "usage_pass", "after_usage_pass", "after_evaluation", "after_task"]
    assert calls == [(name, task) for task in range(2) for name in per_task]
    assert len(metrics["routing"]["per_seed"][0]["task_usage"]) == 2  # the routing analytics saw each usage pass
