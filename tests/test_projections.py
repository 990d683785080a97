"""The projections around the prompted attention against the original layer's own output.

With every prompt logit at -inf the softmax gives the experts no weight, so a prompted layer must
then reproduce the frozen layer it wraps exactly: q/k norms, the output norm, gated attention and
an attention mask included. The projections are taken from the backbone, never re-derived here.
"""

import copy

import pytest
import timm
import torch
from helpers import tiny_timm_vit
from torch import nn

import smope
from smope.layer import PromptedAttention


def silence(layer) -> None:
    """Route as usual but give every active expert a -inf logit (zero attention weight)."""

    def route(q):
        batch, heads = q.shape[:2]
        scores = q.new_full((batch, heads, layer.experts.num_experts), float("-inf"))
        selected = torch.arange(layer.top_k).expand(batch, heads, -1)
        return scores, selected, q.new_ones(batch, heads, 1)

    layer.route = route


def randomize_norms(module: nn.Module) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_()
                m.bias.normal_()


def attention_mask(kind: str | None, batch: int, tokens: int) -> torch.Tensor | None:
    """None, an additive float mask, or a boolean one (True = may attend); token 3 hidden from every query."""
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(batch, 1, tokens, tokens) > 0.3
        mask[..., 0] = True  # every query keeps one token
        mask[..., 3] = False
        return mask
    mask = torch.randn(batch, 1, tokens, tokens)
    mask[..., 3] = float("-inf")
    return mask


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"scale_norm": True}, {"gated": True}])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
def test_silenced_timm_layer_is_the_original_attention(variant, mask_kind):
    attention = timm.models.vision_transformer.Attention(dim=32, num_heads=4, qkv_bias=True, norm_layer=nn.LayerNorm, **variant)
    randomize_norms(attention)
    attention.eval()
    layer = PromptedAttention(attention, smope.SMoPEConfig(num_experts=4, top_k=2, layers=[0])).eval()
    silence(layer)
    x = torch.randn(3, 9, 32)
    mask = attention_mask(mask_kind, 3, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, attn_mask=mask), attention(x, attn_mask=mask))


def test_silenced_qk_norm_vit_is_the_original_model():
    original = tiny_timm_vit(qk_norm=True)
    randomize_norms(original)
    model = smope.attach(copy.deepcopy(original), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1, 2, 3]))
    for layer in smope.prompted_layers(model):
        silence(layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original.eval()(x))
        del smope.prompted_layers(model)[0].route  # back to the real routing
        assert not torch.allclose(model(x), original(x))  # live experts do change the output


def tiny_hf_vit(implementation: str):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_labels=6
    )
    config._attn_implementation = implementation
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("implementation, mask_kind", [("eager", "float"), ("sdpa", "float"), ("sdpa", "bool")])
def test_silenced_transformers_vit_is_the_original_model(implementation, mask_kind):
    original = tiny_hf_vit(implementation)
    model = smope.attach(copy.deepcopy(original), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1]))
    for layer in smope.prompted_layers(model):
        silence(layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, original(pixel_values=x).logits)

    layer = smope.prompted_layers(model)[0]
    hidden, mask = torch.randn(2, 17, 32), attention_mask(mask_kind, 2, 17)
    with torch.no_grad():
        expected, _ = layer.base_layer(hidden, attention_mask=mask)
        got, _ = layer(hidden, attention_mask=mask)
    torch.testing.assert_close(got, expected)
