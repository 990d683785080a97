"""Tiny random-weight backbones, a finished tiny run and an interruption helper shared by the tests."""

import contextlib
from pathlib import Path

import pytest
import timm
import torch


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: thread start-up dominates, and on a busy 2-core machine 2 threads are ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def interrupted_at(monkeypatch, learner_class: type, task: int):
    """Within the block, ``learner_class.train_task`` raises KeyboardInterrupt (Ctrl-C) at ``task``."""
    real_train = learner_class.train_task

    def stop(self, ctx):
        if ctx.task == task:
            raise KeyboardInterrupt
        return real_train(self, ctx)

    monkeypatch.setattr(learner_class, "train_task", stop)
    try:
        yield
    finally:
        monkeypatch.setattr(learner_class, "train_task", real_train)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml run to the end through the CLI; a test that writes into it works on a copy."""
    from smope import cli

    out = tmp_path_factory.mktemp("tiny") / "run"
    cli.main(["run", str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"), f"output_dir={out}"])
    return out
