"""The method's rules, checked against their definitions rather than against the code's own helpers.

Expected values are written out here from the method's description: adaptive noise, the
bookkeeping between tasks inside a real training run, old-class masking, the prototype loss
and classifier alignment.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, tiny_config, tiny_timm_vit

import smope
from smope import cli
from smope.learners import create_learner
from smope.learners.alignment import DiagonalStatistics, align_head
from smope.learners.base import masked_logits
from smope.learners.smope_learner import SMoPELearner



# Adaptive noise --------------------------------------------------------------------------------
def noisy_layer(**config):
    """One prompted layer with clear-cut scores: keys spread out, experts 0-1 often used, 4-5 never."""
    model = smope.attach(tiny_timm_vit(), smope.SMoPEConfig(num_experts=6, top_k=2, layers=[0], **config))
    layer = smope.prompted_layers(model)[0]
    with torch.no_grad():
        layer.experts.keys.normal_()
        layer.experts.counts.copy_(torch.tensor([9, 7, 1, 2, 0, 0]).expand(4, 6))
        layer.experts.frequent.copy_(torch.tensor([True, True, False, False, False, False]).expand(4, 6))
    return model, layer


def expected_selection(scores: torch.Tensor, penalised: torch.Tensor, coefficient: float, top_k: int = 2) -> list:
    """Top-K of s - c * (max s - min s) over the penalised experts, as sorted index lists per (sample, head)."""
    result = []
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            s = scores[b, h].tolist()
            spread = max(s) - min(s)
            g = [s[e] - (coefficient * spread if penalised[h, e] else 0.0) for e in range(len(s))]
            result.append(sorted(sorted(range(len(s)), key=lambda e: -g[e])[:top_k]))
    return result


def selection(layer) -> list:
    return [sorted(row) for row in layer.last_selected.flatten(0, 1).tolist()]


def plain_top_k(layer) -> list:
    return [sorted(row) for row in layer.last_scores.topk(2, dim=-1).indices.flatten(0, 1).tolist()]


def test_training_noise_penalises_flagged_experts_by_eps_times_the_score_range():
    model, layer = noisy_layer(noise_eps=0.4)
    model.train()
    model(torch.randn(8, 3, 32, 32))
    flagged = torch.tensor([True, True, False, False, False, False]).expand(4, 6)
    assert selection(layer) == expected_selection(layer.last_scores, flagged, 0.4)
    assert selection(layer) != plain_top_k(layer)  # the penalty changes some choices here

    model, layer = noisy_layer(noise_eps=1.0)  # a full range: a flagged expert can only tie the worst
    model.train()
    model(torch.randn(8, 3, 32, 32))
    assert not (layer.last_selected < 2).any()


def test_evaluation_noise_penalises_never_used_experts_by_two_score_ranges():
    model, layer = noisy_layer(noise_eps=0.4)
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    never_used = torch.tensor([False, False, False, False, True, True]).expand(4, 6)
    assert selection(layer) == expected_selection(layer.last_scores, never_used, 2.0)
    assert selection(layer) != plain_top_k(layer)

    model, layer = noisy_layer(eval_noise=0.0)  # no evaluation noise: plain top-K of the raw scores
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    assert selection(layer) == plain_top_k(layer)


def test_method_eval_noise_reaches_the_routing():
    for eval_noise, changed in ((0.0, False), (2.0, True)):
        model = create_learner(tiny_config("smope", f"method.eval_noise={eval_noise}"), 10).model.eval()
        layers = smope.prompted_layers(model)
        with torch.no_grad():
            for layer in layers:
                layer.experts.keys.normal_()
                layer.experts.counts[:, :3] = 1  # experts 3-5 never used
            model(torch.randn(8, 3, 16, 16))
        assert any(selection(layer) != plain_top_k(layer) for layer in layers) == changed, eval_noise


def test_usage_counts_the_top_k_of_the_raw_scores_not_the_noisy_selection():
    model, layer = noisy_layer()
    model.eval()
    before = layer.experts.counts.clone()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    smope.accumulate_usage(model)
    expected = before.clone()
    for b in range(8):
        for h in range(4):
            s = layer.last_scores[b, h].tolist()
            for e in sorted(range(6), key=lambda e: -s[e])[:2]:
                expected[h, e] += 1
    assert torch.equal(layer.experts.counts, expected)
    assert selection(layer) != plain_top_k(layer)  # the evaluation noise did change the active experts


# Bookkeeping inside a real training run ----------------------------------------------------------
def snapshot(learner) -> dict:
    layers = smope.prompted_layers(learner.model)
    take = lambda name: torch.stack([getattr(layer.experts, name).detach().clone() for layer in layers])  # noqa: E731
    head = learner.model.get_classifier()
    return {
        **{name: take(name) for name in ("counts", "frequent", "keys", "values", "old_keys", "old_values")},
        "head_weight": head.weight.detach().clone(),
        "head_bias": head.bias.detach().clone(),
    }


def record_run(out: Path, *overrides: str) -> list[dict]:
    """Run the tiny config through the CLI and snapshot the learner around each task's two hooks."""
    records: list[dict] = []
    train_task, after_task = SMoPELearner.train_task, SMoPELearner.after_task

    def recorded_train(self, ctx):
        records.append({"task": ctx.task, "classes": ctx.classes, "size": len(ctx.train_data), "start": snapshot(self)})
        train_task(self, ctx)
        records[-1]["trained"] = snapshot(self)

    def recorded_after(self, ctx):
        after_task(self, ctx)
        records[-1]["after"] = snapshot(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SMoPELearner, "train_task", recorded_train)
        patch.setattr(SMoPELearner, "after_task", recorded_after)
        cli.main(["run", TINY, f"output_dir={out}", "train.device=cpu", "train.epochs=2", "method.align_epochs=2", *overrides])
    return records


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> list[dict]:
    """Read-only: every test below only looks at these snapshots."""
    return record_run(tmp_path_factory.mktemp("recorded") / "run")


def frequent_rule(counts: torch.Tensor) -> torch.Tensor:
    """Flag an expert when its count is at least the mean of the non-zero counts of its (layer, head)."""
    flags = torch.zeros_like(counts, dtype=torch.bool)
    for index in np.ndindex(*counts.shape[:-1]):
        row = counts[index].tolist()
        used = [c for c in row if c > 0]
        if used:
            flags[index] = torch.tensor([c > 0 and c >= sum(used) / len(used) for c in row])
    return flags


def test_usage_pass_counts_top_k_per_training_image_and_counts_add_up_over_tasks(recorded):
    top_k = 2  # configs/tiny.yaml
    assert not recorded[0]["start"]["counts"].any()
    total = 0
    for record in recorded:
        total += record["size"] * top_k
        counts = record["after"]["counts"]
        assert (counts.sum(-1) == total).all(), record["task"]  # every (layer, head): K per image seen so far
        assert torch.equal(record["trained"]["counts"], record["start"]["counts"])  # training itself does not count
        assert (counts >= record["start"]["counts"]).all()  # merged, not replaced


def test_frequent_flags_and_snapshots_are_set_at_each_task_start(recorded):
    first = recorded[0]["trained"]
    assert not first["frequent"].any()  # nothing to protect during the first task
    for record in recorded[1:]:
        start, trained = record["start"], record["trained"]
        expected = start["frequent"] | frequent_rule(start["counts"])  # flags are never unset
        assert torch.equal(trained["frequent"], expected), record["task"]
        assert trained["frequent"].any()
        assert torch.equal(trained["old_keys"], start["keys"]) and torch.equal(trained["old_values"], start["values"])
        assert not torch.equal(trained["keys"], start["keys"])  # and the keys did train past the snapshot
    assert (recorded[2]["trained"]["frequent"] >= recorded[1]["trained"]["frequent"]).all()


def test_old_class_head_rows_do_not_move_while_a_later_task_trains(recorded):
    for record in recorded[1:]:
        old = record["classes"].start
        start, trained = record["start"], record["trained"]
        assert torch.equal(trained["head_weight"][:old], start["head_weight"][:old]), record["task"]
        assert torch.equal(trained["head_bias"][:old], start["head_bias"][:old])
        new = slice(record["classes"].start, record["classes"].stop)
        assert not torch.equal(trained["head_weight"][new], start["head_weight"][new])


def test_alignment_retrains_the_head_from_the_second_task_on(recorded):
    first = recorded[0]
    assert torch.equal(first["after"]["head_weight"], first["trained"]["head_weight"])  # nothing old to align yet
    for record in recorded[1:]:
        seen = record["classes"].stop
        assert not torch.equal(record["after"]["head_weight"][:seen], record["trained"]["head_weight"][:seen])


def test_without_alignment_the_step_after_a_task_leaves_the_head_alone(tmp_path):
    for record in record_run(tmp_path / "run", "method.align=false", "train.epochs=1"):
        assert torch.equal(record["after"]["head_weight"], record["trained"]["head_weight"]), record["task"]
        assert torch.equal(record["after"]["head_bias"], record["trained"]["head_bias"])


def test_masked_logits_hide_earlier_tasks_and_unseen_classes():
    logits = torch.arange(20.0).reshape(2, 10)
    masked = masked_logits(logits, range(3, 6))
    assert masked.shape == (2, 6)
    assert torch.isinf(masked[:, :3]).all() and (masked[:, :3] < 0).all()
    assert torch.equal(masked[:, 3:], logits[:, 3:6])
    assert torch.equal(masked_logits(logits, range(0, 4)), logits[:, :4])


# Prototype loss ----------------------------------------------------------------------------------
def prototype_reference(old: torch.Tensor, current: torch.Tensor, flagged: torch.Tensor, top_k: int) -> float:
    """Per head: for each flagged expert's old key p, sum over the top-K of p . old keys of the
    cross-entropy of logits p . current keys; averaged over the flagged experts, summed over heads."""
    total = 0.0
    for h in range(old.shape[0]):
        rows = [e for e in range(old.shape[1]) if flagged[h, e]]
        for e in rows:
            targets = (old[h] @ old[h, e]).topk(top_k).indices.tolist()
            logits = current[h] @ old[h, e]
            total += sum(float(torch.logsumexp(logits, 0) - logits[t]) for t in targets) / len(rows)
    return total


def flagged_model(proto_weight: float):
    torch.manual_seed(3)
    config = smope.SMoPEConfig(num_experts=5, top_k=2, layers=[0], router_weight=1e-2, proto_weight=proto_weight)
    model = smope.attach(tiny_timm_vit(), config).train()
    experts = smope.prompted_layers(model)[0].experts
    with torch.no_grad():
        experts.frequent[:, :2] = True
        experts.old_keys.copy_(experts.keys + 0.3 * torch.randn_like(experts.keys))
    return model, experts


def test_prototype_term_is_part_of_the_auxiliary_loss_and_trains_the_keys():
    x = torch.randn(3, 3, 32, 32)
    weight = 0.5
    without, _ = flagged_model(0.0)
    without(x)
    model, experts = flagged_model(weight)
    model(x)
    aux = smope.auxiliary_loss(model)
    expected = weight * prototype_reference(experts.old_keys.double(), experts.keys.detach().double(), experts.frequent, 2)
    assert expected > 0
    assert math.isclose(float((aux - smope.auxiliary_loss(without)).detach()), expected, rel_tol=1e-4)

    experts.keys.grad = None
    experts.prototype_loss(2).backward()
    grad = experts.keys.grad
    assert grad is not None and grad.abs().sum() > 0  # the current keys learn from it, the old ones are fixed


# Classifier alignment ----------------------------------------------------------------------------
def test_class_statistics_are_the_population_mean_and_variance():
    generator = np.random.default_rng(0)
    features = generator.normal(size=(30, 5)).astype(np.float32) * [1, 2, 3, 4, 5]
    labels = np.array([0, 2, 3] * 10)
    stats = DiagonalStatistics(4, 5)
    stats.update(torch.from_numpy(features), torch.from_numpy(labels))
    for label in (0, 2, 3):
        rows = features[labels == label]
        np.testing.assert_allclose(stats.mean[label].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var[label].numpy(), rows.var(0), rtol=1e-5, atol=1e-6)  # ddof=0
    assert not stats.mean[1].any()  # a class without features keeps no statistics


def test_samples_follow_each_class_gaussian():
    generator = np.random.default_rng(1)
    stats = DiagonalStatistics(3, 4)
    centres, scales = np.array([[0, 5, -5, 1], [3, 3, 3, 3], [-2, 0, 2, 4]]), np.array([0.5, 1.0, 2.0, 3.0])
    features = np.concatenate([c + scales * generator.normal(size=(500, 4)) for c in centres]).astype(np.float32)
    stats.update(torch.from_numpy(features), torch.arange(3).repeat_interleave(500))
    per_class = 4000
    samples, labels = stats.sample(range(1, 3), per_class, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [1] * per_class + [2] * per_class
    for label in (1, 2):
        drawn = samples[labels == label].double()
        mean, var = stats.mean[label].double(), stats.var[label].double()
        assert ((drawn.mean(0) - mean).abs() < 5 * (var / per_class).sqrt() + 1e-3).all()
        assert ((drawn.var(0) / var - 1).abs() < 0.1).all()


def test_alignment_restores_old_classes_that_a_biased_head_forgets():
    """Six overlapping Gaussian classes; the head learns 0-2 briefly, then 3-5 long with 0-2 masked, and
    takes old samples for new classes. Alignment on samples of every class's statistics corrects it
    (seeds 0-2: old-class accuracy 0.58-0.67 before, 0.95-0.97 after)."""
    torch.manual_seed(0)
    dim, per_class = 16, 200
    centres = torch.randn(6, dim)
    features = torch.cat([c + torch.randn(per_class, dim) for c in centres])
    labels = torch.arange(6).repeat_interleave(per_class)
    head = torch.nn.Linear(dim, 6)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for classes, steps in ((range(0, 3), 20), (range(3, 6), 300)):
        rows = (labels >= classes.start) & (labels < classes.stop)
        for _ in range(steps):
            loss = F.cross_entropy(masked_logits(head(features[rows]), classes), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    stats = DiagonalStatistics(6, dim)
    stats.update(features, labels)
    test = torch.cat([c + torch.randn(per_class, dim) for c in centres[:3]])

    def old_accuracy() -> float:
        with torch.no_grad():
            return float((head(test).argmax(-1) == torch.arange(3).repeat_interleave(per_class)).float().mean())

    before = old_accuracy()
    align_head(head, stats, range(0, 6), epochs=20, lr=0.01, samples_per_class=64, batch_size=64, seed=0)
    assert before < 0.75 and old_accuracy() > before + 0.2
