"""What is trained on top of the shared encoder: one file per method, each a registered `Task`
(tasks/base.py holds the contract). `build(cfg, num_classes)` builds the recipe's task."""
from __future__ import annotations

from .base import ModelExport, RunContext, Task, TaskOutput, register_task, registered_tasks, task_class
from .classify import Classify, ClassifyOutput, build_mixup
from .distill import Distill, DistillOutput, Teacher, build_teacher
from .linear_probe import LinearProbe, ProbeOutput
# before mae: BEiT's checkpoint format (a top-level mask_token and lm_head) is tried before official
# MAE's, whose recogniser also accepts a top-level mask_token (checkpoint.detect_format: first match)
from .beit import BEiT, BEiTOutput, TwoViewCrop
from .dvae import DVAE, DVAEOutput
from .mae import MAE, MAEOutput
from .simmim import SimMIM, SimMIMOutput

__all__ = ["Task", "TaskOutput", "ModelExport", "RunContext", "register_task", "registered_tasks", "task_class",
           "MAE", "MAEOutput", "SimMIM", "SimMIMOutput", "Classify", "ClassifyOutput", "Distill", "DistillOutput",
           "Teacher", "LinearProbe", "ProbeOutput", "build", "build_mixup", "build_teacher",
           "BEiT", "BEiTOutput", "TwoViewCrop", "DVAE", "DVAEOutput"]


def build(cfg, num_classes: int = 0) -> Task:
    """The recipe's task (task.name), its encoder built from `model:`."""
    return task_class(cfg.task.name).build(cfg, num_classes)
