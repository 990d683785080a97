"""One prepared check for a CUDA machine: correctness, training-step speed, loader speed, an end-to-end run.

Needs no network and no dataset (images are generated, weights random) and only torch,
torchvision, timm, peft, transformers, safetensors and scikit-learn, with smope installed by
``pip install --no-deps -e .``. At most about 8 minutes on one GPU (``--budget``: parts that
would start later are recorded as skipped). Writes ``gpu_check.json`` and ``gpu_check.md``
into ``--out`` and prints the Markdown table.

    python benchmarks/gpu_check.py --out gpu_check            # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick       # seconds: the script itself works

Parts: (a) correctness: the SMoPE forward on the device vs the CPU in fp32, prompt-key
gradients non-zero, top-K choices under bf16 autocast vs fp32; (b) ViT-B/16 (random weights,
224 px) training-step images/s and peak memory, plain frozen timm vs SMoPE, fp32 / TF32 / bf16
/ bf16 compiled, batch 64 and 128, autocast set here directly; (c) loader images/s on
generated 500x375 JPEGs: the CPU pipeline with 1, 4, 8, 16 workers vs ``data.pipeline=gpu``;
(d) a two-task ``smope run`` on generated 224 px images: seconds per phase and the fraction
of the run the GPU was busy (kernel time from the profiler over wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import smope
from smope.data import prepared
from smope.data.datasets import load_dataset
from smope.data.synthetic import write_image_folder
from smope.model import prompted_layers
from smope.runconfig import load_config
from smope.trainer import Trainer

PRECISIONS = ("fp32", "tf32", "bf16", "bf16+compile")


# ---------------------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off inside the block (CUDA), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def vit(quick: bool, num_classes: int = 100) -> torch.nn.Module:
    """ViT-B/16 at 224 px with random weights, or a 2-block 32 px ViT for ``--quick``."""
    if quick:
        return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=num_classes)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes)


def prompted(model: torch.nn.Module, quick: bool) -> smope.SMoPEModel:
    layers = [0, 1] if quick else [0, 1, 2, 3, 4, 5]
    return smope.attach(model, smope.SMoPEConfig(layers=layers, num_experts=25 if not quick else 6, top_k=5 if not quick else 2))


def selections(model: torch.nn.Module) -> torch.Tensor:
    """The experts every layer chose in the last forward, sorted per (image, head): (L, B, H, K)."""
    return torch.stack([layer.last_selected.sort(-1).values for layer in prompted_layers(model)])


# ---------------------------------------------------------------------------------------- (a) correctness


def correctness(device: torch.device, quick: bool) -> dict:
    torch.manual_seed(0)
    model = prompted(vit(quick), quick).eval()
    size = 32 if quick else 224
    x = torch.randn(16, 3, size, size)
    with torch.no_grad():
        reference = model(x)
        reference_selected = selections(model)
        model.to(device)
        with tf32(False):
            on_device = model(x.to(device))
        fp32_selected = selections(model)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(x.to(device))
        bf16_selected = selections(model)
    same_choice = bool(torch.equal(fp32_selected.cpu(), reference_selected))
    agreement = (fp32_selected == bf16_selected).all(-1).float().mean().item()  # whole top-K sets per (layer, image, head)
    model.train()
    loss = F.cross_entropy(model(x.to(device)), torch.randint(0, 100, (len(x),), device=device))
    aux = smope.auxiliary_loss(model)
    (loss if aux is None else loss + aux).backward()
    key_grads = [float(layer.experts.keys.grad.abs().sum()) if layer.experts.keys.grad is not None else 0.0 for layer in prompted_layers(model)]
    return {
        "forward_max_abs_diff_vs_cpu_fp32": float((on_device.cpu() - reference).abs().max()),
        "same_top_k_as_cpu_fp32": same_choice,
        "prompt_key_grads_nonzero": all(g > 0 for g in key_grads),
        "bf16_top_k_agreement": agreement,
    }


# ---------------------------------------------------------------------------------------- (b) training steps


def train_step_rate(kind: str, precision: str, batch: int, device: torch.device, quick: bool, steps: int) -> dict:
    """Images/s of forward + backward + AdamW for the plain frozen ViT (head trained) or SMoPE, and peak memory."""
    torch.manual_seed(0)
    model = vit(quick)
    if kind == "smope":
        model = prompted(model, quick)
    else:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(model) if precision.endswith("compile") else model
    size = 32 if quick else 224
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(forward(x).float(), y)
            aux = smope.auxiliary_loss(model) if kind == "smope" else None
            loss = loss if aux is None else loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with tf32(precision != "fp32"):
        for _ in range(3):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None
    return {"model": kind, "precision": precision, "batch": batch, "images_per_s": batch * steps / seconds, "peak_gib": peak}


# ---------------------------------------------------------------------------------------- (c) loaders


def loader_rates(root: Path, device: torch.device, workers: list[int], quick: bool) -> list[dict]:
    """Images/s of a shuffled training pass over generated JPEGs (random crop, flip, jitter), inputs normalised on the device."""
    model = vit(quick).to(device)
    raw = load_dataset("imagefolder", str(root), True), load_dataset("imagefolder", str(root), False)
    rows = []
    for pipeline, count in [("cpu", w) for w in workers] + [("gpu", min(workers[-1], 4))]:
        config = load_config(None, [
            "data.name=imagefolder", f"data.root={root}", f"data.pipeline={pipeline}", f"data.num_workers={count}",
            "data.augment=[random_resized_crop,hflip,color_jitter]", "data.cache=false", f"train.device={device}",
        ])
        data = prepared.prepare_data(config, model, *raw)
        trainer = Trainer(config)
        trainer.pixel_norm = data.pixel_norm
        batches = trainer.loader(data.train, 64 if not quick else 8, shuffle=True)

        def epoch() -> int:
            seen = sum(len(labels) for _, labels in batches)
            sync(device)
            return seen

        epoch()  # workers start, decoders warm up
        start = time.perf_counter()
        seen = epoch()
        rows.append({"pipeline": pipeline, "workers": count, "images_per_s": seen / (time.perf_counter() - start)})
    return rows


# ---------------------------------------------------------------------------------------- (d) end to end


class PhaseClock:
    """Wall seconds per phase of a run, measured by wrapping the functions that run each phase."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}
        self.patches: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, phase: Callable[[tuple, dict], str]) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                key = phase(args, kwargs)
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        self.patches.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.patches):
            setattr(owner, name, original)


def end_to_end(root: Path, out: Path, device: torch.device, quick: bool) -> dict:
    from smope import experiment
    from smope.learners import heads, smope_learner
    from smope.learners.base import Learner

    model = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}"]
    config = load_config(None, [
        "data.name=imagefolder", f"data.root={root}", "data.num_tasks=2", "data.augment=[random_resized_crop,hflip]",
        *(model if quick else ["model.name=vit_base_patch16_224"]), "model.weights=none", "method.name=smope",
        *(["method.layers=[0,1]", "method.num_experts=6", "method.top_k=2"] if quick else []),
        "train.epochs=1", "method.warmup_epochs=0", "method.align_epochs=5", f"train.device={device}", "train.progress=false",
        f"output_dir={out}", "train.batch_size=32" if quick else "train.batch_size=64",
    ])
    clock = PhaseClock(device)

    def pass_phase(args: tuple, kwargs: dict) -> str:
        forward = args[2] if len(args) > 2 else kwargs.get("forward")  # (self, data, forward)
        return "usage pass" if getattr(forward, "__name__", "") == "usage_only" else "statistics"

    clock.wrap(smope_learner.SMoPELearner, "train_task", lambda a, k: "training")
    clock.wrap(Learner, "features_and_labels", pass_phase)
    clock.wrap(heads, "align_after_task", lambda a, k: "alignment")
    clock.wrap(experiment, "evaluate", lambda a, k: "evaluation")
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) if device.type == "cuda" else contextlib.nullcontext()
    try:
        start = time.perf_counter()
        with profile:
            metrics = experiment.run_experiment(config)
            sync(device)
        wall = time.perf_counter() - start
    finally:
        clock.restore()
    busy = None
    if device.type == "cuda":
        events = profile.key_averages()
        kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
        busy = kernel_us / 1e6 / wall
    return {"wall_s": wall, "phase_s": clock.seconds, "gpu_busy_fraction": busy, "final_average_accuracy": metrics["final_average_accuracy"]}


# ---------------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = [f"# gpu_check on {results['device_name']}", "", f"torch {results['torch']}, smope {results['smope']}", ""]
    a = results.get("correctness")
    if a:
        lines += ["| (a) correctness | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in a.items()]
        lines.append("")
    lines += ["| (b) model | precision | batch | images/s | peak GiB |", "|---|---|---|---|---|"]
    for row in results.get("train_steps", []):
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
        rate = row.get("skipped") or f"{row['images_per_s']:.0f}"
        lines.append(f"| {row['model']} | {row['precision']} | {row['batch']} | {rate} | {peak} |")
    lines += ["", "| (c) pipeline | workers | images/s |", "|---|---|---|"]
    lines += [f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']:.0f} |" for r in results.get("loaders", [])]
    d = results.get("end_to_end")
    if d:
        busy = "n/a (CPU)" if d["gpu_busy_fraction"] is None else f"{100 * d['gpu_busy_fraction']:.0f}%"
        lines += ["", "| (d) phase | seconds |", "|---|---|"]
        lines += [f"| {phase} | {seconds:.2f} |" for phase, seconds in d["phase_s"].items()]
        lines += [f"| whole run | {d['wall_s']:.2f} |", f"| GPU busy | {busy} |"]
    if results.get("skipped"):
        lines += ["", "Skipped (time budget): " + ", ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes, no compile: checks that the script runs")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new measurement starts")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: torch finds no CUDA device here; run with --device cpu --quick to check the script only")
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    results: dict = {"device_name": name, "torch": torch.__version__, "smope": smope.__version__, "quick": args.quick, "skipped": []}

    def in_budget(label: str) -> bool:
        if time.perf_counter() - started < args.budget:
            return True
        results["skipped"].append(label)
        return False

    results["correctness"] = correctness(device, args.quick)
    batches = (4, 8) if args.quick else (64, 128)
    precisions = [p for p in PRECISIONS if not args.quick or p in ("fp32", "bf16")]
    steps = 2 if args.quick else 10
    eager = [(k, p, b) for p in precisions if not p.endswith("compile") for b in batches for k in ("timm", "smope")]
    compiled = [(k, p, b) for p in precisions if p.endswith("compile") for b in batches for k in ("timm", "smope")]
    results["train_steps"] = []
    for kind, precision, batch in eager:
        if in_budget(f"{kind} {precision} batch {batch}"):
            results["train_steps"].append(train_step_rate(kind, precision, batch, device, args.quick, steps))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        per_class = 8 if args.quick else 64
        jpegs = write_image_folder(Path(tmp) / "jpegs", 8, per_class if args.quick else 4 * per_class, (64, 48) if args.quick else (500, 375))
        if in_budget("loaders"):
            results["loaders"] = loader_rates(jpegs, device, [1] if args.quick else [1, 4, 8, 16], args.quick)
        size = (48, 48) if args.quick else (224, 224)
        run_root = Path(tmp) / "run_data"
        write_image_folder(run_root / "train", 4, per_class, size)
        write_image_folder(run_root / "test", 4, per_class // 4, size, first_seed=10**6)
        if in_budget("end to end"):
            results["end_to_end"] = end_to_end(run_root, Path(tmp) / "run", device, args.quick)
    for kind, precision, batch in compiled:  # last: compilation is the slowest part to measure
        if in_budget(f"{kind} {precision} batch {batch}"):
            results["train_steps"].append(train_step_rate(kind, precision, batch, device, args.quick, steps))
    results["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
