"""What is trained on top of the shared encoder: one module per method, each owning its head and loss.

    build(cfg, num_classes=...) -> nn.Module whose forward(batch) returns an output with `.loss`
    (a scalar) and `.metrics` (a dict of floats to log); the training loop never asks which task it runs.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ..models.timm_models import create_timm_model
from ..models.vit import VisionTransformer, create_encoder
from .classify import Classify, ClassifyOutput, build_mixup
from .distill import Distill, DistillOutput, Teacher, build_teacher
from .linear_probe import LinearProbe, ProbeOutput
from .mae import MAE, MAEOutput

__all__ = ["MAE", "MAEOutput", "Classify", "ClassifyOutput", "Distill", "DistillOutput", "Teacher", "LinearProbe",
           "ProbeOutput", "build", "build_encoder", "build_mae", "build_teacher", "CLASSIFICATION_TASKS"]

CLASSIFICATION_TASKS = ("classify", "linear_probe", "distill")


def build_encoder(model_cfg, **overrides) -> VisionTransformer:
    """The encoder a recipe's `model:` section describes; `model.arch=timm:NAME` builds timm's model
    NAME instead (locally, never downloading weights), for supervised training only."""
    options = {**OmegaConf.to_container(model_cfg, resolve=True), **overrides}
    arch = options.pop("arch")
    if arch.startswith("timm:"):
        return create_timm_model(arch, options)
    return create_encoder(arch, **options)


def build_mae(cfg, num_classes: int) -> MAE:
    task = cfg.task
    return MAE(build_encoder(cfg.model, num_classes=0), decoder_dim=task.decoder_dim,
               decoder_depth=task.decoder_depth, decoder_heads=task.decoder_heads, mask_ratio=task.mask_ratio,
               norm_pix_loss=task.norm_pix_loss)


def build_classify(cfg, num_classes: int) -> Classify:
    return Classify(build_encoder(cfg.model, num_classes=num_classes), label_smoothing=cfg.task.label_smoothing,
                    mixup=build_mixup(cfg.task, num_classes), head_init_std=cfg.task.head_init_std)


def build_linear_probe(cfg, num_classes: int) -> LinearProbe:
    return LinearProbe(build_encoder(cfg.model, num_classes=0), num_classes, lr_scales=cfg.task.lr_scales,
                       head_init_std=cfg.task.head_init_std)


def build_distill(cfg, num_classes: int) -> Distill:
    task = cfg.task
    encoder = build_encoder(cfg.model, num_classes=num_classes)
    teacher = None
    if task.distillation != "none":
        teacher = build_teacher(task.teacher, num_classes=num_classes, student_img_size=list(encoder.config["img_size"]),
                                student_mean=list(cfg.data.mean), student_std=list(cfg.data.std))
    return Distill(encoder, teacher, distillation=task.distillation, alpha=task.distillation_alpha,
                   tau=task.distillation_tau, label_smoothing=task.label_smoothing,
                   mixup=build_mixup(task, num_classes), head_init_std=task.head_init_std, eval_head=task.eval_head)


BUILDERS = {"mae": build_mae, "classify": build_classify, "linear_probe": build_linear_probe,
            "distill": build_distill}


def build(cfg, num_classes: int = 0):
    return BUILDERS[cfg.task.name](cfg, num_classes)
