"""Every learner resumes an interrupted run to the same numbers, and refuses an incomplete checkpoint."""

import json
from pathlib import Path

import pytest
from conftest import interrupted_at
from test_baselines import SHARED, TINY_SCALE, tiny_config

from smope import SmopeError, cli
from smope.learners import LEARNERS, create_learner

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
# SMoPE's own resume is in test_experiment.py; joint trains everything at the first task. vq-prompt, hide-prompt
# and norga also align (their statistics come back from every task's checkpoint).
RESUMED = ["coda-prompt", "dualprompt", "head-only", "hide-prompt", "l2p", "lora", "norga", "prototype", "vq-prompt"]
FAST = ["train.epochs=2"]


def run(out: Path, method: str) -> None:
    cli.main(["run", TINY, f"output_dir={out}", f"method.name={method}", *SHARED, *TINY_SCALE.get(method, []), *FAST])


def per_seed(out: Path) -> list:
    return json.loads((out / "metrics.json").read_text())["per_seed"]


@pytest.mark.parametrize("method", RESUMED)
def test_interrupted_run_resumes_to_the_same_metrics(method, tmp_path, monkeypatch):
    run(tmp_path / "whole", method)
    with interrupted_at(monkeypatch, LEARNERS[method], 2), pytest.raises(SystemExit):
        run(tmp_path / "resumed", method)
    assert sorted(p.name for p in (tmp_path / "resumed" / "seed_0").iterdir()) == ["task_000.safetensors", "task_001.safetensors"]
    run(tmp_path / "resumed", method)
    assert per_seed(tmp_path / "resumed") == per_seed(tmp_path / "whole")


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_a_checkpoint_missing_an_entry_is_refused_by_name(method):
    learner = create_learner(tiny_config(method), 10)
    state = learner.state_dict()
    dropped = sorted(state)[-1]
    del state[dropped]
    with pytest.raises(SmopeError, match=f"missing: {dropped}"):
        learner.load_state_dict(state)
    learner.load_state_dict(learner.state_dict())  # a complete one loads
