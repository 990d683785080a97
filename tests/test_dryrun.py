"""ImageNet-R's fixed split and `smope run CONFIG --dry-run`: the setup checks a researcher runs before a GPU run."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import pytest

from smope.data import IMAGENET_R_SPLIT_FILE, load_dataset
from smope.errors import SmopeError


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
