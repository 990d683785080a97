"""Using a trained run: ``smope predict RUN_DIR IMAGE_OR_FOLDER...`` and ``smope export RUN_DIR OUT_DIR``.

A run's last task checkpoint holds everything trained; the frozen backbone comes back from
the run's own config, and the test transform from the backbone (resolution, mean, std), so
predictions here are the predictions the run's evaluation made. Class names and the class
order come from ``provenance.json`` (or, in a folder without it, from the dataset).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from .data import class_order, split_classes
from .data.prepared import load_splits, split_transform
from .errors import SmopeError
from .experiment import restore_learner
from .learners import Learner
from .model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, SMoPEModel, backbone_facts
from .provenance import backbone_identity
from .runconfig import RunConfig
from .rundir import RunDir
from .trainer import Trainer


@dataclass
class TrainedRun:
    """A run's learner restored from its last checkpoint of one seed, with what predicting needs."""

    config: RunConfig
    seed: int
    task: int  # the checkpoint's task (0-based)
    learner: Learner
    class_names: list[str]  # by label, i.e. in the seed's class order
    seen: int  # classes learned by ``task``: predictions are among labels 0..seen-1
    task_sizes: list[int] | None = None  # classes per task, in task order
    routing: dict | None = None  # the checkpoint's routing records (smope.routing.RoutingTracker.checkpoint_meta), if any


def _classes(run_dir: RunDir, config: RunConfig, seed: int) -> tuple[list[str], list[int]]:
    """Class names in the seed's label order and the task sizes."""
    provenance = run_dir.provenance()
    if provenance is not None:
        order = provenance["class_order"].get(str(seed))
        if order is not None:
            return order["names"], provenance["dataset"]["task_sizes"]
    names = list(load_splits(config)[0].classes)  # a folder without provenance.json: ask the dataset
    return [names[i] for i in class_order(len(names), seed)], split_classes(len(names), config.data.num_tasks, config.data.first_task_classes)


def load_trained_run(run_dir: str | Path, seed: int | None = None) -> TrainedRun:
    """The learner of ``seed`` (default: the run's first seed with a checkpoint) after its last finished task."""
    run_dir = RunDir(run_dir)
    config = run_dir.config()
    config = replace(config, train=replace(config.train, progress=False))
    if seed is not None and seed not in config.seeds:
        raise SmopeError(f"seed {seed} is not one of the run's seeds {config.seeds}: pick one of those with --seed")
    candidates = [seed] if seed is not None else config.seeds
    done = [(s, run_dir.finished_tasks(s)) for s in candidates]
    done = [(s, tasks) for s, tasks in done if tasks]
    if not done:
        raise SmopeError(f"{run_dir} has no task checkpoint for seed {candidates[0] if seed is not None else config.seeds}: nothing trained yet")
    seed, tasks = done[0]
    run_dir.refuse_unfinished(len(tasks) == config.data.num_tasks, f"seed {seed}")
    last = run_dir.usable_chain(seed, "use").length - 1
    names, sizes = _classes(run_dir, config, seed)
    learner, meta = restore_learner(config, run_dir, seed, last, len(names), Trainer(config))
    return TrainedRun(config, seed, last, learner, names, list(accumulate(sizes))[last], list(sizes), meta.get("routing"))


def image_paths(inputs: list[str]) -> list[Path]:
    """Image files named directly, and every image under named folders (recursively, sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise SmopeError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {item}")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise SmopeError(f"{item} does not exist: give image files or folders of images")
    return paths


def _unreadable(path: Path, exc: OSError) -> str:
    """Why ``path`` could not be decoded, in words (PIL's own text shows a file object's repr)."""
    return "not an image file PIL can read" if isinstance(exc, UnidentifiedImageError) else (exc.strerror or str(exc))


def image_batches(run: TrainedRun, paths: list[str | Path], strict: bool = False) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """The readable images among ``paths`` with the run's test transform, in batches of its eval batch size.

    An unreadable file is skipped with one line on stderr (``strict``: it is an error instead).
    """
    transform = split_transform(run.config, run.learner.model, train=False)
    batch_size = run.config.train.eval_batch_size
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in map(Path, paths[start : start + batch_size]):
            try:
                images.append(transform(pil_loader(str(path))))
            except OSError as exc:
                if strict:
                    raise SmopeError(f"cannot read image {path} ({_unreadable(path, exc)}); remove or fix it, or leave out --strict to skip it") from exc
                print(f"skipped {path}: {_unreadable(path, exc)}", file=sys.stderr)
                continue
            batch.append(path)
        if batch:
            yield batch, torch.stack(images)


def top_classes(run: TrainedRun, logits: torch.Tensor, top_k: int) -> list[list[dict]]:
    """Per image, the ``top_k`` most probable classes among those learned so far."""
    best = logits[:, : run.seen].softmax(-1).cpu().topk(min(top_k, run.seen), dim=-1)
    return [
        [{"label": i, "class": run.class_names[i], "probability": p} for i, p in zip(labels, values)]
        for values, labels in zip(best.values.tolist(), best.indices.tolist())
    ]


def predict(run: TrainedRun, paths: list[str | Path], top_k: int = 5, strict: bool = False, routes: bool = False) -> list[dict]:
    """Top-k classes and probabilities per image, with the run's test transform.

    ``routes``: each result also holds the image's ``routes`` (:mod:`smope.routes`); a run whose
    method has no gate is an error. An unreadable file is skipped with one line on stderr
    (``strict``: it is an error instead); none readable at all is an error.
    """
    from .routes import GateReader

    gate = GateReader(run) if routes else None
    results = []
    for batch, images in image_batches(run, paths, strict):
        with gate.capture() if gate is not None else contextlib.nullcontext():
            logits = run.learner.logits(images)
        for index, (path, best) in enumerate(zip(batch, top_classes(run, logits, top_k))):
            results.append({"image": str(path), "predictions": best})
            if gate is not None:
                results[-1]["routes"] = gate.image(index, best[0]["label"])
    if not results:
        raise SmopeError(f"none of the {len(paths)} file(s) given is a readable image; give image files ({', '.join(IMG_EXTENSIONS)})")
    return results


def format_predictions(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines.append(result["image"])
        width = max(len(p["class"]) for p in result["predictions"])
        lines += [f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%" for rank, p in enumerate(result["predictions"], 1)]
    return "\n".join(lines)


def _check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a folder already holding an adapter unless ``overwrite``: before any model is built."""
    if out.exists() and not out.is_dir():
        raise SmopeError(f"{out} is a file: give a folder for the adapter (adapter_config.json, adapter_model.safetensors, classes.json)")
    held = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if (out / name).is_file()]
    if held and not overwrite:
        raise SmopeError(f"{out} already holds an adapter ({', '.join(held)}): add --overwrite to replace it, or give another folder")


def backbone_record(run: TrainedRun, run_dir: str | Path) -> dict:
    """adapter_config.json's ``backbone``: the run's model settings and weights' identity (from its provenance.json)."""
    identity = (RunDir(run_dir).provenance() or {}).get("backbone")
    model = run.config.model
    return {
        **(identity or backbone_identity(model)),
        "img_size": backbone_facts(run.learner.model.base_model)["img_size"],
        "num_classes": len(run.class_names),
        "kwargs": model.kwargs,
    }


def export_adapter(run_dir: str | Path, out: str | Path, seed: int | None = None, overwrite: bool = False) -> Path:
    """Save the run's final adapter in peft's layout, loadable by :meth:`smope.SMoPEModel.from_pretrained`.

    adapter_config.json records the backbone (:func:`backbone_record`), and peft's
    ``base_model_name_or_path`` names its Hugging Face hub repository when the weights come from one.
    """
    out = Path(out)
    _check_export_target(out, overwrite)
    run = load_trained_run(run_dir, seed)
    if not isinstance(run.learner.model, SMoPEModel):
        raise SmopeError(
            f"method.name={run.config.method.name} has no prompt-expert adapter; export works for smope, dense-prompt and joint runs"
        )
    model = run.learner.model
    backbone = backbone_record(run, run_dir)
    model.peft_config.backbone = backbone
    model.peft_config.base_model_name_or_path = backbone.get("hf_hub_id")
    model.save_pretrained(out)
    (out / "classes.json").write_text(json.dumps(run.class_names, indent=1))
    return out
