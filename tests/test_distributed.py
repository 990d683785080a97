"""Data-parallel runs: sharding arithmetic in one process, and real 2-process gloo runs under torchrun.

The multi-process tests are marked ``distributed`` (deselected by default); run them with
``python -m pytest -m distributed -p no:cacheprovider tests/test_distributed.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, read_metrics

from smope import distributed
from smope.errors import SmopeError

# Fewer epochs than the tiny config: the runs only need to learn something, fast.
OVERRIDES = ["train.epochs=3", "train.device=cpu"]
RUN_TIMEOUT = 150  # seconds; a hang (e.g. a surviving rank never stopped) fails the test instead of blocking the suite


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


def shard_batches(size: int, batch: int, world: int, seed: int, monkeypatch) -> list[list[list[int]]]:
    """Per rank, the index batches of two shuffled epochs, as each process of ``world`` would draw them."""
    per_rank = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        sampler = distributed.ShardSampler(size, shuffle=True, seed=seed)
        local = distributed.local_batch_size(batch, exact=True)
        epochs = [list(sampler) for _ in range(2)]
        per_rank.append([order[i : i + local] for order in epochs for i in range(0, len(order), local)])
    return per_rank


def test_shards_together_form_the_single_process_batches(monkeypatch):
    (single,) = shard_batches(100, 8, 1, seed=3, monkeypatch=monkeypatch)
    ranks = shard_batches(100, 8, 2, seed=3, monkeypatch=monkeypatch)
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # every process takes the same number of steps
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in single]


def test_unshuffled_shards_visit_every_sample_once(monkeypatch):
    seen = []
    for rank in range(3):
        as_rank(monkeypatch, rank, 3)
        seen += list(distributed.ShardSampler(10, shuffle=False))
    assert sorted(seen) == list(range(10))


def test_global_batch_must_split_evenly(monkeypatch):
    as_rank(monkeypatch, 0, 4)
    assert distributed.local_batch_size(32, exact=True) == 8
    assert distributed.local_batch_size(30, exact=False) == 8  # evaluation batches may be uneven
    with pytest.raises(SmopeError, match="set train.batch_size to a multiple of 4"):
        distributed.local_batch_size(30, exact=True)


def test_one_process_is_untouched():
    tensor = torch.arange(6.0)
    assert distributed.all_reduce_sum(tensor) is tensor
    assert distributed.gather_shards(tensor, 6) is tensor
    assert distributed.world_size() == 1 and distributed.is_main()


# Real multi-process runs -------------------------------------------------------------------
def smope_run(out: Path, processes: int, *overrides: str, timeout: float = RUN_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """``smope run`` of the tiny config plus ``overrides``; with ``SMOPE_TEST_FAIL_RANK`` set, through tests/inject_rank_failure.py."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    program = [str(Path(__file__).with_name("inject_rank_failure.py"))] if "SMOPE_TEST_FAIL_RANK" in env else ["-m", "smope"]
    command = [sys.executable, *launcher, *program, "run", TINY, f"output_dir={out}", *OVERRIDES, *overrides]
    # One thread per process, as torchrun sets for several processes: the same arithmetic in both runs.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)



@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = smope_run(out, processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.distributed
def test_two_processes_write_one_set_of_outputs_matching_one_process(two_process_run, tmp_path):
    out, result = two_process_run
    # .lock: the file of the writer lock (RunDir.exclusive); it stays, only the OS lock on it marks a writer
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "log.jsonl", "metrics.csv", "metrics.json", "provenance.json", "seed_0"]
    assert sorted(p.name for p in (out / "seed_0").iterdir()) == [f"task_{t:03d}.safetensors" for t in range(3)]
    assert len((out / "log.jsonl").read_text().splitlines()) == 3  # not once per process
    assert result.stdout.count("final average accuracy") == 1

    single = smope_run(tmp_path / "single", processes=1)
    assert single.returncode == 0, single.stderr[-3000:]
    # The global batches are the same samples in both runs (see ShardSampler), so only float
    # rounding differs (a mean of means, other matmul blockings), which can flip an argmax
    # or an expert's top-k choice now and then; on this machine the numbers are identical.
    expected, got = read_metrics(tmp_path / "single")["accuracy_matrix"], read_metrics(out)["accuracy_matrix"]
    assert [len(row) for row in got] == [len(row) for row in expected]
    for row_got, row_expected in zip(got, expected):
        assert row_got == pytest.approx(row_expected, abs=3.0)
    assert read_metrics(out)["accuracy_matrix"][0][0] > 35.0  # learns: chance on the first task's 4 classes is 25%
    # Routing records combine the shards: every training image is counted once, its expert sets merged.
    routing_got, routing_expected = (read_metrics(run)["routing"]["per_seed"][0] for run in (out, tmp_path / "single"))
    assert np.array(routing_got["task_usage"]).sum((2, 3)).tolist() == np.array(routing_expected["task_usage"]).sum((2, 3)).tolist()
    # Training steps: equal shards may repeat a sample per epoch (ShardSampler), so about equal.
    assert np.array(routing_got["step_usage"]).sum() == pytest.approx(np.array(routing_expected["step_usage"]).sum(), rel=0.01)
    assert [len(row) for row in routing_got["test_in_task_experts"]] == [1, 2, 3]


@pytest.mark.distributed
def test_failing_rank_stops_the_run_and_the_run_resumes(two_process_run, tmp_path):
    out = tmp_path / "run"
    failed = smope_run(out, processes=2, SMOPE_TEST_FAIL_RANK="1")
    assert failed.returncode != 0
    assert "rank 1 failed: RuntimeError: failure injected by SMOPE_TEST_FAIL_RANK=1" in failed.stderr
    assert sorted(p.name for p in (out / "seed_0").iterdir()) == ["task_000.safetensors"]

    resumed = smope_run(out, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming after task 1") == 1
    assert read_metrics(out)["per_seed"] == read_metrics(two_process_run[0])["per_seed"]


# Seed-parallel runs (train.parallel: seeds) ------------------------------------------------
SEEDS = ("seeds=[0, 1]",)


@pytest.mark.distributed
def test_seed_parallel_run_writes_the_sequential_metrics_and_resumes_per_seed(tmp_path):
    parallel = smope_run(tmp_path / "parallel", 2, *SEEDS, "train.parallel=seeds")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    sequential = smope_run(tmp_path / "sequential", 1, *SEEDS, timeout=2 * RUN_TIMEOUT)  # the two seeds one after the other
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    # Each process trains one whole seed as a single process would: the same numbers, to the last digit.
    assert read_metrics(tmp_path / "parallel") == read_metrics(tmp_path / "sequential")
    out = tmp_path / "parallel"
    assert sorted((out / "log.jsonl").read_text().count(f'"seed": {seed},') for seed in (0, 1)) == [3, 3]
    assert parallel.stdout.count("final average accuracy") == 1

    (out / "seed_1" / "task_002.safetensors").unlink()  # seed 1 was stopped in its last task
    resumed = smope_run(out, 2, *SEEDS, "train.parallel=seeds")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "seed 1: resuming after task 2" in resumed.stdout and "seed 0: resuming after task 3" in resumed.stdout
    assert read_metrics(out) == read_metrics(tmp_path / "sequential")


@pytest.mark.distributed
def test_seed_parallel_run_with_more_processes_than_seeds_is_refused(tmp_path):
    result = smope_run(tmp_path / "run", 2, "seeds=[0]", "train.parallel=seeds")
    assert result.returncode != 0
    assert "error: train.parallel=seeds gives each process whole seeds, but 2 processes share 1 seed(s) [0]: start at most 1" in result.stderr
    assert "Traceback" not in result.stderr.split("rank 0 failed")[0]  # the ranks' own output: one line, no traceback
    assert not (tmp_path / "run" / "seed_0").exists()


def test_seed_share_gives_each_process_whole_seeds(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    assert distributed.seed_share([0, 1, 2]) == [1]
    as_rank(monkeypatch, 0, 2)
    assert distributed.seed_share([0, 1, 2]) == [0, 2]
    as_rank(monkeypatch, 0, 3)
    with pytest.raises(SmopeError, match=r"3 processes share 2 seed\(s\) \[0, 1\]: start at most 2 processes"):
        distributed.seed_share([0, 1])
