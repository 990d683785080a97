"""The run directory (a run's ``output_dir``): its on-disk layout, its configuration and its log.

Layout::

    config.yaml                    the resolved configuration
    metrics.json / metrics.csv     accuracy matrix and metrics, per seed and aggregated
    log.jsonl                      one line per finished task
    eval.json                      written by ``smope eval``
    provenance.json                versions, backbone identity, class orders (:mod:`smope.provenance`)
    seed_<s>/task_<t>.safetensors  everything task t+1 needs (atomic; the resume points)

A run directory binds to a configuration only once work was done in it: until the first
task checkpoint exists, a new command into the same ``output_dir`` replaces ``config.yaml``
(a failed start costs nothing). After that, another configuration is refused, and every
error whose fix changes the configuration says how to proceed: a new ``output_dir``, or
deleting the run. :class:`RunDir` is the only code that knows these names; readers such as
``smope report`` use it without the experiment engine.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from .checkpoint import Chain, atomic_write, verify_chain
from .errors import SmopeError
from .runconfig import RunConfig, dump_config, load_config

# Keys that change how a run executes but not its numbers: a resume may differ in them.
EXECUTION_KEYS = {("train", "progress"), ("train", "device"), ("train", "loggers"), ("data", "num_workers"), ("data", "prefetch"), ("output_dir",), ("seeds",)}


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


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class RunDir:
    """One run's output folder: where each file lives, and reading and writing them."""

    CONFIG = "config.yaml"
    METRICS = "metrics.json"
    METRICS_CSV = "metrics.csv"
    LOG = "log.jsonl"
    EVAL = "eval.json"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # Checkpoints ---------------------------------------------------------------------------
    def seed_dir(self, seed: int) -> Path:
        return self.path / f"seed_{seed}"

    def checkpoint(self, seed: int, task: int) -> Path:
        return self.seed_dir(seed) / f"task_{task:03d}.safetensors"

    def finished_tasks(self, seed: int) -> list[int]:
        """Tasks with a checkpoint file on disk, sorted (not checked: see :meth:`chain`)."""
        return sorted(int(p.stem.split("_")[1]) for p in self.seed_dir(seed).glob("task_*.safetensors"))

    def has_finished_tasks(self) -> bool:
        return any(self.path.glob("seed_*/task_*.safetensors"))

    def chain(self, seed: int) -> Chain:
        """The checkpoints of ``seed`` that can be resumed from or evaluated (see :func:`~smope.checkpoint.verify_chain`)."""
        done = self.finished_tasks(seed)
        return verify_chain([self.checkpoint(seed, t) for t in range(done[-1] + 1 if done else 0)], seed)

    # Configuration -------------------------------------------------------------------------
    def config(self) -> RunConfig:
        """The saved configuration, read with today's defaults (a key added since counts as its default)."""
        path = self.path / self.CONFIG
        if not path.is_file():
            raise SmopeError(f"{self.path} is not a run directory: it has no {self.CONFIG} (run 'smope run CONFIG' first)")
        return load_config(path, strict=False)

    def bind(self, config: RunConfig) -> None:
        """Write config.yaml, refusing to mix finished tasks of another configuration.

        Runs before any work, so an unwritable ``output_dir`` fails at once.
        """
        out = self.path
        if (out / self.CONFIG).is_file() and self.has_finished_tasks():
            saved = comparable(self.config().to_dict())
            current = comparable(config.to_dict())
            if saved != current:
                diff = [f"{s}.{k}" for s in current if isinstance(current[s], dict) for k in current[s] if saved.get(s, {}).get(k) != current[s][k]]
                raise SmopeError(
                    f"{out} holds finished tasks of a run with a different configuration (differs in: {', '.join(diff) or 'sections'}). "
                    f"Set output_dir to a new folder, or delete {out} to start over"
                )
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / self.CONFIG, dump_config(config))
        except OSError as exc:
            raise SmopeError(f"cannot write to output_dir {out} ({exc.strerror or exc}); set output_dir to a writable folder") from exc

    def change_advice(self) -> str:
        """How to act on advice that changes the configuration, given what the folder already holds."""
        if self.has_finished_tasks():
            return (
                f"The finished tasks in {self.path} belong to the current configuration: to change it, set output_dir "
                f"to a new folder, or delete {self.path} to start over"
            )
        return f"No task has finished yet, so the changed command may keep output_dir={self.path}"

    # Log -------------------------------------------------------------------------------------
    def append_log(self, entry: dict) -> None:
        with open(self.path / self.LOG, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def rewrite_log(self, seed: int, metas: list[dict]) -> None:
        """Make log.jsonl hold exactly one line per checkpoint of ``seed`` that resuming keeps.

        Lines of other seeds stay as they are; a line of this seed already present is kept (it
        has the original timing), a missing one is rebuilt from the checkpoint, lines of tasks
        about to be recomputed are dropped.
        """
        path = self.path / self.LOG
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
            write_text_atomic(path, new)

    # Results ---------------------------------------------------------------------------------
    def write_metrics(self, result: dict) -> None:
        """metrics.json, and metrics.csv with one row per seed and task plus the mean."""
        (self.path / self.METRICS).write_text(json.dumps(result, indent=2))
        num_tasks = result["num_tasks"]
        with open(self.path / self.METRICS_CSV, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seed", "after_task", "average_accuracy", *[f"task_{j}" for j in range(num_tasks)]])
            rows = [(run["seed"], run["accuracy_matrix"]) for run in result["per_seed"]] + [("mean", result["accuracy_matrix"])]
            for label, matrix in rows:
                for t, row in enumerate(matrix):
                    writer.writerow([label, t, f"{np.mean(row):.4f}", *[f"{a:.4f}" for a in row], *[""] * (num_tasks - len(row))])

    def write_eval(self, result: dict) -> None:
        (self.path / self.EVAL).write_text(json.dumps(result, indent=2))

    def read_json(self, name: str) -> dict | None:
        """``name`` (metrics.json, eval.json, ...) parsed, or None when the file is absent."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None
