"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-
distillation with no labels. Written like the paper's Algorithm 1:

    views = multi_crop(image)                 2 global crops (model.img_size) + N local crops (§3.1)
    student_out = head(encoder(views))        every view through the student
    teacher_out = teacher_head(teacher(views[:2]))   the global views only, no gradient
    loss = H(teacher_out, student_out)        cross-entropy of the centred, sharpened teacher against
                                              the student, over every pair of different views (eq. 3)
    after the update: teacher = lerp(teacher, student, 1 - m), center = lerp(center, batch mean, 1 - c)

The teacher is an exponential moving average of the student (momentum m from 0.996 to 1 by a cosine
over the run, §3.1 "Teacher network"), kept in this module (so checkpoints, resume and exports carry
it) and updated by the contract's step hook `after_update`, after every update that was taken. Its
output is centred (a running mean of its outputs over every rank, momentum 0.9, eq. 4) and sharpened
by a low temperature (0.04, warmed from `warmup_teacher_temp` over the first epochs), the student's
at 0.1 (§3.1). The teacher is what is evaluated (the k-NN monitor) and exported as the backbone, as
the paper evaluates it (§5.1 / appendix: "we use the teacher").

Where ssl_vit differs from main_dino.py, and why: the gradient is clipped by its global norm
(optim.clip_grad, 3.0), not per parameter; while the last layer is frozen (the first epoch) its
gradient is zero rather than absent, so AdamW's decoupled weight decay still shrinks it, which
changes nothing with norm_last_layer (its rows are normalised); the center is updated once per
optimizer step from all its micro-batches (main_dino.py has no accumulation), so one process with
accumulation equals several without.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps
from timm.layers import trunc_normal_
from torchvision.transforms import v2

from ..config import ConfigError, TaskConfig
from ..data.transforms import Transform, decode_pil, pil_to_uint8
from ..models import build_encoder, describe_encoder
from .base import Progress, Task, TaskOutput, encoder_family, images_of, register_task
from .pictures import attention_grid


@dataclass
class DINOConfig(TaskConfig):
    name: str = "dino"
    out_dim: int = 65536                  # K prototypes (appendix, table 9: 65536 works best)
    hidden_dim: int = 2048                # projection head: 3-layer MLP, hidden 2048, GELU (§3.1)
    bottleneck_dim: int = 256             # then l2-normalised, 256-d, into the weight-normalised last layer
    head_layers: int = 3                  # layers of the MLP before the bottleneck (§3.1: 3)
    norm_last_layer: bool = True          # the last layer's norm fixed at 1 (main_dino.py; False for ViT-S there)
    student_temp: float = 0.1             # tau_s (§3.1)
    teacher_temp: float = 0.04            # tau_t after the warm-up (0.04 .. 0.07, appendix D)
    warmup_teacher_temp: float = 0.04     # tau_t at the start, linear to teacher_temp ...
    warmup_teacher_temp_epochs: int = 0   # ... over these epochs (30 in the ViT runs, appendix D)
    center_momentum: float = 0.9          # the center's EMA (eq. 4)
    momentum_teacher: float = 0.996       # lambda, cosine to 1 over the run (§3.1)
    freeze_last_layer: int = 1            # epochs with the last layer fixed (main_dino.py: "helps training")
    global_crops_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])   # RandomResizedCrop scales
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])   # (§3.1, multi-crop)
    local_crops_number: int = 8           # N local views (10 in the best ViT-S/16 run, table 12 / appendix)
    local_crop_size: int = 96             # px, of a 224-px model (§3.1)
    hflip: float = 0.5                    # flip probability of every view (BYOL's augmentations, §3.1)
    color_jitter: float = 0.8             # probability of ColorJitter(0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.2                # probability of turning a view grey (BYOL's, §3.1)
    blur: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])   # Gaussian blur p: global 1, global 2, local
    blur_radius: List[float] = field(default_factory=lambda: [0.1, 2.0])  # PIL radius, uniform (BYOL)
    solarization: float = 0.2             # on the second global view only


class WeightNormLinear(nn.Module):
    """y = x (g v / ||v||)^T without bias (Salimans & Kingma 2016), g and v kept under the names
    torch's weight_norm gives them (weight_g [out, 1], weight_v [out, in]), as DINO's files hold them."""

    def __init__(self, in_features: int, out_features: int, train_norm: bool):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # nn.Linear's initialisation, as DINO's head
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=train_norm)
        self.frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, g = self.weight_v, self.weight_g
        if self.frozen:  # in the graph with a zero gradient: DDP sees every parameter used
            v = v.detach() + 0.0 * v
            g = g.detach() + 0.0 * g
        return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP (GELU) -> l2-normalise -> weight-normalised linear to out_dim (DINO §3.1, appendix)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, layers: int,
                 norm_last_layer: bool):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for index, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            modules.append(nn.Linear(a, b))
            if index < len(dims) - 2:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, train_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, global_views: int = 2) -> torch.Tensor:
    """Eq. 3: the mean over pairs (teacher global view i, student view v != i) of the cross-entropy
    between softmax((t - center) / tau_t) and softmax(s / tau_s); outputs are stacked view by view
    ([V * B, K] and [2 * B, K])."""
    views = student_out.shape[0] // (teacher_out.shape[0] // global_views)
    student = (student_out.float() / student_temp).chunk(views)
    teacher = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach().chunk(global_views)
    total, terms = 0.0, 0
    for i, target in enumerate(teacher):
        for v, prediction in enumerate(student):
            if v == i:
                continue  # the same view for both
            total = total + torch.sum(-target * F.log_softmax(prediction, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


class MultiCrop(Transform):
    """DINO's views of one image (main_dino.py's DataAugmentationDINO): 2 global crops, N local crops,
    each flipped, colour-jittered, maybe greyed, blurred, the second global view maybe solarised.
    uint8 [3, H, W] views in that order; the stream seeds each sample's draws (exact resume)."""

    def __init__(self, cfg, global_size: int):
        t = cfg.task
        jitter = [v2.RandomHorizontalFlip(p=t.hflip),
                  v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                 p=t.color_jitter),
                  v2.RandomGrayscale(p=t.grayscale)]
        bicubic = v2.InterpolationMode.BICUBIC
        self.global_crop = v2.Compose([v2.RandomResizedCrop(global_size, scale=tuple(t.global_crops_scale),
                                                            interpolation=bicubic), *jitter])
        self.local_crop = v2.Compose([v2.RandomResizedCrop(t.local_crop_size, scale=tuple(t.local_crops_scale),
                                                           interpolation=bicubic), *jitter])
        self.local_number, self.blur, self.radius = t.local_crops_number, list(t.blur), tuple(t.blur_radius)
        self.solarization = t.solarization

    def _blur(self, image, p: float):
        if random.random() < p:
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))
        return image

    def decode(self, data: bytes):
        return decode_pil(data)

    def augment(self, image) -> list[torch.Tensor]:
        first = self._blur(self.global_crop(image), self.blur[0])
        second = self._blur(self.global_crop(image), self.blur[1])
        if random.random() < self.solarization:
            second = ImageOps.solarize(second, threshold=128)
        local = [self._blur(self.local_crop(image), self.blur[2]) for _ in range(self.local_number)]
        return [pil_to_uint8(view) for view in (first, second, *local)]


def run_views(encoder: nn.Module, head: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """The class-token features of every view through the head, views of one size run together
    (DINO's MultiCropWrapper): [sum of batch sizes, K], in the order of `views`."""
    outputs, start = [], 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        x = torch.cat(list(views[start:end]))
        outputs.append(encoder.forward_head(encoder.forward_features(x), pre_logits=True))
        start = end
    return head(torch.cat(outputs))


@dataclass(kw_only=True)
class DINOOutput(TaskOutput):
    student: torch.Tensor     # [V * B, K] logits before the temperature
    teacher: torch.Tensor     # [2 * B, K]


@register_task
class DINO(Task):
    """DINO: self-distillation of an EMA teacher across multi-crop views (Caron et al. 2021)."""
    name = "dino"
    Config = DINOConfig
    evaluation = "knn"
    needs_any_image_size = True  # the local crops
    shardable = False            # the teacher is updated from the whole student after every step

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        t = cfg.task
        if cfg.model.get("global_pool", "token") != "token" or not cfg.model.get("class_token", True):
            raise ConfigError(f"task.name=dino trains the class token's output (§3.1): set model.global_pool=token "
                              f"(not {cfg.model.get('global_pool')}) with a class token")
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "local_crop_size"):
            if t[key] < 1:
                raise ConfigError(f"task.{key}={t[key]} must be a positive integer")
        if t.head_layers < 1 or t.local_crops_number < 0 or t.freeze_last_layer < 0 or \
                t.warmup_teacher_temp_epochs < 0:
            raise ConfigError("task.head_layers must be >= 1; task.local_crops_number, task.freeze_last_layer and "
                              "task.warmup_teacher_temp_epochs >= 0")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if not t[key] > 0:
                raise ConfigError(f"task.{key}={t[key]} must be positive")
        for key in ("center_momentum", "momentum_teacher"):
            if not 0 <= t[key] <= 1:
                raise ConfigError(f"task.{key}={t[key]} must be in [0, 1]")
        for key in ("global_crops_scale", "local_crops_scale", "blur_radius"):
            low, high = t[key]
            if not 0 < low <= high or (key != "blur_radius" and high > 1):
                raise ConfigError(f"task.{key}={list(t[key])}: give [low, high] with 0 < low <= high"
                                  f"{' <= 1' if key != 'blur_radius' else ''}")
        if len(t.blur) != 3 or not all(0 <= p <= 1 for p in (*t.blur, t.hflip, t.color_jitter, t.grayscale,
                                                              t.solarization)):
            raise ConfigError("task.blur is three probabilities (first global view, second, local views); the "
                              "probabilities task.hflip, color_jitter, grayscale, solarization are in [0, 1]")
        patch = cfg.model.get("patch_size")
        if patch and t.local_crop_size % patch:
            raise ConfigError(f"task.local_crop_size={t.local_crop_size} is not a multiple of model.patch_size={patch}: "
                              f"use e.g. {max(patch, round(t.local_crop_size / patch) * patch)}")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "DINO":
        t = cfg.task
        student = build_encoder(cfg.model, num_classes=0)
        teacher = build_encoder(cfg.model, num_classes=0, drop_path_rate=0.0)  # the teacher drops no path
        heads = [DINOHead(student.num_features, t.out_dim, t.hidden_dim, t.bottleneck_dim, t.head_layers,
                          t.norm_last_layer) for _ in range(2)]
        return cls(student, teacher, *heads, t)

    @classmethod
    def train_transform(cls, cfg, image_size):
        return MultiCrop(cfg, image_size[0] if isinstance(image_size, (tuple, list)) else image_size)

    def __init__(self, encoder: nn.Module, teacher_encoder: nn.Module, head: DINOHead, teacher_head: DINOHead,
                 task_cfg):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.teacher_encoder, self.teacher_head = teacher_encoder, teacher_head
        self.teacher_encoder.load_state_dict(self.encoder.state_dict())   # the same start (main_dino.py)
        self.teacher_head.load_state_dict(self.head.state_dict())
        for p in (*self.teacher_encoder.parameters(), *self.teacher_head.parameters()):
            p.requires_grad = False
        self.register_buffer("center", torch.zeros(1, task_cfg.out_dim))
        self.cfg = task_cfg
        self.teacher_temp = task_cfg.warmup_teacher_temp
        self._batch_sum: Optional[torch.Tensor] = None   # the teacher outputs of this step's micro-batches
        self._batch_count = 0

    def evaluated_encoder(self) -> nn.Module:
        return self.teacher_encoder

    def _students_and_teachers(self):
        pairs = [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]
        student = [p for s, _ in pairs for p in s.parameters()]
        teacher = [p for _, t in pairs for p in t.parameters()]
        return student, teacher

    # --- the step hooks (tasks/base.py) ------------------------------------------------------

    def teacher_temperature(self, epoch: int) -> float:
        """Linear from warmup_teacher_temp to teacher_temp over the warm-up epochs (np.linspace's
        values, epoch by epoch, as main_dino.py), then constant."""
        c = self.cfg
        warmup = c.warmup_teacher_temp_epochs
        if epoch >= warmup:
            return c.teacher_temp
        if warmup == 1:
            return c.warmup_teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * epoch / (warmup - 1)

    def start_step(self, progress: Progress) -> None:
        self.teacher_temp = self.teacher_temperature(progress.epoch)
        self.head.last_layer.frozen = progress.epoch < self.cfg.freeze_last_layer
        self._batch_sum, self._batch_count = None, 0

    @torch.no_grad()
    def after_update(self, progress: Progress) -> None:
        """The teacher follows the student (momentum: a cosine from momentum_teacher to 1), then the
        center follows the mean teacher output of the step's global batch (every rank's)."""
        momentum = self.momentum(progress)
        student, teacher = self._students_and_teachers()
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1.0 - momentum)
        if self._batch_sum is not None:
            total = torch.cat([self._batch_sum, torch.tensor([[float(self._batch_count)]], device=self.center.device)],
                              dim=1)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total)
            batch_center = total[:, :-1] / total[:, -1:]
            self.center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1.0 - self.cfg.center_momentum)
            self._batch_sum, self._batch_count = None, 0

    def momentum(self, progress: Progress) -> float:
        return progress.cosine(self.cfg.momentum_teacher, 1.0)

    # --- the step ------------------------------------------------------------------------------

    def forward(self, batch) -> DINOOutput:
        views = images_of(batch)
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError("DINO takes a list of views (2 global crops, then the local ones): its MultiCrop "
                             "transform makes them")
        with torch.no_grad():
            teacher = run_views(self.teacher_encoder, self.teacher_head, views[:2])
        student = run_views(self.encoder, self.head, views)
        loss = dino_loss(student, teacher, self.center, self.cfg.student_temp, self.teacher_temp)
        with torch.no_grad():
            total = teacher.float().sum(dim=0, keepdim=True)
            self._batch_sum = total if self._batch_sum is None else self._batch_sum + total
            self._batch_count += teacher.shape[0]
            probabilities = F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1)
            entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(-1).mean()
        # collapse shows as entropy -> 0 (one prototype) or -> log K (uniform), §3.1 / figure 7
        metrics = {"teacher_entropy": entropy, "teacher_temp": torch.tensor(self.teacher_temp)}
        return DINOOutput(loss=loss, metrics=metrics, student=student.detach(), teacher=teacher)

    # --- pictures: where the teacher's class token looks, per head (the paper's figure 1) -----

    def picture_split(self) -> Optional[str]:
        return "val" if encoder_family(self).draws_attention(self.teacher_encoder) else None

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        maps = encoder_family(self).attention_maps(self.teacher_encoder, images, heads=True)
        return {"teacher_attention": attention_grid(denormalize(images), maps)}

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        c = self.cfg
        return (f"task dino on a student and an EMA teacher, each a {describe_encoder(self.encoder)}; heads to {c.out_dim} prototypes; views: 2 global + {c.local_crops_number} local of "
                f"{c.local_crop_size} px; {trainable / 1e6:.2f}M trainable parameters")


__all__ = ["DINO", "DINOConfig", "DINOHead", "DINOOutput", "MultiCrop", "dino_loss", "run_views"]
