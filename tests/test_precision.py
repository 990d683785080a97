"""Mixed precision and torch.compile on CPU with the tiny config."""

import json
import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import TINY, tiny_learner

from smope import cli
from smope.learners import Learner, TaskContext



pytestmark = pytest.mark.usefixtures("one_thread")



def one_batch_task() -> TaskContext:
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    return TaskContext(task=0, classes=range(4), seen=range(4), train_data=TensorDataset(images, labels), seed=0)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_covers_training_and_evaluation(precision, dtype):
    learner = tiny_learner(f"train.precision={precision}", "train.batch_size=8")
    seen = []
    qkv = learner.model.blocks[0].attn.base_layer.qkv
    qkv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    ctx = one_batch_task()
    learner.train_phase(ctx, epochs=1, description="one step")  # fp16 also goes through the GradScaler
    logits = learner.logits(ctx.train_data.tensors[0])
    learner.features_and_labels(ctx.train_data, learner.pooled_features)
    assert seen == [dtype] * 3
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_run_learns(tmp_path):
    out = tmp_path / "run"
    # The tiny config's 10 epochs: with 3, the first task (digits 7, 8, 1, 5) stayed at chance in fp32 too.
    cli.main(["run", TINY, f"output_dir={out}", "train.precision=bf16", "data.train_per_class=80"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_matrix"][0][0] > 35.0  # chance on the first task's 4 classes is 25%
    assert metrics["final_average_accuracy"] > 12.0  # chance over all 10 digits is 10%


needs_compiler = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="torch.compile's CPU backend (inductor) needs a C compiler (gcc or cc) on PATH",
)


def compiled_and_eager() -> tuple[Learner, Learner]:
    """Two tiny learners with the same initial weights, the first compiled."""
    learners = []
    for _ in range(2):
        torch.manual_seed(0)
        learners.append(tiny_learner("train.batch_size=8"))
    learners[0].compile()
    return tuple(learners)


@needs_compiler
def test_compile_builds_and_predicts_like_eager():
    compiled, eager = compiled_and_eager()
    images = one_batch_task().train_data.tensors[0]
    torch.testing.assert_close(compiled.logits(images), eager.logits(images), atol=1e-4, rtol=1e-4)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints stay interchangeable


@needs_compiler
@pytest.mark.slow  # about a minute on 2 busy CPU cores: inductor compiles the training graphs
def test_compiled_training_step_matches_eager():
    compiled, eager = compiled_and_eager()
    ctx = one_batch_task()
    for learner in (compiled, eager):
        learner.train_phase(ctx, epochs=1, description="one step")
    images = ctx.train_data.tensors[0]
    torch.testing.assert_close(compiled.logits(images), eager.logits(images), atol=1e-4, rtol=1e-4)
