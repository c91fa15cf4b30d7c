"""What is trained on top of the shared encoder: one file per method, each a registered `Task`
(tasks/base.py holds the contract). `build(cfg, num_classes)` builds the recipe's task."""
from __future__ import annotations

from .base import ModelExport, Progress, RunContext, Task, TaskOutput, images_of, register_task, registered_tasks, task_class
from .beit import BEiT, BEiTOutput, TwoViewCrop
from .classify import Classify, ClassifyOutput, build_mixup
from .dino import DINO, DINOOutput
from .distill import Distill, Teacher, build_teacher
from .dvae import DVAE, DVAEOutput
from .linear_probe import LinearProbe, ProbeOutput
from .mae import MAE, MAEOutput
from .simmim import SimMIM, SimMIMOutput

DistillOutput = ClassifyOutput  # DeiT's output is a classifier's (loss, logits, metrics); the old name kept

__all__ = ["Task", "TaskOutput", "Progress", "images_of", "ModelExport", "RunContext", "register_task", "registered_tasks", "task_class",
           "MAE", "MAEOutput", "SimMIM", "SimMIMOutput", "Classify", "ClassifyOutput", "Distill", "DistillOutput",
           "Teacher", "LinearProbe", "ProbeOutput", "build", "build_mixup", "build_teacher",
           "BEiT", "BEiTOutput", "TwoViewCrop", "DVAE", "DVAEOutput", "DINO", "DINOOutput"]


def build(cfg, num_classes: int = 0) -> Task:
    """The recipe's task (task.name), its encoder built from `model:`."""
    return task_class(cfg.task.name).build(cfg, num_classes)
