"""Per-task checkpoints: safetensors tensors plus JSON metadata, written atomically.

A checkpoint holds what the next task needs and nothing frozen: trainable parameters,
expert bookkeeping, class feature statistics, the RNG state, and the run's position and
accuracy rows in the metadata. A crash mid-write leaves the previous file intact, because
the new one is written beside it and renamed over it in one step.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SmopeError

META_KEY = "smope"


def state_mismatch(expected: dict[str, torch.Size | tuple[int, ...]], got: dict[str, torch.Size | tuple[int, ...]], limit: int = 5) -> str:
    """How tensor names and shapes ``got`` differ from ``expected``; empty when they match.

    One readable line ("missing: a, b; unexpected: c; wrong shape: d (1, 2) vs (2, 2)") for
    the error a user sees when weights or an adapter do not fit a model.
    """
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(
        f"{k} {tuple(got[k])} vs {tuple(expected[k])}" for k in expected.keys() & got.keys() if tuple(got[k]) != tuple(expected[k])
    )
    return "; ".join(
        f"{label}: {', '.join(items[:limit])}{' ...' if len(items) > limit else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    )


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint; a damaged file is a :class:`SmopeError` saying what to do."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[META_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors and json raise several types for damaged files
        raise SmopeError(
            f"checkpoint {path} is damaged or not a smope checkpoint ({type(exc).__name__}: {exc}). "
            f"Delete it and run the same command again: the run resumes from the task before it."
        ) from exc
    return tensors, meta
