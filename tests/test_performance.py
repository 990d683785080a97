"""What keeps a GPU busy, checked on CPU tensors: host reads per step, fp32 routing under bf16, attention backends, precision and compile keys."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from helpers import TINY, tiny_learner

from smope import layer as layer_module
from smope.errors import SmopeError
from smope.experiment import with_resolved_precision
from smope.learners import TaskContext
from smope.learners.alignment import VARIANCE_FLOOR, FullCovarianceStatistics
from smope.model import prompted_layers, set_mode
from smope.routing import RoutingTracker
from smope.rundir import RunDir
from smope.runconfig import load_config
from smope.trainer import resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def step_overhead():
    """benchmarks/step_overhead.py as a module: its :class:`StepCounter` counts the host reads here too."""
    benchmarks = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, benchmarks)  # it imports its neighbour overhead.py
    try:
        spec = importlib.util.spec_from_file_location("step_overhead", Path(benchmarks) / "step_overhead.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(benchmarks)
    return module



def task(samples: int) -> TaskContext:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(samples, 3, 16, 16, generator=generator), torch.arange(samples) % 4
    return TaskContext(task=0, classes=range(4), seen=range(4), train_data=TensorDataset(images, labels), seed=0)


def count_host_reads(step_overhead, sync_every: int, steps: int, warmup: int) -> tuple[int, list[float]]:
    """Host reads during training steps ``warmup + 1 .. steps`` of the SMoPE loss on the tiny model, and the losses logged."""
    learner = tiny_learner(f"train.sync_every={sync_every}", "train.batch_size=8")
    ctx = task(8 * steps)
    model, criterion = learner.model, torch.nn.CrossEntropyLoss()
    set_mode(model, "sparse")
    reads = step_overhead.StepCounter()
    calls = []

    def loss_fn(images, labels):
        calls.append(1)
        reads.active = len(calls) > warmup
        model.train()
        logits = model(images)
        return criterion(logits[:, :4], labels) + sum(layer.aux_loss for layer in prompted_layers(model))

    logged = []
    learner.trainer.on_step = lambda description, loss, lrs: logged.append(loss)
    # On CUDA the harness's AdamW is fused (trainer.adamw): its step counters stay on the device. On the
    # CPU the default AdamW keeps them on the host, which is no device read; fused is what a GPU runs.
    with reads:
        learner.trainer.fit(learner.param_groups(), ctx.train_data, 1, loss_fn, 0, "count", optimizer=lambda g, wd: torch.optim.AdamW(g, weight_decay=wd, fused=True))
    assert len(calls) == steps and len(logged) == steps  # the loggers still get every step's loss
    return reads.reads, logged


def test_at_most_one_host_read_per_sync_every_steps(step_overhead):
    every, steps, warmup = 5, 20, 5
    reads, logged = count_host_reads(step_overhead, every, steps, warmup)
    print(f"host reads in training steps {warmup + 1}-{steps} with train.sync_every={every}: {reads} ({reads / (steps - warmup):.2f} per step)")
    assert reads <= math.ceil((steps - warmup) / every)
    assert reads == (steps - warmup) // every  # the reads the counter must see: one per sync point, none elsewhere
    assert all(math.isfinite(value) for value in logged)


def test_reading_every_step_is_counted(step_overhead):
    reads, _ = count_host_reads(step_overhead, 1, 8, 2)
    assert reads == 6  # the counter sees the per-step read of train.sync_every=1


def test_divergence_is_caught_within_sync_every_steps():
    learner = tiny_learner("train.sync_every=4", "train.batch_size=8")
    ctx = task(8 * 12)
    calls = []

    def loss_fn(images, labels):
        calls.append(1)
        loss = F.cross_entropy(learner.model(images)[:, :4], labels)
        return loss * float("nan") if len(calls) >= 6 else loss  # NaN from step 6 on

    with pytest.raises(SmopeError, match="the training loss became nan in 'nan' \\(epoch 1\\)"):
        learner.trainer.fit(learner.param_groups(), ctx.train_data, 1, loss_fn, 0, "nan")
    assert len(calls) == 8  # read at step 8: within 4 steps of the first NaN


def test_routing_is_decided_in_fp32_under_bf16_autocast():
    learner = tiny_learner()
    model = learner.model.eval()
    attention = prompted_layers(model)[0]
    q = torch.randn(64, attention.num_heads, 17, attention.head_dim)
    scores, selected, _ = attention.route(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores_bf16, selected_bf16, _ = attention.route(q.bfloat16())
    assert scores_bf16.dtype == torch.float32
    # The same queries, rounded to bf16 as the projection under autocast returns them.
    assert (selected_bf16 == attention.route(q.bfloat16().float())[1]).all()
    assert (selected.sort(-1).values == selected_bf16.sort(-1).values).float().mean() > 0.97


def test_bf16_selections_match_fp32_for_almost_every_image_and_head():
    learner = tiny_learner()
    model = learner.model.eval()
    images = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(images)
        fp32 = [layer.last_selected.sort(-1).values for layer in prompted_layers(model)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        bf16 = [layer.last_selected.sort(-1).values for layer in prompted_layers(model)]
    differ = torch.stack([(a != b).any(-1) for a, b in zip(fp32, bf16)]).float().mean().item()
    print(f"(image, layer, head) expert sets that differ between bf16 autocast and fp32: {100 * differ:.2f}%")
    assert differ <= 0.02  # the bf16 projections move a score past its neighbour for at most 2% of the choices


def test_prompt_keys_learn_through_the_training_attention_backends(monkeypatch):
    learner = tiny_learner()
    model = learner.model.train()
    masks = []
    original = F.scaled_dot_product_attention

    def capture(*args, **kwargs):
        masks.append(kwargs["attn_mask"])
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module.F, "scaled_dot_product_attention", capture)
    images, labels = task(8).train_data.tensors
    F.cross_entropy(model(images)[:, :4], labels).backward()
    for attention in prompted_layers(model):
        assert attention.experts.keys.grad.abs().sum() > 0
    width = masks[0].shape[-1]  # K prompts + 17 tokens
    assert width == 2 + 17 and all(stride % layer_module.BIAS_ALIGNMENT == 0 for stride in masks[0].stride()[:-1])


def test_aligned_bias_gives_the_same_attention():
    attention = prompted_layers(tiny_learner().model)[0]
    q, k, v = (torch.randn(4, attention.num_heads, 17, attention.head_dim) for _ in range(3))
    scores, selected, _ = attention.route(q)
    out = attention.attend(q, k, v, scores, selected)
    logits = scores.gather(-1, selected)
    keys = torch.cat([k.new_zeros(4, attention.num_heads, 2, attention.head_dim), k], 2)
    values = torch.cat([attention.experts.values[torch.arange(attention.num_heads)[None, :, None], selected], v], 2)
    bias = F.pad(logits * attention.scale, (0, 17)).unsqueeze(2).contiguous()
    assert torch.equal(out, F.scaled_dot_product_attention(q, keys, values, attn_mask=bias))


def test_usage_pass_copies_to_the_host_once(step_overhead):
    learner = tiny_learner()
    tracker = RoutingTracker(learner.model)
    reads = step_overhead.StepCounter()
    images = task(32).train_data.tensors[0]
    learner.model.eval()
    with tracker.usage_pass(), torch.no_grad(), reads:
        reads.active = True
        for batch in images.split(8):
            learner.model(batch)
        reads.active = False
    assert reads.reads == 0  # the hooks keep the expert sets on the device during the pass
    assert all(n >= 1 for heads in tracker.records[-1]["distinct_sets"] for n in heads)


def test_full_covariance_factor_once_per_class_and_task(monkeypatch):
    stats = FullCovarianceStatistics(3, 4)
    features, labels = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 3
    stats.update(features, labels)
    calls = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a: calls.append(len(a)) or cholesky(a))
    generator = torch.Generator("cpu").manual_seed(0)
    first = stats.sample(range(3), 5, generator)[0]
    stats.sample(range(3), 5, generator)
    assert calls == [3]  # one batched factorisation for the three classes, none at the second draw
    stats.update(features[labels == 1] * 2, labels[labels == 1])
    stats.sample(range(3), 5, generator)
    assert calls == [3, 1]  # a class's new statistics: only its factor again
    # The draws of a CPU run: the generator's normal noise through each class's float64 Cholesky factor.
    noise = torch.randn(15, 4, generator=torch.Generator().manual_seed(0))
    factors = [cholesky(torch.cov(features[labels == c].T).double() + VARIANCE_FLOOR * torch.eye(4, dtype=torch.float64)).float() for c in range(3)]
    expected = torch.cat([stats_mean + rows @ factor.T for stats_mean, rows, factor in zip(_means(features, labels), noise.view(3, 5, 4), factors)])
    assert torch.allclose(first, expected, atol=1e-6)


def _means(features: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    return [features[labels == c].mean(0) for c in range(3)]


def test_precision_auto_is_fp32_off_cuda_and_bf16_needs_support(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bf16 (emulated without AVX512-BF16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp32"
    with pytest.raises(SmopeError, match=r"train.precision=bf16 but cuda:0 \(Tesla V100\) has no bf16 support; use train.precision=auto, fp16 or fp32"):
        resolve_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.precision=fp8", "config key 'train.precision' must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        ("train.compile=fast", "config key 'train.compile' must be true, false or one of default, reduce-overhead, max-autotune, got 'fast'"),
        ("train.parallel=tensor", "config key 'train.parallel' must be one of data, seeds, got 'tensor'"),
        ("train.sync_every=0", "config key 'train.sync_every' must be >= 1, got 0"),
    ],
)
def test_bad_performance_keys_are_named(override, message):
    with pytest.raises(SmopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])


@pytest.mark.parametrize("value, mode", [("true", None), ("max-autotune", "max-autotune"), ("reduce-overhead", "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(monkeypatch, value, mode):
    learner = tiny_learner(f"train.compile={value}")
    seen = []
    monkeypatch.setattr(learner.model, "compile", lambda **kwargs: seen.append(kwargs))
    learner.compile()
    assert seen == [{"mode": mode}]


def test_resume_in_another_precision_is_refused(tmp_path):
    out = tmp_path / "run"
    config = with_resolved_precision(load_config(TINY, ["train.device=cpu", f"output_dir={out}"]))
    assert config.train.precision == "fp32"  # auto on a CPU: what config.yaml and the run identity record
    run_dir = RunDir(out)
    run_dir.bind(config)
    (out / "seed_0").mkdir()
    (out / "seed_0" / "task_000.safetensors").write_bytes(b"")  # a finished task binds the folder
    run_dir.bind(with_resolved_precision(load_config(TINY, ["train.device=cpu", f"output_dir={out}", "train.precision=fp32"])))
    with pytest.raises(SmopeError, match="differs in: train.precision"):
        run_dir.bind(load_config(TINY, ["train.device=cpu", f"output_dir={out}", "train.precision=bf16"]))
    # How often the loss is read and how seeds are spread over processes change no number: a resume may differ in them.
    run_dir.bind(with_resolved_precision(load_config(TINY, ["train.device=cpu", f"output_dir={out}", "train.sync_every=50", "train.parallel=seeds"])))


def test_step_overhead_benchmark_runs(step_overhead, capsys):
    step_overhead.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2", "--steps", "4", "--warmup", "2", "--sync-every", "2", "--repeats", "1"])
    printed = capsys.readouterr().out
    assert "dispatched ops per step: plain" in printed and "host reads per step    : plain    0.50, smope    0.50" in printed
