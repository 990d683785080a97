"""Loader throughput: today's float path, the uint8 path and the cached test path, and a 10-task evaluation.

Part 1, images/s of ONE loader worker (``DataLoader(num_workers=1)``, what the main process
receives, shared-memory hand-over included) for the train and test transforms, on generated
500x375 JPEGs and on a CIFAR-like uint8 array (32 px, resized to 224): the float path (PIL,
``ToDtype`` + ``Normalize`` in the worker, 602,112 bytes per image), the uint8 path (PIL, uint8
out, 150,528 bytes; the device normalises) and, for the test split, the cached path (the uint8
cache gathered batch by batch in the main process, no worker). The uint8 path's device-side
normalisation is timed apart (on this CPU, where it is not free).

Part 2, the evaluation after task 10 of a 10-task run over generated JPEGs: one loader per
test task over a float cache (as before) against one loader over all seen tasks and a uint8
cache (the trainer's), same frozen random-weight model, same predictions (checked). The model
is one block of width 8 so that the time is the data path's, as on a GPU where the forward of
a batch costs milliseconds; the uint8 path's normalisation still runs on this CPU and counts.

Ratios are measured in one run, interleaved, best of ``--repeats``. Part 2 also times the device
work inside each evaluation (the forward, and the uint8 path's normalisation, which run on this
CPU here and on the GPU in a GPU run) and gives the ratio of the host sides alone.

    OMP_NUM_THREADS=1 python benchmarks/loader.py [--eval-images 5000] [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from smope import distributed
from smope.data import ArrayDataset, ClassIncrementalScenario, build_transform, normalize_pixels
from smope.data.cache import cache_dataset
from smope.data.datasets import load_dataset
from smope.data.prepared import TensorImages, TransformedView, split_transform
from smope.data.synthetic import write_image_folder
from smope.experiment import SeedRun, evaluate
from smope.runconfig import load_config
from smope.rundir import RunDir

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN_AUGMENT = ["random_resized_crop", "hflip", "color_jitter"]


def cpu_name() -> str:
    """The CPU model, its widest vector units and the cores this process may use (numbers depend on all three)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = len(os.sched_getaffinity(0))
    return f"{model} ({simd} flags, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {cores} cores available, load average {load:.1f})"


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def drain(loader) -> int:
    return sum(len(labels) for _, labels in loader)


class Transformed(Dataset):
    def __init__(self, raw: Dataset, transform: Callable) -> None:
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int):
        image, label = self.raw[index]
        return self.transform(image), label


def worker_rates(raw: Dataset, img_size: int, repeats: int, batch: int = 32) -> dict[str, float]:
    """Images/s of one worker for the float and uint8 train and test paths of ``raw``, and of the cached test path."""
    rates = {}
    paths = {
        "train float": build_transform(img_size, MEAN, STD, True, TRAIN_AUGMENT),
        "train uint8": build_transform(img_size, MEAN, STD, True, TRAIN_AUGMENT, uint8=True),
        "test float": build_transform(img_size, MEAN, STD, False),
        "test uint8": build_transform(img_size, MEAN, STD, False, uint8=True),
    }
    for name, transform in paths.items():
        loader = DataLoader(Transformed(raw, transform), batch_size=batch, num_workers=1, persistent_workers=True)
        drain(loader)  # warm-up: worker start and first-call allocations
        rates[name] = len(raw) / best_of(repeats, lambda loader=loader: drain(loader))
    images, labels = cache_dataset(Transformed(raw, paths["test uint8"])).tensors
    cached = TensorImages(images, labels, ["x"])
    from smope.trainer import Trainer

    trainer = Trainer(load_config(None, ["train.device=cpu"]))
    trainer.pixel_norm = (MEAN, STD)
    raw_batches = trainer.loader(cached, batch, shuffle=False).loader  # the gather alone: normalisation belongs to the device
    rates["test cached"] = len(raw) / best_of(repeats, lambda: drain(raw_batches))
    rates["device normalisation (on this CPU)"] = len(raw) / best_of(repeats, lambda: [normalize_pixels(images[i : i + batch], (MEAN, STD)) for i in range(0, len(images), batch)])
    return rates


class DeviceWork:
    """Seconds spent in what a GPU run does on the device: the forward and the uint8 path's normalisation.

    Wraps ``learner.logits`` and the trainer's ``normalize_pixels`` while installed; the rest of an
    evaluation's time is its host side (loaders, workers, gathers, shared-memory hand-over),
    which on a GPU machine the device waits on.
    """

    def __init__(self, learner) -> None:
        import smope.trainer

        self.seconds = 0.0
        self.patches = [(learner, "logits", learner.logits), (smope.trainer, "normalize_pixels", smope.trainer.normalize_pixels)]

    def timed(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper

    def __enter__(self) -> DeviceWork:
        for owner, name, fn in self.patches:
            setattr(owner, name, self.timed(fn))
        return self

    def __exit__(self, *exc) -> None:
        (learner, _, _), (module, name, fn) = self.patches
        del learner.logits  # the instance attribute set above: the class's method shows again
        setattr(module, name, fn)


def timed_with_device_work(learner, fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of ``fn()`` and the part of them spent in device work (:class:`DeviceWork`)."""
    with DeviceWork(learner) as work:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall, work.seconds


def todays_evaluate(learner, scenario: ClassIncrementalScenario, task: int, workers: int, batch: int) -> list[float]:
    """The evaluation as it was: one DataLoader per test task (workers started for each), float images from the loader."""
    seen = scenario.seen_classes(task)
    accuracies = []
    for j in range(task + 1):
        data = scenario.test_dataset(j)
        loader = DataLoader(data, batch_size=batch, sampler=distributed.ShardSampler(len(data), False), num_workers=workers)
        correct = total = 0
        for images, labels in loader:
            correct += int((learner.logits(images)[:, : seen.stop].argmax(-1).cpu() == labels).sum())
            total += len(labels)
        accuracies.append(100.0 * correct / max(total, 1))
    return accuracies


def evaluation(root: Path, classes: int, per_class: int, workers: int, repeats: int, img_size: int) -> dict:
    """Seconds of the evaluation after task 10: per-task loaders + float cache vs one loader + uint8 cache."""
    write_image_folder(root / "train", classes, 1, first_seed=10**6)
    write_image_folder(root / "test", classes, per_class)
    config = load_config(None, [
        "data.name=imagefolder", f"data.root={root}", "data.num_tasks=10", "method.name=head-only", "model.name=vit_tiny_patch16_224",
        "model.weights=none", f"model.img_size={img_size}", "model.kwargs={patch_size: 32, embed_dim: 8, depth: 1, num_heads: 2}",
        "train.device=cpu", f"data.num_workers={workers}", "train.progress=false",
    ])
    seed_run = SeedRun(config, 0, RunDir(root / "run"))
    started = time.perf_counter()
    seed_run.build()  # the uint8 caches
    uint8_cache = time.perf_counter() - started
    learner, scenario = seed_run.learner, seed_run.scenario
    raw_test = load_dataset("imagefolder", str(root), False)
    started = time.perf_counter()
    float_view = TransformedView(raw_test, list(range(len(raw_test))), split_transform(config, learner.model, train=False))
    images, labels = cache_dataset(float_view, num_workers=workers).tensors
    float_cache = time.perf_counter() - started
    old_scenario = ClassIncrementalScenario(seed_run.data.train, TensorImages(images, labels, float_view.classes), 10, 0)
    last, batch = scenario.num_tasks - 1, config.train.eval_batch_size
    before = todays_evaluate(learner, old_scenario, last, workers, batch)
    after = evaluate(learner, seed_run.trainer, scenario, last, False)
    if before != after:
        raise AssertionError(f"the two evaluations disagree: {before} vs {after}")
    old, new = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        old.append(timed_with_device_work(learner, lambda: todays_evaluate(learner, old_scenario, last, workers, batch)))
        new.append(timed_with_device_work(learner, lambda: evaluate(learner, seed_run.trainer, scenario, last, False)))
    (old_s, old_device), (new_s, new_device) = min(old), min(new)
    return {
        "test_images": len(raw_test),
        "tasks": scenario.num_tasks,
        "workers": workers,
        "per_task_loaders_float_cache_s": old_s,
        "one_loader_uint8_cache_s": new_s,
        "speedup": old_s / new_s,
        # Device work (forward; the uint8 path's normalisation) timed inside each: on a GPU it overlaps or vanishes.
        "device_work_s": {"per_task_loaders_float_cache": old_device, "one_loader_uint8_cache": new_device},
        "host_side_speedup": (old_s - old_device) / (new_s - new_device),
        "same_accuracies": True,
        "cache_bytes_per_image": {"float": images[0].nbytes, "uint8": seed_run.data.test.images[0].nbytes},
        "cache_build_s": {"float": float_cache, "uint8": uint8_cache},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per throughput measurement")
    parser.add_argument("--eval-images", type=int, default=5000, help="test images of the 10-task evaluation (100 classes)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the evaluation (both paths)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.eval_images, args.repeats, args.img_size, args.workers = 16, 200, 1, 32, 0
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    results: dict = {"cpu": cpu_name()}
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = load_dataset("imagefolder", str(write_image_folder(Path(tmp) / "jpegs", 4, args.images // 4)), True)
        cifar = ArrayDataset(np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8), [0] * args.images, ["x"])
        results["worker_images_per_s"] = {
            "500x375 JPEG": worker_rates(jpegs, args.img_size, args.repeats),
            "CIFAR-like 32 px array": worker_rates(cifar, args.img_size, args.repeats),
        }
        for source, rates in results["worker_images_per_s"].items():
            print(f"\n{source} -> {args.img_size} px, images/s of one worker (ratio to the float path of the same split)")
            for name, rate in rates.items():
                split = name.split()[0]
                ratio = f"{rate / rates[f'{split} float']:.2f}x" if f"{split} float" in rates else ""
                print(f"  {name:<36} {rate:9.0f}  {ratio}")
        classes = 100 if args.eval_images >= 100 else 10
        results["evaluation"] = evaluation(Path(tmp) / "eval", classes, args.eval_images // classes, args.workers, args.repeats, args.img_size)
    ev = results["evaluation"]
    print(
        f"\nevaluation after task {ev['tasks']} over {ev['test_images']} generated JPEGs ({ev['workers']} workers): "
        f"per-task loaders + float cache {ev['per_task_loaders_float_cache_s']:.2f} s, one loader + uint8 cache "
        f"{ev['one_loader_uint8_cache_s']:.2f} s: {ev['speedup']:.1f}x faster, same accuracies\n"
        f"  of which device work on this CPU (forward; normalisation of the uint8 path): {ev['device_work_s']['per_task_loaders_float_cache']:.2f} s "
        f"and {ev['device_work_s']['one_loader_uint8_cache']:.2f} s; host side alone: {ev['host_side_speedup']:.1f}x faster\n"
        f"cache bytes per image: float {ev['cache_bytes_per_image']['float']:,}, uint8 {ev['cache_bytes_per_image']['uint8']:,}; "
        f"cache build: float {ev['cache_build_s']['float']:.1f} s, uint8 {ev['cache_build_s']['uint8']:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
