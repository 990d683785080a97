"""Using and comparing finished tiny runs: provenance, predict, export, run comparison, loggers."""

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import smope
from helpers import TINY, read_metrics

from smope import cli, experiment
from smope.backbones import create_backbone
from smope.data import load_dataset
from smope.experiment import task_seed
from smope.loggers import WandbLogger
from smope.predict import load_trained_run
from smope.provenance import backbone_identity
from smope.report import load_results
from smope.runconfig import ModelConfig

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None



@pytest.fixture(scope="module")
def split_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("split") / "split.txt"
    path.write_text("a fixed split\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, split_file) -> Path:
    """A short tiny run whose dataset names a split file, logged to TensorBoard when it is installed."""
    out = tmp_path_factory.mktemp("runs") / "smope_run"
    real_load_splits = experiment.load_splits

    def with_split_file(config):
        splits = real_load_splits(config)
        for split in splits:
            split.split_file = str(split_file)
        return splits

    patch = pytest.MonkeyPatch()
    patch.setattr(experiment, "load_splits", with_split_file)
    loggers = "[tensorboard]" if HAS_TENSORBOARD else "[]"
    try:
        cli.main(["run", TINY, f"output_dir={out}", "train.epochs=2", f"train.loggers={loggers}"])
    finally:
        patch.undo()
    return out



def test_provenance_is_complete(tiny_run, split_file):
    provenance = json.loads((tiny_run / "provenance.json").read_text())
    assert provenance["python"].count(".") == 2
    assert all(provenance["packages"][name] for name in ("torch", "timm", "transformers", "peft", "smope"))
    assert provenance["backbone"] == {"model": "vit_tiny_patch16_224", "weights": "none", "source": "random initialisation"}
    order = provenance["class_order"]["0"]
    assert sorted(order["original_labels"]) == list(range(10))
    classes = load_dataset("digits", None, train=True).classes
    assert order["names"] == [classes[i] for i in order["original_labels"]]
    assert provenance["dataset"]["task_sizes"] == [4, 3, 3]
    assert provenance["dataset"]["split_file"] == {
        "path": str(split_file.resolve()),
        "sha256": hashlib.sha256(split_file.read_bytes()).hexdigest(),
    }
    summary = cli_report(tiny_run)
    assert summary.index("Provenance") < summary.index("| method |")
    assert f"class order of seed 0: {', '.join(order['names'])}" in summary


def cli_report(run: Path) -> str:
    cli.main(["report", str(run)])
    return (run / "report" / "summary.md").read_text()


def predicted_accuracy(run: Path, folder: Path, capsys) -> float:
    """Write the test split as image files, predict them with ``smope predict --json`` and score the answers."""
    trained = load_trained_run(run)
    test = load_dataset("digits", None, train=False)
    label_of = {name: label for label, name in enumerate(trained.class_names)}
    truth = {}
    for index in range(len(test)):
        image, original = test[index]
        path = folder / f"{index:04d}.png"
        image.save(path)
        truth[str(path)] = label_of[test.classes[original]]
    capsys.readouterr()
    cli.main(["predict", str(run), str(folder), "--json", "--top-k", "3"])
    results = json.loads(capsys.readouterr().out)
    assert len(results) == len(test) and all(len(r["predictions"]) == 3 for r in results)
    return 100.0 * sum(r["predictions"][0]["label"] == truth[r["image"]] for r in results) / len(results)


def test_predict_reproduces_the_final_accuracy(tiny_run, tmp_path, capsys):
    """Images of the test split written as files and predicted one by one score what the run's evaluation did."""
    assert predicted_accuracy(tiny_run, tmp_path, capsys) == pytest.approx(read_metrics(tiny_run)["pooled_accuracy"])


@pytest.mark.parametrize("method", ["prototype", "l2p"])
def test_predict_works_for_other_learners(method, tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(["run", TINY, f"output_dir={run}", "train.epochs=1", f"method.name={method}"])
    images = tmp_path / "images"
    images.mkdir()
    assert predicted_accuracy(run, images, capsys) == pytest.approx(read_metrics(run)["pooled_accuracy"])


def test_predict_prints_class_names_and_probabilities(tiny_run, tmp_path, capsys):
    image, _ = load_dataset("digits", None, train=False)[0]
    image.save(tmp_path / "digit.png")
    cli.main(["predict", str(tiny_run), str(tmp_path / "digit.png"), "--top-k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / "digit.png") and len(lines) == 3
    assert lines[1].lstrip().startswith("1. ") and lines[1].endswith("%")


def test_predict_names_a_missing_image(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["predict", str(tiny_run), str(tmp_path / "nothing.png")])
    assert stopped.value.code == 2
    assert "nothing.png does not exist" in capsys.readouterr().err


def test_exported_adapter_loads_into_a_fresh_backbone(tiny_run, tmp_path):
    cli.main(["export", str(tiny_run), str(tmp_path / "adapter")])
    trained = load_trained_run(tiny_run)
    torch.manual_seed(task_seed(0, 0))  # the tiny backbone has random weights: build the run's own
    fresh = create_backbone(trained.config.model, len(trained.class_names))
    loaded = smope.SMoPEModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(images), trained.learner.logits(images), atol=1e-6)
    assert json.loads((tmp_path / "adapter" / "classes.json").read_text()) == trained.class_names


def test_report_compares_runs(tiny_run, tmp_path):
    other = tmp_path / "dense_run"
    cli.main(["run", TINY, f"output_dir={other}", "train.epochs=2", "method.name=dense-prompt"])
    partial = tmp_path / "partial_run"
    shutil.copytree(other, partial)
    (partial / "metrics.json").unlink()
    (partial / "seed_0" / "task_002.safetensors").unlink()
    cli.main(["eval", str(partial)])
    # The partial run's routing comes from its last checkpoint: the full run's first two tasks.
    routing, full = load_results(partial)["routing"], read_metrics(other)["routing"]
    assert routing["per_seed"][0]["task_usage"] == full["per_seed"][0]["task_usage"][:2]
    assert routing["per_seed"][0]["test_in_task_experts"] == full["per_seed"][0]["test_in_task_experts"][:2]
    assert {k: v for k, v in routing.items() if k != "per_seed"} == {k: v for k, v in full.items() if k != "per_seed"}

    cli.main(["report", str(tiny_run), str(other), str(partial), "--out", str(tmp_path / "compared")])
    assert imread(tmp_path / "compared" / "accuracy_curves.png").shape[0] > 100
    table = (tmp_path / "compared" / "comparison.md").read_text()
    faa = read_metrics(tiny_run)["final_average_accuracy"]
    assert f"| smope_run | smope | digits | 3 | 1 | {faa:.2f} ± 0.00 |" in table
    assert "| partial_run (partial: 2 of 3 tasks) | dense-prompt | digits | 2 of 3 |" in table
    differences = table.split("## Settings that differ")[1]
    assert "| `method.name` | `smope` | `dense-prompt` | `dense-prompt` |" in differences
    assert "output_dir" not in differences and "train.loggers" not in differences


def test_comparing_runs_needs_an_output_folder(tiny_run, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["report", str(tiny_run), str(tiny_run)])
    assert stopped.value.code == 2
    assert "--out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'smope[tensorboard]')")
def test_tensorboard_events_hold_the_per_task_accuracy(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard" / "seed_0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"accuracy/task_1", "accuracy/task_3", "train/loss", "train/lr_group0", "routing/usage_balance"} <= set(tags)
    metrics = read_metrics(tiny_run)
    average = [(e.step, e.value) for e in events.Scalars("accuracy/average")]
    assert [s for s, _ in average] == [1, 2, 3]
    assert np.allclose([v for _, v in average], metrics["average_accuracy"], atol=1e-4)
    first_task = [e.value for e in events.Scalars("accuracy/task_1")]
    assert np.allclose(first_task, [row[0] for row in metrics["accuracy_matrix"]], atol=1e-4)


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'smope[wandb]')")
def test_wandb_writes_one_offline_run_per_seed(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logged = []
    real_log = WandbLogger.log
    monkeypatch.setattr(WandbLogger, "log", lambda self, values, step: logged.append(values) or real_log(self, values, step))
    cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "train.epochs=1", "seeds=[0,1]", "train.loggers=[wandb]"])
    logs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(logs) == 2 and all(log.stat().st_size > 0 for log in logs)
    averages = [values["accuracy/average"] for values in logged if "accuracy/average" in values]
    per_seed = read_metrics(tmp_path / "run")["per_seed"]
    assert averages == pytest.approx([a for run in per_seed for a in run["average_accuracy"]])


def test_a_missing_logger_package_names_the_extra(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "train.loggers=[wandb]"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "pip install 'smope[wandb]'" in error
    assert not (tmp_path / "run" / "seed_0").exists()


def test_an_unknown_logger_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "train.loggers=[mlflow]"])
    assert "unknown logger 'mlflow'" in capsys.readouterr().err


def test_backbone_identity_names_timm_tags_and_hashes_files(tmp_path):
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"weights")
    local = backbone_identity(ModelConfig(name="vit_base_patch16_224", weights=str(weights)))
    assert local["file"] == {"path": str(weights.resolve()), "sha256": hashlib.sha256(b"weights").hexdigest()}
    default = backbone_identity(ModelConfig(name="vit_base_patch16_224", weights="pretrained"))
    assert default["timm_tag"].startswith("vit_base_patch16_224.") and default["hf_hub_id"].endswith(default["timm_tag"])
    tagged = backbone_identity(ModelConfig(name="vit_base_patch16_224", weights="augreg_in21k"))
    assert tagged["timm_tag"] == "vit_base_patch16_224.augreg_in21k"
