"""Experiment trackers: ``train.loggers: [tensorboard, wandb]``.

Users of other continual-learning toolkits expect their runs in TensorBoard or Weights &
Biases. Each seed becomes one TensorBoard log folder (``OUTPUT_DIR/tensorboard/seed_<s>``) or
one W&B run (offline unless ``WANDB_MODE`` says otherwise, files under ``OUTPUT_DIR/wandb``),
written through the libraries' own APIs: the training loss and learning rates per step, and per
task the accuracy on each task so far, their average and the routing numbers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import MissingExtraError, SmopeError
from .runconfig import RunConfig

LOGGERS = ("tensorboard", "wandb")


def check_loggers(names: list[str]) -> None:
    """Unknown names and missing packages fail before any training."""
    for name in names:
        if name not in LOGGERS:
            raise SmopeError(f"unknown logger '{name}' in train.loggers; choose from {', '.join(LOGGERS)}")
        if importlib.util.find_spec(name) is None:
            raise MissingExtraError(name, name, f"train.loggers=[{name}]")


class TensorBoardLogger:
    def __init__(self, out: Path, seed: int, config: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from .rundir import RunDir

        self.writer = SummaryWriter(log_dir=str(RunDir(out).tensorboard_dir(seed)))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, out: Path, seed: int, config: RunConfig) -> None:
        import wandb

        self.run = wandb.init(
            project="smope",
            dir=str(out),
            name=f"{Path(config.output_dir).name}-seed{seed}",
            group=Path(config.output_dir).name,
            config={**config.to_dict(), "seed": seed},
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        # Steps and tasks are separate axes: name the axis in the record instead of wandb's own step.
        axis = "train/step" if any(tag.startswith("train/") for tag in values) else "task"
        self.run.log({**values, axis: step})

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The loggers of one seed; does nothing when ``train.loggers`` is empty."""

    def __init__(self, names: list[str], config: RunConfig, out: Path, seed: int) -> None:
        check_loggers(names)
        kinds = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
        self.loggers = [kinds[name](out, seed, config) for name in names]
        self.step = 0

    def training_step(self, description: str, loss: float, learning_rates: list[float]) -> None:
        """One optimiser step of :meth:`smope.trainer.Trainer.optimize`."""
        self.step += 1
        values = {"train/loss": loss, **{f"train/lr_group{i}": lr for i, lr in enumerate(learning_rates)}}
        for logger in self.loggers:
            logger.log(values, self.step)

    def task_finished(self, task: int, accuracy: list[float], routing: dict | None) -> None:
        """Accuracy on each task so far (1-based names, as in the summaries), the average, and routing numbers."""
        values = {f"accuracy/task_{j + 1}": a for j, a in enumerate(accuracy)}
        values["accuracy/average"] = sum(accuracy) / len(accuracy)
        values.update(routing or {})
        for logger in self.loggers:
            logger.log(values, task + 1)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
