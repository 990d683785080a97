"""What the tests share: the tiny config and each method's tiny settings, run helpers, a tiny ViT, the
one-line-error check and the interruption helper. Fixtures live in conftest.py; test modules import
from here, never from each other.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")  # a seconds-long CPU run: tiny random ViT, bundled digits, 3 tasks

# The tiny ViT has 2 blocks and 17 tokens, so the published block choices do not exist in it and
# the published prompt lengths (20 prefix tokens per L2P prompt, 5 prompts) would be several times
# its sequence: scale those down. All learners share one learning rate below the tiny config's.
SHARED = ["train.lr=0.01"]
TINY_SCALE = {
    # L2P trains only its prompt pool and head: at the tiny scale it needs more epochs to clear
    # chance on every class order (10 epochs: 12% final accuracy with seed 0's; 20 epochs: 25%).
    "l2p": ["method.prompt_length=4", "train.epochs=20"],
    "dualprompt": ["method.prompt_length=4", "method.g_prompt_length=2", "method.g_prompt_layers=[0]", "method.prompt_layers=[1]"],
    "coda-prompt": ["method.prompt_layers=[0, 1]"],
    "vq-prompt": ["method.prompt_layers=[0, 1]"],
    # Fewer task-identity and realignment epochs than published (20, 30): seconds, not a minute, per run.
    "hide-prompt": ["method.prompt_layers=[0, 1]", "method.prompt_length=4", "method.hide_tii_epochs=10", "method.hide_align_epochs=10"],
    "norga": ["method.prompt_layers=[0, 1]", "method.prompt_length=4", "method.hide_tii_epochs=10", "method.hide_align_epochs=10"],
}


def method_overrides(method: str, *overrides: str) -> list[str]:
    """``method.name=<method>`` with the shared rate and the method's tiny-scale settings, then ``overrides``."""
    return [f"method.name={method}", *SHARED, *TINY_SCALE.get(method, []), *overrides]


def read_only(method: str, *overrides: str) -> list[str]:
    """``overrides`` without the ``method.*`` keys ``method`` does not read (a setting that changes nothing is refused)."""
    from smope.methods import unread_method_keys

    unread = set(unread_method_keys(method, [o.split("=")[0].removeprefix("method.") for o in overrides if o.startswith("method.")]))
    return [o for o in overrides if not (o.startswith("method.") and o.split("=")[0].removeprefix("method.") in unread)]


def tiny_config(method: str = "smope", *overrides: str):
    """configs/tiny.yaml on the CPU for ``method`` at the tiny scale, as a RunConfig."""
    from smope.runconfig import load_config

    return load_config(TINY, ["train.device=cpu", *method_overrides(method, *overrides)])


def tiny_learner(*overrides: str):
    """The learner configs/tiny.yaml builds on the CPU (SMoPE unless ``overrides`` name another), for its 10 digits, seeded."""
    from smope.learners import create_learner
    from smope.runconfig import load_config

    torch.manual_seed(0)
    return create_learner(load_config(TINY, ["train.device=cpu", *overrides]), num_classes=10)


def read_metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def run(out: Path, *overrides: str, config: str = TINY) -> dict:
    """``smope run <config> output_dir=<out> <overrides>`` through the CLI; its metrics.json."""
    from smope import cli

    cli.main(["run", str(config), f"output_dir={out}", *overrides])
    return read_metrics(out)


def run_method(out: Path, method: str, *overrides: str) -> dict:
    """The tiny run of ``method`` at its tiny scale (:func:`method_overrides`); its metrics.json."""
    return run(out, *method_overrides(method, *overrides))


def checkpoints(out: Path, seed: int = 0) -> list[str]:
    """The file names in a run's ``seed_<seed>`` folder, sorted."""
    return sorted(p.name for p in (Path(out) / f"seed_{seed}").iterdir())


def tiny_timm_vit(num_classes: int = 10, **kwargs) -> torch.nn.Module:
    """A 4-block, 4-head ViT on 32 px images: fast on CPU, same code path as ViT-B."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=num_classes)
    args.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**args)


def fails(capsys, *args: str) -> str:
    """Run the CLI, expect exit 2 and return its one-line message."""
    from smope import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(list(args))
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


@contextlib.contextmanager
def interrupted_at(monkeypatch, learner_class: type, task: int | None, trained: list[int] | None = None):
    """Within the block, ``learner_class.train_task`` raises KeyboardInterrupt (Ctrl-C) at ``task`` (None: at no task).

    Every task it is called for, the interrupted one included, is appended to ``trained`` when given.
    """
    real_train = learner_class.train_task

    def stop(self, ctx):
        if trained is not None:
            trained.append(ctx.task)
        if ctx.task == task:
            raise KeyboardInterrupt
        return real_train(self, ctx)

    monkeypatch.setattr(learner_class, "train_task", stop)
    try:
        yield
    finally:
        monkeypatch.setattr(learner_class, "train_task", real_train)
