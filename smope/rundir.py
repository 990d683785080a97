"""The run directory (a run's ``output_dir``): its on-disk layout, its configuration and its log.

Layout::

    config.yaml                    the resolved configuration
    metrics.json / metrics.csv     accuracy matrix and metrics, per seed and aggregated
    log.jsonl                      one line per finished task
    eval.json                      written by ``smope eval``
    provenance.json                versions, backbone identity, class orders (:mod:`smope.provenance`)
    seed_<s>/task_<t>.safetensors  everything task t+1 needs (atomic; the resume points)
    .lock                          the writer's lock, holding its process id
    report/                        ``smope report``'s plots and summary.md (by default)
    tensorboard/seed_<s>/          with ``train.loggers: [tensorboard]``

A run directory binds to a configuration only once work was done in it: until the first
task checkpoint exists, a new command into the same ``output_dir`` replaces ``config.yaml``
(a failed start costs nothing). After that, another configuration is refused, and every
error whose fix changes the configuration says how to proceed: a new ``output_dir``, or
deleting the run. Every checkpoint names its run (a hash of the configuration), and a
``config.yaml`` that names another run (edited or replaced by hand) is refused by every
reader. One ``smope run`` at a time writes a folder (:meth:`RunDir.exclusive`); readers take
no lock but refuse what a running writer has not finished. :class:`RunDir` is the only code
that knows these names; readers such as ``smope report`` use it without the experiment engine.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

from .checkpoint import Chain, atomic_write, read_meta, verify_chain
from .errors import DiskFullError, SmopeError, disk_full
from .runconfig import RunConfig, acting_dict, dump_config, load_config

# Keys that change how a run executes but not its numbers: a resume may differ in them.
EXECUTION_KEYS = {
    ("train", "progress"), ("train", "device"), ("train", "loggers"), ("data", "num_workers"), ("output_dir",), ("seeds",),
    ("train", "sync_every"), ("train", "parallel"), ("data", "prefetch"),
}


def comparable(config: dict) -> dict:
    """The part of a config dict that decides a run's numbers (without :data:`EXECUTION_KEYS`)."""
    return {
        section: ({k: v for k, v in values.items() if (section, k) not in EXECUTION_KEYS} if isinstance(values, dict) else values)
        for section, values in config.items()
        if (section,) not in EXECUTION_KEYS
    }


def identity_of(values: dict) -> str:
    """A short hash of a config dict's comparable part."""
    return hashlib.sha256(json.dumps(comparable(values), sort_keys=True).encode()).hexdigest()[:16]


def run_identity(config: RunConfig) -> str:
    """The ``run`` recorded in every checkpoint: :func:`identity_of` the settings that act (config.yaml's content)."""
    return identity_of(acting_dict(config))


def differences(saved: dict, current: dict) -> list[str]:
    """``section.key`` of every comparable setting whose value differs between two config dicts."""
    saved, current = comparable(saved), comparable(current)
    sections = [s for s in {**saved, **current} if isinstance(current.get(s, saved.get(s)), dict)]
    return [f"{s}.{k}" for s in sections for k in {**saved.get(s, {}), **current.get(s, {})} if saved.get(s, {}).get(k) != current.get(s, {}).get(k)]


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
    PROVENANCE = "provenance.json"
    LOCK = ".lock"
    REPORT = "report"
    TENSORBOARD = "tensorboard"
    LOCK_WAIT = 0.5  # seconds a starting run retries while a reader probes the lock

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # Files and folders ----------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def provenance_path(self) -> Path:
        return self.path / self.PROVENANCE

    @property
    def report_dir(self) -> Path:
        return self.path / self.REPORT

    def tensorboard_dir(self, seed: int) -> Path:
        return self.path / self.TENSORBOARD / f"seed_{seed}"

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
        """The checkpoints of ``seed`` that can be resumed from or evaluated (see :func:`~smope.checkpoint.verify_chain`),
        once their run is config.yaml's (:meth:`check_identity`)."""
        done = self.finished_tasks(seed)
        self.check_identity(seeds=[seed])
        return verify_chain([self.checkpoint(seed, t) for t in range(done[-1] + 1 if done else 0)], seed)

    def usable_chain(self, seed: int, doing: str) -> Chain:
        """:meth:`chain`, refusing one with a broken link: what follows it was not trained from what is on disk."""
        chain = self.chain(seed)
        if chain.problem:
            raise SmopeError(
                f"cannot {doing} {self.path}: {chain.problem}, so the checkpoints of seed {seed} after task {chain.length} "
                f"do not follow from the ones before. Recompute them with: smope run {self.config_path} output_dir={self.path}"
            )
        return chain

    # Configuration -------------------------------------------------------------------------
    def config(self) -> RunConfig:
        """The saved configuration, read with today's defaults (a key added since counts as its default)."""
        path = self.config_path
        if not path.is_file():
            raise SmopeError(f"{self.path} is not a run directory: it has no {self.CONFIG} (run 'smope run CONFIG' first)")
        return load_config(path, strict=False)

    def saved_config(self) -> dict | None:
        """config.yaml as written, a plain dict (no defaults filled in, nothing checked); None when there is none."""
        return yaml.safe_load(self.config_path.read_text()) if self.config_path.is_file() else None

    def saved_identities(self) -> set[str]:
        """The run identities config.yaml stands for: its content hashed as written, and as read today.

        The first is what the run that wrote it recorded, also when this version's defaults add keys;
        the second forgives edits that change no setting (a key spelled out at its default).
        """
        return {identity_of(self.saved_config() or {}), run_identity(self.config())}

    def check_identity(self, config: RunConfig | None = None, seeds: list[int] | None = None) -> None:
        """Refuse checkpoints whose recorded run is not ``config``'s (default: config.yaml's, when there is one).

        Only the first checkpoint of each seed (default: every seed on disk) is read:
        :func:`~smope.checkpoint.verify_chain` ties the later ones to it.
        """
        if config is not None:
            identities, described_by = {run_identity(config)}, "this command's configuration"
        elif self.config_path.is_file():
            config, identities, described_by = self.config(), self.saved_identities(), str(self.config_path)
        else:
            return
        firsts = sorted(self.path.glob("seed_*/task_000.safetensors")) if seeds is None else [self.checkpoint(s, 0) for s in seeds]
        for first in filter(Path.is_file, firsts):
            try:
                meta = read_meta(first)
            except SmopeError:  # damaged: the chain check recomputes it (run) or refuses it (eval), naming the fix
                continue
            if meta.get("run") in identities:
                continue
            trained = meta.get("config")  # the acting settings it was trained with
            changed = f" (they differ in {', '.join(differences(trained, acting_dict(config)))})" if trained else ""
            raise SmopeError(
                f"{first} was trained as run {meta['run']}, but {described_by} describes run {run_identity(config)}{changed}. "
                f"Restore the config.yaml the checkpoints were trained with, or set output_dir to another folder for this configuration"
            )

    def bind(self, config: RunConfig) -> None:
        """Write config.yaml, refusing to mix finished tasks of another configuration.

        Runs before any work, so an unwritable ``output_dir`` fails at once. Once tasks have
        finished, config.yaml must still describe their checkpoints, and is rewritten only in
        the keys a resume may change (:data:`EXECUTION_KEYS`), so it keeps hashing to their run.
        """
        out = self.path
        text = dump_config(config)
        if self.has_finished_tasks():
            if not self.config_path.is_file():
                self.check_identity(config)
            else:
                self.check_identity()
                diff = differences(self.config().to_dict(), config.to_dict())
                if diff:
                    raise SmopeError(
                        f"{out} holds finished tasks of a run with a different configuration (differs in: {', '.join(diff)}). "
                        f"Set output_dir to a new folder, or delete {out} to start over"
                    )
                text = self._with_execution_keys(config)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.config_path, text)
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(exc, out, "run the same command again") from exc
            raise SmopeError(f"cannot write to output_dir {out} ({exc.strerror or exc}); set output_dir to a writable folder") from exc

    def _with_execution_keys(self, config: RunConfig) -> str:
        """config.yaml as saved, with the :data:`EXECUTION_KEYS` of ``config`` (more seeds, another device)."""
        saved = self.saved_config()
        current = config.to_dict()
        for *sections, key in EXECUTION_KEYS:
            source, target = current, saved
            for section in sections:
                source, target = source[section], target.setdefault(section, {})
            target[key] = source[key]
        return yaml.safe_dump(saved, sort_keys=False)

    # Writer lock -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Be the folder's only writer while the block runs: an OS lock (``flock``) on :attr:`LOCK`.

        The kernel drops the lock when the process ends, however it ends, so a killed run leaves
        no stale lock. A second writer is refused at once, naming the process that holds it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / self.LOCK, "a+")
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(exc, self.path, "run the same command again") from exc
            raise SmopeError(f"cannot write to output_dir {self.path} ({exc.strerror or exc}); set output_dir to a writable folder") from exc
        with handle:
            deadline = time.monotonic() + self.LOCK_WAIT
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SmopeError(
                            f"output_dir {self.path} is being written by another smope run (process {self._holder(handle)}): "
                            "wait for it to finish, or set output_dir to another folder"
                        ) from None
                    time.sleep(0.02)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield

    @staticmethod
    def _holder(handle) -> str:
        handle.seek(0)
        return handle.read().strip() or "unknown"

    def writer(self) -> str | None:
        """The process id of the smope run writing this folder now, or None.

        Probes the lock with a shared ``flock`` released at once, so readers never block a writer
        for longer than that (a starting writer retries for :attr:`LOCK_WAIT`).
        """
        try:
            handle = open(self.path / self.LOCK)
        except OSError:
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._holder(handle)
        return None

    def refuse_unfinished(self, finished: bool, what: str) -> None:
        """Refuse to read ``what`` while a run writes this folder and has not ``finished`` it."""
        holder = None if finished else self.writer()
        if holder is not None:
            raise SmopeError(
                f"{self.path} is being written by smope run (process {holder}) and {what} is not finished yet: "
                "wait for that run to end, then run this command again"
            )

    def change_advice(self) -> str:
        """How to act on advice that changes the configuration, given what the folder already holds."""
        if self.has_finished_tasks():
            return (
                f"The finished tasks in {self.path} belong to the current configuration: to change it, set output_dir "
                f"to a new folder, or delete {self.path} to start over"
            )
        return f"No task has finished yet, so the changed command may keep output_dir={self.path}"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access to the files all seeds share (log, provenance): seed-parallel processes write them too."""
        folder = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the lock

    # Log -------------------------------------------------------------------------------------
    def append_log(self, entry: dict) -> None:
        with self.locked(), open(self.path / self.LOG, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def rewrite_log(self, seed: int, metas: list[dict]) -> None:
        """Make log.jsonl hold exactly one line per checkpoint of ``seed`` that resuming keeps.

        Lines of other seeds stay as they are; a line of this seed already present is kept (it
        has the original timing), a missing one is rebuilt from the checkpoint, lines of tasks
        about to be recomputed are dropped.
        """
        with self.locked():
            self._rewrite_log(seed, metas)

    def _rewrite_log(self, seed: int, metas: list[dict]) -> None:
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

    def metrics(self) -> dict | None:
        return self.read_json(self.METRICS)

    def eval_result(self) -> dict | None:
        return self.read_json(self.EVAL)

    def provenance(self) -> dict | None:
        """provenance.json (:mod:`smope.provenance`), or None when the folder has none."""
        return self.read_json(self.PROVENANCE)
