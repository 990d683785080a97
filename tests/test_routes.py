"""`smope predict --routes`: per-image experts, margins and the task the routing points to, on a tiny two-task run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY
from PIL import Image
from sklearn.datasets import load_digits

import smope
from smope import cli
from smope.errors import SmopeError
from smope.predict import image_batches, load_trained_run, predict

pytestmark = pytest.mark.usefixtures("one_thread")


def two_task_config(tmp_path: Path, **method) -> Path:
    """configs/tiny.yaml as two short tasks, with ``method`` replacing its method section when given."""
    config = yaml.safe_load(Path(TINY).read_text())
    config["data"]["num_tasks"] = 2
    config["train"]["epochs"] = 2
    config["method"].update(align_epochs=2)
    if method:
        config["method"] = method
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("routes")
    out = folder / "run"
    cli.main(["run", str(two_task_config(folder)), f"output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[Path]:
    """Five digit images of different classes as PNG files."""
    folder = tmp_path_factory.mktemp("digits")
    data = load_digits()
    paths = []
    for digit in (0, 3, 5, 7, 9):
        index = int(np.flatnonzero(data.target == digit)[0])
        path = folder / f"digit_{digit}.png"
        Image.fromarray((data.images[index] * 16).clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def routed(two_task_run, digits):
    run = load_trained_run(two_task_run)
    return run, predict(run, digits, routes=True)


def test_selected_experts_are_the_ones_the_layers_attend_to(routed, digits):
    run, results = routed
    layers = smope.prompted_layers(run.learner.model)
    seen = [[] for _ in layers]
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(m.last_selected)) for i, layer in enumerate(layers)]
    try:
        for _, images in image_batches(run, digits):
            run.learner.logits(images)
    finally:
        for handle in handles:
            handle.remove()
    attended = [torch.cat(batches) for batches in seen]  # per layer, (images, heads, K)
    for image, result in enumerate(results):
        for index, layer in enumerate(result["routes"]["layers"]):
            assert [head["experts"] for head in layer["heads"]] == attended[index][image].tolist()


def test_margins_are_the_gap_to_the_first_unselected_expert(routed):
    _, results = routed
    for result in results:
        for layer in result["routes"]["layers"]:
            for head in layer["heads"]:
                assert head["margin"] >= 0
                assert head["first_unselected"] not in head["experts"]
                assert head["margin"] == pytest.approx(min(head["gate_scores"]) - head["first_unselected_gate_score"])
        lowest = result["routes"]["lowest_margins"]
        assert [m["margin"] for m in lowest] == sorted(m["margin"] for m in lowest)


def test_the_task_summary_is_a_task_of_the_run(routed):
    run, results = routed
    for result in results:
        routes = result["routes"]
        assert routes["task"] in (1, 2) and 0 < routes["agreement"] <= 1
        assert routes["agreement"] == pytest.approx(max(routes["task_votes"]))
        assert sum(routes["task_votes"]) <= 1 + 1e-9 and 0 <= routes["single_task_heads"] <= 1
        label = result["predictions"][0]["label"]
        assert routes["predicted_class_task"] == (1 if label < run.task_sizes[0] else 2)
        for layer in routes["layers"]:
            for head in layer["heads"]:
                assert len(head["task_overlap"]) == 2 and all(0 <= v <= 1 + 1e-9 for v in head["task_overlap"])
                assert set(head["votes_for"]) <= {1, 2}
                assert all(set(tasks) <= {1, 2} for tasks in head["used_by"])


def test_json_holds_every_layer_and_head(two_task_run, digits, capsys):
    cli.main(["predict", str(two_task_run), str(digits[0]), str(digits[1]), "--routes", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [str(digits[0]), str(digits[1])]
    routes = results[0]["routes"]
    assert {"seed", "after_task", "task", "agreement", "task_votes", "mean_task_overlap", "predicted_class_task", "lowest_margins", "layers"} <= routes.keys()
    assert routes["after_task"] == 2
    assert [layer["layer"] for layer in routes["layers"]] == ["blocks.0.attn", "blocks.1.attn"]
    for layer in routes["layers"]:
        assert [head["head"] for head in layer["heads"]] == [0, 1, 2, 3]
        for head in layer["heads"]:
            assert len(head["experts"]) == len(head["scores"]) == len(head["gate_scores"]) == len(head["used_by"]) == 2


def test_terminal_table_has_one_row_per_image(two_task_run, digits, capsys):
    cli.main(["predict", str(two_task_run), *map(str, digits[:2]), "--routes"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("routes of seed 0 after task 2") and "routing points to" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == [str(digits[0]), str(digits[1])]
    assert all("% of heads" in line and "blocks." in line for line in lines[2:])


def test_routes_of_a_gateless_method_is_one_line_and_exit_2(tmp_path, digits, capsys):
    out = tmp_path / "run"
    cli.main(["run", str(two_task_config(tmp_path, name="prototype")), f"output_dir={out}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(out), str(digits[0]), "--routes"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: method.name=prototype has no gate (no sparse prompt experts): --routes applies to smope and joint runs"]
    with pytest.raises(SmopeError, match="smope and joint"):
        predict(load_trained_run(out), digits[:1], routes=True)
