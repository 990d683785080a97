"""The SMoPE adapter configuration, saved and loaded in peft's ``adapter_config.json`` format.

peft only registers methods listed in its own ``PeftType`` enum (peft issue #2273), so a
third-party method cannot go through ``get_peft_model`` without patching peft. We subclass
:class:`peft.PeftConfig` instead: the file layout, ``save_pretrained`` and ``from_pretrained``
are peft's, and ``from_peft_type`` is overridden so that loading never looks the unknown
type up in peft's registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from .settings import PromptExpertSettings

SMOPE_PEFT_TYPE = "SMOPE"


@dataclass
class SMoPEConfig(PromptExpertSettings, PeftConfig):
    """Hyper-parameters of a sparse mixture of prompt experts (docs/method.md), as a peft config.

    The fields and their checks are :class:`~smope.settings.PromptExpertSettings`' (num_experts,
    top_k, layers, noise_eps, eval_noise, router_weight, proto_weight, init), shared with the run
    config's ``method`` section; this class adds peft's:

    Args:
        modules_to_save: backbone modules trained along with the prompts; ``None`` picks the
            classifier head automatically when the config is attached.
        backbone: what the adapter was trained on, written by ``smope export``: ``model`` (timm
            name), ``weights`` and ``source`` (as in a run's provenance.json), ``img_size``,
            ``num_classes`` and ``kwargs`` (timm.create_model's extra arguments);
            :meth:`~smope.SMoPEModel.from_pretrained` refuses a backbone that differs. ``None``: not recorded.
    """

    modules_to_save: list[str] | None = field(default=None, metadata={"help": "extra trainable modules"})
    backbone: dict | None = field(default=None, metadata={"help": "the backbone the adapter was trained on"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SMOPE_PEFT_TYPE
        self.layers = [int(i) for i in self.layers]
        self.check_settings()

    @classmethod
    def from_peft_type(cls, **kwargs) -> "SMoPEConfig":
        """Build from saved attributes without consulting peft's registry of built-in types."""
        kwargs.pop("peft_type", None)
        return cls(**kwargs)
