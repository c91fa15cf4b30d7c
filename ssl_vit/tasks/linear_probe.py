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
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..config import ConfigError, TaskConfig
from ..data.features import FeatureData, extract_features, split_for_rank
from ..data.loaders import build_eval_loader, holdout_range, training_range
from ..data.stream import in_range
from ..models import build_encoder
from ..models.base import classifier_prefixes
from .base import ModelExport, RunContext, Task, TaskOutput, register_task


@dataclass
class LinearProbeConfig(TaskConfig):
    name: str = "linear_probe"
    head_init_std: float = 0.01           # trunc-normal std of the heads (MAE's main_linprobe.py)
    lr_scales: List[float] = field(default_factory=lambda: [1.0])  # one head per lr multiplier


@dataclass(kw_only=True)
class ProbeOutput(TaskOutput):
    logits: list


@register_task
class LinearProbe(Task):
    """linear probing of a frozen encoder (MAE appendix A.3), one head per lr of a sweep."""
    name = "linear_probe"
    Config = LinearProbeConfig
    needs_labels = True
    trains_encoder = False
    evaluation = "top-k"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if not cfg.task.lr_scales or min(cfg.task.lr_scales) <= 0:
            raise ConfigError(f"task.lr_scales={list(cfg.task.lr_scales)}: give positive multipliers, e.g. [0.1,1,10]")
        if cfg.optim.layer_decay is not None:
            raise ConfigError(f"optim.layer_decay={cfg.optim.layer_decay} would change nothing: a linear probe's "
                              "encoder is frozen (pass optim.layer_decay=null)")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "LinearProbe":
        return cls(build_encoder(cfg.model, num_classes=0), num_classes, lr_scales=cfg.task.lr_scales,
                   head_init_std=cfg.task.head_init_std)

    def __init__(self, encoder: nn.Module, num_classes: int, *, lr_scales: Sequence[float] = (1.0,),
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
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # val / holdout features, when cached

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
        metrics = {f"loss_lr{scale:g}": loss.detach() for scale, loss in zip(self.lr_scales, losses)}
        return ProbeOutput(loss=sum(losses), logits=logits, metrics=metrics)

    # --- data: features cached once when nothing is augmented -------------------------------

    def training_data(self, run: RunContext):
        """With data.train_transform=eval (no augmentation) the frozen encoder's features of the
        splits are extracted once (each sample once over all ranks) and the heads train on them:
        seconds instead of epochs of passes through the encoder. Otherwise the shard loader."""
        cfg, accelerator, plan = run.cfg, run.accelerator, run.plan
        if cfg.data.train_transform != "eval":
            run.print(f"linear probe: data.train_transform={cfg.data.train_transform} augments every batch, so the "
                      "frozen encoder runs at every step (features are cached only with data.train_transform=eval)")
            return None
        self.eval()
        splits = {}
        for split in ("train", "val"):
            loader = build_eval_loader(cfg, split, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                       batch_size=cfg.eval.batch_size or cfg.data.batch_size)
            with accelerator.autocast():
                splits[split] = extract_features(self.features, loader, device=accelerator.device,
                                                 normalize=run.normalize, accelerator=accelerator,
                                                 description=f"caching the {split} features")
        feats, labels, keys = splits.pop("train")
        parts = {"train": training_range(cfg)}
        if cfg.data.holdout_fraction > 0:
            parts["holdout"] = holdout_range(cfg)
        cached = {"val": splits["val"][:2]}
        for part, (start, stop) in parts.items():
            keep = torch.tensor([in_range(k, start, stop) for k in keys], dtype=torch.bool, device=labels.device)
            cached[part] = (feats[keep], labels[keep])
        for part, (_, part_labels) in cached.items():
            run.print(f"cached the {part} features of {len(part_labels)} samples")
        self.train()
        self.cached = {k: v for k, v in cached.items() if k != "train"}
        return FeatureData(*cached["train"], per_device_batch=plan.per_device_batch, accumulation=plan.accumulation,
                           world_size=accelerator.num_processes, rank=accelerator.process_index,
                           steps_per_epoch=plan.steps_per_epoch, seed=cfg.train.seed)

    def validation_batches(self, rank: int, world_size: int, batch_size: int,
                           split: str = "val") -> Optional[Iterable[dict]]:
        if split not in self.cached:
            return None
        return split_for_rank(*self.cached[split], rank=rank, world_size=world_size, batch_size=batch_size)

    # --- evaluation: the heads of the sweep --------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict) -> list[torch.Tensor]:
        features = batch["features"] if "features" in batch else self.features(batch["images"])
        return [head(features.float()) for head in self.heads]

    def summarize(self, results: list[dict], selection: Optional[list[dict]] = None) -> dict:
        """The data.val result of the head chosen (`best_head`, which the export folds in); with a
        sweep, which lr scale it was and every head's results. The head is chosen by its top-1 on the
        held-out training images when data.holdout_fraction is set; otherwise on data.val itself, the
        split it reports, which flatters the number by the choice (say so: `selected_on`)."""
        chooser = selection or results
        best = max(range(len(chooser)), key=lambda i: chooser[i]["top1"])
        metrics = dict(results[best])
        metrics["selected_on"] = "holdout" if selection else "val"
        metrics["best_head"] = best
        if selection:
            metrics["holdout"] = dict(selection[best])
        if len(results) > 1:
            metrics["best_lr_scale"] = self.lr_scales[best]
            metrics["heads"] = [{"lr_scale": s, **r, **({"holdout_top1": h["top1"]} if selection else {})}
                                for s, r, h in zip(self.lr_scales, results, selection or results)]
        return metrics

    def param_groups(self, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
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

    def export_state(self, evaluation: Optional[dict] = None) -> ModelExport:
        """model.safetensors: the frozen encoder with the head `evaluation` chose (its `best_head`; the
        first without one) folded into its `head`, a plain timm classifier."""
        head = self.folded_head((evaluation or {}).get("best_head", 0))
        name = classifier_prefixes(self.encoder)[0]  # `head.` (ViT), `fc.` (a timm ResNet), ...
        state = {**self.encoder.state_dict(), f"{name}weight": head.weight, f"{name}bias": head.bias}
        return ModelExport(state, {**self.encoder.config, "num_classes": head.out_features})
