"""Host syncs and dispatched ops per training step: SMoPE vs the plain frozen timm model.

A GPU stays busy only while the host queues work ahead of it. Every device-to-host read
makes the host wait until the device has caught up, and every dispatched op costs host time
(several microseconds per kernel launch) whatever its size, so at the small per-GPU batches
of a data-parallel run these counts, not FLOPs, bound the step time.

Both models (the pair of ``overhead.py``) take the same steps of the harness's step loop,
:meth:`smope.trainer.Trainer.optimize`: forward, loss, backward, AdamW, schedule, and the
loss read every ``--sync-every`` steps. AdamW is the fused one a CUDA run uses (the CPU's
default keeps its step counters on the host and reads them every step, which on a GPU is no
device read). Counts are per step after warm-up; times are medians of interleaved repeats,
so their ratio is measured in one run.

    python benchmarks/step_overhead.py [--model vit_small_patch16_224] [--batch 8] [--steps 16] [--sync-every 4]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from overhead import build_models, model_arguments
from torch.utils._python_dispatch import TorchDispatchMode

import smope
from smope.runconfig import RunConfig, TrainConfig
from smope.trainer import Trainer

aten = torch.ops.aten


class StepCounter(TorchDispatchMode):
    """Counts, while :attr:`active`, the ops dispatched and the device-to-host reads.

    Reads are scalar reads (``item``, ``bool``, ``float``: torch's ``_local_scalar_dense``), ops
    whose output size depends on the values (``nonzero``, ``unique``, ...) and the Python copies
    ``tolist``, ``numpy`` and ``cpu``, which dispatch nothing for CPU tensors and so are patched.
    """

    SYNCING = {
        aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
        aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
    }
    COPIES = ("tolist", "numpy", "cpu")

    def __init__(self) -> None:
        super().__init__()
        self.active, self.ops, self.reads = False, 0, 0
        self._originals: dict[str, Callable] = {}

    def __enter__(self) -> StepCounter:
        for name in self.COPIES:
            self._originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(self._originals[name]))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for name, method in self._originals.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, method: Callable) -> Callable:
        def counted(tensor, *args, **kwargs):
            self.reads += self.active
            return method(tensor, *args, **kwargs)

        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.active
        self.reads += self.active and func in self.SYNCING
        return func(*args, **(kwargs or {}))


def cpu_name() -> str:
    """The processor's model name (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def trainable_groups(model: torch.nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}]


def run_steps(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, sync_every: int, on_step: Callable[[int], None]) -> None:
    """``steps`` training steps of ``model`` on one batch through the harness's loop; ``on_step(i)`` before step i's forward."""
    trainer = Trainer(RunConfig(train=TrainConfig(device="cpu", precision="fp32", progress=False, sync_every=sync_every)))
    model.train()
    prompted = isinstance(model, smope.SMoPEModel)
    calls = []

    def loss_fn(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        on_step(len(calls))
        calls.append(1)
        loss = F.cross_entropy(model(images), targets)
        aux = smope.auxiliary_loss(model) if prompted else None
        return loss if aux is None else loss + aux

    groups = trainable_groups(model)
    optimizer = torch.optim.AdamW(groups, fused=True)
    trainer.optimize(groups, optimizer, [lambda _: 1.0], 1, steps, lambda _: ((x, labels) for _ in range(steps)), loss_fn, "step")


def count_per_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int, warmup: int, sync_every: int) -> tuple[float, float]:
    """(dispatched ops, host reads) per step over the steps after ``warmup``."""
    counter = StepCounter()

    def on_step(index: int) -> None:
        counter.active = index >= warmup

    with counter:
        run_steps(model, x, labels, steps, sync_every, on_step)
    return counter.ops / (steps - warmup), counter.reads / (steps - warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser, batch=8)
    parser.add_argument("--steps", type=int, default=16, help="steps per measurement, warm-up included")
    parser.add_argument("--warmup", type=int, default=4, help="steps not counted; a multiple of --sync-every counts whole read intervals")
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    plain, prompted, x, labels = build_models(args)
    models = {"plain timm": plain, "smope": prompted}

    counts = {name: count_per_step(model, x, labels, args.steps, args.warmup, args.sync_every) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            run_steps(model, x, labels, args.steps, args.sync_every, lambda _: None)
            times[name].append((time.perf_counter() - start) / args.steps)

    print(
        f"{args.model} at {args.img_size}px, batch {args.batch}, {torch.get_num_threads()} threads on {cpu_name()}; "
        f"training steps of smope.trainer.Trainer.optimize, fused AdamW, loss read every {args.sync_every} steps; "
        f"counts per step over steps {args.warmup + 1}-{args.steps}, time the median of {args.repeats} interleaved repeats"
    )
    (plain_ops, plain_reads), (ops, reads) = counts["plain timm"], counts["smope"]
    plain_ms, ms = (statistics.median(times[name]) * 1000 for name in models)
    print(f"  dispatched ops per step: plain {plain_ops:7.1f}, smope {ops:7.1f}, ratio {ops / plain_ops:.2f}")
    print(f"  host reads per step    : plain {plain_reads:7.2f}, smope {reads:7.2f} (at most 1/{args.sync_every} = {1 / args.sync_every:.2f})")
    print(f"  time per step          : plain {plain_ms:7.1f} ms, smope {ms:7.1f} ms, ratio {ms / plain_ms:.2f}")


if __name__ == "__main__":
    main()
