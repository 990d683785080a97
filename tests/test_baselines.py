"""Baselines in the harness: every learner runs, learns, checkpoints; FLOPs are counted right."""

import json

import pytest
import timm
import torch

from helpers import TINY, checkpoints, run, run_method, tiny_config

from smope import cli
from smope.checkpoint import load_checkpoint
from smope.cost import count_flops, method_config, method_flops
from smope.learners import LEARNERS, create_learner
from smope.learners.prefix import PrefixAttention
from smope.learners.prompt_pool import CodaPromptPool


TWO_PASS = ("l2p", "dualprompt", "coda-prompt", "vq-prompt")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_learner_learns_and_its_checkpoints_reproduce_it(method, tmp_path):
    out = tmp_path / "run"
    metrics = run_method(out, method)
    assert metrics["method"] == method
    assert checkpoints(out) == [f"task_{t:03d}.safetensors" for t in range(3)]
    assert metrics["final_average_accuracy"] > 15.0  # chance is 10% over the 10 digits
    if method in ("smope", "dense-prompt", "joint", "l2p", "dualprompt", "coda-prompt", "prototype", "head-only", "lora"):
        assert ("routing" in metrics) == (method in ("smope", "dense-prompt", "joint"))  # only prompt experts route
    assert ("prompt_choice" in metrics) == (method in ("hide-prompt", "norga"))  # only task-identity methods choose a task
    # Each task's checkpoint alone, loaded into a fresh learner, gives back the same accuracies.
    cli.main(["eval", str(out)])
    assert json.loads((out / "eval.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]


def test_aligned_head_is_head_only_plus_the_alignment(tmp_path):
    def accuracy(method: str, *extra: str) -> list[list[float]]:
        out = tmp_path / "-".join((method, *extra))
        return run(out, "train.epochs=2", f"method.name={method}", *extra)["accuracy_matrix"]

    head_only, aligned = accuracy("head-only"), accuracy("aligned-head", "method.align_epochs=2")
    assert aligned[0] == head_only[0] and aligned[1:] != head_only[1:]  # the same first task; aligned from the second on
    assert accuracy("aligned-head", "method.align=false") == head_only  # without the alignment it is head-only exactly


def test_joint_trains_once_on_every_class(tmp_path):
    out = tmp_path / "run"
    cli.main(["run", TINY, f"output_dir={out}", "method.name=joint", "train.epochs=1", "method.warmup_epochs=0"])
    first, _ = load_checkpoint(out / "seed_0" / "task_000.safetensors")
    last, _ = load_checkpoint(out / "seed_0" / "task_002.safetensors")
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    assert int(first["class_stats.count"].count_nonzero()) == 10  # every class was seen at the first task


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_params_builds_every_method_with_random_weights(method, capsys):
    cli.main(["params", "--model", "vit_tiny_patch16_224", "--num-classes", "10", "--method", method, "--img-size", "32"])
    assert f"{method} on vit_tiny_patch16_224" in capsys.readouterr().out


def test_two_pass_methods_pay_for_the_query_pass():
    smope = method_flops(tiny_config("smope"), 10)
    flops = {method: method_flops(tiny_config(method), 10) for method in TWO_PASS}
    for method, counted in flops.items():
        assert 1.8 < counted.inference.total / smope.inference.total < 2.3, method
    assert flops["l2p"].training.total > 1.8 * smope.training.total
    assert flops["coda-prompt"].training.total > 1.8 * smope.training.total
    assert flops["dualprompt"].training.total < 1.2 * smope.training.total  # the task id picks the prompt: no query


def test_smope_flops_match_a_hand_count():
    """configs/tiny.yaml: 16 px images, 4 px patches, width 64, 2 blocks, 4 heads, 10 classes, top-2 of 6 experts."""
    config = tiny_config("smope")
    learner = create_learner(config, 10)
    patches, tokens, dim, heads, head_dim, hidden, blocks = 16, 17, 64, 4, 16, 4 * 64, 2
    experts, top_k, classes = 6, 2, 10
    patch_embed = patches * dim * (3 * 4 * 4)  # the 4x4 convolution over 3 channels, one output per patch
    linear = tokens * dim * 3 * dim + tokens * dim * dim + tokens * dim * hidden + tokens * hidden * dim  # qkv, proj, MLP
    attention = 2 * heads * tokens * (top_k + tokens) * head_dim  # QK^T and AV, with the K prompt columns
    routing = heads * head_dim * experts  # averaged query . every expert key
    head = dim * classes
    macs = patch_embed + blocks * (linear + attention + routing) + head
    counted = count_flops(learner.logits, torch.randn(1, 3, 16, 16))
    assert counted.total == 2 * macs
    assert counted.attention == 2 * blocks * attention


def test_flops_count_the_random_projection_and_the_second_backbone_pass():
    dense = method_flops(tiny_config("dense-prompt"), 10).inference.total
    prototype = method_flops(tiny_config("prototype"), 10).inference.total
    dim, rp_dim, classes = 64, 256, 10  # configs/tiny.yaml
    head = 2 * dim * classes  # a linear head, and equally the cosine scores against the class means
    ridge = 2 * (dim * rp_dim + rp_dim * classes)
    assert method_flops(tiny_config("ranpac"), 10).inference.total == dense - head + ridge
    assert method_flops(tiny_config("dense-prompt", "method.head=ridge"), 10).inference.total == dense - head + ridge
    assert method_flops(tiny_config("ranpac", "method.first_task_adapt=false"), 10).inference.total == prototype - head + ridge
    # The frozen pass and the adapted pass, then cosine scores on the feature of twice the width.
    assert method_flops(tiny_config("aper"), 10).inference.total == (prototype - head) + (dense - head) + 2 * head


def test_smope_needs_half_the_inference_flops_of_coda_prompt_on_vit_base():
    smope = method_flops(method_config("vit_base_patch16_224", "smope"), 100).inference
    coda = method_flops(method_config("vit_base_patch16_224", "coda-prompt"), 100).inference
    assert 0.48 < smope.total / coda.total < 0.52
    assert smope.without_attention / 1e9 == pytest.approx(33.72, abs=0.05)  # docs/method.md#paper-numbers anchor
    assert coda.without_attention / 1e9 == pytest.approx(67.44, abs=0.1)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.prompt_layers=[7]", "config key 'method.prompt_layers' must list distinct block indices in [0, 1]"),
        ("method.prompt_length=5", "config key 'method.prompt_length' must be even"),
        ("method.pool_size=2", "config key 'method.pool_size'=2 must be at least data.num_tasks=3"),
    ],
)
def test_bad_pool_settings_name_the_key(override, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", "method.name=coda-prompt", "method.prompt_layers=[0]", override])
    assert stopped.value.code == 2
    assert expected in capsys.readouterr().err


def test_prefix_attention_is_attention_over_prefix_and_tokens():
    attention = timm.models.vision_transformer.Attention(dim=32, num_heads=4, qkv_bias=True).eval()
    layer = PrefixAttention(attention)
    x, keys, values = torch.randn(2, 5, 32), torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    assert torch.equal(layer(x), attention(x))  # no prefix: the frozen layer, untouched
    layer.prefix = (keys, values)
    q, k, v = attention.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
    k, v = torch.cat([heads(keys), k], dim=2), torch.cat([heads(values), v], dim=2)
    weights = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(layer(x), expected)


def test_coda_prompt_trains_only_the_current_tasks_components():
    pool = CodaPromptPool(layers=[0], pool_size=6, length=4, num_tasks=3, ortho_weight=0.1, width=8, query_dim=16)
    before = pool.keys.detach().clone()
    pool.begin_task(1)
    assert torch.equal(pool.keys[:, :2], before[:, :2]) and not torch.equal(pool.keys[:, 2:4], before[:, 2:4])
    old, new = pool.keys[0, :2], pool.keys[0, 2:4]
    torch.testing.assert_close(new @ old.T, torch.zeros(2, 2), atol=1e-5, rtol=0)  # born orthogonal to the old
    pool.train()
    prefixes, loss = pool(torch.randn(5, 16), batch=5)
    (prefixes[0][0].sum() + prefixes[0][1].sum() + loss).backward()
    for weight in (pool.keys, pool.attention, pool.components):
        grad = weight.grad.flatten(2).norm(dim=-1)[0]
        assert grad[2:4].gt(0).all() and grad[:2].eq(0).all() and grad[4:].eq(0).all()
    pool.eval()
    assert pool.active(pool.keys).shape[1] == 4  # inference: tasks 0 and 1, never the unseen task 2
