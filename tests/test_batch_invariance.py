"""Every method predicts each test image on its own: the same classes at test batch 1 and in one large mixed batch.

Public releases of several baselines do not (docs/baselines.md#batch-invariance): L2P's and
DualPrompt's pick one prompt per test batch by majority vote, HiDe-Prompt's and NoRGa's mix up
the prompt halves of a batch's samples. Here a tiny run of two tasks is restored from its last
checkpoint and its test images of both tasks, shuffled so that every batch mixes them, are
predicted once image by image and once as a single batch.
"""

import pytest
import torch
from helpers import read_only, tiny_config

from smope.experiment import SeedRun, run_experiment
from smope.learners import create_learner
from smope.learners.prompt_pool import PromptPoolLearner
from smope.methods import method_names, spec_for

QUICK = ["data.num_tasks=2", "data.first_task_classes=5", "train.epochs=1", "method.align_epochs=2", "data.test_per_class=6", "train.progress=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", method_names())
def test_predictions_do_not_depend_on_the_test_batch(method, tmp_path):
    config = tiny_config(method, *read_only(method, *QUICK), f"output_dir={tmp_path}")  # method.align_epochs only where it is read
    run_experiment(config)
    seed_run = SeedRun(config, config.seeds[0], tmp_path)
    seed_run.build()
    seed_run.restore(1)
    test = seed_run.scenario.test_dataset_upto(1)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    images = torch.stack([test[int(i)][0] for i in order])
    seen = seed_run.scenario.seen_classes(1).stop
    learner = seed_run.learner
    one_by_one = torch.cat([learner.logits(image[None])[:, :seen] for image in images])
    together = learner.logits(images)[:, :seen]
    first_task = seed_run.scenario.task_classes(0)
    assert len({int(test[int(i)][1]) in first_task for i in order[:8]}) == 2  # the batch mixes both tasks
    assert torch.equal(one_by_one.argmax(-1), together.argmax(-1))
    # The scores too, up to float rounding: a batch-dependent choice that happens to keep the argmax still shows.
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)


POOL_METHODS = [name for name in method_names() if issubclass(spec_for(name).load(), PromptPoolLearner)]


@pytest.mark.parametrize("method", POOL_METHODS)
def test_pool_choices_are_per_sample(method):
    """With keys far apart, inputs choose different prompts; each input's prefix is the one it gets alone.

    At the tiny run's scale every input may pick the same prompts, and a per-batch vote would then
    go unnoticed by the test above.
    """
    learner = create_learner(tiny_config(method), 10)
    pool = learner.model.pool.eval()
    with torch.no_grad():
        if hasattr(pool, "task"):
            pool.begin_task(2)  # DualPrompt's and CODA-Prompt's test-time choice spans tasks 0..2
        for weight in pool.parameters():  # after begin_task, which may copy one task's prompt to the next
            weight.normal_()
        if hasattr(pool, "add_classes"):  # HiDe-Prompt and NoRGa choose the task of the predicted class
            for task in range(3):
                pool.add_classes(task, range(3 * task, 3 * task + 3))
        queries = 10 * torch.randn(16, learner.model.num_features)
        together, _ = pool(queries, len(queries))
        alone = [pool(query[None], 1)[0] for query in queries]
    # Somewhere the inputs get different prompts (DualPrompt's G-prompt blocks are shared by design).
    assert any(len({tuple(k.flatten().tolist()) for k in keys}) > 1 for keys, _ in together.values())
    for block, (keys, values) in together.items():
        torch.testing.assert_close(keys, torch.cat([prefix[block][0] for prefix in alone]))
        torch.testing.assert_close(values, torch.cat([prefix[block][1] for prefix in alone]))
