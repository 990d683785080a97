"""Cost of attaching SMoPE: time of a prompted ViT divided by the plain timm model's.

Both models are measured in the same run, interleaved, and the median of the repeats is
reported, because shared CPU machines are noisy. The training step is forward + backward
with a frozen backbone: for the plain model only the head is trainable, so its backward
stops at the head, while SMoPE's gradients must reach the prompts of block 0. That gap is
inherent to prompt tuning, not overhead of this implementation; the inference ratio is the
number to watch (goal <= 1.05).

    python benchmarks/overhead.py [--model vit_small_patch16_224] [--batch 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import smope


def timed(fn, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_arguments(parser: argparse.ArgumentParser, batch: int) -> None:
    """The options that say which pair of models is measured (shared with step_overhead.py)."""
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--num-classes", type=int, default=100)


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, smope.SMoPEModel, torch.Tensor, torch.Tensor]:
    """The plain timm model with only its head trainable, the same weights with SMoPE attached, and one batch."""
    torch.manual_seed(0)
    plain = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    plain.requires_grad_(False)
    plain.get_classifier().requires_grad_(True)
    prompted = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    prompted.load_state_dict(plain.state_dict())
    prompted = smope.attach(prompted, smope.SMoPEConfig())
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, args.num_classes, (args.batch,))
    return plain, prompted, x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser, batch=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    plain, prompted, x, labels = build_models(args)

    def infer(model):
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step(model):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        aux = smope.auxiliary_loss(model) if isinstance(model, smope.SMoPEModel) else None
        (loss if aux is None else loss + aux).backward()
        model.zero_grad(set_to_none=True)

    results = {"inference": ([], []), "train step": ([], [])}
    for _ in range(args.repeats):
        for name, fn in (("inference", infer), ("train step", train_step)):
            results[name][0].append(timed(lambda: fn(plain)))
            results[name][1].append(timed(lambda: fn(prompted)))

    print(f"{args.model} at {args.img_size}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats; SMoPE sparse mode, {smope.SMoPEConfig().layers} prompted")
    for name, (base, ours) in results.items():
        b, o = statistics.median(base), statistics.median(ours)
        print(f"  {name:<10}: plain {b * 1000:7.1f} ms, smope {o * 1000:7.1f} ms, ratio {o / b:.3f}")


if __name__ == "__main__":
    main()
