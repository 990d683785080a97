"""The run directory: which configuration it is bound to, and its log.

A run directory binds to a configuration only once work was done in it: until the first
task checkpoint exists, a new command into the same ``output_dir`` replaces ``config.yaml``
(a failed start costs nothing). After that, another configuration is refused, and every
error whose fix changes the configuration says how to proceed: a new ``output_dir``, or
deleting the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import SmopeError
from .runconfig import RunConfig, dump_config, load_config

# Keys that change how a run executes but not its numbers: a resume may differ in them.
EXECUTION_KEYS = {("train", "progress"), ("train", "device"), ("train", "loggers"), ("data", "num_workers"), ("output_dir",), ("seeds",)}
LOG_NAME = "log.jsonl"


def comparable(config: dict) -> dict:
    """The part of a config dict that decides a run's numbers (without :data:`EXECUTION_KEYS`)."""
    return {
        section: ({k: v for k, v in values.items() if (section, k) not in EXECUTION_KEYS} if isinstance(values, dict) else values)
        for section, values in config.items()
        if (section,) not in EXECUTION_KEYS
    }


def run_identity(config: RunConfig) -> str:
    """A short hash of the configuration's comparable part: the ``run`` recorded in every checkpoint."""
    return hashlib.sha256(json.dumps(comparable(config.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(seed_dir: Path, task: int) -> Path:
    return seed_dir / f"task_{task:03d}.safetensors"


def finished_tasks(seed_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in seed_dir.glob("task_*.safetensors"))


def has_finished_tasks(out: Path) -> bool:
    return any(out.glob("seed_*/task_*.safetensors"))


def config_change_advice(out: Path) -> str:
    """How to act on advice that changes the configuration, given what ``out`` already holds."""
    if has_finished_tasks(out):
        return (
            f"The finished tasks in {out} belong to the current configuration: to change it, set output_dir "
            f"to a new folder, or delete {out} to start over"
        )
    return f"No task has finished yet, so the changed command may keep output_dir={out}"


def _write_atomic(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_dir(out: Path, config: RunConfig) -> None:
    """Write config.yaml into ``out``, refusing to mix finished tasks of another configuration.

    Runs before any work, so an unwritable ``output_dir`` fails at once. The saved config is
    read with today's defaults, so a key added since the run was written counts as its
    default and does not block resuming it.
    """
    saved_path = out / "config.yaml"
    if saved_path.is_file() and has_finished_tasks(out):
        saved = comparable(load_config(saved_path).to_dict())
        current = comparable(config.to_dict())
        if saved != current:
            diff = [f"{s}.{k}" for s in current if isinstance(current[s], dict) for k in current[s] if saved.get(s, {}).get(k) != current[s][k]]
            raise SmopeError(
                f"{out} holds finished tasks of a run with a different configuration (differs in: {', '.join(diff) or 'sections'}). "
                f"Set output_dir to a new folder, or delete {out} to start over"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(saved_path, dump_config(config))
    except OSError as exc:
        raise SmopeError(f"cannot write to output_dir {out} ({exc.strerror or exc}); set output_dir to a writable folder") from exc


def log_entry(meta: dict) -> dict:
    """The log.jsonl line of a finished task, from its checkpoint metadata."""
    row = meta["accuracy_matrix"][-1]
    return {
        "seed": meta["seed"],
        "task": meta["task"],
        "accuracy": row,
        "average_accuracy": float(np.mean(row)),
        "seconds": meta.get("seconds"),
    }


def append_log(out: Path, entry: dict) -> None:
    with open(out / LOG_NAME, "a") as log:
        log.write(json.dumps(entry) + "\n")


def rewrite_log(out: Path, seed: int, metas: list[dict]) -> None:
    """Make log.jsonl hold exactly one line per checkpoint of ``seed`` that resuming keeps.

    Lines of other seeds stay as they are; a line of this seed already present is kept (it
    has the original timing), a missing one is rebuilt from the checkpoint, lines of tasks
    about to be recomputed are dropped.
    """
    path = out / LOG_NAME
    lines = path.read_text().splitlines() if path.is_file() else []
    others, own = [], {}
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if entry.get("seed") != seed:
            others.append(line)
        else:
            own.setdefault(entry.get("task"), line)
    kept = [own.get(meta["task"]) or json.dumps(log_entry(meta)) for meta in metas]
    new = "".join(f"{line}\n" for line in others + kept)
    if new != ("".join(f"{line}\n" for line in lines)):
        _write_atomic(path, new)
