"""DeiT distillation (Touvron et al. 2021): a class token and a distillation token on the shared encoder.

    images [B, C, H, W] (+ mixup / cutmix, timm's Mixup)
      -> encoder with [cls, dist] prefix tokens -> head(cls) , head_dist(dist)
      -> class-token loss: cross-entropy to the (mixed, smoothed) labels            weight 1 - alpha
      -> distillation-token loss, against a frozen teacher run on the same images    weight alpha
           hard: cross-entropy to the teacher's argmax (DeiT's default, alpha 1/2, §5 eq. 3)
           soft: KL(teacher || student) at temperature tau, x tau^2 (§5 eq. 2)
           none: the labels again (the "two class tokens" control of §5)
    evaluation: the mean of both heads' logits (DeiT's inference, §5), or one head (task.eval_head)

Why not timm's `TokenDistillationTask`: its soft loss is the KL summed over classes and averaged
over the batch, C times DeiT's (whose code divides the summed KL by batch x classes), so DeiT's
alpha and tau would not carry over; it also takes (input, target) rather than our batch with
mixup, and downloads its teacher by name. We keep DeiT's definition (`soft_distillation_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.models import get_pretrained_cfg

from ..config import CheckpointError, ConfigError, check_choice
from ..models import build_encoder, create_encoder, family_for_arch
from ..models.files import encoder_config_of, export_description, load_model_weights, read_checkpoint, unwrap
from ..models.timm_models import PREFIX, timm_model_name
from .base import HoldsFrozenModule, register_task
from .classify import Classify, ClassifyConfig, ClassifyOutput, build_mixup


@dataclass
class TeacherConfig:
    """DeiT distillation's teacher (Touvron et al. 2021 §4): any timm model, built here and loaded
    from a local file (never downloaded), frozen."""
    arch: Optional[str] = None            # a timm name, e.g. regnety_160 (DeiT's), resnet18; "timm:" optional
    weights: Optional[str] = None         # our model.safetensors, a timm or torchvision state dict (.pth)
    img_size: Optional[int] = None        # None: our export's JSON, else timm's pretrained config (else the student's)
    mean: Optional[List[float]] = None    # None: as img_size
    std: Optional[List[float]] = None     # None: as img_size


@dataclass
class DistillConfig(ClassifyConfig):
    # DeiT distillation (Touvron et al. 2021 §5); defaults are DeiT's code: hard, alpha 0.5, tau 1
    name: str = "distill"
    distillation: str = "hard"            # none | soft | hard
    distillation_alpha: float = 0.5       # weight of the distillation-token loss; 1 - alpha on the class token's
    distillation_tau: float = 1.0         # soft: temperature
    eval_head: str = "mean"               # evaluation: mean of both heads | cls | dist
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


DISTILLATION_TYPES = ("none", "soft", "hard")


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """DeiT's soft loss: KL(softmax(t / tau) || softmax(s / tau)) summed, x tau^2, divided by
    batch x classes (DeiT's losses.py, `outputs_kd.numel()`)."""
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="sum", log_target=True)
    return kl * (tau * tau) / student_logits.numel()


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard loss: cross-entropy to the teacher's decision."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))




class Teacher(nn.Module):
    """A frozen classifier seen through its own input: the student's normalised images are brought
    back to pixels, normalised with the teacher's statistics and resized to its input size (bicubic)
    when these differ. Always in eval mode, never trained."""

    def __init__(self, model: nn.Module, *, student_mean: Sequence[float], student_std: Sequence[float],
                 mean: Sequence[float], std: Sequence[float], img_size: Optional[Sequence[int]] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.img_size = list(img_size) if img_size is not None else None
        self.same_normalisation = list(student_mean) == list(mean) and list(student_std) == list(std)
        for name, values in (("student_mean", student_mean), ("student_std", student_std), ("mean", mean), ("std", std)):
            self.register_buffer(name, torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.eval()

    def describe(self) -> str:
        arch = getattr(self.model, "config", {}).get("arch") or type(self.model).__name__
        size = "x".join(map(str, self.img_size)) if self.img_size else "the student's size"
        norm = "the student's normalisation" if self.same_normalisation else (
            f"mean {[round(v, 3) for v in self.mean.flatten().tolist()]}, std {[round(v, 3) for v in self.std.flatten().tolist()]}")
        return f"{arch} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M parameters), frozen; input {size}, {norm}"

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # BatchNorm statistics and dropout stay frozen

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.same_normalisation:
            pixels = images * self.student_std.to(images.dtype) + self.student_mean.to(images.dtype)
            images = (pixels - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.img_size is not None and list(images.shape[-2:]) != self.img_size:
            images = F.interpolate(images, size=self.img_size, mode="bicubic", align_corners=False, antialias=True)
        return self.model(images)


@register_task
class Distill(HoldsFrozenModule, Classify):
    """DeiT distillation: a distillation token taught by a frozen teacher (Touvron et al. 2021).
    The teacher is held outside the module tree: not in `state_dict` (checkpoints, exports), the
    optimizer or DDP; `.to()` still moves it."""
    name = "distill"
    Config = DistillConfig
    frozen_module = "teacher"             # copies share it: a RegNetY-16GF is 84M parameters that never change

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        check_choice(cfg, "task.distillation", DISTILLATION_TYPES)
        check_choice(cfg, "task.eval_head", ("mean", "cls", "dist"))
        task = cfg.task
        if not 0 <= task.distillation_alpha <= 1 or task.distillation_tau <= 0:
            raise ConfigError(f"task.distillation_alpha={task.distillation_alpha} must be in [0, 1] and "
                              f"task.distillation_tau={task.distillation_tau} positive")
        if not cfg.model.get("dist_token", False):
            raise ConfigError("task.name=distill needs model.dist_token=true (DeiT's distillation token)")
        weights = task.teacher.weights
        if task.distillation != "none" and weights and not Path(weights).is_file():
            raise ConfigError(f"task.teacher.weights={weights}: no such file (a trained classifier: our "
                              "model.safetensors, a timm or torchvision state dict)")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "Distill":
        task = cfg.task
        encoder = build_encoder(cfg.model, num_classes=num_classes)
        teacher = None
        if task.distillation != "none":
            teacher = build_teacher(task.teacher, num_classes=num_classes, student_img_size=list(encoder.config["img_size"]),
                                    student_mean=list(cfg.data.mean), student_std=list(cfg.data.std))
        return cls(encoder, teacher, distillation=task.distillation, alpha=task.distillation_alpha,
                   tau=task.distillation_tau, label_smoothing=task.label_smoothing, mixup=build_mixup(task, num_classes),
                   head_init_std=task.head_init_std, eval_head=task.eval_head)

    def describe(self) -> str:
        text = super().describe()
        return text + (f"\nteacher: {self.teacher.describe()}" if self.teacher is not None else "")

    def __init__(self, encoder: nn.Module, teacher: Optional[Teacher], *, distillation: str = "hard",
                 alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0, mixup: Optional[Mixup] = None,
                 head_init_std: Optional[float] = 0.02, eval_head: str = "mean"):
        if encoder.head_dist is None:
            raise ValueError("distillation needs an encoder with a distillation token (model.dist_token=true)")
        if distillation not in DISTILLATION_TYPES:
            raise ValueError(f"distillation={distillation!r}: use one of {', '.join(DISTILLATION_TYPES)}")
        if distillation != "none" and teacher is None:
            raise ValueError(f"distillation={distillation!r} needs a teacher (task.teacher.weights)")
        super().__init__(encoder, label_smoothing=label_smoothing, mixup=mixup, head_init_std=head_init_std)
        self.distillation, self.alpha, self.tau, self.eval_head = distillation, alpha, tau, eval_head
        self.__dict__["teacher"] = teacher  # a plain attribute: see the class docstring

    def forward(self, batch: dict) -> ClassifyOutput:
        images, labels = batch["images"], batch["labels"]
        targets = labels
        if self.training and self.mixup is not None:
            images, targets = self.mixup(images, labels)  # both tokens and the teacher see the mixed images
        cls_logits, dist_logits = self.encoder.forward_heads(self.encoder.forward_features(images))
        class_loss = self.criterion(cls_logits.float(), targets)
        if self.distillation == "none":
            token_loss = self.criterion(dist_logits.float(), targets)
        else:
            teacher_logits = self.teacher_logits(images)
            if self.distillation == "soft":
                token_loss = soft_distillation_loss(dist_logits.float(), teacher_logits, self.tau)
            else:
                token_loss = hard_distillation_loss(dist_logits.float(), teacher_logits)
        loss = (1 - self.alpha) * class_loss + self.alpha * token_loss
        metrics = {"class_loss": class_loss.detach(), "distillation_loss": token_loss.detach()}  # on the device
        if targets is labels:
            metrics["train_top1"] = 100.0 * ((cls_logits + dist_logits).argmax(1) == labels).float().mean()
        return ClassifyOutput(loss=loss, logits=(cls_logits + dist_logits) / 2, metrics=metrics)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).float()

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        images = batch["images"]
        if self.eval_head == "mean":
            return self.encoder(images)  # the encoder's own eval output: the mean of both heads
        cls_logits, dist_logits = self.encoder.forward_heads(self.encoder.forward_features(images))
        return cls_logits if self.eval_head == "cls" else dist_logits


# -------------------------------------------------------------------------------------------
# the teacher: any timm classifier, or one of our exports, from a local file


def build_teacher(teacher_cfg, *, num_classes: int, student_img_size: Sequence[int], student_mean: Sequence[float],
                  student_std: Sequence[float]) -> Teacher:
    """Build `task.teacher.arch` locally (pretrained=False: never downloaded) and load
    `task.teacher.weights` strictly. Our exports say their own architecture and input (the JSON);
    for other files the input size and normalisation come from timm's pretrained config of the arch,
    unless task.teacher.img_size / mean / std say otherwise."""
    if not teacher_cfg.weights:
        raise ConfigError("distillation needs task.teacher.weights=PATH (a trained classifier: our "
                          "model.safetensors, a timm or torchvision state dict); or task.distillation=none")
    path = Path(teacher_cfg.weights)
    if not path.is_file():
        raise ConfigError(f"task.teacher.weights={teacher_cfg.weights}: no such file")
    ours = encoder_config_of(path)
    arch = teacher_cfg.arch or (ours or {}).get("arch")
    if not arch:
        raise ConfigError(f"task.teacher.arch is needed for {path.name} (not one of our exports): a timm model "
                          "name, e.g. task.teacher.arch=regnety_160 for DeiT's teacher")
    data = export_description(path).get("data") or {}
    if arch.startswith(PREFIX) or ours is None:
        name = timm_model_name(arch, "task.teacher.arch")
        pretrained = get_pretrained_cfg(name)  # timm's defaults for the arch: classifier name, input
        classifier = pretrained.classifier if pretrained is not None else "head"
        state, _ = unwrap(read_checkpoint(path)[0])
        weight = state.get(f"{classifier}.weight", state.get(f"encoder.{classifier}.weight"))
        default_size = list(pretrained.input_size[1:]) if pretrained is not None else list(student_img_size)
        model = family_for_arch(PREFIX + name).create(
            PREFIX + name, num_classes=int(weight.shape[0]) if weight is not None else num_classes,
            in_chans=(ours or {}).get("in_chans", 3), key="task.teacher.arch")
        try:
            load_model_weights(model, state, strict=True)
        except CheckpointError as e:
            raise ConfigError(f"task.teacher.weights={path} does not fit timm's {name}: {e}; is task.teacher.arch "
                              "right?") from None
        default_mean = pretrained.mean if pretrained is not None else student_mean
        default_std = pretrained.std if pretrained is not None else student_std
    else:  # one of our exports (e.g. a fine-tuned, larger ViT)
        model = create_encoder(**ours)
        load_model_weights(model, path, strict=True)
        default_size, default_mean, default_std = list(model.config["img_size"]), student_mean, student_std
    outputs = getattr(model, "num_classes", None)
    if outputs != num_classes:
        raise ConfigError(f"the teacher {path.name} predicts {outputs} classes, the student {num_classes}")
    if ours is not None:  # our exports record their input
        default_size = list(ours.get("img_size", default_size))
        default_mean, default_std = data.get("mean", default_mean), data.get("std", default_std)
    size = teacher_cfg.img_size or default_size
    size = [size, size] if isinstance(size, int) else list(size)
    return Teacher(model, student_mean=student_mean, student_std=student_std,
                   mean=list(teacher_cfg.mean or default_mean), std=list(teacher_cfg.std or default_std), img_size=size)
