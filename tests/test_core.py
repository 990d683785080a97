"""The prompted attention against a plain reference written from docs/method.md#forward-pass."""

import math

import pytest
import timm
import torch
from helpers import tiny_timm_vit
from safetensors.torch import load_file

import smope
from smope.layer import PromptedAttention


def reference_context(q, k, v, keys, values, top_k, coef=None, dense=False):
    """Per-sample, per-head, per-expert loops, straight from docs/method.md#forward-pass (float64)."""
    q, k, v, keys, values = (t.double() for t in (q, k, v, keys, values))
    batch, heads, tokens, dim = q.shape
    num_experts = keys.shape[1]
    scale = dim**-0.5
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            q_bar = q[b, h].mean(0)
            s = [float(q_bar @ keys[h, e].detach()) for e in range(num_experts)]
            if dense:
                active = list(range(num_experts))
            else:
                spread = max(s) - min(s)
                g = [s[e] - (float(coef[h, e]) if coef is not None else 0.0) * spread for e in range(num_experts)]
                active = sorted(range(num_experts), key=lambda e: -g[e])[:top_k]
            for i in range(tokens):
                logits = [s[e] * scale for e in active] + [float(q[b, h, i] @ k[b, h, j]) * scale for j in range(tokens)]
                m = max(logits)
                weights = [math.exp(x - m) for x in logits]
                total = sum(weights)
                vecs = [values[h, e] for e in active] + [v[b, h, j] for j in range(tokens)]
                out[b, h, i] = sum(w / total * vec for w, vec in zip(weights, vecs))
    return out


def prompted(model) -> list[PromptedAttention]:
    return smope.prompted_layers(model)


def layer_context(layer, x):
    q, k, v = layer.project_qkv(x)
    scores, selected, _ = layer.route(q)
    return (q, k, v), layer.attend(q, k, v, scores, selected)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("training", [True, False])
def test_attention_matches_reference(mode, training):
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=7, top_k=3, layers=[0, 2]))
    layer = prompted(model)[0]
    with torch.no_grad():  # values spread out so that top-K choices are clear-cut
        layer.experts.keys.normal_()
        layer.experts.values.normal_()
        layer.experts.frequent[:, :3] = True  # noise flags on some experts
        layer.experts.counts[:, 2:] = 5  # experts 0 and 1 never used: evaluation penalty
    smope.set_mode(model, mode)
    model.train(training)
    for m in model.modules():  # no dropout in this comparison
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(3, 17, 32)
    (q, k, v), context = layer_context(layer, x)
    coef = layer.experts.penalty_coefficients(training, layer.noise_eps, layer.eval_noise)
    expected = reference_context(q, k, v, layer.experts.keys, layer.experts.values, 3, coef, dense=mode == "dense")
    assert torch.allclose(context.double(), expected, atol=1e-5)
    # and the whole layer = reference context through the frozen output projection
    assert torch.allclose(layer(x), layer.project_out(expected.float(), x), atol=1e-5)


def test_evaluation_rule_avoids_never_used_experts():
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=6, top_k=2, layers=[0])).eval()
    layer = prompted(model)[0]
    with torch.no_grad():
        layer.experts.counts[:, :2] = 0
        layer.experts.counts[:, 2:] = 1
    model(torch.randn(4, 3, 32, 32))
    assert (layer.last_selected >= 2).all()  # eval_noise = 2 spreads: never-used experts always lose
    with torch.no_grad():
        layer.experts.counts.zero_()  # no counts at all: plain top-K of the raw scores
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(layer.last_selected, layer.last_scores.topk(2, dim=-1).indices)


def test_gradients_reach_only_prompts_and_head():
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1]))
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean() + smope.auxiliary_loss(model)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(".experts." in n or ".head." in n for n in trainable)
    assert any(".experts.keys" in n for n in with_grad) and any(".experts.values" in n for n in with_grad)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_sample_output_does_not_depend_on_batch(mode):
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=8, top_k=3, layers=[0, 1, 2])).eval()
    smope.set_mode(model, mode)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(16)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_state_dict_round_trip_keeps_bookkeeping():
    config = smope.SMoPEConfig(num_experts=5, top_k=2, layers=[1, 3])
    model = smope.attach(tiny_timm_vit(), config).eval()
    with torch.no_grad():
        model(torch.randn(6, 3, 32, 32))
    smope.accumulate_usage(model)
    smope.begin_task(model)
    state = model.state_dict()
    for suffix in ("keys", "values", "counts", "frequent", "old_keys", "old_values"):
        assert any(k.endswith(f"experts.{suffix}") for k in state)
    clone = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[1, 3]))
    clone.load_state_dict(state)
    for (name, a), b in zip(state.items(), clone.state_dict().values()):
        assert torch.equal(a, b), name


def test_usage_counts_and_frequent_flags():
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=6, top_k=2, layers=[0])).eval()
    layer = prompted(model)[0]
    with torch.no_grad():
        model(torch.randn(5, 3, 32, 32))
    smope.accumulate_usage(model)
    counts = layer.experts.counts
    assert counts.sum(-1).tolist() == [5 * 2] * 4  # every sample adds K per head
    smope.begin_task(model)
    for h in range(4):
        used = counts[h][counts[h] > 0].double()
        expected = (counts[h] > 0) & (counts[h].double() >= used.mean())
        assert torch.equal(layer.experts.frequent[h], expected)
    assert torch.equal(layer.experts.old_keys, layer.experts.keys.detach())


def test_router_and_prototype_losses_match_reference():
    config = smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0], router_weight=1.0, proto_weight=0.0)
    model = smope.attach(tiny_timm_vit(), config).train()
    layer = prompted(model)[0]
    model(torch.randn(3, 3, 32, 32))
    scores, selected = layer.last_scores.double(), layer.last_selected
    expected = 0.0
    for b in range(3):
        for h in range(4):
            s = scores[b, h]
            spread = float(s.max() - s.min())
            logits = [float(s[e]) + (0.0 if e in selected[b, h].tolist() else config.noise_eps * spread) for e in range(5)]
            lse = math.log(sum(math.exp(x) for x in logits))
            expected += sum(lse - logits[r] for r in selected[b, h].tolist()) / 3
    assert math.isclose(float(layer.aux_loss.detach()), expected, rel_tol=1e-5)

    experts = layer.experts
    with torch.no_grad():
        experts.frequent[:, :2] = True
        experts.old_keys.normal_()
    old, cur = experts.old_keys.double(), experts.keys.detach().double()
    expected = 0.0
    for h in range(4):
        rows = [e for e in range(5) if experts.frequent[h, e]]
        for e in rows:
            targets = (old[h] @ old[h, e]).topk(2).indices.tolist()
            logits = cur[h] @ old[h, e]
            expected += sum(float(torch.logsumexp(logits, 0) - logits[t]) for t in targets) / len(rows)
    assert math.isclose(float(experts.prototype_loss(2).detach()), expected, rel_tol=1e-5)


def test_dense_mode_has_no_auxiliary_loss():
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0])).train()
    smope.set_mode(model, "dense")
    model(torch.randn(2, 3, 32, 32))
    assert smope.auxiliary_loss(model) is None
    with pytest.raises(ValueError, match="mode"):
        smope.set_mode(model, "fast")


@pytest.mark.parametrize(
    "classes, trainable",
    [(200, 384_200), (100, 307_300)],
)
def test_parameter_counts_vit_base(classes, trainable):
    model = smope.attach(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=classes))
    counts = smope.count_parameters(model)
    assert counts["prompt"] == 230_400
    assert counts["trainable"] == trainable
    assert counts["head"] == trainable - 230_400
    assert counts["frozen"] + counts["trainable"] == counts["total"]


def test_attach_to_dinov2_style_vit():
    backbone = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=3, embed_dim=48, num_heads=3, num_classes=5
    )
    model = smope.attach(backbone, smope.SMoPEConfig(num_experts=4, top_k=2, layers=[0, 2]))
    assert len(smope.prompted_layers(model)) == 2
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert smope.count_parameters(model)["prompt"] == 2 * 3 * 4 * 16 * 2


def test_attach_to_transformers_vit():
    from transformers import ViTConfig, ViTForImageClassification

    hf_config = ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8, num_labels=6
    )
    model = smope.attach(ViTForImageClassification(hf_config), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 1]))
    layers = smope.prompted_layers(model)
    assert len(layers) == 2
    counts = smope.count_parameters(model)
    assert counts["prompt"] == 2 * 4 * 5 * 8 * 2
    assert counts["trainable"] == counts["prompt"] + 32 * 6 + 6
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    logits = model(pixel_values=x).logits
    assert logits.shape == (2, 6)
    # the transformers layer computes the same attention as the reference
    layer = layers[0]
    hidden = torch.randn(2, 17, 32)
    (q, k, v), context = layer_context(layer, hidden)
    coef = layer.experts.penalty_coefficients(False, layer.noise_eps, layer.eval_noise)
    assert torch.allclose(context.double(), reference_context(q, k, v, layer.experts.keys, layer.experts.values, 2, coef), atol=1e-5)


def test_unsupported_model_lists_what_is_supported():
    with pytest.raises(smope.SmopeError, match="Supported: timm VisionTransformer"):
        smope.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_peft_style_save_and_load(tmp_path, capsys):
    config = smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0, 3], noise_eps=0.5)
    torch.manual_seed(1)  # the frozen backbone is not in the adapter: rebuild the same one below
    model = smope.attach(tiny_timm_vit(), config).eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
        model.head.weight.normal_()
    smope.accumulate_usage(model)
    smope.begin_task(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = model.adapter_state_dict()
    assert all(k.startswith("base_model.model.") for k in saved)
    assert {k.rsplit(".", 1)[1] for k in saved} == {"keys", "values", "counts", "frequent", "old_keys", "old_values", "weight", "bias"}

    torch.manual_seed(1)
    loaded = smope.SMoPEModel.from_pretrained(tiny_timm_vit(), tmp_path).eval()
    assert loaded.peft_config.noise_eps == 0.5 and loaded.peft_config.layers == [0, 3]
    for key, tensor in loaded.adapter_state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    loaded.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    trainable, total = loaded.get_nb_trainable_parameters()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_loading_a_damaged_adapter_names_the_problem(tmp_path):
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0]))
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(smope.SmopeError, match="damaged"):
        smope.SMoPEModel.from_pretrained(tiny_timm_vit(), tmp_path)


def test_loading_an_adapter_of_another_shape_names_the_tensors(tmp_path):
    smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0])).save_pretrained(tmp_path)
    other = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=6, top_k=2, layers=[0, 1]))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(smope.SmopeError, match=r"missing: base_model\.model\.blocks\.1\..*wrong shape: .*\(4, 5\) vs \(4, 6\)"):
        other.load_adapter_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_k": 30}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"noise_eps": 1.5}, "noise_eps"),
        ({"noise_eps": -0.1}, "noise_eps"),
        ({"num_experts": 0}, "num_experts"),
        ({"init": "xavier"}, "init"),
        ({"layers": []}, "layers"),
        ({"router_weight": -1.0}, "router_weight"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        smope.SMoPEConfig(**kwargs)


def test_block_index_beyond_model_is_rejected():
    with pytest.raises(ValueError, match=r"layers \[7\].*\[0, 3\]"):
        smope.attach(tiny_timm_vit(), smope.SMoPEConfig(layers=[0, 7]))
