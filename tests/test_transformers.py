"""transformers' ViT in the layout of the installed release: 5.x (q_proj ... o_proj) or 4.x
(attention.query ... + output.dense). CI runs this file under both (.ci/run)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import smope

transformers = pytest.importorskip("transformers")
MAJOR = int(transformers.__version__.split(".")[0])


def tiny_hf_vit(dropout: float = 0.0):
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=6,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return transformers.ViTForImageClassification(config).eval()


def without_prompts(layer, q, k, v, scores, selected, attn_mask=None):
    """The wrapped layer's attention with the prompt experts left out."""
    return F.scaled_dot_product_attention(q, k, v)


def test_transformers_layout_of_this_release_is_recognised():
    model = smope.attach(tiny_hf_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 2]))
    layers = smope.prompted_layers(model)
    assert len(layers) == 2
    assert all(layer.layout.name == ("transformers-5" if MAJOR >= 5 else "transformers-4") for layer in layers)
    assert (layers[0].num_heads, layers[0].head_dim) == (4, 8)
    counts = smope.count_parameters(model)
    assert counts["prompt"] == 2 * 4 * 5 * 8 * 2
    assert counts["trainable"] == counts["prompt"] + 32 * 6 + 6


def test_transformers_vit_with_prompts_off_matches_the_original(monkeypatch):
    original = tiny_hf_vit()
    model = smope.attach(copy.deepcopy(original), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1, 2])).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(pixel_values=x).logits
        with_prompts = model(pixel_values=x).logits
        for layer in smope.prompted_layers(model):
            monkeypatch.setattr(layer, "attend", without_prompts.__get__(layer))
        assert torch.allclose(model(pixel_values=x).logits, expected, atol=1e-5)
    assert not torch.allclose(with_prompts, expected, atol=1e-3)  # the prompts do change the output


def test_transformers_vit_trains_prompts_and_head_only():
    model = smope.attach(tiny_hf_vit(dropout=0.1), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logits = model(pixel_values=torch.randn(4, 3, 32, 32)).logits
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])) + smope.auxiliary_loss(model)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable and n.endswith("keys"))
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if "classifier" in n)
