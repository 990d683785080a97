"""Break the method on purpose, one deliberate mutation at a time, and see whether the tests notice.

Each mutation names a file, an exact piece of its text, the text to put instead, and the test
files (plus optional pytest arguments) that should catch it. The repository is copied once to a
temporary directory; every mutation is applied to that copy, its tests run there with
``-x -q`` (the copy's ``smope`` is imported, since the working directory comes first on
``sys.path``), and the file is put back. The checkout you run this from is never modified.

    OMP_NUM_THREADS=1 python tools/mutation_check.py            # all mutations
    OMP_NUM_THREADS=1 python tools/mutation_check.py noise      # those whose name contains "noise"

A mutation whose old text is no longer in the file is reported as ``stale`` (update the list);
one whose tests already fail without it as ``red`` (each test set is first run unmutated once).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    args: list[str] = field(default_factory=list)


METHOD = ["tests/test_method.py"]
CORE = ["tests/test_core.py"]
PROJECTIONS = ["tests/test_projections.py"]
METRICS = ["tests/test_metrics.py"]
RESUME = ["tests/test_resume.py"]
SLCA = ["tests/test_slca.py"]
LAYER, LEARNER, ALIGN, BASE = "smope/layer.py", "smope/learners/smope_learner.py", "smope/learners/alignment.py", "smope/learners/base.py"
HEADS = "smope/learners/heads.py"
VIT = "smope/vit.py"

MUTATIONS = [
    # Core: the prompted attention and its routing
    Mutation("core: prompt logits unscaled", LAYER, "F.pad((logits * self.scale).unsqueeze(2)", "F.pad(logits.unsqueeze(2)", CORE),
    Mutation("core: route on the first token, not the mean", LAYER, "q.float().mean(dim=2), self.experts.keys", "q.float()[:, :, 0], self.experts.keys", CORE),
    Mutation("core: router loss without its margin", LAYER, "(scores + self.noise_eps * spread * inactive)", "(scores)", CORE),
    Mutation("core: usage from the lowest scores", LAYER, "self.last_scores.topk(self.top_k, dim=-1).indices", "self.last_scores.topk(self.top_k, dim=-1, largest=False).indices", METHOD),
    Mutation("core: usage from the noisy selection", LAYER, "self.experts.add_usage(self.last_scores.topk(self.top_k, dim=-1).indices)", "self.experts.add_usage(self.last_selected)", METHOD),
    # Adaptive noise
    Mutation("noise: training coefficient zero", LAYER, "self.frequent.to(self.keys.dtype) * noise_eps", "self.frequent.to(self.keys.dtype) * 0.0", METHOD),
    Mutation("noise: counts in place of flags", LAYER, "self.frequent.to(self.keys.dtype) * noise_eps", "(self.counts > 0).to(self.keys.dtype) * noise_eps", METHOD),
    Mutation("noise: evaluation coefficient ignored", LAYER, "(self.counts == 0).to(self.keys.dtype) * eval_noise", "(self.counts == 0).to(self.keys.dtype) * 2.0", METHOD),
    Mutation("noise: method.eval_noise not passed on", "smope/settings.py", "for name in PROMPT_EXPERT_KEYS}", 'for name in PROMPT_EXPERT_KEYS if name != "eval_noise"}', METHOD),
    # Bookkeeping inside training
    Mutation("bookkeeping: usage pass skipped", LEARNER, "self.features_and_labels(ctx.train_data, usage_only)", "", METHOD),
    Mutation("bookkeeping: usage replaced, not merged", LEARNER, "total = before + distributed.all_reduce_sum(", "total = 0 * before + distributed.all_reduce_sum(", METHOD),
    Mutation("bookkeeping: begin_task skipped", LEARNER, "if ctx.task > 0:\n            begin_task(self.model)", "if False:\n            begin_task(self.model)", METHOD),
    Mutation("bookkeeping: flags unset at later tasks", LAYER, "self.frequent |= used & (self.counts >= mean_used)", "self.frequent.copy_(used & (self.counts >= mean_used))", METHOD),
    Mutation("bookkeeping: flags need more than the mean", LAYER, "used & (self.counts >= mean_used)", "used & (self.counts > mean_used)", METHOD),
    Mutation("bookkeeping: old keys not snapshotted", LAYER, "self.old_keys.copy_(self.keys)", "self.old_keys.copy_(self.old_keys)", METHOD),
    Mutation("bookkeeping: old values not snapshotted", LAYER, "self.old_values.copy_(self.values)", "self.old_values.copy_(self.old_values)", METHOD),
    # Old-class masking
    Mutation("masking: earlier classes not masked", BASE, "mask[:, : classes.start] = True", "mask[:, : classes.start] = False", METHOD),
    # Prototype loss
    Mutation("prototype: current keys detached", LAYER, "(old @ self.keys.transpose(-1, -2))", "(old @ self.keys.detach().transpose(-1, -2))", METHOD),
    Mutation("prototype: term dropped from the auxiliary loss", LAYER, "if self.proto_weight > 0:", "if self.proto_weight < 0:", METHOD),
    # Classifier alignment
    Mutation("alignment: never run", HEADS, "if ctx.task > 0 and method.align:", "if False:", METHOD),
    Mutation("alignment: run despite align=false", HEADS, "if ctx.task > 0 and method.align:", "if ctx.task > 0:", METHOD),
    Mutation("alignment: sample variance (ddof=1)", ALIGN, "rows.var(0, unbiased=False)", "rows.var(0)", METHOD),
    Mutation("alignment: samples scaled by the variance, not the std", ALIGN, "(self.var[labels] + VARIANCE_FLOOR).sqrt()", "(self.var[labels] + VARIANCE_FLOOR)", METHOD),
    Mutation("alignment: head never stepped", ALIGN, "trainer.optimize(groups, optimizer(groups, weight_decay), multipliers, epochs,", "trainer.optimize(groups, optimizer(groups, weight_decay), multipliers, 0,", METHOD),
    # Metrics
    Mutation("metrics: forgetting from A[j][j]", "smope/metrics.py", "max(matrix[t][j] for t in range(j, last))", "matrix[j][j]", METRICS),
    Mutation("metrics: forgetting includes the last row", "smope/metrics.py", "for t in range(j, last))", "for t in range(j, last + 1))", METRICS),
    # Checkpointing and resume
    Mutation("resume: prompt pools not checkpointed", BASE, "if n in trainable}", 'if n in trainable and not n.startswith("pool.")}', RESUME, ["-k", "uninterrupted and (l2p or dualprompt or coda)"]),
    Mutation("resume: LoRA matrices not checkpointed", BASE, "if n in trainable}", 'if n in trainable and "lora_" not in n}', RESUME, ["-k", "uninterrupted and lora"]),
    Mutation("resume: missing entries accepted", BASE, "        self.check_state(state)\n        self.model.load_state_dict", "        self.model.load_state_dict", RESUME, ["-k", "missing"]),
    Mutation("checkpoint: usage counts not saved", "smope/model.py", 'if ".experts." in f".{name}"', 'if ".experts.keys" in f".{name}" or ".experts.values" in f".{name}"', CORE),
    Mutation("checkpoint: class statistics not saved", LEARNER, "**self.stats.state_dict(), **self.output_head.state_dict()}", "**self.output_head.state_dict()}", RESUME, ["-k", "uninterrupted and smope"]),
    # The run loop's steps for each task
    Mutation("run loop: after-task step skipped", "smope/experiment.py", "            self.learner.after_task(ctx)\n", "", ["tests/test_experiment.py"], ["-k", "every_output"]),
    Mutation("run loop: task checkpoint not written", "smope/experiment.py", "        save_checkpoint(run.run_dir.checkpoint(run.seed, task), run.learner.state_dict(), meta)", "        pass", RESUME, ["-k", "uninterrupted and lora"]),
    Mutation("run loop: usage-pass hooks not called", "smope/experiment.py", "            self.hook(\"after_usage_pass\", ctx)\n", "", ["tests/test_experiment.py"], ["-k", "plugin_hooks"]),
    # Projections around the attention
    Mutation("projection: q/k norms skipped", VIT, "return module.q_norm(q), module.k_norm(k), v", "return q, k, v", PROJECTIONS),
    Mutation("projection: output norm skipped", VIT, "out = module.norm(context", "out = (context", PROJECTIONS),
    Mutation("projection: attention gate skipped", VIT, "out = out * gate(x).sigmoid()", "out = out", PROJECTIONS),
    Mutation("projection: attention mask ignored", LAYER, "bias = bias + F.pad(attn_mask, (num_prompts, 0))", "bias = bias", PROJECTIONS),
    Mutation("projection: boolean mask added as 0/1", LAYER, "if attn_mask.dtype == torch.bool:", "if False:", PROJECTIONS),
    Mutation("projection: transformers keys and values swapped", VIT, "(module.q_proj, module.k_proj, module.v_proj)", "(module.q_proj, module.v_proj, module.k_proj)", PROJECTIONS),
    # Method keys and the ridge head's checkpoints
    Mutation("config: unread method keys accepted", "smope/runconfig.py", "    if unread:\n        raise _unread_keys_error", "    if False:\n        raise _unread_keys_error", ["tests/test_runconfig.py"]),
    Mutation("config: a switched file's unread keys refused", "smope/runconfig.py", '(file_keys if section.get("name", DEFAULT_METHOD) == file_method else set())', "file_keys", ["tests/test_runconfig.py"]),
    Mutation("config: null for a formerly published key refused", "smope/runconfig.py", "        if value is None and key in NULL_MEANS_DEFAULT:\n            continue\n", "", ["tests/test_runconfig.py"]),
    Mutation("settings: method.lora_r not checked", "smope/methods.py", '        at_least("method.lora_r", self.lora_r, 1)\n', "", ["tests/test_reliability.py"], ["-k", "cannot_honour"]),
    Mutation("settings: a per-task pool smaller than the tasks accepted", "smope/methods.py", "        if self.PER_TASK and self.pool_size < tasks:", "        if False:", ["tests/test_baselines.py"], ["-k", "bad_pool_settings"]),
    Mutation("settings: a published default not checked at load", "smope/methods.py", "        if self.pool_top_k > self.pool_size:", "        if False:", ["tests/test_reliability.py"], ["-k", "cannot_honour"]),
    Mutation("settings: an inactive key kept in the run identity", "smope/methods.py", '({"rp_dim"} if self.head != "ridge" else set())', "set()", ["tests/test_run_folder.py"]),
    Mutation("ridge: method.head=ridge never solved after a task", HEADS, "        self.ridge.update(features, labels, ctx.seed)", "        pass", ["tests/test_heads.py"], ["-k", "ridge_head_is_solved"]),
    Mutation("ridge: restored features never added to G", "smope/learners/ridge.py", "        for earlier in self.pending:", "        for earlier in []:", ["tests/test_ridge_head.py"], ["-k", "ridge_checkpoints"]),
    # Class order (the rule is Python's random.shuffle seeded by the run's seed)
    Mutation("slca: logits not normalised in the alignment", "smope/learners/slca.py", "        if logit_norm > 0:", "        if False:", SLCA, ["-k", "releases_step"]),
    Mutation("slca: older class means not scaled", "smope/learners/slca.py", "return features + (scale[labels] - 1).unsqueeze(1) * stats.mean[labels]", "return features", SLCA, ["-k", "releases_step"]),
    Mutation("slca: a zero backbone rate still trains the backbone", "smope/learners/slca.py", "if config.method.slca_backbone_lr == 0:", "if False:", SLCA, ["-k", "zero_backbone"]),
    Mutation("aligned-head: alignment skipped", "smope/learners/frozen_backbone.py", "self.output_head.after_task(ctx, features, labels, self.stats)", "", ["tests/test_baselines.py"], ["-k", "aligned_head_is"]),
    Mutation("schedule: step rule ignores its milestones", "smope/schedule.py", "return 0.1 ** sum(epoch >= milestone for milestone in milestones)", "return 1.0", ["tests/test_protocol.py"], ["-k", "step_is"]),
    Mutation("class order: another seed", "smope/data/scenario.py", "random.Random(seed).shuffle(order)", "random.Random(seed + 1).shuffle(order)", ["tests/test_class_order.py"]),
]


def copy_repo(target: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "runs", "*.egg-info", ".pytest_cache")
    return Path(shutil.copytree(ROOT, target / "repo", ignore=ignore))


def tests_pass(repo: Path, tests: list[str]) -> bool:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True).returncode == 0


def run_mutation(repo: Path, mutation: Mutation, baseline: dict[tuple[str, ...], bool]) -> tuple[str, float]:
    """``caught``, ``survived``, ``stale`` (old text not found) or ``red`` (the tests fail unmutated), and the seconds taken."""
    path = repo / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return "stale", 0.0
    tests = (*mutation.tests, *mutation.args)
    started = time.monotonic()
    if tests not in baseline:  # a failure only means "caught" when the same tests pass unmutated
        baseline[tests] = tests_pass(repo, list(tests))
    if not baseline[tests]:
        return "red", time.monotonic() - started
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        return ("survived" if tests_pass(repo, list(tests)) else "caught"), time.monotonic() - started
    finally:
        path.write_text(original)


def main(argv: list[str]) -> int:
    selected = [m for m in MUTATIONS if not argv or any(word in m.name for word in argv)]
    counts = {"caught": 0, "survived": 0, "stale": 0, "red": 0}
    baseline: dict[tuple[str, ...], bool] = {}
    with tempfile.TemporaryDirectory(prefix="smope-mutation-") as tmp:
        repo = copy_repo(Path(tmp))
        width = max(len(m.name) for m in selected)
        print(f"{'mutation':<{width}}  result    seconds  tests")
        for mutation in selected:
            status, seconds = run_mutation(repo, mutation, baseline)
            counts[status] += 1
            print(f"{mutation.name:<{width}}  {status:<8}  {seconds:7.1f}  {' '.join(mutation.tests + mutation.args)}", flush=True)
    print(
        f"total: {counts['caught']} caught, {counts['survived']} survived, {counts['stale']} stale, "
        f"{counts['red']} with failing tests unmutated, of {len(selected)} mutations"
    )
    return 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
