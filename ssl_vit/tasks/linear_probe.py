"""Linear probing of a frozen encoder (MAE appendix A.3), with a sweep of learning rates in one pass.

    images -> frozen encoder (eval mode, no gradients) -> feature: the class token after the final
    norm (or the pooled feature, by recipe)     [B, D]   (or features cached once, batch["features"])
      -> one head per learning-rate multiplier: BatchNorm (no affine, eps 1e-6) + Linear, trunc-normal
         std 0.01 (MAE's main_linprobe.py); the heads see the same features and never interact,
         so training them together is training each alone (DINOv2's linear evaluation does the same)
      -> cross-entropy, summed over heads

Only the heads are in the optimizer. The best head exports folded into the encoder's own `head`
(the BatchNorm statistics folded into the linear layer), a plain timm classifier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..models.vit import VisionTransformer


@dataclass
class ProbeOutput:
    loss: torch.Tensor
    logits: list
    metrics: dict = field(default_factory=dict)


class LinearProbe(nn.Module):
    def __init__(self, encoder: VisionTransformer, num_classes: int, *, lr_scales: Sequence[float] = (1.0,),
                 head_init_std: float = 0.01):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.lr_scales = list(lr_scales)
        dim = encoder.num_features
        self.heads = nn.ModuleList()
        for _ in self.lr_scales:
            head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
            trunc_normal_(head[1].weight, std=head_init_std)
            nn.init.zeros_(head[1].bias)
            self.heads.append(head)
        self.criterion = nn.CrossEntropyLoss()
        self.best_head = 0  # set by the evaluation: the head with the best validation top-1

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm-free, but no dropout / drop path either
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The probed feature, [B, D]: class token after the final norm, or the pooled tokens."""
        return self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)

    def forward(self, batch: dict) -> ProbeOutput:
        features = batch["features"] if "features" in batch else self.features(batch["images"])
        features = features.float()
        logits = [head(features) for head in self.heads]
        losses = [self.criterion(out, batch["labels"]) for out in logits]
        metrics = {f"loss_lr{scale:g}": loss.item() for scale, loss in zip(self.lr_scales, losses)}
        return ProbeOutput(loss=sum(losses), logits=logits, metrics=metrics)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, from_features: bool = False) -> list[torch.Tensor]:
        features = inputs if from_features else self.features(inputs)
        return [head(features.float()) for head in self.heads]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """One group per head carrying its lr multiplier. MAE's LARS adapts the >= 2-D weights only
        (exclude_bias_and_norm): weights get `always_adapt`, biases do not (and no weight decay)."""
        groups = []
        for scale, head in zip(self.lr_scales, self.heads):
            linear = head[1]
            groups.append({"params": [linear.weight], "lr_scale": scale, "weight_decay": weight_decay,
                           "always_adapt": True})
            groups.append({"params": [linear.bias], "lr_scale": scale, "weight_decay": 0.0,
                           "always_adapt": False})
        return groups

    @torch.no_grad()
    def folded_head(self, index: int) -> nn.Linear:
        """Head `index` as one Linear: W (x - mean) / sqrt(var + eps) + b = (W / s) x + (b - W mean / s)."""
        norm, linear = self.heads[index]
        scale = (norm.running_var + norm.eps).sqrt()
        folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
        folded.weight.copy_(linear.weight / scale)
        folded.bias.copy_(linear.bias - (linear.weight / scale) @ norm.running_mean)
        return folded

    def export_state(self) -> tuple[dict, dict]:
        """(state dict, encoder config) of model.safetensors: the frozen encoder with the best head
        folded into its `head`, a plain timm classifier."""
        head = self.folded_head(self.best_head)
        state = {**self.encoder.state_dict(), "head.weight": head.weight, "head.bias": head.bias}
        return state, {**self.encoder.config, "num_classes": head.out_features}
