"""The divergence advice names the config key of each parameter group's learning rate, as the learner built it."""

import pytest
import torch
from helpers import TINY, TINY_SCALE, fails, method_overrides

from smope import cli
from smope.divergence import DivergenceGuard
from smope.methods import METHODS
from smope.runconfig import load_config
from smope.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def advice(config, *groups: dict) -> str:
    guard = DivergenceGuard(config, "task 1", list(groups))
    guard.diverged(float("nan"))
    return str(guard.error(epoch=1))


def test_the_advice_names_each_groups_key_once_train_lr_first():
    config = load_config(None, ["method.name=lora", "train.precision=bf16"])
    message = advice(config, {"lr": 5e-4, "lr_key": "method.lora_lr"}, {"lr": 0.005, "lr_key": "train.lr"}, {"lr": 0.025, "lr_key": "train.lr"})
    assert message.endswith("training diverged. Lower train.lr (now 0.005) or method.lora_lr (now 0.0005), or use train.precision=fp32 (now bf16)")


def test_equal_rates_from_different_keys_are_told_apart():
    # The old rule matched numbers: a head rate equal to train.lr was taken for train.lr.
    config = load_config(None, ["method.name=hide-prompt", "method.hide_tii_lr=0.005"])
    assert advice(config, {"lr": 0.005, "lr_key": "method.hide_tii_lr"}).endswith("Lower method.hide_tii_lr (now 0.005)")
    assert advice(config, {"lr": 0.005}).endswith("Lower train.lr (now 0.005)")  # a group without a key: the harness's rate


def test_a_group_naming_no_config_key_fails_when_the_guard_is_built():
    with pytest.raises(AttributeError):
        DivergenceGuard(load_config(None), "task 1", [{"lr": 0.1, "lr_key": "train.learning_rate"}])


@pytest.mark.parametrize("method", [spec.name for spec in METHODS])
def test_every_learner_names_the_key_of_each_groups_rate(method, tmp_path, monkeypatch):
    """Each phase's groups carry ``lr_key``, and their rate is that key's value (x train.prompt_lr_scale for prompts)."""
    overrides = method_overrides(method, "train.epochs=1")
    config = load_config(TINY, overrides)
    seen: dict[str, list[dict]] = {}

    def record(self, param_groups, optimizer, multipliers, epochs, steps_per_epoch, batches, loss_fn, description):
        seen[description] = [{k: v for k, v in group.items() if k != "params"} for group in param_groups]

    monkeypatch.setattr(Trainer, "optimize", record)  # no step is taken: the phases only show their groups
    cli.main(["run", TINY, f"output_dir={tmp_path / 'run'}", *overrides])
    assert seen or method == "prototype"  # the prototype learner has no gradient step
    for description, groups in seen.items():
        for group in groups:
            assert "lr_key" in group, (description, group)
            section, name = group["lr_key"].split(".")
            value = getattr(getattr(config, section), name)
            assert group["lr"] in (pytest.approx(value), pytest.approx(value * config.train.prompt_lr_scale)), (description, group)


def test_a_diverging_task_identity_head_names_its_own_rate(tmp_path, capsys):
    out = tmp_path / "run"
    message = fails(capsys, "run", TINY, f"output_dir={out}", "method.name=hide-prompt", *TINY_SCALE["hide-prompt"], "method.hide_tii_epochs=3", "method.hide_tii_lr=1e6")
    assert "in 'task 1 identity'" in message and "Lower method.hide_tii_lr (now 1e+06)" in message and "train.lr" not in message


def test_a_diverging_lora_names_both_rates(tmp_path, capsys):
    message = fails(capsys, "run", TINY, f"output_dir={tmp_path / 'run'}", "method.name=lora", "method.lora_lr=1e6", "train.epochs=2")
    assert "Lower train.lr (now 0.03) or method.lora_lr (now 1e+06)" in message


def test_plain_torch_optimizers_accept_the_named_groups():
    weight = torch.nn.Parameter(torch.ones(2))
    for optimizer in (torch.optim.AdamW, torch.optim.SGD):
        step = optimizer([{"params": [weight], "lr": 0.1, "lr_key": "train.lr"}], lr=0.1)
        weight.grad = torch.ones(2)
        step.step()
        assert step.param_groups[0]["lr_key"] == "train.lr"
