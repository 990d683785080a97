"""Data-parallel runs under ``torchrun``: process group, sharding, reductions, failure handling.

``torchrun --nproc_per_node N -m smope run CONFIG`` starts N copies of the run. Each process
holds the whole (small) trainable state and sees a shard of every pass over the data:

* training batches: ``train.batch_size`` is the *global* batch, split evenly over the
  processes, and the shards interleave so that batch b of all processes together is batch b
  of a single process. Averaging the gradients then gives every process the same step.
* passes whose results are summed or gathered afterwards (evaluation counts, features for
  class statistics, expert usage) visit each sample exactly once over all processes.

With ``train.parallel: seeds`` each process instead runs whole seeds (:func:`seed_share`) inside
:func:`alone`, and only the finished seeds' results cross processes (:func:`gather_objects`).

Every function here is a no-op (or the identity) in a single process, so the trainer and the
learners call them unconditionally. Only the main process (rank 0) writes files and prints.
A process that fails ends the run; ``$SMOPE_DIST_TIMEOUT`` (seconds, default 600) bounds how
long a collective waits for a peer that hangs instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from .errors import SmopeError

TIMEOUT_ENV = "SMOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600


_working_alone = False  # inside alone(): a process of a seed-parallel run training its own seeds


def is_distributed() -> bool:
    """True in a data-parallel run: passes over the data are sharded and reduced over the processes."""
    return dist.is_available() and dist.is_initialized() and not _working_alone


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within it every helper here acts as in one process, though the process group stays up (``train.parallel: seeds``)."""
    global _working_alone
    _working_alone = True
    try:
        yield
    finally:
        _working_alone = False


def seed_share(seeds: list[int]) -> list[int]:
    """This process's seeds in a seed-parallel run: every ``world_size()``-th, each seed on one process.

    More processes than seeds would leave one idle while waiting for the others: refused.
    """
    world, own = world_size(), rank()
    if world > len(seeds):
        raise SmopeError(
            f"train.parallel=seeds gives each process whole seeds, but {world} processes share {len(seeds)} seed(s) {seeds}: "
            f"start at most {len(seeds)} processes (torchrun --nproc_per_node {len(seeds)}) or list more seeds"
        )
    return seeds[own::world]


def gather_objects(value: object) -> list:
    """Every process's ``value``, in rank order (``[value]`` in one process).

    Waits for the slowest process without a time limit: in a seed-parallel run the others may
    still be training their seeds (a peer that fails ends the run through torchrun instead).
    """
    if not is_distributed():
        return [value]
    dist.monitored_barrier(timeout=timedelta(days=365), wait_all_ranks=True)
    gathered: list[object] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _timeout() -> timedelta:
    """How long a collective waits for a peer that hangs (a peer that dies is noticed at once)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise SmopeError(f"environment variable {TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def data_parallel(device: str, parallel: str = "data") -> Iterator[None]:
    """Join torchrun's process group for the duration of a run, if torchrun started more than one process.

    The backend is NCCL when the run uses CUDA (each process on ``cuda:LOCAL_RANK``) and gloo on
    CPU. With ``parallel="seeds"`` no tensor crosses processes, only the finished seeds'
    results: gloo, whatever the device. An exception in any process ends that process at once with a non-zero exit code after
    printing ``rank R failed: ...``: its peers would otherwise wait in their next collective until
    the timeout, while torchrun stops them as soon as one worker exits with an error.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        yield
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(_local_rank())
    nccl = use_cuda and parallel == "data"
    dist.init_process_group(
        "nccl" if nccl else "gloo",
        timeout=_timeout(),
        device_id=torch.device("cuda", _local_rank()) if nccl else None,
    )
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure must end this process, not leave peers waiting
        user_error = isinstance(exc, SmopeError)
        if not user_error:
            traceback.print_exc()
        print(f"rank {rank()} failed: {'error' if user_error else type(exc).__name__}: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if user_error else 1)  # skips atexit and thread joins that could wait on peers
    dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """This process's device: a CUDA device becomes ``cuda:LOCAL_RANK`` under torchrun (data- or seed-parallel)."""
    if dist.is_available() and dist.is_initialized() and device.type == "cuda":
        return torch.device("cuda", _local_rank())
    return device


def _collective_device() -> torch.device:
    """Where tensors must be for a collective: NCCL works on CUDA tensors only, gloo on CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Let the first process of each machine go first, e.g. to download a dataset the others then read."""
    first = _local_rank() == 0
    if not first:
        barrier()
    yield
    if first:
        barrier()


def local_batch_size(global_batch: int, exact: bool) -> int:
    """This process's share of a global batch; ``exact`` requires an even split (training batches)."""
    world = world_size()
    if exact and global_batch % world:
        raise SmopeError(
            f"train.batch_size={global_batch} is the global batch, split evenly over the {world} processes: "
            f"set train.batch_size to a multiple of {world}"
        )
    return -(-global_batch // world)


class ShardSampler(Sampler[int]):
    """This process's share of a pass over ``size`` samples: every ``world_size()``-th index.

    With ``shuffle`` (training) each pass draws a new permutation from a generator seeded once
    with ``seed``, identical on every process, and pads it by repeating its start to a multiple
    of the world size: all processes then take the same number of steps, and the consecutive
    local batches of all processes together form the batches a single process would draw.
    Without ``shuffle`` every sample is visited exactly once over all processes, in order.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0) -> None:
        self.size, self.shuffle = size, shuffle
        self.rank, self.world = rank(), world_size()
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.rank, self.size, self.world))
        order = torch.randperm(self.size, generator=self.generator)
        padding = -self.size % self.world
        order = torch.cat([order, order[:padding]])
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        if self.shuffle:
            return -(-self.size // self.world)
        return len(range(self.rank, self.size, self.world))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes, on ``tensor``'s device (``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    total = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def gather_shards(shard: torch.Tensor, total: int) -> torch.Tensor:
    """The rows of a whole unshuffled pass, in dataset order, from each process's rows of its shard.

    ``shard`` holds this process's outputs for the indices :class:`ShardSampler` gave it without
    shuffling (rank, rank + world, ...); ``total`` is the dataset's length.
    """
    if not is_distributed():
        return shard
    world = world_size()
    padded = shard.new_zeros((-(-total // world), *shard.shape[1:]), device=_collective_device())
    padded[: len(shard)] = shard
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.stack(gathered, 1).flatten(0, 1)[:total].to(shard.device)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over all processes, with one all-reduce of the flattened gradients.

    Which parameters receive a gradient depends on the model, not on the data, so every process
    flattens the same list in the same order.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    mean = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size()
    for grad, average in zip(grads, mean.split([g.numel() for g in grads])):
        grad.copy_(average.view_as(grad))
