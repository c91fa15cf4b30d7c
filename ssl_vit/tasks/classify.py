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

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..models.vit import VisionTransformer


@dataclass
class ClassifyOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict = field(default_factory=dict)


class Classify(nn.Module):
    def __init__(self, encoder: nn.Module, *, label_smoothing: float = 0.0, mixup: Optional[Mixup] = None,
                 head_init_std: Optional[float] = 0.02):
        super().__init__()
        if getattr(encoder, "num_classes", 0) <= 0:
            raise ValueError("a classification task needs an encoder with num_classes > 0")
        self.encoder, self.mixup = encoder, mixup
        if head_init_std is not None and isinstance(encoder, VisionTransformer):  # timm models keep timm's init
            # a new head: MAE fine-tuning uses std 2e-5 (main_finetune.py), DeiT timm's 0.02
            for head in (encoder.head, encoder.head_dist):
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
            metrics["train_top1"] = 100.0 * (logits.argmax(1) == labels).float().mean().item()
        return ClassifyOutput(loss=loss, logits=logits, metrics=metrics)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def export_state(self) -> tuple[dict, dict]:
        """(state dict, encoder config) of model.safetensors: a timm ViT with its classifier, or the
        timm model itself (model.arch=timm:NAME)."""
        if isinstance(self.encoder, VisionTransformer):
            return self.encoder.state_dict(), dict(self.encoder.config)
        return self.encoder.state_dict(), dict(self.encoder.ssl_vit_config)

    def group_matcher(self, coarse: bool = False) -> dict:
        """The encoder's grouping under this module's `encoder.` prefix: without it, timm's
        layer-wise lr decay would put every parameter in one group with lr_scale 1.0."""
        return dict(stem=r"^encoder\.(?:cls_token|dist_token|pos_embed|patch_embed)",
                    blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))])


def build_mixup(task_cfg, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup / CutMix (DeiT table 9 and MAE A.2: mixup 0.8, cutmix 1.0, switch 0.5,
    label smoothing 0.1), applied to whole batches on the device."""
    if task_cfg.mixup <= 0 and task_cfg.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=task_cfg.mixup, cutmix_alpha=task_cfg.cutmix, prob=task_cfg.mixup_prob,
                 switch_prob=task_cfg.mixup_switch_prob, mode="batch", label_smoothing=task_cfg.label_smoothing,
                 num_classes=num_classes)
