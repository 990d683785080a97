"""``smope`` under torchrun with one process failing as the second task starts (tests/test_distributed.py).

The rank named by ``$SMOPE_TEST_FAIL_RANK`` raises once the main process has saved the first
task, while its peers wait in a collective: the run must stop as a whole and resume later.
"""

import os
import sys

from smope import cli, distributed
from smope.learners.smope_learner import SMoPELearner

FAIL_RANK = os.environ["SMOPE_TEST_FAIL_RANK"]
train_task = SMoPELearner.train_task


def failing_train_task(self, ctx):
    if ctx.task == 1:
        distributed.barrier()  # the main process has saved the first task: the run can be resumed
        if str(distributed.rank()) == FAIL_RANK:
            raise RuntimeError(f"failure injected by SMOPE_TEST_FAIL_RANK={FAIL_RANK}")
    return train_task(self, ctx)


SMoPELearner.train_task = failing_train_task
cli.main(sys.argv[1:])
