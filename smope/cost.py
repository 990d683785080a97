"""Compute accounting for every method: parameter counts and forward FLOPs per image.

Both build the learner with random weights on the CPU (nothing is downloaded), so the numbers
are those of the model a run trains. Parameters use :func:`smope.vit.count_parameters`, one
meaning of "prompt" (everything trained besides the classifier head) for every method.

FLOPs are counted by torch's own ``FlopCounterMode``: images are pushed through exactly the
forward the learner runs; the cost per image is the count for two images minus the count for
one, so work done once per batch is not charged to an image.

- training: ``model(images)`` in train mode, i.e. one training step's forward. Two-pass
  methods include the prompt-free query pass when they need it in training (L2P++, CODA-Prompt);
  DualPrompt picks its training prompt by task id, so it runs one pass (docs/method.md#paper-numbers). Learners
  that train on frozen features (prototype, head-only) count the one backbone pass per image;
  DualPrompt's key fit adds one query pass per image per task, not per step, and is left out.
- inference: ``learner.logits(images)``, query pass included.

Convention: FLOPs = 2 x multiply-accumulates, as ``FlopCounterMode`` counts. Two totals are
reported: all matrix products, and the same without the attention-score products (QK^T and
AV inside ``scaled_dot_product_attention``). The second is what the paper's numbers count (docs/method.md#paper-numbers):
SMoPE on ViT-B/16 at 224 px gives 33.70 GFLOPs against the paper's 33.72, as a counter that sees
the linear and convolution layers but not the fused attention kernel would; the full count is
35.14. The paper's numbers are thus 2 x MACs, not fvcore-style MACs (ViT-B/16 has 17.6 G MACs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .learners import create_learner
from .runconfig import RunConfig, load_config
from .vit import count_parameters

# FlopCounterMode has formulas for the CUDA attention kernels only; this is the CPU one.
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass(frozen=True)
class FlopCount:
    total: int  # every matrix product, 2 FLOPs per multiply-accumulate
    attention: int  # of which the QK^T and AV products of scaled_dot_product_attention

    @property
    def without_attention(self) -> int:
        """The paper's convention (docs/method.md#paper-numbers): linear and convolution layers only, in effect."""
        return self.total - self.attention


@dataclass(frozen=True)
class MethodFlops:
    training: FlopCount
    inference: FlopCount
    img_size: int  # the resolution counted at


def count_flops(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> FlopCount:
    """FLOPs of one call ``forward(images)``, without gradients."""
    counter = FlopCounterMode(display=False, custom_mapping={_CPU_ATTENTION: _cpu_attention_flops})
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), counter:
        forward(images)
    return FlopCount(counter.get_total_flops(), counter.get_flop_counts()["Global"].get(_CPU_ATTENTION, 0))


def per_image_flops(forward: Callable[[torch.Tensor], torch.Tensor], height: int, width: int) -> FlopCount:
    """What one more image costs: the count for two images minus the count for one.

    Work done once per batch (CODA-Prompt's orthogonality penalty) is thus not charged to an image.
    """
    one, two = (count_flops(forward, torch.randn(n, 3, height, width)) for n in (1, 2))
    return FlopCount(two.total - one.total, two.attention - one.attention)


def counting_config(config: RunConfig) -> RunConfig:
    """``config`` with random weights on the CPU: FLOPs do not depend on the weights."""
    config = copy.deepcopy(config)
    config.model.weights = "none"
    config.train.device = "cpu"
    config.train.precision = "fp32"
    return config


def method_flops(config: RunConfig, num_classes: int) -> MethodFlops:
    """Training and inference forward FLOPs per image of ``config.method.name`` on ``config.model``."""
    learner = create_learner(counting_config(config), num_classes)
    height, width = learner.model.patch_embed.img_size
    learner.model.train()
    training = per_image_flops(learner.model, height, width)
    return MethodFlops(training, per_image_flops(learner.logits, height, width), height)


def flops_table(config: RunConfig, num_classes: int) -> str:
    """The ``smope flops`` report: GFLOPs (FLOPs / 1e9) per image, both conventions."""
    flops = method_flops(config, num_classes)
    lines = [
        f"{config.method.name} on {config.model.name} at {flops.img_size} px, {num_classes} classes: forward GFLOPs per image",
        f"  {'':<10} {'all matmuls':>12} {'w/o attention scores':>21}",
    ]
    for phase, count in (("training", flops.training), ("inference", flops.inference)):
        lines.append(f"  {phase:<10} {count.total / 1e9:>12.2f} {count.without_attention / 1e9:>21.2f}")
    lines.append("  FLOPs = 2 x multiply-adds (torch FlopCounterMode); 'w/o attention scores' omits the QK^T and AV")
    lines.append("  products and is the convention of docs/method.md#paper-numbers (SMoPE on ViT-B/16 at 224 px: 33.72)")
    return "\n".join(lines)


# Parameters ----------------------------------------------------------------------------------
def method_config(
    model: str,
    method: str = "smope",
    num_experts: int | None = None,
    top_k: int | None = None,
    layers: list[int] | None = None,
    img_size: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """A run config that builds ``method`` on ``model`` with random weights on the CPU.

    The prompt settings given (not None) and the ``key=value`` ``overrides`` are checked as a
    run's would be: a method that does not read them refuses them, naming the key.
    """
    settings = [f"method.name={method}", f"model.name={model}", "model.weights=none", "train.device=cpu", "train.progress=false"]
    settings += [f"method.{key}={value}" for key, value in (("num_experts", num_experts), ("top_k", top_k), ("layers", layers)) if value is not None]
    if img_size is not None:
        settings.append(f"model.img_size={img_size}")
    return load_config(None, [*settings, *overrides])


def parameter_counts(config: RunConfig, num_classes: int) -> dict[str, int]:
    """Trainable / prompt / head / frozen / total parameters of ``config``'s learner (:func:`smope.vit.count_parameters`)."""
    return count_parameters(create_learner(config, num_classes).model)


def parameter_table(config: RunConfig, num_classes: int) -> str:
    """The ``smope params`` report."""
    counts = parameter_counts(config, num_classes)
    width = max(len(f"{v:,d}") for v in counts.values())
    lines = [f"{config.method.name} on {config.model.name}, {num_classes} classes", f"  {'component':<10} {'parameters':>{width}}"]
    lines += [f"  {name:<10} {value:>{width},d}" for name, value in counts.items()]
    return "\n".join(lines)
