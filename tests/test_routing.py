"""Routing analytics against hand counts on a tiny model, and end to end in a tiny run."""

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import tiny_timm_vit

import smope
from smope.routing import RoutingTracker, normalised_entropy, set_codes, task_overlap

EXPERTS, TOP_K, FORCED = 6, 2, (1, 3)


def force_experts(layer: smope.PromptedAttention, experts: tuple[int, ...]) -> None:
    """Make ``layer`` score ``experts`` highest for every input, whatever the input."""
    real_route = layer.route

    def route(q):
        scores, _, spread = real_route(q)
        fixed = torch.zeros_like(scores)
        fixed[..., list(experts)] = 10.0
        return fixed, fixed.topk(layer.top_k, dim=-1).indices, spread

    layer.route = route


@pytest.fixture
def model():
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=EXPERTS, top_k=TOP_K, layers=[0, 1]))
    force_experts(smope.prompted_layers(model)[0], FORCED)
    return model.eval()


def usage_pass(model, tracker, batches):
    """What the learner does after a task: forwards in eval mode that add to the usage counts."""
    scores = []
    with tracker.usage_pass(), torch.no_grad():
        for images in batches:
            model(images)
            smope.accumulate_usage(model)
            scores.append(smope.prompted_layers(model)[1].last_scores)
    return torch.cat(scores)


def test_usage_sets_and_entropy_match_a_hand_count(model):
    tracker = RoutingTracker(model)
    batches = [torch.randn(5, 3, 32, 32) for _ in range(3)]
    free_scores = usage_pass(model, tracker, batches)
    record = tracker.records[0]
    usage = np.array(record["usage"])  # (layers, heads, experts)

    forced = np.zeros((4, EXPERTS), dtype=int)
    forced[:, list(FORCED)] = 15
    assert (usage[0] == forced).all()
    assert record["distinct_sets"][0] == [1, 1, 1, 1]

    for head in range(4):  # the free layer, counted image by image
        chosen = [tuple(sorted(row.tolist())) for row in free_scores[:, head].topk(TOP_K, dim=-1).indices]
        assert record["distinct_sets"][1][head] == len(set(chosen))
        counts = Counter(e for experts in chosen for e in experts)
        assert usage[1, head].tolist() == [counts[e] for e in range(EXPERTS)]

    entropy = normalised_entropy(usage, TOP_K)
    assert (entropy[0] == 0).all()
    assert ((entropy[1] >= 0) & (entropy[1] <= 1)).all()


def test_a_usage_pass_is_the_difference_of_cumulative_counts(model):
    tracker = RoutingTracker(model)
    usage_pass(model, tracker, [torch.randn(4, 3, 32, 32)])
    usage_pass(model, tracker, [torch.randn(6, 3, 32, 32)])
    assert [np.array(r["usage"])[0, 0, FORCED[0]] for r in tracker.records] == [4, 6]
    assert (smope.expert_usage(model)[0, 0, FORCED[0]] == 10).all()


def test_training_steps_count_the_attended_experts(model):
    tracker = RoutingTracker(model)
    with tracker.training_steps():
        model.train()
        for batch in (3, 5):
            model(torch.randn(batch, 3, 32, 32))
    model.eval()
    usage_pass(model, tracker, [torch.randn(2, 3, 32, 32)])
    steps = np.array(tracker.records[0]["step_usage"])
    assert (steps[0][:, list(FORCED)] == 8).all() and steps[0].sum() == 8 * 4 * TOP_K
    assert (steps[1].sum(-1) == 8 * TOP_K).all()
    assert np.array(tracker.records[0]["usage"])[0, 0, FORCED[0]] == 2  # the usage pass alone, not the steps


def test_test_images_on_the_task_experts(model):
    tracker = RoutingTracker(model)
    usage_pass(model, tracker, [torch.randn(4, 3, 32, 32)])
    tracker.begin_evaluation(0)
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    tracker.observe_test(torch.zeros(3, dtype=torch.long))  # three images of test task 0
    tracker.end_evaluation()
    used = np.array(tracker.records[0]["usage"]) > 0
    layers = smope.prompted_layers(model)
    selected = [layer.last_selected for layer in layers]
    inside = sum(int(used[i][np.arange(4)[None, :, None], s.numpy()].sum()) for i, s in enumerate(selected))
    expected = 100.0 * inside / sum(s.numel() for s in selected)
    assert tracker.records[0]["test_in_task_experts"] == [pytest.approx(expected)]
    assert expected >= 50.0  # the forced layer's selections are all on the task's experts


def test_entropy_and_overlap_extremes():
    uniform = np.full((2, 3, EXPERTS), 7)
    assert np.allclose(normalised_entropy(uniform, TOP_K), 1.0)
    assert np.isnan(normalised_entropy(np.zeros((1, EXPERTS)), TOP_K)).all()
    a = np.zeros((1, 1, EXPERTS))
    b = np.zeros((1, 1, EXPERTS))
    a[..., :2], b[..., 2:4] = 5, 5
    overlap = task_overlap(np.stack([a, b, a]))  # (layers, tasks, tasks)
    assert overlap[0].tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_set_codes_ignore_order_and_tell_sets_apart():
    selected = torch.tensor([[[0, 3]], [[3, 0]], [[0, 2]], [[70, 1]]])  # (B=4, H=1, K=2), 80 experts
    codes = set_codes(selected, 80)
    assert codes.shape == (4, 1, 2)
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    assert codes[3, 0].tolist() == [2, 1 << (70 - 62)]


def test_models_without_prompt_experts_have_no_routing():
    tracker = RoutingTracker(tiny_timm_vit())
    with tracker.usage_pass():
        pass
    assert not tracker.enabled and tracker.summary(0) is None
