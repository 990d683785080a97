"""Sequential LoRA fine-tuning of the attention qkv projections, with peft: a baseline in the style of docs/method.md#baselines."""

from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model

from ..backbones import create_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import unfreeze_classifier
from .base import Learner, TaskContext, training_loss


class LoRALearner(Learner):
    """peft's LoRA on every block's fused ``qkv`` Linear, trained task after task with the head.

    ``inject_adapter_in_model`` keeps the timm model's class (so its head, ``patch_embed`` and
    data config stay reachable) and freezes everything but the adapters; the head is unfrozen
    here. One low-rank update is shared by all tasks and nothing protects old ones, so this
    measures how much a generic parameter-efficient fine-tune forgets. Checkpoints hold the
    LoRA matrices and the head (the trainable parameters, via :meth:`Learner.state_dict`).
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        method = config.method
        adapter = LoraConfig(r=method.lora_r, lora_alpha=method.lora_alpha, lora_dropout=0.0, target_modules=["qkv"])
        self.model = unfreeze_classifier(inject_adapter_in_model(adapter, create_backbone(config.model, num_classes))).to(self.device)

    def train_task(self, ctx: TaskContext) -> None:
        loss_fn = training_loss(self.model, ctx.classes)
        head = list(self.model.get_classifier().parameters())
        adapters = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        groups = [{"params": adapters, "lr": self.config.method.lora_lr, "lr_key": "method.lora_lr"}, {"params": head, "lr": self.config.train.lr, "lr_key": "train.lr"}]
        self.trainer.fit(groups, ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}")
