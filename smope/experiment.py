"""Running a continual-learning experiment: tasks, evaluation, checkpoints, resume.

The files a run writes and their layout belong to :class:`~smope.rundir.RunDir`. Each task
starts from an RNG seeded by (seed, task), so a run resumed from a checkpoint ends with the
same numbers as an uninterrupted one.

Under ``torchrun`` every process runs this same loop on its shard of the data (see
:mod:`smope.distributed`); only the main process writes the outputs and prints.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed
from . import metrics as cl_metrics
from .backbones import check_block_settings
from .checkpoint import Chain, chain_link, load_checkpoint, save_checkpoint
from .data import ClassIncrementalScenario
from .data.prepared import PreparedData, load_splits, prepare_data
from .errors import ConfigAdviceError, DiskFullError, SmopeError, disk_full
from .learners import Learner, TaskContext, create_learner
from .learners.ridge import narrow_projection
from .loggers import RunLoggers, check_loggers
from .provenance import record_seed
from .prompt_choice import PromptChoiceTracker, prompt_choice_metrics
from .routing import RoutingTracker, collapse_warnings, combine_routing
from .runconfig import RunConfig, acting_dict
from .rundir import RunDir, comparable, log_entry, run_identity
from .stability import is_gated, routing_stability
from .trainer import DeviceBatches, Trainer, bar_disabled, resolve_device, resolve_precision
from .vit import count_parameters


def task_seed(seed: int, task: int) -> int:
    return seed * 1000 + task


def evaluate(
    learner: Learner,
    trainer: Trainer,
    scenario: ClassIncrementalScenario,
    task: int,
    progress: bool | None,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> list[float]:
    """Accuracy (percent) on each task 0..task's test set, predicting among all seen classes.

    One pass (one loader) over the test images of every seen task; each image counts for the
    task that owns its label, since tasks own contiguous label ranges. In a data-parallel run
    each process counts on its shard and the counts are summed. ``on_batch(tasks)`` runs after
    each forward with the test task of every image (routing analytics read the layers then).
    """
    seen = scenario.seen_classes(task)
    task_of_label = torch.tensor([t for t in range(task + 1) for _ in scenario.task_classes(t)])
    counts = torch.zeros(task + 1, 2, dtype=torch.int64)  # correct, total
    batches = trainer.loader(scenario.test_dataset_upto(task), learner.config.train.eval_batch_size, shuffle=False)
    for images, labels in tqdm(batches, desc=f"evaluate after task {task + 1}", disable=bar_disabled(progress), leave=False):
        predictions = learner.logits(images)[:, : seen.stop].argmax(-1).cpu()
        tasks = task_of_label[labels]
        counts[:, 0].index_add_(0, tasks, (predictions == labels).long())
        counts[:, 1].index_add_(0, tasks, torch.ones_like(tasks))
        if on_batch is not None:
            on_batch(tasks)
    return [100.0 * correct / max(total, 1) for correct, total in distributed.all_reduce_sum(counts).tolist()]


def load_learner_state(learner: Learner, run_dir: RunDir, seed: int, task: int, first: int = 0) -> dict:
    """The learner's state after ``task``, checkpoints ``first``..task loaded in turn; returns the last one's metadata.

    A checkpoint holds the learner's whole trainable state but only the class statistics of
    its own task's classes (full covariances are large), so the earlier ones supply the rest.
    ``first > 0`` is for a learner that already holds the state after task ``first - 1``.
    """
    for earlier in range(first, task + 1):
        tensors, meta = load_checkpoint(run_dir.checkpoint(seed, earlier))
        learner.load_state_dict(tensors)
    return meta


def new_learner(config: RunConfig, seed: int, num_classes: int, trainer: Trainer) -> Learner:
    """The learner of ``seed`` before its first task; the RNG as the run seeded it, so random initialisations come back the same."""
    torch.manual_seed(task_seed(seed, 0))  # model initialisation (random heads, prompts, model.weights=none)
    return create_learner(config, num_classes, trainer)


def restore_learner(config: RunConfig, run_dir: RunDir, seed: int, task: int, num_classes: int, trainer: Trainer) -> tuple[Learner, dict]:
    """The learner of ``seed`` as its run left it after ``task``, and that checkpoint's metadata.

    The one way every reader of a trained run (``smope eval``, ``predict``, ``export``,
    ``report``, the benchmarks) gets its model back: built as the run built it, then its
    checkpoints 0..task loaded.
    """
    learner = new_learner(config, seed, num_classes, trainer)
    return learner, load_learner_state(learner, run_dir, seed, task)


class RunPlugin:
    """An object the task loop tells what it does, at named points (in the spirit of Avalanche's strategy plugins).

    The loop itself only trains, evaluates and hands over; what a run records around that
    (routing analytics, loggers, checkpoints) lives in plugins, so the loop reads as the
    protocol. For each task, in order: :meth:`before_task`, :meth:`training_step` after every
    optimiser step, :meth:`after_training`, the learner's usage pass between
    :meth:`before_usage_pass` and :meth:`after_usage_pass`, the learner's ``after_task``,
    :meth:`before_evaluation`, :meth:`after_eval_batch` per test batch, :meth:`after_evaluation`,
    :meth:`after_task`. Every hook does nothing unless a plugin overrides it.
    """

    def before_task(self, run: SeedRun, ctx: TaskContext) -> None:
        pass

    def training_step(self, run: SeedRun, description: str, loss: float, learning_rates: list[float]) -> None:
        pass

    def after_training(self, run: SeedRun, ctx: TaskContext) -> None:
        pass

    def before_usage_pass(self, run: SeedRun, ctx: TaskContext) -> None:
        pass

    def after_usage_pass(self, run: SeedRun, ctx: TaskContext) -> None:
        pass

    def before_evaluation(self, run: SeedRun, task: int) -> None:
        pass

    def after_eval_batch(self, run: SeedRun, test_tasks: torch.Tensor) -> None:
        pass

    def after_evaluation(self, run: SeedRun, task: int, accuracy: list[float]) -> None:
        pass

    def after_task(self, run: SeedRun, task: int, rows: list[list[float]], seconds: float) -> None:
        pass


class EvaluationAnalytics(RunPlugin):
    """A tracker that reads the model on the test forwards of each task (prompt choices; routing extends it)."""

    def __init__(self, tracker: PromptChoiceTracker | RoutingTracker) -> None:
        self.tracker = tracker

    def before_evaluation(self, run: SeedRun, task: int) -> None:
        self.tracker.begin_evaluation(task)

    def after_eval_batch(self, run: SeedRun, test_tasks: torch.Tensor) -> None:
        self.tracker.observe_test(test_tasks)

    def after_evaluation(self, run: SeedRun, task: int, accuracy: list[float]) -> None:
        self.tracker.end_evaluation()


class RoutingAnalytics(EvaluationAnalytics):
    """:class:`~smope.routing.RoutingTracker` on the loop: training steps, the usage pass and the test forwards of each task."""

    def __init__(self, tracker: RoutingTracker) -> None:
        super().__init__(tracker)
        self.watching = contextlib.ExitStack()

    def before_task(self, run: SeedRun, ctx: TaskContext) -> None:
        self.watching.enter_context(self.tracker.training_steps())

    def after_training(self, run: SeedRun, ctx: TaskContext) -> None:
        self.watching.close()

    def before_usage_pass(self, run: SeedRun, ctx: TaskContext) -> None:
        self.watching.enter_context(self.tracker.usage_pass())

    def after_usage_pass(self, run: SeedRun, ctx: TaskContext) -> None:
        self.watching.close()


class Logging(RunPlugin):
    """The seed's :class:`~smope.loggers.RunLoggers`: every training step, and each task's accuracy with its routing numbers."""

    def __init__(self, loggers: RunLoggers) -> None:
        self.loggers = loggers

    def training_step(self, run: SeedRun, description: str, loss: float, learning_rates: list[float]) -> None:
        self.loggers.training_step(description, loss, learning_rates)

    def after_evaluation(self, run: SeedRun, task: int, accuracy: list[float]) -> None:
        self.loggers.task_finished(task, accuracy, run.routing.latest_scalars())


class CheckpointWriter(RunPlugin):
    """After each task on the main process: the checkpoint (chained to the previous task's file), log line and message."""

    def after_task(self, run: SeedRun, task: int, rows: list[list[float]], seconds: float) -> None:
        if not distributed.is_main():  # every process holds the same state and rows
            return
        previous = run.run_dir.checkpoint(run.seed, task - 1) if task > 0 else None
        meta = {
            **chain_link(run.run_id, run.seed, task, previous),
            "config": comparable(acting_dict(run.config)),  # what run_id hashes, so a mismatch can say what differs
            "accuracy_matrix": rows,
            "num_tasks": run.scenario.num_tasks,
            "seconds": round(seconds, 2),
        }
        if run.routing.enabled:
            meta["routing"] = run.routing.checkpoint_meta()
        if run.choices.enabled:
            meta["prompt_choice"] = run.choices.checkpoint_meta()
        save_checkpoint(run.run_dir.checkpoint(run.seed, task), run.learner.state_dict(), meta)
        entry = log_entry(meta)
        run.run_dir.append_log(entry)
        where = f"seed {run.seed} task {task + 1}/{run.scenario.num_tasks}"
        tqdm.write(f"{where}: average accuracy {entry['average_accuracy']:.2f}% ({seconds:.0f}s)")
        if run.routing.enabled and is_gated(run.learner.model):
            for line in collapse_warnings(run.routing.records, run.routing.names, run.routing.layers[0].top_k):
                tqdm.write(f"{where}: {line}")


class SeedRun:
    """One seed of an experiment: learner, scenario and the per-task loop with resume."""

    def __init__(self, config: RunConfig, seed: int, out: Path | RunDir, data: PreparedData | None = None) -> None:
        self.config, self.seed = config, seed
        self.run_dir = out if isinstance(out, RunDir) else RunDir(out)
        self.data = data
        self.trainer: Trainer | None = None
        self.learner: Learner | None = None
        self.scenario: ClassIncrementalScenario | None = None
        self.run_id: str | None = None
        self.routing: RoutingTracker | None = None
        self.choices: PromptChoiceTracker | None = None
        self.plugins: list[RunPlugin] = []

    def build(self, restore: int | None = None) -> dict | None:
        """Trainer, learner and scenario; the first seed also loads and transforms the data for the backbone.

        With ``restore``, the learner is the one the run left after that task
        (:func:`restore_learner`) and the checkpoint's metadata is returned.
        """
        raw = None if self.data is not None else load_splits(self.config)
        num_classes = self.data.num_classes if raw is None else len(raw[0].classes)
        self.trainer = Trainer(self.config, on_step=functools.partial(self.hook, "training_step"))
        meta = None
        if restore is None:
            self.learner = new_learner(self.config, self.seed, num_classes, self.trainer)
        else:
            self.learner, meta = restore_learner(self.config, self.run_dir, self.seed, restore, num_classes, self.trainer)
        ridge = getattr(self.learner, "ridge", None)
        if ridge is not None and distributed.is_main() and self.seed == self.config.seeds[0]:
            warning = narrow_projection(*ridge.projection.shape)
            if warning:
                tqdm.write(warning)
        if self.config.train.compile:
            self.learner.compile()
        if raw is not None:
            self.data = prepare_data(self.config, self.learner.model, *raw, num_workers=self.trainer.num_workers)
        self.trainer.pixel_norm = self.data.pixel_norm
        data = self.config.data
        self.scenario = ClassIncrementalScenario(self.data.train, self.data.test, data.num_tasks, self.seed, data.first_task_classes)
        self.routing = RoutingTracker(self.learner.model)
        self.choices = PromptChoiceTracker(self.learner.model)
        return meta

    def test_sizes(self) -> list[int]:
        return [len(self.scenario.test_dataset(t)) for t in range(self.scenario.num_tasks)]

    def restore(self, task: int, first: int = 0) -> dict:
        return load_learner_state(self.learner, self.run_dir, self.seed, task, first)

    def stability(self) -> dict:
        """Routing stability of the current model on every task's test images (:mod:`smope.stability`)."""
        tests = [self.scenario.test_dataset(t) for t in range(self.scenario.num_tasks)]
        return routing_stability(self.learner.eval_features, self.learner.model, tests, self.loader)

    def loader(self, data: Dataset) -> DeviceBatches:
        """Unshuffled batches of ``data`` at ``train.eval_batch_size`` on the run's device: test images for the analyses."""
        return self.trainer.loader(data, self.config.train.eval_batch_size, shuffle=False)

    def chain(self) -> Chain:
        return self.run_dir.chain(self.seed)

    def run(self) -> dict:
        chain = self.chain()
        # A resumed chain keeps the identity of its first task, even if defaults added since change the hash.
        self.run_id = chain.metas[0].get("run") if chain.metas else None
        self.run_id = self.run_id or run_identity(self.config)
        if distributed.is_main():
            if chain.problem:
                tqdm.write(f"seed {self.seed}: {chain.problem}; recomputing from task {chain.length + 1}")
            self.run_dir.rewrite_log(self.seed, chain.metas)
        self.build()
        if distributed.is_main():
            with self.run_dir.locked():  # seed-parallel processes share provenance.json
                record_seed(self.run_dir.path, self.config, self.seed, self.scenario, self.data.split_file, self.data.source)
        loggers = RunLoggers(self.config.train.loggers if distributed.is_main() else [], self.config, self.run_dir.path, self.seed)
        self.plugins = [RoutingAnalytics(self.routing), EvaluationAnalytics(self.choices), Logging(loggers), CheckpointWriter()]
        try:
            return self.run_tasks(chain)
        finally:
            loggers.close()

    def hook(self, name: str, *args) -> None:
        """Call the hook ``name`` of every plugin, in the list's order."""
        for plugin in self.plugins:
            getattr(plugin, name)(self, *args)

    def run_tasks(self, chain: Chain) -> dict:
        progress = self.config.train.progress
        rows: list[list[float]] = []
        if chain.length:
            last = chain.length - 1
            meta = self.restore(last)
            rows = meta["accuracy_matrix"]
            self.routing.restore((meta.get("routing") or {}).get("records"), len(rows))
            self.choices.restore((meta.get("prompt_choice") or {}).get("records"), len(rows))
            if distributed.is_main():
                tqdm.write(f"seed {self.seed}: resuming after task {last + 1} from {self.run_dir.checkpoint(self.seed, last)}")
        for task in range(len(rows), self.scenario.num_tasks):
            started = time.time()
            torch.manual_seed(task_seed(self.seed, task))
            ctx = TaskContext(
                task=task,
                classes=self.scenario.task_classes(task),
                seen=self.scenario.seen_classes(task),
                task_ranges=tuple(self.scenario.task_classes(t) for t in range(task + 1)),
                train_data=self.learner.training_data(self.scenario, task),
                seed=task_seed(self.seed, task),
            )
            self.hook("before_task", ctx)
            self.learner.train_task(ctx)
            self.hook("after_training", ctx)
            self.hook("before_usage_pass", ctx)
            self.learner.usage_pass(ctx)
            self.hook("after_usage_pass", ctx)
            self.learner.after_task(ctx)
            self.hook("before_evaluation", task)
            rows.append(evaluate(self.learner, self.trainer, self.scenario, task, progress, lambda tasks: self.hook("after_eval_batch", tasks)))
            self.hook("after_evaluation", task, rows[-1])
            self.hook("after_task", task, rows, time.time() - started)
        if self.routing.enabled and is_gated(self.learner.model):
            self.routing.stability = self.stability()
        return {"seed": self.seed, **cl_metrics.summarize(rows, self.test_sizes())}


def metrics_result(
    config: RunConfig, per_seed: list[dict], learner: Learner, routing: dict | None = None, prompt_choice: dict | None = None
) -> dict:
    """metrics.json's content."""
    counts = count_parameters(learner.model)
    result = {
        "method": config.method.name,
        "dataset": config.data.name,
        "model": config.model.name,
        "weights": config.model.weights,
        "model_kwargs": config.model.kwargs,
        "num_tasks": len(per_seed[0]["accuracy_matrix"]),
        "seeds": [run["seed"] for run in per_seed],
        "num_classes": learner.num_classes,
        "trainable_parameters": counts["trainable"],
        "parameters": counts,
        **cl_metrics.aggregate(per_seed),
        "per_seed": per_seed,
    }
    if routing is not None:
        result["routing"] = routing
    if prompt_choice is not None:
        result["prompt_choice"] = prompt_choice
    return result


class SeedOutcome(NamedTuple):
    """What a finished seed adds to metrics.json; plain data, so seed-parallel processes can send it to rank 0."""

    seed: int
    result: dict
    routing: dict | None  # RoutingTracker.summary
    layout: dict | None  # RoutingTracker.describe, None without prompt experts
    choices: list | None  # PromptChoiceTracker.records, None for methods without a prompt choice
    stability: dict | None  # routing stability after the final task, None without a gate


def run_seeds(config: RunConfig, seeds: list[int], run_dir: RunDir) -> tuple[list[SeedOutcome], Learner]:
    """Run (or resume) ``seeds`` one after the other in this process; the data is prepared once."""
    outcomes, data, learner = [], None, None
    for seed in seeds:
        seed_run = SeedRun(config, seed, run_dir, data)
        result = seed_run.run()
        data, learner, tracker = seed_run.data, seed_run.learner, seed_run.routing
        choices = seed_run.choices.records if seed_run.choices.enabled else None
        stability = {"seed": seed, **tracker.stability} if tracker.stability is not None else None
        outcomes.append(SeedOutcome(seed, result, tracker.summary(seed), tracker.describe() if tracker.enabled else None, choices, stability))
    return outcomes, learner


def with_resolved_precision(config: RunConfig) -> RunConfig:
    """``config`` with ``train.precision: auto`` replaced by what it means on this run's device.

    config.yaml and the run's identity then name the precision the numbers come from, so a run
    resumed where ``auto`` means another precision is refused like any other change.
    """
    precision = resolve_precision(config.train.precision, resolve_device(config.train.device))
    return replace(config, train=replace(config.train, precision=precision))


def run_experiment(config: RunConfig) -> dict:
    """Run (or resume) every seed of ``config`` and write the outputs; returns metrics.json's content.

    Under torchrun, ``train.parallel: data`` splits every batch over the processes; ``seeds``
    gives each process whole seeds (:func:`~smope.distributed.seed_share`) and rank 0 writes
    metrics.json once all of them have finished. The main process holds the folder's writer
    lock throughout (:meth:`RunDir.exclusive`). A full disk is a
    :class:`~smope.errors.DiskFullError`: the tasks finished before it stay on disk.
    """
    run_dir = RunDir(config.output_dir)
    config = with_resolved_precision(config)
    by_seed = config.train.parallel == "seeds" and distributed.is_distributed()
    own_seeds = distributed.seed_share(config.seeds) if by_seed else config.seeds
    if not by_seed:
        distributed.local_batch_size(config.train.batch_size, exact=True)  # an uneven split fails before any work
    check_loggers(config.train.loggers)
    check_block_settings(config)
    with run_dir.exclusive() if distributed.is_main() else contextlib.nullcontext():
        try:
            return _run_seeds(config, run_dir, by_seed, own_seeds)
        except OSError as exc:
            if not disk_full(exc):
                raise
            raise DiskFullError(exc, run_dir.path, "run the same command to resume (finished tasks are kept)") from exc


def _run_seeds(config: RunConfig, run_dir: RunDir, by_seed: bool, own_seeds: list[int]) -> dict:
    """:func:`run_experiment`'s work: bind the folder, run this process's seeds, write metrics.json."""
    if distributed.is_main():
        run_dir.bind(config)
    distributed.barrier()  # the others start once config.yaml is checked and written
    if not distributed.is_main():
        config = replace(config, train=replace(config.train, progress=False))  # one set of progress bars
    try:
        with distributed.alone() if by_seed else contextlib.nullcontext():
            outcomes, learner = run_seeds(config, own_seeds, run_dir)
    except ConfigAdviceError as exc:
        raise ConfigAdviceError(f"{exc}. {run_dir.change_advice()}") from exc
    if by_seed:
        finished = {o.seed: o for share in distributed.gather_objects(outcomes) for o in share}
        outcomes = [finished[seed] for seed in config.seeds]
    layouts = [o.layout for o in outcomes if o.layout is not None]
    stability = [o.stability for o in outcomes if o.stability is not None]
    routing = combine_routing(layouts[0], [o.routing for o in outcomes if o.routing is not None], stability) if layouts else None
    choices = prompt_choice_metrics([(o.seed, o.choices) for o in outcomes])
    result = metrics_result(config, [o.result for o in outcomes], learner, routing, choices)
    if distributed.is_main():  # only the main process of a data-parallel run writes the files
        run_dir.write_metrics(result)
    return result


def evaluate_run(path: Path) -> dict:
    """Re-evaluate every task checkpoint of a finished or partial run; writes eval.json."""
    run_dir = RunDir(path)
    config = run_dir.config()
    finished = all(len(run_dir.finished_tasks(seed)) == config.data.num_tasks for seed in config.seeds)
    run_dir.refuse_unfinished(finished, "its last task")
    per_seed, data = [], None
    for seed in config.seeds:
        seed_run = SeedRun(config, seed, run_dir, data)
        chain = run_dir.usable_chain(seed, "evaluate")
        if not chain.length:
            continue
        seed_run.build()
        data = seed_run.data
        rows = []
        for task in range(chain.length):  # in order, so each task adds only its own checkpoint
            seed_run.restore(task, first=task)
            rows.append(evaluate(seed_run.learner, seed_run.trainer, seed_run.scenario, task, config.train.progress))
        per_seed.append({"seed": seed, **cl_metrics.summarize(rows, seed_run.test_sizes())})
    if not per_seed:
        raise SmopeError(f"{path} has no task checkpoints yet: nothing to evaluate")
    # A partial run may have seeds at different tasks: aggregate those that got furthest.
    furthest = max(len(run["accuracy_matrix"]) for run in per_seed)
    result = {**cl_metrics.aggregate([r for r in per_seed if len(r["accuracy_matrix"]) == furthest]), "per_seed": per_seed}
    run_dir.write_eval(result)
    return result
