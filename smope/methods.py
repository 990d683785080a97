"""The continual learners: each ``method.name`` (and aliases), its settings, and where its class lives.

One dataclass per learner holds the ``method.*`` keys it reads: their defaults (the method's
published values), their help (``metadata["help"]``, from which docs/config.md is written)
and their range checks (:meth:`MethodSettings.check`, run when the settings are built, so a
config is refused when it loads, ``--dry-run`` included). The keys a method reads are its
settings' fields: :func:`smope.runconfig.load_config` refuses any other, because a setting
that silently does nothing runs another experiment than the one the user asked for.

The settings live here, not in the learners' modules, because they must load without torch
or peft: a config is checked before any model is built, and ``smope report`` reads a run's
config without the model code. A learner's class is imported only when it is built
(:meth:`MethodSpec.load`). Adding a learner is one file in ``smope/learners/`` plus its
settings class (built from the groups below) and one :class:`MethodSpec` line here.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import InvalidSettingError, SmopeError
from .settings import DENSE_PROMPT_KEYS, PromptExpertSettings, above, at_least, check_prompt_shape, one_of

if TYPE_CHECKING:
    from .runconfig import RunConfig

ALIGN_COVARIANCES = ("diag", "full")
ALIGN_STEPS = ("old_classes", "all_samples")
HEADS = ("linear", "ridge")
HIDE_STATISTICS = ("centroids", "full", "diag")  # hide-prompt / norga: k-means centroids with variances, covariance, variance
NORGA_GATES = ("sigmoid", "tanh", "relu", "gelu", "softplus", "elu")  # the release's --gate_act choices

# Keys that were "null = the method's published value" before those values became the defaults:
# config files that say null for them (run folders' config.yaml among them) get the default.
NULL_MEANS_DEFAULT = frozenset({
    "pool_size", "prompt_length", "prompt_layers", "pool_top_k", "g_prompt_length", "g_prompt_layers", "ortho_weight",
    "vq_temperature", "vq_loss_weight", "vq_commit_weight", "hide_statistics",
})  # fmt: skip


def like(owner: type, name: str, default: Any = MISSING) -> Any:
    """A field declared as ``owner``'s field ``name`` (its help, its default), with another ``default`` if given:
    a method that reads a shared key with a published value of its own declares it with this."""
    declared = owner.__dataclass_fields__[name]
    if default is MISSING:
        return field(default=declared.default, default_factory=declared.default_factory, metadata=declared.metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=declared.metadata)
    return field(default=default, metadata=declared.metadata)


def even_prompt_length(key: str, value: int) -> int:
    """A prefix length of config key ``method.<key>``: half keys, half values."""
    if value < 2 or value % 2:
        raise SmopeError(f"config key 'method.{key}' must be even and >= 2 (half prefix keys, half values), got {value}")
    return value


def prompt_expert_check(settings: Any, check: Any) -> None:
    """Run ``check(settings)`` (the adapter config's own checks) with its error named as ``method.*`` settings."""
    try:
        check(settings)
    except InvalidSettingError as exc:
        raise SmopeError(f"invalid method settings: {exc} (config keys method.*)") from exc


# The base and the groups of keys that several methods read --------------------------------


@dataclass
class MethodSettings:
    """``method.*``: the learner (``name``) and the settings it reads, one field per key.

    Subclasses extend :meth:`check`, :meth:`check_run` and :meth:`inactive_keys` cooperatively
    (calling ``super()``), so the groups below combine by inheritance.
    """

    name: str = field(default="", metadata={"help": "the learner: `smope` or a baseline ([baselines.md](baselines.md))"})

    def __post_init__(self) -> None:
        self.name = self.name or registered_name(type(self))
        self.check()

    def check(self) -> None:
        """Range checks within the section: each error names its ``method.<key>``."""

    def check_run(self, run: RunConfig) -> None:
        """Checks that need the rest of the run (for example ``data.num_tasks``): at load and when a learner is built."""

    def inactive_keys(self) -> set[str]:
        """Fields that change nothing given the others' values: config.yaml and the run identity leave them out."""
        return set()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The ``method.*`` keys the learner reads, besides ``name``."""
        return tuple(f.name for f in fields(cls) if f.name != "name")


@dataclass
class AlignmentSampling(MethodSettings):
    """Whether the head is realigned on features sampled from class statistics, and how many per class."""

    align: bool = field(
        default=True, metadata={"help": "classifier alignment on sampled class features after each task from the second on (for `slca`: its own alignment, `method.slca_*`)"}
    )
    align_samples_per_class: int = field(
        default=256, metadata={"help": "features sampled per class for classifier alignment (`slca`: for its own alignment too)"}
    )

    def check(self) -> None:
        super().check()
        at_least("method.align_samples_per_class", self.align_samples_per_class, 1)


@dataclass
class AlignmentSettings(AlignmentSampling):
    """Classifier alignment after each task (:func:`smope.learners.alignment.align_after_task`)."""

    align_epochs: int = field(default=50, metadata={"help": "epochs of classifier alignment"})
    align_lr: float = field(default=1e-5, metadata={"help": "learning rate of classifier alignment"})
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

    def check(self) -> None:
        super().check()
        at_least("method.align_epochs", self.align_epochs, 0)
        above("method.align_lr", self.align_lr)
        one_of("method.align_covariance", self.align_covariance, ALIGN_COVARIANCES)
        one_of("method.align_steps", self.align_steps, ALIGN_STEPS)


@dataclass
class HeadSettings(MethodSettings):
    """The prompt learners' classifier: linear (gradient-trained, aligned) or RanPAC's ridge head."""

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

    def check(self) -> None:
        super().check()
        one_of("method.head", self.head, HEADS)
        at_least("method.rp_dim", self.rp_dim, 1)

    def inactive_keys(self) -> set[str]:
        return super().inactive_keys() | ({"rp_dim"} if self.head != "ridge" else set())


@dataclass
class DensePromptShape(MethodSettings):
    """SMoPE's prompt experts in dense mode (every expert on: no routing, noise or routing losses)."""

    num_experts: int = like(PromptExpertSettings, "num_experts")
    top_k: int = like(PromptExpertSettings, "top_k")
    layers: list[int] = like(PromptExpertSettings, "layers")
    init: str = like(PromptExpertSettings, "init")

    def check(self) -> None:
        super().check()
        prompt_expert_check(self, check_prompt_shape)

    def prompt_expert_settings(self) -> dict:
        """These fields as keyword arguments of :class:`~smope.config.SMoPEConfig` (the rest keep its defaults)."""
        return {name: getattr(self, name) for name in DENSE_PROMPT_KEYS}


@dataclass
class PoolSettings(MethodSettings):
    """A pool of prefix prompts (the two-pass methods); each method declares its published sizes."""

    PER_TASK: ClassVar[str | None] = None  # what each task owns of the pool ("prompt"), when the pool is split by task

    pool_size: int = field(default=10, metadata={"help": "prompts in the pool (CODA-Prompt: components)"})
    prompt_length: int = field(default=8, metadata={"help": "prefix length of one prompt, split into half keys and half values"})
    prompt_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "blocks that receive the pool's prompts"})

    def check(self) -> None:
        super().check()
        at_least("method.pool_size", self.pool_size, 1)
        even_prompt_length("prompt_length", self.prompt_length)

    def check_run(self, run: RunConfig) -> None:
        super().check_run(run)
        tasks = run.data.num_tasks
        if self.PER_TASK and self.pool_size < tasks:
            raise SmopeError(
                f"config key 'method.pool_size'={self.pool_size} must be at least data.num_tasks={tasks} for {self.name} "
                f"(one {self.PER_TASK} per task): raise method.pool_size"
            )


# One class per learner ---------------------------------------------------------------------


@dataclass
class SMoPESettings(HeadSettings, AlignmentSettings, PromptExpertSettings):
    """``smope`` (and ``joint``): the sparse prompt experts, the after-task passes, alignment and the head."""

    after_task_eval_noise: float | None = field(
        default=None,
        metadata={
            "help": "`method.eval_noise` of the two after-task passes (usage counts, class statistics); null = `method.eval_noise`. The release runs "
            "them at 2.0 (the paper configs) and its reported test evaluation at 0 ([which pass uses which](method.md#after-task-passes))"
        },
    )
    warmup_epochs: int | None = field(default=None, metadata={"help": "dense warm-up epochs on the first task; null = half of `train.epochs`"})

    def check(self) -> None:
        super().check()
        prompt_expert_check(self, PromptExpertSettings.check_settings)
        if (self.after_task_eval_noise or 0) < 0:
            raise SmopeError(f"config key 'method.after_task_eval_noise' must be >= 0 or null, got {self.after_task_eval_noise}")
        at_least("method.warmup_epochs", self.warmup_epochs or 0, 0)


@dataclass
class DensePromptSettings(HeadSettings, AlignmentSettings, DensePromptShape):
    """``dense-prompt``: SMoPE's experts all active, with SMoPE's alignment and head."""


@dataclass
class L2PSettings(PoolSettings):
    """``l2p`` (L2P++): prompts chosen per input by key matching."""

    pool_size: int = like(PoolSettings, "pool_size", default=30)
    prompt_length: int = like(PoolSettings, "prompt_length", default=20)
    prompt_layers: list[int] = like(PoolSettings, "prompt_layers", default=[0])
    pool_top_k: int = field(default=5, metadata={"help": "prompts L2P++ selects per input"})

    def check(self) -> None:
        super().check()
        at_least("method.pool_top_k", self.pool_top_k, 1)
        if self.pool_top_k > self.pool_size:
            raise SmopeError(f"config key 'method.pool_top_k'={self.pool_top_k} must not exceed method.pool_size={self.pool_size}")


@dataclass
class DualPromptSettings(PoolSettings):
    """``dualprompt``: one E-prompt per task and a task-shared G-prompt."""

    PER_TASK = "E-prompt"

    prompt_length: int = like(PoolSettings, "prompt_length", default=20)
    prompt_layers: list[int] = like(PoolSettings, "prompt_layers", default=[2, 3, 4])
    g_prompt_length: int = field(default=6, metadata={"help": "prefix length of DualPrompt's task-shared G-prompt"})
    g_prompt_layers: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "blocks of DualPrompt's G-prompt"})

    def check(self) -> None:
        super().check()
        even_prompt_length("g_prompt_length", self.g_prompt_length)


@dataclass
class CodaPromptSettings(PoolSettings):
    """``coda-prompt``: components mixed by attention, each task training its own slice."""

    PER_TASK = "slice of the pool"

    pool_size: int = like(PoolSettings, "pool_size", default=100)
    ortho_weight: float = field(default=0.1, metadata={"help": "weight of CODA-Prompt's orthogonality penalty on keys, attention vectors and components"})

    def check(self) -> None:
        super().check()
        at_least("method.ortho_weight", self.ortho_weight, 0)


@dataclass
class VQPromptSettings(AlignmentSettings, PoolSettings):
    """``vq-prompt``: the prompt mixture snapped to the nearest pool prompt, then aligned as SMoPE's head is."""

    vq_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of VQ-Prompt's prompt weights (5 on CUB-200; [baselines.md](baselines.md#vq-prompt))"}
    )
    vq_loss_weight: float = field(default=0.4, metadata={"help": "weight of VQ-Prompt's quantisation loss"})
    vq_commit_weight: float = field(default=0.1, metadata={"help": "weight of VQ-Prompt's commitment loss"})

    def check(self) -> None:
        super().check()
        above("method.vq_temperature", self.vq_temperature)
        at_least("method.vq_loss_weight", self.vq_loss_weight, 0)
        at_least("method.vq_commit_weight", self.vq_commit_weight, 0)


@dataclass
class FrozenBackboneSettings(MethodSettings):
    """``prototype`` (SimpleCIL) and ``head-only``: no ``method.*`` key besides the name."""


@dataclass
class AlignedHeadSettings(AlignmentSettings):
    """``aligned-head``: a linear head on the frozen backbone, with classifier alignment."""


@dataclass
class LoRASettings(MethodSettings):
    """``lora``: LoRA on the attention qkv projections, trained in sequence."""

    lora_r: int = field(default=8, metadata={"help": "rank of the LoRA matrices on the attention qkv projections"})
    lora_alpha: int = field(default=16, metadata={"help": "scaling alpha of the LoRA matrices"})
    lora_lr: float = field(
        default=5e-4,
        metadata={
            "help": "learning rate of the LoRA matrices (the head keeps `train.lr`); `train.lr` itself (5e-3) made sequential LoRA collapse to one "
            "predicted class on the CPU benchmarks"
        },
    )

    def check(self) -> None:
        super().check()
        at_least("method.lora_r", self.lora_r, 1)
        above("method.lora_lr", self.lora_lr)


@dataclass
class RanPACSettings(DensePromptShape):
    """``ranpac``: a first-task dense prompt (optional), then the random-projection ridge head."""

    rp_dim: int = like(HeadSettings, "rp_dim")
    first_task_adapt: bool = field(
        default=True, metadata={"help": "train SMoPE's prompt in dense mode on the first task, then freeze it; false = frozen backbone features"}
    )

    def check(self) -> None:
        super().check()
        at_least("method.rp_dim", self.rp_dim, 1)


@dataclass
class APERSettings(DensePromptShape):
    """``aper``: a first-task dense prompt, then prototypes of the frozen and the prompted features."""


@dataclass
class SLCASettings(AlignmentSampling):
    """``slca``: the slow learner (the whole backbone at a small rate) and its own classifier alignment."""

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

    def check(self) -> None:
        super().check()
        above("method.slca_head_lr", self.slca_head_lr)
        for key in ("slca_backbone_lr", "slca_align_epochs", "slca_logit_norm"):  # a zero backbone rate: the ablation without the slow learner
            at_least(f"method.{key}", getattr(self, key), 0)


@dataclass
class HiDePromptSettings(PoolSettings):
    """``hide-prompt``: one prompt per task chosen by a task-identity head, both heads realigned after each task."""

    PER_TASK = "prompt"

    prompt_length: int = like(PoolSettings, "prompt_length", default=10)
    hide_tii_epochs: int = field(default=20, metadata={"help": "epochs per task of the task-identity head (an MLP on the frozen class token)"})
    hide_tii_lr: float = field(default=5e-4, metadata={"help": "learning rate of the task-identity head"})
    hide_align_epochs: int = field(
        default=30,
        metadata={"help": "epochs of the realignment of both heads on Gaussian pseudo-features after each task from the second (0: none)"},
    )
    hide_align_lr: float = field(default=0.005, metadata={"help": "learning rate of the realignment of both heads"})
    hide_statistics: str = field(
        default="centroids",
        metadata={"help": "class statistics: `centroids` (k-means centroids with per-cluster variances), `full` (covariance) or `diag`"},
    )
    hide_centroids: int = field(default=10, metadata={"help": "k-means centroids per class (`centroids` statistics)"})
    hide_prompt_momentum: float = field(default=0.01, metadata={"help": "momentum of each task's E-prompt towards the mean of the earlier ones"})
    hide_contrastive_weight: float = field(
        default=0.1, metadata={"help": "weight of the contrastive regulariser against the stored class means (0.1 CIFAR-100, 0.5 ImageNet-R)"}
    )

    def check(self) -> None:
        super().check()
        one_of("method.hide_statistics", self.hide_statistics, HIDE_STATISTICS)
        for key, low in (("hide_tii_epochs", 1), ("hide_align_epochs", 0), ("hide_centroids", 1)):
            at_least(f"method.{key}", getattr(self, key), low)
        for key in ("hide_tii_lr", "hide_align_lr"):
            above(f"method.{key}", getattr(self, key))
        if not 0 <= self.hide_prompt_momentum < 1:
            raise SmopeError(f"config key 'method.hide_prompt_momentum' must be in [0, 1), got {self.hide_prompt_momentum}")
        at_least("method.hide_contrastive_weight", self.hide_contrastive_weight, 0)


@dataclass
class NoRGaSettings(HiDePromptSettings):
    """``norga``: HiDe-Prompt with a non-linear residual gate on the prefix scores and covariance statistics."""

    hide_statistics: str = like(HiDePromptSettings, "hide_statistics", default="full")
    norga_gate: str = field(
        default="sigmoid",
        metadata={
            "help": "the non-linear residual gate g in s + alpha g(tau s) on the prefix-key scores: `sigmoid` (the released scripts'), `tanh`, "
            "`relu`, `gelu`, `softplus` or `elu`"
        },
    )

    def check(self) -> None:
        super().check()
        one_of("method.norga_gate", self.norga_gate, NORGA_GATES)


# The registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One learner: ``method.name`` (and aliases), where its class lives, and its settings."""

    name: str
    target: str  # "module:Class" under smope.learners, imported only when the learner is built
    settings: type[MethodSettings]
    aliases: tuple[str, ...] = ()

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(f"smope.learners.{module}"), cls)

    @property
    def reads(self) -> tuple[str, ...]:
        """The ``method.*`` keys the learner reads besides ``name``: its settings' fields."""
        return self.settings.keys()


METHODS = (
    MethodSpec("smope", "smope_learner:SMoPELearner", SMoPESettings),
    MethodSpec("dense-prompt", "smope_variants:DensePromptLearner", DensePromptSettings),
    MethodSpec("l2p", "prompt_pool:L2PLearner", L2PSettings),
    MethodSpec("dualprompt", "prompt_pool:DualPromptLearner", DualPromptSettings),
    MethodSpec("coda-prompt", "prompt_pool:CodaPromptLearner", CodaPromptSettings),
    MethodSpec("vq-prompt", "vq_prompt:VQPromptLearner", VQPromptSettings),
    MethodSpec("prototype", "frozen_backbone:PrototypeLearner", FrozenBackboneSettings, aliases=("simplecil",)),  # SimpleCIL's published name
    MethodSpec("head-only", "frozen_backbone:HeadOnlyLearner", FrozenBackboneSettings),
    MethodSpec("aligned-head", "frozen_backbone:AlignedHeadLearner", AlignedHeadSettings),
    MethodSpec("lora", "lora:LoRALearner", LoRASettings),
    MethodSpec("joint", "smope_variants:JointLearner", SMoPESettings),
    MethodSpec("ranpac", "ranpac:RanPACLearner", RanPACSettings),
    MethodSpec("aper", "aper:APERLearner", APERSettings),
    MethodSpec("slca", "slca:SLCALearner", SLCASettings),
    MethodSpec("hide-prompt", "hide_prompt:HiDePromptLearner", HiDePromptSettings),
    MethodSpec("norga", "hide_prompt:NoRGaLearner", NoRGaSettings),
)

# The learners whose model routes each input to its top-K prompt experts (smope.stability.is_gated):
# what per-image routes, routing stability and collapse warnings apply to.
GATED_METHODS = ("smope", "joint")

BY_NAME: dict[str, MethodSpec] = {name: spec for spec in METHODS for name in (spec.name, *spec.aliases)}


def method_names() -> list[str]:
    """Every accepted ``method.name``, aliases included, sorted."""
    return sorted(BY_NAME)


def spec_for(name: str) -> MethodSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise SmopeError(f"unknown method.name '{name}'; choose one of {', '.join(method_names())}") from None


def registered_name(settings: type[MethodSettings]) -> str:
    """The first ``method.name`` whose settings are ``settings``: the name a class built without one stands for."""
    for spec in METHODS:
        if spec.settings is settings:
            return spec.name
    raise SmopeError(f"{settings.__name__} is not a registered method's settings: give it name=, one of {', '.join(method_names())}")


def every_method_key() -> list[str]:
    """Every ``method.*`` key some learner reads, ``name`` first, then in the registry's order."""
    keys = {"name": None}
    for spec in METHODS:
        keys.update(dict.fromkeys(spec.reads))
    return list(keys)


def readers_of(key: str) -> list[str]:
    """The methods (by primary name) that read ``method.<key>``."""
    return [spec.name for spec in METHODS if key in spec.reads]


def field_default(settings: type[MethodSettings], key: str) -> Any:
    """The default of ``settings``' field ``key`` (a fresh list for list fields)."""
    declared = settings.__dataclass_fields__[key]
    return declared.default_factory() if declared.default is MISSING else declared.default


def defaults_of(key: str) -> list[Any]:
    """The defaults of ``method.<key>`` in the settings of every method that reads it, in the registry's order."""
    return [field_default(spec.settings, key) for spec in METHODS if key in spec.settings.__dataclass_fields__]


def unread_method_keys(name: str, keys: set[str] | list[str]) -> list[str]:
    """Those of ``keys`` that method ``name`` does not read, sorted."""
    reads = spec_for(name).reads
    return sorted(key for key in keys if key != "name" and key not in reads)
