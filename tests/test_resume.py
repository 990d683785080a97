"""Resume: every registered method, interrupted after its first task, resumes to the uninterrupted run's
metrics without training that task again; an incomplete checkpoint is refused by name.

Damaged or missing checkpoints and broken chains are in test_reliability.py and test_experiment.py,
SIGTERM and the run's identity in test_run_folder.py, seed-parallel resume in test_distributed.py.
"""

import pytest
import torch
from helpers import checkpoints, interrupted_at, method_overrides, read_only, run, tiny_config
from safetensors.torch import load_file

from smope import SmopeError
from smope.learners import LEARNERS, create_learner
from smope.methods import method_names

pytestmark = pytest.mark.usefixtures("one_thread")

# One epoch on a few images: what is compared is the resumed run against the whole one, not accuracy.
QUICK = [
    "train.epochs=1", "data.train_per_class=30", "data.test_per_class=10", "method.align_epochs=1",
    "method.slca_align_epochs=1", "method.hide_tii_epochs=1", "method.hide_align_epochs=1",
]  # fmt: skip
# Every accepted method.name (a method registered later is covered as it is), and the settings that
# change what a checkpoint holds: the ridge head keeps its features, full covariances, RanPAC without
# first-task adaptation.
CASES = [
    *(pytest.param(method, [], id=method) for method in method_names()),
    pytest.param("smope", ["method.head=ridge"], id="smope-head=ridge"),
    pytest.param("smope", ["method.align_covariance=full"], id="smope-align_covariance=full"),
    pytest.param("ranpac", ["method.first_task_adapt=false"], id="ranpac-first_task_adapt=false"),
]


@pytest.mark.parametrize("method, settings", CASES)
def test_run_interrupted_after_the_first_task_resumes_to_the_uninterrupted_metrics(method, settings, tmp_path, monkeypatch):
    overrides = read_only(method, *method_overrides(method, *QUICK, *settings))
    whole = run(tmp_path / "whole", *overrides)
    learner_class, trained = LEARNERS[method], []
    with interrupted_at(monkeypatch, learner_class, 1, trained), pytest.raises(SystemExit) as stopped:  # Ctrl-C in task 2
        run(tmp_path / "resumed", *overrides)
    assert stopped.value.code == 130 and trained == [0, 1]
    assert checkpoints(tmp_path / "resumed") == ["task_000.safetensors"]
    trained.clear()
    with interrupted_at(monkeypatch, learner_class, None, trained):  # records the tasks trained, interrupts none
        resumed = run(tmp_path / "resumed", *overrides)
    assert trained == [1, 2]  # the first task came back from its checkpoint
    assert resumed == whole  # metrics.json: accuracy matrix, per-seed metrics, routing, everything
    last = [load_file(out / "seed_0" / "task_002.safetensors") for out in (tmp_path / "whole", tmp_path / "resumed")]
    assert last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])  # the same weights


@pytest.mark.parametrize("method", sorted(LEARNERS))
def test_a_checkpoint_missing_an_entry_is_refused_by_name(method):
    learner = create_learner(tiny_config(method), 10)
    state = learner.state_dict()
    dropped = sorted(state)[-1]
    del state[dropped]
    with pytest.raises(SmopeError, match=f"missing: {dropped}"):
        learner.load_state_dict(state)
    learner.load_state_dict(learner.state_dict())  # a complete one loads
