"""The data side of a fast run: uint8 batches normalised on the device, caches, one evaluation loader, the device pipeline."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode, v2

from helpers import TINY

from smope import cli, distributed
from smope.data import ArrayDataset, ClassIncrementalScenario, build_transform, cache_dataset, normalize_pixels
from smope.data import cache as cache_module
from smope.data.device_pipeline import DeviceArray, DevicePipeline, EncodedFiles, device_source
from smope.data.loading import MAX_AUTO_WORKERS, auto_workers
from smope.data.prepared import TensorImages
from smope.data.synthetic import photo, write_image_folder
from smope.errors import SmopeError
from smope.experiment import SeedRun, evaluate
from smope.runconfig import load_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jpeg_folder(root: Path, classes: int, per_class: int, ext: str = ".jpg") -> Path:
    return write_image_folder(root, classes, per_class, (50, 38), ext)


def test_device_normalisation_gives_the_cpu_transforms_floats_bit_for_bit():
    """uint8 + normalize_pixels on a batch == ToDtype + Normalize in the transform, image by image (same kernels, elementwise)."""
    images = [photo(i, (50, 38)) for i in range(6)]
    for mean, std in ((IMAGENET_MEAN, IMAGENET_STD), ((0.0,) * 3, (1.0,) * 3)):
        float_path = torch.stack([build_transform(24, mean, std, train=False)(image) for image in images])
        uint8_path = torch.stack([build_transform(24, mean, std, train=False, uint8=True)(image) for image in images])
        assert uint8_path.dtype == torch.uint8
        assert torch.equal(normalize_pixels(uint8_path, (mean, std)), float_path)
    assert normalize_pixels(float_path, (IMAGENET_MEAN, IMAGENET_STD)) is float_path  # float inputs pass unchanged


def test_cache_holds_uint8_and_its_guard_counts_real_bytes():
    images = np.zeros((3, 224, 224, 3), dtype=np.uint8)
    view = ClassIncrementalScenario(
        ArrayDataset(images, [0, 1, 2], ["a", "b", "c"]),
        ArrayDataset(images, [0, 1, 2], ["a", "b", "c"]),
        1,
        0,
        test_transform=build_transform(224, IMAGENET_MEAN, IMAGENET_STD, train=False, uint8=True),
    ).test_dataset(0)
    cached, _ = cache_dataset(view).tensors
    assert cached.dtype == torch.uint8 and cached[0].nbytes == 150_528  # 224 * 224 * 3, not 602,112
    assert cache_module.cache_bytes(view) == 3 * (150_528 + 8)
    with pytest.raises(SmopeError, match=r"needs 0\.00 GiB.*set data\.cache=false"):
        cache_dataset(view, max_bytes=3 * 150_528)


def test_node_cache_is_one_mapped_file_the_other_processes_read(monkeypatch, tmp_path):
    """Under torchrun with 2 processes on a machine: local rank 0 writes the file, rank 1 maps the same bytes, the file is then unlinked."""
    data = [(torch.full((3, 4, 4), i, dtype=torch.uint8), i % 2) for i in range(5)]
    dataset = TensorImages(torch.stack([d for d, _ in data]), torch.tensor([lab for _, lab in data]), ["a", "b"])
    monkeypatch.setenv("SMOPE_SHARED_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    built_images, built_labels = cache_module.node_cache(dataset, "test").tensors
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped; the mapping keeps the pages
    assert torch.equal(built_images, dataset.images) and built_labels.tolist() == dataset.targets
    mapped, labels = cache_module.shared_cache(dataset, "again.bin", build=True).tensors
    monkeypatch.setenv("LOCAL_RANK", "1")
    other, other_labels = cache_module.shared_cache(dataset, "again.bin", build=False).tensors
    assert torch.equal(other, dataset.images) and other_labels.tolist() == labels.tolist()
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda _: SimpleNamespace(free=10))  # a full /dev/shm
    with pytest.raises(SmopeError, match=r"shared data cache needs .* only 0\.00 GiB is free.*data\.cache=false"):
        cache_module.node_cache(dataset, "test")


def test_one_evaluation_loader_counts_each_task_like_one_loader_per_task(finished_run):
    """The evaluation after the last task, through one loader, equals the per-task accuracies of per-task loaders."""
    from smope.rundir import RunDir

    run_dir = RunDir(finished_run)
    config = run_dir.config()
    seed_run = SeedRun(config, 0, run_dir)
    seed_run.build()
    last = seed_run.scenario.num_tasks - 1
    seed_run.restore(last)
    learner, scenario = seed_run.learner, seed_run.scenario
    per_task = []
    for j in range(last + 1):
        correct = total = 0
        for images, labels in seed_run.trainer.loader(scenario.test_dataset(j), 7, shuffle=False):  # odd batches: mixed tasks
            correct += int((learner.logits(images)[:, : scenario.seen_classes(last).stop].argmax(-1).cpu() == labels).sum())
            total += len(labels)
        per_task.append(100.0 * correct / total)
    seen_tasks = []
    assert evaluate(learner, seed_run.trainer, scenario, last, False, lambda tasks: seen_tasks.append(tasks)) == per_task
    assert sorted(torch.cat(seen_tasks).tolist()) == sorted(t for t in range(last + 1) for _ in scenario.test_dataset(t))


def test_unshuffled_passes_reuse_their_loader_and_training_loaders_are_fresh():
    from smope.trainer import Trainer

    trainer = Trainer(load_config(TINY, ["train.device=cpu"]))
    data = TensorImages(torch.zeros(10, 3, 2, 2), torch.zeros(10, dtype=torch.long), ["a"])
    assert trainer.loader(data, 4, shuffle=False) is trainer.loader(data, 4, shuffle=False)
    assert trainer.loader(data, 4, shuffle=True) is not trainer.loader(data, 4, shuffle=True)
    other = TensorImages(torch.zeros(3, 3, 2, 2), torch.zeros(3, dtype=torch.long), ["a"])
    assert len(trainer.loader(other, 4, shuffle=False)) == 1 and trainer.loader(data, 4, shuffle=False) is not None


def test_auto_workers(monkeypatch):
    assert auto_workers(torch.device("cpu")) == 0  # CPU runs: deterministic and free of worker start-up
    monkeypatch.setattr("smope.data.loading.available_cpus", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers(torch.device("cuda", 0)) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_workers(torch.device("cuda", 0)) == MAX_AUTO_WORKERS
    assert load_config(None, []).data.num_workers == "auto"


@pytest.mark.parametrize(
    "override, expected",
    [("data.num_workers=-1", "data.num_workers' must be auto or an integer >= 0"), ("data.prefetch=0", "data.prefetch' must be >= 1"),
     ("data.pipeline=tpu", "data.pipeline' must be one of cpu, gpu")],
)
def test_loader_keys_are_checked(override, expected):
    with pytest.raises(SmopeError, match=expected.replace(".", r"\.")):
        load_config(TINY, [override])


def test_device_pipeline_matches_pil_on_the_same_crop(tmp_path):
    """Same file, same crop box, same bicubic resize: torchvision's tensor kernels against PIL's. Largest difference: stated below."""
    path = tmp_path / "photo.jpg"
    photo(7).save(path, quality=90)
    box = dict(top=40, left=60, height=250, width=300, size=[224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pil = v2.functional.pil_to_tensor(v2.functional.resized_crop(Image.open(path).convert("RGB"), **box))
    decoded = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    assert torch.equal(decoded, v2.functional.pil_to_tensor(Image.open(path).convert("RGB")))  # same libjpeg decode on CPU
    tensor = v2.functional.resized_crop(decoded, **box)
    difference = (pil.int() - tensor.int()).abs()
    # Measured on 20 such crops: at most 2 levels of 255, mean 0.003: PIL resamples in fixed point, torchvision in float.
    assert difference.max() <= 2 and difference.float().mean() < 0.5


def test_device_pipeline_batches_files_and_arrays(tmp_path):
    steps = v2.Compose([v2.RandomResizedCrop((16, 16), antialias=True), v2.RandomHorizontalFlip()])
    folder = _jpeg_folder(tmp_path / "jpegs", 2, 3)
    files = EncodedFiles([(str(p), int(p.parent.name[-1])) for p in sorted(folder.rglob("*.jpg"))], ["class000", "class001"])
    pipeline = DevicePipeline(steps, random=True)
    encoded, labels = pipeline.collate([files[i] for i in range(4)])
    out = pipeline(encoded, torch.device("cpu"))
    assert out.shape == (4, 3, 16, 16) and out.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 1]
    grey = DeviceArray(np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8), [0, 1, 0, 1, 0], ["a", "b"])
    resize = DevicePipeline(v2.Resize((16, 16), antialias=True), random=False, array=grey)
    batch = resize(torch.tensor([4, 1]), torch.device("cpu"))
    expected = v2.functional.resize(grey.images[[4, 1]], [16, 16], antialias=True)
    assert torch.equal(batch, expected) and torch.equal(batch[:, 0], batch[:, 2])  # grey repeated into RGB, as PIL's convert


def test_gpu_pipeline_refuses_files_it_cannot_decode(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "bmp", 2, 3, ext=".bmp")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={root}", "data.pipeline=gpu"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decodes JPEG and PNG files only" in err and "use data.pipeline=cpu" in err
    with pytest.raises(SmopeError, match="neither; use data.pipeline=cpu"):
        device_source(type("Odd", (), {"targets": [0], "classes": ["a"]})(), [0], "odd")


def test_gpu_pipeline_trains_on_jpegs_and_resume_refuses_the_other_pipeline(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "jpegs", 4, 6)
    out = tmp_path / "run"
    common = [f"output_dir={out}", "data.name=imagefolder", f"data.root={root}", "data.num_tasks=2", "data.first_task_classes=null", "train.epochs=1"]
    cli.main(["run", TINY, *common, "data.pipeline=gpu", "data.augment=[random_resized_crop,hflip,color_jitter]"])
    assert (out / "metrics.json").is_file()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, *common, "data.augment=[random_resized_crop,hflip,color_jitter]"])
    assert stopped.value.code == 2 and "data.pipeline" in capsys.readouterr().err
