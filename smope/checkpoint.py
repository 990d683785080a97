"""Per-task checkpoints: safetensors tensors plus JSON metadata, written atomically.

A checkpoint holds what the next task needs and nothing frozen: trainable parameters,
expert bookkeeping, class feature statistics, the RNG state, and the run's position and
accuracy rows in the metadata. A crash mid-write leaves the previous file intact, because
the new one is written beside it and renamed over it in one step.

The checkpoints of one seed form a chain: each records its run, seed and task and the
sha256 of the previous task's file, so a missing, damaged, replaced or foreign file in the
middle is found (:func:`verify_chain`) instead of being skipped over.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SmopeError, disk_full

META_KEY = "smope"


@functools.cache
def file_mode() -> int:
    """The mode ``open()`` gives a new file (0644 under the usual umask 022); read once, as the umask can only be read by setting it."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path`` in one step.

    A crash mid-write leaves the previous file intact and no partial file under ``path``. The
    file gets the mode of any other output (``mkstemp`` makes it 0600), and a full disk is an
    ``OSError(ENOSPC)`` naming ``path`` whatever library wrote (safetensors raises its own type).
    """
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        try:
            write(tmp)
        except Exception as exc:
            if disk_full(exc):  # named as the file it replaces, not its temporary name
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
            raise
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written with :func:`atomic_write`."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_safetensors(path, tensors, {META_KEY: json.dumps(meta)})


def read_meta(path: Path) -> dict:
    """A checkpoint's metadata alone (no tensors are read); a damaged file is a :class:`SmopeError`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {})[META_KEY])
    except Exception as exc:  # safetensors and json raise several types for damaged files
        raise _damaged(path, exc) from exc


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint; a damaged file is a :class:`SmopeError` saying what to do."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[META_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors and json raise several types for damaged files
        raise _damaged(path, exc) from exc
    return tensors, meta


def _damaged(path: Path, exc: Exception) -> SmopeError:
    return SmopeError(
        f"checkpoint {path} is damaged or not a smope checkpoint ({type(exc).__name__}: {exc}). "
        f"Delete it and run the same command again: the run resumes from the task before it."
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chain_link(run: str, seed: int, task: int, previous: Path | None) -> dict:
    """The metadata that ties a checkpoint to its run, seed and the previous task's file."""
    return {"run": run, "seed": seed, "task": task, "previous_sha256": None if previous is None else file_sha256(previous)}


@dataclass
class Chain:
    """The usable checkpoints of one seed: tasks 0 .. ``len(metas) - 1``, in order.

    ``problem`` says why the checkpoint of task ``len(metas)`` cannot be used although it, or
    a later one, is on disk; ``None`` when every file on disk belongs to the chain.
    """

    metas: list[dict] = field(default_factory=list)
    problem: str | None = None

    @property
    def length(self) -> int:
        return len(self.metas)


def verify_chain(paths: list[Path], seed: int) -> Chain:
    """Check the checkpoints ``paths[0], paths[1], ...`` of one seed and return the good contiguous prefix.

    A file belongs to the chain when it loads, names this seed and its own task, carries the
    run of task 0, and records the sha256 of the file before it as it is on disk now. Files
    after the first bad one are not used: they were trained from something other than what is on disk.
    """
    chain = Chain()
    last = max((t for t, path in enumerate(paths) if path.is_file()), default=-1)
    previous_sha = None
    for task in range(last + 1):
        path = paths[task]
        if not path.is_file():
            chain.problem = f"{path} is missing"
            return chain
        try:
            _, meta = load_checkpoint(path)
        except SmopeError as exc:
            chain.problem = f"{path} is damaged ({exc.__cause__ or exc})"
            return chain
        sha = file_sha256(path)
        if (meta.get("seed"), meta.get("task")) != (seed, task):
            chain.problem = f"{path} holds seed {meta.get('seed')} task {meta.get('task')}, not seed {seed} task {task}"
        elif chain.metas and meta.get("run") != chain.metas[0].get("run"):
            chain.problem = f"{path} belongs to another run ({meta.get('run')}, not {chain.metas[0].get('run')})"
        elif task > 0 and meta.get("previous_sha256") != previous_sha:
            chain.problem = f"{path} was not trained from the {paths[task - 1].name} now on disk (that file was replaced)"
        if chain.problem:
            return chain
        chain.metas.append(meta)
        previous_sha = sha
    return chain
