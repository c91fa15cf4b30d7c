"""Supervised classification on the shared encoder: end-to-end fine-tuning (MAE appendix A.2) and
training from scratch (DeiT).

    images [B, C, H, W] (+ mixup / cutmix on the device, timm's Mixup)
      -> encoder -> pool (class token, or mean of the patch tokens + fc_norm) -> head [B, classes]
      -> cross-entropy with label smoothing, or soft-target cross-entropy on mixed targets

The classifier is the encoder's own `head` (timm layout), so the fine-tuned model exports as a
plain timm ViT. `model.arch=timm:NAME` trains any timm model instead (e.g. a convnet teacher for
DeiT distillation, trained here offline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..config import ConfigError, TaskConfig
from ..models import build_encoder
from .base import Task, TaskOutput, encoder_family, register_task
from .pictures import attention_grid


@dataclass
class ClassifyConfig(TaskConfig):
    name: str = "classify"
    label_smoothing: float = 0.0          # of the cross-entropy targets (0.1: DeiT, MAE fine-tuning)
    mixup: float = 0.0                    # mixup alpha (timm's Mixup); 0 = off
    cutmix: float = 0.0                   # cutmix alpha; 0 = off
    mixup_prob: float = 1.0               # probability of mixing a batch
    mixup_switch_prob: float = 0.5        # probability of cutmix instead of mixup when both are on
    head_init_std: Optional[float] = 0.02  # trunc-normal std of a new classifier head (null: the encoder's own init)


@dataclass(kw_only=True)
class ClassifyOutput(TaskOutput):
    logits: torch.Tensor


@register_task
class Classify(Task):
    """supervised classification: fine-tuning (MAE appendix A.2) and training from scratch (DeiT)."""
    name = "classify"
    Config = ClassifyConfig
    needs_labels = True
    evaluation = "top-k"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        task = cfg.task
        if min(task.mixup, task.cutmix, task.label_smoothing) < 0:
            raise ConfigError("task.mixup, task.cutmix and task.label_smoothing must be >= 0")
        if not 0 <= task.mixup_prob <= 1 or not 0 <= task.mixup_switch_prob <= 1:
            raise ConfigError("task.mixup_prob and task.mixup_switch_prob are probabilities in [0, 1]")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "Classify":
        return cls(build_encoder(cfg.model, num_classes=num_classes), label_smoothing=cfg.task.label_smoothing,
                   mixup=build_mixup(cfg.task, num_classes), head_init_std=cfg.task.head_init_std)

    def __init__(self, encoder: nn.Module, *, label_smoothing: float = 0.0, mixup: Optional[Mixup] = None,
                 head_init_std: Optional[float] = 0.02):
        super().__init__()
        if getattr(encoder, "num_classes", 0) <= 0:
            raise ValueError("a classification task needs an encoder with num_classes > 0")
        self.encoder, self.mixup = encoder, mixup
        if head_init_std is not None:
            # a new head: MAE fine-tuning uses std 2e-5 (main_finetune.py), DeiT timm's 0.02; a
            # classifier not named `head` (a timm convnet's `fc`) keeps timm's initialisation
            for head in (getattr(encoder, "head", None), getattr(encoder, "head_dist", None)):
                if isinstance(head, nn.Linear):
                    trunc_normal_(head.weight, std=head_init_std)
                    nn.init.zeros_(head.bias)
        if mixup is not None:  # mixup carries the label smoothing into its soft targets
            self.criterion = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def forward(self, batch: dict) -> ClassifyOutput:
        images, labels = batch["images"], batch["labels"]
        targets = labels
        if self.training and self.mixup is not None:
            images, targets = self.mixup(images, labels)        # targets: [B, classes], soft
        logits = self.encoder(images)
        loss = self.criterion(logits.float(), targets)
        metrics = {}
        if targets is labels:
            metrics["train_top1"] = 100.0 * (logits.argmax(1) == labels).float().mean()  # on the device
        return ClassifyOutput(loss=loss, logits=logits, metrics=metrics)

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        return self.encoder(batch["images"])

    def picture_split(self) -> Optional[str]:
        """The first validation images, to watch where the encoder looks as it learns (when its
        family draws attention maps: a ViT with a class token)."""
        return "val" if encoder_family(self).draws_attention(self.encoder) else None

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        maps = encoder_family(self).attention_maps(self.encoder, images, rollout=True)
        return {"attention": attention_grid(denormalize(images), maps)}


def build_mixup(task_cfg, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup / CutMix (DeiT table 9 and MAE A.2: mixup 0.8, cutmix 1.0, switch 0.5,
    label smoothing 0.1), applied to whole batches on the device."""
    if task_cfg.mixup <= 0 and task_cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=task_cfg.mixup, cutmix_alpha=task_cfg.cutmix, prob=task_cfg.mixup_prob,
                 switch_prob=task_cfg.mixup_switch_prob, mode="batch", label_smoothing=task_cfg.label_smoothing,
                 num_classes=num_classes)
