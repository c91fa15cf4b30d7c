"""The task contract: what a method trained on top of the shared encoder says about itself.

A task is one file in ssl_vit/tasks/ holding one `Task` subclass decorated with `@register_task`;
`task.name` picks it. The training loop, evaluation, the optimizer, checkpoints, exports and pictures
call what is written here and never ask which task they run.

    @register_task
    class MAE(Task):
        name = "mae"                    # task.name
        Config = MAEConfig              # its `task:` keys, a dataclass extending config.TaskConfig
        needs_labels = False            # training batches must carry class labels (model.num_classes)
        trains_encoder = True           # False: the encoder stays frozen (linear probing)
        evaluation = "knn"              # the protocol it is measured by (eval/protocols.py): "top-k" (predict()
                                        # on data.val), "knn" (the k-NN monitor of the encoder) or "none"
        encoder_forwards = {"visible"}  # what it asks of the encoder's forward_features (models/base.py)

        validate(cfg)                   # its own rules, before anything is built (ConfigError)
        build(cfg, num_classes)         # the module, from the recipe                        (required)
        forward(batch)                  # -> a TaskOutput: .loss (scalar) and .metrics (dict of 0-d tensors,
                                        #    kept on the device: the loop reads them when it logs)  (required)
        describe()                      # what was built, printed at start-up

    and, where the defaults below do not fit:
        param_groups(weight_decay, layer_decay)   the encoder's groups (its group_matcher and
                                        no_weight_decay, through timm) + the task's own parameters
        no_weight_decay()               its own parameters (outside the encoder) kept out of weight decay
        predict(batch) / summarize(results, selection)   top-k evaluation (a list of logits for several
                                        heads; choices made on `selection`, the held-out split, if any;
                                        summarize is pure: what it chooses is in the metrics it returns)
        train_transform(cfg, image_size)  a training transform of its own (several views of one crop)
        training_data(run) / validation_batches(rank, world_size, batch_size, split)   data of its own
        picture_split() / pictures(images, denormalize)   what TensorBoard shows every log.images_every
        reconstructs, reconstruct(images, seed)           tools/visualize.py reconstruct
        export_state(evaluation)        model.safetensors (default: its state, encoder keys unprefixed) and any
                                        other files of its own (a tokenizer), given the evaluation it
                                        is exported at (a probe folds the head that evaluation chose)
        fit_state_dict(state, metadata, report)   its own tensors in a file -> this module's shapes
        checkpoint_format(state) / convert_checkpoint(state, module, report)   the task's own file
                                        format (official MAE with its decoder): recognised by its keys
                                        (a file claimed by two tasks is an error, whatever the import
                                        order), and what another module keeps of such a file
        config_from_state(state, recorded)   the `task:` keys a foreign file implies

    and, for a method with more of the loop (an EMA teacher, schedules of its own):
        start_step(progress)            before every optimizer step's first forward (after a resume too):
                                        set what is a function of the step (DINO's teacher temperature)
        after_update(progress)          after every optimizer update that was taken (not after a skipped
                                        non-finite step), `progress.step` the update's index: DINO's EMA
                                        teacher. A pure function of the step and the weights, so a resumed
                                        run equals an uninterrupted one, and ranks stay equal under DDP
                                        without a broadcast
        evaluated_encoder()             the encoder the k-NN monitor measures and backbone.safetensors holds
                                        (DINO's teacher); default: `encoder`
        needs_any_image_size            its views have other sizes than model.img_size (multi-crop): the
                                        encoder's family must say `any_image_size`
        shardable                       False: refused with train.sharding=fsdp (a teacher kept whole)
`register_task` refuses a class that lacks `name`, `build` or `forward`, naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..config import ConfigError, TaskConfig
from ..models import LoadReport, describe_encoder, family_for_arch, family_of
from ..models.base import register_unique
from .param_groups import own_param_groups, param_groups

EVALUATIONS = ("top-k", "knn", "none")


@dataclass
class TaskOutput:
    """What forward returns; a task's own output extends it with keyword-only fields (MAE's pred and
    mask), e.g. `@dataclass(kw_only=True) class MAEOutput(TaskOutput)`."""
    loss: torch.Tensor                  # scalar
    metrics: dict = field(default_factory=dict)


def images_of(batch: Union[dict, torch.Tensor]) -> torch.Tensor:
    """A batch's images: forward(batch) takes the loader's dict, or the images alone (tests, tools)."""
    return batch["images"] if isinstance(batch, dict) else batch


@dataclass
class ModelExport:
    """What model.safetensors holds: tensors, the encoder config to rebuild it, and whether the file
    is a plain timm model (then its JSON carries the timm.create_model command); `files`: other files
    of the task's, {name: write(path)}, written beside it (the dVAE's tokenizer.safetensors)."""
    state: dict
    encoder_config: dict
    timm_loadable: bool = True
    files: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Where a run is, for a task's step hooks: `step` optimizer updates done before the one at hand
    (so the first is 0), of `total_steps` (the schedule's length, optim.epochs), `steps_per_epoch`."""
    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def cosine(self, start: float, end: float) -> float:
        """start -> end by a half cosine over the run (DINO's cosine_scheduler without warm-up)."""
        progress = min(1.0, self.step / max(1, self.total_steps))
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


@dataclass
class RunContext:
    """What a task may use to make its own data: the run's config, Accelerate, the derived plan, the
    device-side normalisation, the training split and the main process's printer."""
    cfg: Any
    accelerator: Any
    plan: Any
    normalize: Any
    source: Any
    print: Any


class HoldsFrozenModule:
    """For a task that keeps a frozen module (DeiT's teacher, BEiT's tokenizer) as a plain attribute
    named `frozen_module`, outside the module tree: not in the state dict (checkpoints, exports), the
    optimizer, DDP / FSDP or EMA copies. Copies of the task (timm's EMA deep-copies it) share the
    module, and `.to()` moves it with the task, so it runs on the device in the data-parallel step.
    Put it before Task among the bases."""
    frozen_module: ClassVar[str]

    def __deepcopy__(self, memo):
        import copy

        frozen = self.__dict__.get(self.frozen_module)
        if frozen is not None:
            memo[id(frozen)] = frozen
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        return copied

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        frozen = self.__dict__.get(self.frozen_module)
        if frozen is not None:
            frozen._apply(fn, recurse)
        return self


class Task(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type] = TaskConfig
    needs_labels: ClassVar[bool] = False
    trains_encoder: ClassVar[bool] = True
    evaluation: ClassVar[str] = "knn"
    encoder_forwards: ClassVar[frozenset] = frozenset()
    needs_any_image_size: ClassVar[bool] = False
    shardable: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = False
    encoder: nn.Module

    # --- what the recipe says ---------------------------------------------------------------

    @classmethod
    def validate(cls, cfg) -> None:
        """The task's rules over its `task:` keys (and their interplay with the others): ConfigError."""
        family = family_for_arch(cfg.model.arch)
        missing = cls.encoder_forwards - family.masked_forwards
        if missing:
            raise ConfigError(f"task.name={cls.name} needs the encoder's {', '.join(sorted(missing))} forward, which "
                              f"model.arch={cfg.model.arch} ({family.name} encoders) does not have; use an encoder "
                              f"that does (e.g. model.arch=vit_base_patch16)")
        if cls.needs_any_image_size and not family.any_image_size:
            raise ConfigError(f"task.name={cls.name} runs the encoder on views of other sizes than model.img_size "
                              f"(multi-crop), which model.arch={cfg.model.arch} ({family.name} encoders) cannot: "
                              "its position tables or windows are fixed to one size. Use a ViT or BEiT's encoder "
                              "(model.arch=vit_* or beit_*)")
        if not cls.shardable and cfg.train.sharding == "fsdp":
            raise ConfigError(f"task.name={cls.name} keeps a teacher updated from the student's whole weights "
                              "after every step, which train.sharding=fsdp would split: use train.sharding=ddp")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "Task":
        raise NotImplementedError

    def forward(self, batch: dict) -> TaskOutput:
        raise NotImplementedError

    def describe(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return f"task {self.name} on a {describe_encoder(self.encoder)}; {trainable / 1e6:.2f}M trainable parameters"

    # --- training ----------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
        """The encoder's groups (timm's, from its group_matcher / no_weight_decay) when it trains, then
        the task's own parameters (heads, decoders) at the full lr."""
        groups = param_groups(self.encoder, weight_decay, layer_decay) if self.trains_encoder else []
        own = [(n, p) for n, p in self.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
        return groups + own_param_groups(own, weight_decay, self.no_weight_decay())

    def no_weight_decay(self) -> set[str]:
        return set()

    def start_step(self, progress: Progress) -> None:
        """Before every optimizer step's first forward: set what is a function of the step."""

    def after_update(self, progress: Progress) -> None:
        """After every optimizer update that was taken (progress.step: its index), e.g. an EMA teacher."""

    @classmethod
    def has_step_hooks(cls) -> bool:
        return cls.start_step is not Task.start_step or cls.after_update is not Task.after_update

    def evaluated_encoder(self) -> nn.Module:
        """The encoder that is measured (the k-NN monitor) and exported as backbone.safetensors."""
        return self.encoder

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one: the encoder's blocks (its family says which), and the
        task's own blocks where it has some (MAE's decoder)."""
        return family_of(self.encoder).fsdp_units(self.encoder)

    @classmethod
    def train_transform(cls, cfg, image_size):
        """A training transform of the task's own (bytes -> uint8 [C, H, W], or a dict of such views of
        one crop, each stacked into the batch under its key: BEiT's model and tokenizer views), or
        None for the data's (data.train_transform). Only batch["images"] is normalised on the device."""
        return None

    def training_data(self, run: RunContext):
        """Data of the task's own making (e.g. cached features), or None for the shard loader."""
        return None

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluated encoder's pooled features [B, D] (what its head reads): the k-NN monitor's."""
        encoder = self.evaluated_encoder()
        return encoder.forward_head(encoder.forward_features(images), pre_logits=True)

    def predict(self, batch: dict) -> Union[torch.Tensor, Sequence[torch.Tensor]]:
        """Logits for the top-k evaluation (batch["images"] normalised), or one per head."""
        raise NotImplementedError(f"task {self.name} is not evaluated by top-k accuracy")

    def summarize(self, results: list[dict], selection: Optional[list[dict]] = None) -> dict:
        """The evaluation's metrics from one result per head of predict() on data.val; `selection`:
        the same on the held-out training images (data.holdout_fraction), which choices (the best
        model, the best head) are made on instead of data.val."""
        metrics = dict(results[0])
        metrics["selected_on"] = "holdout" if selection else "val"
        if selection:
            metrics["holdout"] = dict(selection[0])
        return metrics

    def validation_batches(self, rank: int, world_size: int, batch_size: int,
                           split: str = "val") -> Optional[Iterable[dict]]:
        """Data of the task's own making for an evaluation split ("val", or "holdout": the held-out
        training images), or None for the shard loader of that split."""
        return None

    # --- pictures ----------------------------------------------------------------------------

    def picture_split(self) -> Optional[str]:
        """Which split's first images TensorBoard shows ("train" or "val"), or None for no pictures."""
        return None

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        """{TensorBoard tag: image grid [3, H, W] in [0, 1]} for normalised images."""
        return {}

    def reconstruct(self, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"task {self.name} does not reconstruct images")

    # --- files -------------------------------------------------------------------------------

    def export_state(self, evaluation: Optional[dict] = None) -> ModelExport:
        """model.safetensors: the task's tensors with the encoder's keys at the top level (timm's
        names), its own beside them. `evaluation`: the metrics the export is made at (the final
        evaluation, or the best one for model_best), for a task whose export depends on a choice
        the evaluation made."""
        prefix = "encoder."
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in self.state_dict().items()}
        own = any(not k.startswith(prefix) for k in self.state_dict())
        return ModelExport(state, dict(self.encoder.config), timm_loadable=not own)

    def fit_state_dict(self, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        """Make a file's tensors for the task's own parts (keys outside `encoder.`) fit this module."""
        return state

    @classmethod
    def checkpoint_format(cls, state: Mapping[str, torch.Tensor]) -> Optional[str]:
        """The name of this task's own file format if `state` is one (an MAE decoder's keys), else None."""
        return None

    @classmethod
    def convert_checkpoint(cls, state: dict[str, torch.Tensor], module: nn.Module, report: LoadReport) -> dict:
        """A file of this task's format, for `module` (this task, another task or a bare encoder): what
        `module` has no place for is dropped, each part with a note in `report`."""
        return state

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], recorded: Mapping[str, Any],
                          path: str = "") -> dict[str, Any]:
        """The `task:` keys a file (at `path`) implies, from its tensors' shapes and what it recorded
        (our JSON's task section, or an official checkpoint's training arguments)."""
        return {}


# -------------------------------------------------------------------------------------------
# the registry

_TASKS: dict[str, type[Task]] = {}


REQUIRED = ("build", "forward")  # what Task cannot do for a method


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available as task.name=<cls.name>, once it has what the contract
    requires (a task without forward would fail at its first step, not here)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)) or not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__}: a task subclasses ssl_vit.tasks.Task and sets `name`")
    missing = [member for member in REQUIRED
               if not any(member in klass.__dict__ for klass in cls.__mro__[:cls.__mro__.index(Task)])]
    if missing:
        raise TypeError(f"{cls.__name__} (task {cls.name!r}) does not define {', '.join(missing)}, which every task "
                        "must (see ssl_vit/tasks/base.py)")
    if cls.evaluation not in EVALUATIONS:
        raise TypeError(f"{cls.__name__}.evaluation={cls.evaluation!r}: use one of {', '.join(EVALUATIONS)}")
    if not issubclass(cls.Config, TaskConfig):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass extending ssl_vit.config.TaskConfig")
    return register_unique(_TASKS, "tasks", cls)


def registered_tasks() -> dict[str, type[Task]]:
    return dict(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ConfigError(f"task.name={name!r} is not one of: {', '.join(_TASKS)} (a task of your own registers "
                          "itself with @register_task in a module named under imports:)")
    return _TASKS[name]


def encoder_family(task: Task):
    """The family of a task's encoder (pictures, exports)."""
    return family_of(task.encoder)
