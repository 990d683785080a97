"""SLCA: a zero backbone rate trains the head alone, a negative one is refused, and its alignment is the release's step."""

import math

import pytest
import torch
from helpers import TINY, read_metrics
from safetensors.torch import load_file

from smope import cli
from smope.learners.alignment import FullCovarianceStatistics
from smope.learners.slca import slca_align

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slca_with_a_zero_backbone_rate_trains_the_head_only(tmp_path):
    out = tmp_path / "frozen"
    cli.main(["run", TINY, f"output_dir={out}", "train.epochs=1", "method.name=slca", "method.slca_backbone_lr=0", "method.slca_align_epochs=1"])
    run = read_metrics(out)
    assert run["parameters"]["trainable"] == run["parameters"]["head"] > 0  # no backbone weight is trained or saved
    saved = load_file(out / "seed_0" / "task_001.safetensors")
    assert not any(name.startswith("blocks.") for name in saved) and any(name.startswith("class_stats.") for name in saved)


def test_negative_slca_backbone_rate_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["run", TINY, f"output_dir={tmp_path}", "method.name=slca", "method.slca_backbone_lr=-1e-4"])
    assert stopped.value.code == 2
    assert "method.slca_backbone_lr' must be >= 0" in capsys.readouterr().err


def test_slca_alignment_is_the_releases_step():
    generator = torch.Generator().manual_seed(0)
    stats = FullCovarianceStatistics(6, 4)
    stats.update(torch.randn(600, 4, generator=generator) + (torch.arange(6).repeat_interleave(100).unsqueeze(1) + 1) * 10.0, torch.arange(6).repeat_interleave(100))
    head = torch.nn.Linear(4, 6)
    tasks = (range(0, 2), range(2, 4), range(4, 6))
    seen = {}

    class Recorder:  # stands in for the Trainer: keeps what the step loop would run
        def optimize(self, groups, optimizer, multipliers, epochs, steps_per_epoch, batches, loss_fn, description):
            seen.update(optimizer=optimizer, rates=[multipliers[0](s) for s in range(epochs * steps_per_epoch)], steps=steps_per_epoch)
            seen["batches"] = list(batches(0))
            seen["loss"] = loss_fn(*seen["batches"][0])

    slca_align(head, stats, tasks, epochs=5, lr=0.01, samples_per_class=400, logit_norm=0.1, seed=0, trainer=Recorder())
    assert isinstance(seen["optimizer"], torch.optim.SGD) and seen["optimizer"].defaults["momentum"] == 0.9
    assert seen["steps"] == 6 and all(len(labels) == 400 for _, labels in seen["batches"])  # one pass, a batch per class
    expected = [0.5 * (1 + math.cos(math.pi * epoch / 5)) for epoch in range(5)]  # cosine over epochs, flat within one
    assert seen["rates"] == pytest.approx([rate for rate in expected for _ in range(6)])
    features = torch.cat([f for f, _ in seen["batches"]])
    labels = torch.cat([y for _, y in seen["batches"]])
    for label, scale in ((0, 0.9 + 0.1 / 3), (2, 0.9 + 0.2 / 3), (5, 1.0)):  # oldest task's means shrink the most
        assert torch.allclose(features[labels == label].mean(0), scale * stats.mean[label], atol=0.2)
    x, y = seen["batches"][0]
    logits = head(x).detach()
    norms = torch.stack([logits[:, t.start : t.stop].norm(dim=-1) + 1e-7 for t in tasks], -1).mean(-1, keepdim=True)
    assert seen["loss"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits / norms / 0.1, y).item(), rel=1e-5)
