"""Nothing a user types costs them a run: each mistake is one line and exit 2, finished tasks survive,
and a run directory's checkpoints cannot silently disagree with each other."""

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import TINY, fails, read_metrics
from PIL import Image

from smope import backbones, cli
from smope.checkpoint import chain_link, save_checkpoint, verify_chain
from smope.divergence import DivergenceGuard
from smope.learners.smope_learner import SMoPELearner
from smope.runconfig import load_config




def logged_tasks(run_dir: Path) -> list[int]:
    return [json.loads(line)["task"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def recovered_run(tmp_path_factory) -> Path:
    """A failed first start (missing data) and then the corrected command into the same output_dir."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={out}", "data.name=imagefolder", "data.root=/nope"])
    assert stopped.value.code == 2 and (out / "config.yaml").is_file()
    cli.main(["run", TINY, f"output_dir={out}"])
    return out


def test_corrected_command_after_a_failed_start_runs_to_the_end(recovered_run):
    assert read_metrics(recovered_run)["num_tasks"] == 3
    assert load_config(recovered_run / "config.yaml").data.name == "digits"
    assert logged_tasks(recovered_run) == [0, 1, 2]


def test_broken_chain_is_refused_by_eval_and_recomputed_by_run(recovered_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(recovered_run, out)
    (out / "seed_0" / "task_001.safetensors").unlink()
    message = fails(capsys, "eval", str(out))
    assert "task_001.safetensors is missing" in message and f"smope run {out / 'config.yaml'} output_dir={out}" in message
    cli.main(["run", TINY, f"output_dir={out}"])
    printed = capsys.readouterr().out
    assert "task_001.safetensors is missing; recomputing from task 2" in printed
    assert "task 2/3" in printed and "task 3/3" in printed  # both later tasks are trained again
    assert read_metrics(out) == read_metrics(recovered_run)
    assert logged_tasks(out) == [0, 1, 2]
    cli.main(["eval", str(out)])  # the chain is whole again


def test_divergence_after_a_finished_task_says_how_to_change_the_config(recovered_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(recovered_run, out)
    (out / "seed_0" / "task_002.safetensors").unlink()
    guard = DivergenceGuard(load_config(TINY), "task 3", [{"lr": 0.03}])

    def diverge(self, ctx):
        guard.diverged(torch.tensor(float("nan")))
        raise guard.error(epoch=1)

    monkeypatch.setattr(SMoPELearner, "train_task", diverge)
    message = fails(capsys, "run", TINY, f"output_dir={out}")
    assert "Lower train.lr (now 0.03)" in message and "precision" not in message
    assert f"set output_dir to a new folder, or delete {out}" in message
    assert (out / "seed_0" / "task_001.safetensors").is_file()


def test_growing_loss_stops_the_run_before_any_task_and_keeps_the_dir_usable(tmp_path, capsys):
    out = tmp_path / "run"
    message = fails(capsys, "run", TINY, f"output_dir={out}", "train.lr=1e6", "train.epochs=1")
    assert "the training loss grew from" in message and "Lower train.lr (now 1e+06)" in message
    assert "precision" not in message and f"may keep output_dir={out}" in message


def test_divergence_rule_and_advice():
    bf16 = load_config(None, ["train.precision=bf16", "method.name=lora"])
    guard = DivergenceGuard(bf16, "task 1", [{"lr": bf16.method.lora_lr, "lr_key": "method.lora_lr"}, {"lr": bf16.train.lr, "lr_key": "train.lr"}])
    for _ in range(30):
        assert not guard.diverged(torch.tensor(2.0))  # a flat loss is fine
    assert not any(guard.diverged(torch.tensor(150.0)) for _ in range(3))  # a few bad steps are not enough
    assert any(guard.diverged(torch.tensor(300.0)) for _ in range(10))
    message = str(guard.error(epoch=2))
    assert "train.lr (now 0.005) or method.lora_lr (now 0.0005)" in message and "train.precision=fp32 (now bf16)" in message
    small = DivergenceGuard(bf16, "task 1", [{"lr": 0.005}])
    for _ in range(20):  # 100x a tiny starting loss is still below the absolute floor
        assert not small.diverged(torch.tensor(0.01 if _ == 0 else 5.0))


def test_checkpoint_chain_finds_each_kind_of_break(tmp_path):
    paths = [tmp_path / f"task_{t:03d}.safetensors" for t in range(4)]

    def write(task: int, seed: int = 0, run: str = "r", previous: Path | None = None) -> None:
        previous = previous if previous is not None else (paths[task - 1] if task else None)
        save_checkpoint(paths[task], {"x": torch.full((2,), float(task))}, chain_link(run, seed, task, previous))

    for task in range(4):
        write(task)
    assert verify_chain(paths, seed=0).length == 4 and verify_chain(paths, seed=0).problem is None
    assert verify_chain(paths, seed=1).problem.endswith("holds seed 0 task 0, not seed 1 task 0")
    write(0, run="r")  # rewritten: identical content, the chain still holds
    assert verify_chain(paths, seed=0).length == 4
    save_checkpoint(paths[1], {"x": torch.zeros(3)}, chain_link("r", 0, 1, paths[0]))  # task 1 trained again differently
    chain = verify_chain(paths, seed=0)
    assert chain.length == 2 and "task_002.safetensors was not trained from the task_001.safetensors now on disk" in chain.problem
    write(2, run="other")
    assert "belongs to another run" in verify_chain(paths, seed=0).problem
    paths[3].write_bytes(b"\0garbage")
    paths[2].unlink()
    chain = verify_chain(paths, seed=0)
    assert chain.length == 2 and chain.problem == f"{paths[2]} is missing"
    write(2)
    chain = verify_chain(paths, seed=0)
    assert chain.length == 3 and "task_003.safetensors is damaged" in chain.problem


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(tmp_path, capsys, workers):
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / label / f"{i}.png")
    bad = root / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    message = fails(
        capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={root}",
        "data.num_tasks=1", "data.first_task_classes=null", f"data.num_workers={workers}",
    )
    assert f"cannot read image {bad}" in message and "delete or replace that file" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.layers=[99]", "config key 'method.layers' must list distinct block indices in [0, 1] (this model has 2 blocks), got [99]"),
        ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
        ("train.min_lr=-1", "config key 'train.min_lr' must be >= 0"),
        ("data.train_per_class=0", "config key 'data.train_per_class' must be >= 1"),
        ("seeds=[0,0]", "config key 'seeds' must list at least one seed, each once"),
        ("method.pool_size=3", "method.pool_size is not read by method.name=smope, so it would change nothing"),
        ("model.weights=WEIGHTS_FILE", "cannot load model.weights="),
        pytest.param(
            "train.device=cuda", "torch finds no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
        ),
    ],
)
def test_bad_setting_is_one_line(override, expected, tmp_path, capsys):
    """Refused when the run starts: one line, exit 2."""
    weights = tmp_path / "not_a_checkpoint.pth"
    weights.write_bytes(b"\0garbage")
    override = override.replace("WEIGHTS_FILE", str(weights))
    assert expected in fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", override)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["method.name=hide-prompt", "method.prompt_layers=[0,40]"], "'method.prompt_layers' must list distinct block indices in [0, 1] (this model has 2 blocks)"),
        (["method.name=dualprompt", "method.prompt_layers=[1]", "method.g_prompt_layers=[5]"], "'method.g_prompt_layers' must list distinct block indices in [0, 1]"),
        (["method.name=vq-prompt", "method.prompt_layers=[2]"], "'method.prompt_layers' must list distinct block indices in [0, 1]"),
        (["method.layers=[0,40]"], "'method.layers' must list distinct block indices in [0, 1]"),
        (["method.name=l2p", "method.pool_size=0"], "config key 'method.pool_size' must be >= 1, got 0"),
        (["method.name=l2p", "method.prompt_length=3"], "config key 'method.prompt_length' must be even and >= 2"),
        (["method.name=lora", "method.lora_r=0"], "config key 'method.lora_r' must be >= 1, got 0"),
        (["method.name=norga", "method.pool_size=2"], "must be at least data.num_tasks=3"),
        (["method.name=norga", "method.norga_gate=swish"], "config key 'method.norga_gate' must be one of"),
        (["method.name=l2p", "method.pool_size=3"], "config key 'method.pool_top_k'=5 must not exceed method.pool_size=3"),  # a published default
        (["method.name=dualprompt"], "'method.prompt_layers' must list distinct block indices in [0, 1]"),  # published [2, 3, 4], 2 blocks
        (["method.name=coda-prompt", "method.ortho_weight=-1"], "config key 'method.ortho_weight' must be >= 0, got -1"),
    ],
)
def test_settings_a_method_cannot_honour_are_refused_by_the_dry_run(overrides, expected, capsys):
    """Prompt blocks outside the backbone, empty pools or ranks: refused at load, before any data or model."""
    assert expected in fails(capsys, "run", TINY, *overrides, "--dry-run")


def test_params_with_bad_layers_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["params", "--model", "vit_base_patch16_224", "--num-classes", "10", "--layers", "a"])
    assert stopped.value.code == 2 and "expected comma-separated block indices" in capsys.readouterr().err
    assert fails(capsys, "params", "--model", "vit_base_patch16_224", "--num-classes", "10", "--layers", "0,99").endswith(
        "invalid method.layers: layers [99] do not exist: this model has 12 blocks, so layers must be in [0, 11]\n"
    )


def test_unwritable_output_dir_fails_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(SMoPELearner, "__init__", lambda *a: pytest.fail("work started"))
    message = fails(capsys, "run", TINY, f"output_dir={blocker / 'run'}")
    assert f"cannot write to output_dir {blocker / 'run'}" in message


def test_yaml_error_names_the_file(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  epochs: [1,\n")
    message = fails(capsys, "run", str(config))
    assert f"config file {config} is not valid YAML (line 3, column 1:" in message and "<unicode string>" not in message


def test_dataset_download_without_network_names_url_and_folder(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    message = fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", "data.name=cifar100", f"data.root={root}", "data.download=true")
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message and f"put the file(s) in {root};" in message


def test_hub_weights_without_network_fail_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(backbones, "hub_reachable", lambda *a: False)
    message = fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", "model.weights=augreg_in21k")
    assert "cannot be reached" in message and "HF_HUB_OFFLINE=1" in message and "model.weights=/path/to/file.safetensors" in message
    assert "may keep output_dir" in message


def test_log_has_one_line_per_finished_task_after_any_resume(recovered_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(recovered_run, out)
    lines = (out / "log.jsonl").read_text().splitlines()
    # a line repeated by an earlier recompute, and the last one lost to a kill between checkpoint and log
    (out / "log.jsonl").write_text("\n".join([lines[0], lines[1], lines[1]]) + "\n")
    cli.main(["run", TINY, f"output_dir={out}"])
    assert (out / "log.jsonl").read_text().splitlines() == lines
