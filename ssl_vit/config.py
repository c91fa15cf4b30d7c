"""The bottom layer: the recipe schema (typed dataclasses), the errors, and the rules of the general
sections. It imports nothing of ssl_vit's: loading, the sections tasks and encoder families own and
their rules are in ssl_vit/recipes/, above the registries.

    recipe=NAME | recipe=path.yaml  ->  recipes/NAME.yaml (+ its `base:` chain, oldest first)
                                    ->  merged onto the schema's defaults; `task:` and `model:`
                                        typed by the task / encoder family they select
                                    ->  `a.b=c` overrides from the command line
                                    ->  validated: unknown keys, wrong types, bad choices and
                                        missing data stop here with a message naming the key.

The defaults below are the MAE-Base pre-training settings (He et al. 2022, appendix A.1);
recipes say only what differs and cite where each value comes from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MAKE_SHARDS_HINT = ("make shards with `python tools/make_shards.py /path/to/images shards/NAME` and pass "
                    "e.g. data.train='shards/NAME-{000000..000099}.tar' or data.train=shards/NAME.json")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to do instead."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says why and what to do."""


# -------------------------------------------------------------------------------------------
# schema


@dataclass
class ModelConfig:
    """The keys every encoder family has; each family's own section (ViT's patch size, width, ...)
    extends this in its file under ssl_vit/models/ and is picked by `model.arch`."""
    arch: str = "vit_base_patch16"       # a named size of a registered family, or timm:NAME
    img_size: Any = 224                   # int, or [height, width]
    in_chans: int = 3                     # image channels
    num_classes: int = 0                  # 0: features only (classification tasks: from the data)
    drop_path_rate: float = 0.0           # stochastic depth, rising linearly to this at the last block


@dataclass
class TaskConfig:
    """The key every task has; each task's own section (MAE's mask_ratio, ...) extends this in its
    file under ssl_vit/tasks/ and is picked by `task.name`."""
    name: str = "mae"                     # a registered task: mae | classify | linear_probe | distill | ...


@dataclass
class DataConfig:
    name: str = "shards"                  # shards (data.train / data.val) | digits (embedded)
    train: Any = None                     # brace pattern, a::b, [list], pipe: command, or index .json
    val: Any = None                       # the validation split, as data.train
    batch_size: int = 64                  # per device; optim.batch_size is the global batch
    num_workers: int = 8                  # loader processes per rank (at most the cores)
    samples_per_epoch: Optional[int] = None  # None: the shard index's count
    shuffle_buffer: int = 5000            # samples, per loader worker
    # worker-side augmentation (ssl_vit/data/transforms.py)
    train_transform: str = "rrc"          # rrc | randaug | eval
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5                    # horizontal-flip probability (training)
    auto_augment: Optional[str] = None    # timm RandAugment spec for randaug, e.g. rand-m9-mstd0.5-inc1
    crop_pct: float = 0.875               # eval: resize to img_size / crop_pct, centre crop
    random_erasing: float = 0.0           # on the device, after normalisation
    train_fraction: float = 1.0           # keep this fraction of the training samples (few-label runs)
    holdout_fraction: float = 0.0         # hold out this fraction of train to select on (the best epoch / lr) instead of data.val
    repeated_aug: int = 1                 # k augmented views of each decoded sample (DeiT: 3, Hoffer et al. 2020)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet statistics
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per channel, with data.mean


@dataclass
class OptimConfig:
    name: str = "adamw"                   # adamw | lars
    batch_size: int = 4096                # global batch, over all devices and accumulation steps
    blr: Optional[float] = 1.5e-4         # base lr: lr = blr * batch_size / lr_base_batch (MAE A.1)
    lr: Optional[float] = None            # absolute lr; set it instead of blr
    lr_base_batch: int = 256              # the batch blr is quoted for (MAE 256, DeiT 512)
    min_lr: float = 0.0                   # where the cosine ends
    weight_decay: float = 0.05            # decoupled (AdamW); not on biases, norms, tokens, position tables
    weight_decay_end: Optional[float] = None  # set: weight decay from weight_decay to this by a cosine over the run (DINO)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's
    momentum: float = 0.9                 # LARS / SGD
    epochs: float = 800                   # the schedule's length; fractions allowed
    warmup_epochs: float = 40             # linear warm-up from 0, then cosine
    clip_grad: Optional[float] = None     # max global gradient norm; None: no clipping
    layer_decay: Optional[float] = None   # layer-wise lr decay (BEiT, MAE fine-tuning)
    schedule: str = "cosine"              # after warm-up: cosine (to min_lr) | step (x lr_gamma at each of lr_milestones)
    lr_milestones: List[float] = field(default_factory=list)  # step schedule: the epochs where the lr drops
    lr_gamma: float = 0.1                 # step schedule: the factor at each milestone


@dataclass
class TrainConfig:
    output_dir: str = "runs/${recipe}"    # config, logs, checkpoints and exports of the run
    seed: int = 0                         # initialisation, masks, augmentations, data order
    precision: str = "auto"               # auto (bf16 where the GPU or CPU has it natively, else fp32) | bf16 | fp16 | no
    compile: bool = False                 # torch.compile the model
    sharding: str = "ddp"                 # ddp (a whole copy per rank) | fsdp (FSDP2: blocks sharded over the ranks)
    grad_checkpointing: bool = False      # recompute the blocks in the backward pass (less memory)
    max_steps: Optional[int] = None       # stop early; the schedule still follows optim.epochs
    checkpoint_every: int = 1000          # optimizer steps
    keep_checkpoints: int = 2             # complete checkpoints kept (the newest)
    max_nonfinite_steps: int = 10         # stop (with a checkpoint) after this many skipped steps in a row
    ema_decay: Optional[float] = None     # keep an exponential moving average of the weights (timm's)


@dataclass
class EvalConfig:
    every_epochs: int = 1                 # classification: evaluate on data.val every N epochs (0: at the end only)
    batch_size: Optional[int] = None      # None: data.batch_size
    knn_k: int = 20                       # k-NN monitor (DINO, Caron et al. 2021): k and temperature
    knn_temperature: float = 0.07         # the vote's temperature
    knn_every: int = 0                    # steps between k-NN evaluations during training (0: off)


@dataclass
class LogConfig:
    every: int = 20                       # optimizer steps between scalar logs
    images_every: int = 1000              # optimizer steps between image logs
    tensorboard: bool = True              # write TensorBoard events into output_dir/tensorboard


@dataclass
class Config:
    recipe: str = ""                      # a recipe name (recipes/NAME.yaml) or a .yaml path
    imports: List[str] = field(default_factory=list)  # modules or .py files registering tasks / encoders of your own
    init: Optional[str] = None            # weights to start from: a path, or "random"
    like: Optional[str] = None            # with init=random: take the architecture and input of this export or run folder
    init_partial: bool = False            # accept an init file that leaves most of the encoder as initialised
    resume: str = "auto"                  # auto (newest checkpoint in output_dir) | false | PATH
    print_config: bool = False            # print the resolved config and exit
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Choices checked by `validate`; tasks and encoder families check their own (`check_choice`).
CHOICES = {
    "data.name": ("shards", "digits"),
    "data.train_transform": ("rrc", "randaug", "eval"),
    "optim.name": ("adamw", "lars"),
    "optim.schedule": ("cosine", "step"),
    "train.precision": ("auto", "bf16", "fp16", "no"),
    "train.sharding": ("ddp", "fsdp"),
}

# Sections whose keys depend on a value in them: `task:` on task.name (each task's own Config) and
# `model:` on model.arch (each encoder family's own Config).
SELECTED_SECTIONS = {"task": "name", "model": "arch"}


# -------------------------------------------------------------------------------------------
# validation: what the types alone cannot say


def check_choice(cfg: DictConfig, key: str, options: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in options:
        hint = (f" (YAML reads an unquoted no / off / yes / on as a boolean: write {key.split('.')[-1]}: 'no' in a "
                "recipe)" if value in ("True", "False") else "")
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}{hint}")


def check_general(cfg: DictConfig) -> None:
    """The rules of the general sections (the encoder family's and the task's own are theirs:
    recipes/validation.py calls all three)."""
    for key, options in CHOICES.items():
        check_choice(cfg, key, options)
    img_size = cfg.model.img_size
    if isinstance(img_size, (int, float)) and not isinstance(img_size, bool):
        sizes = [img_size]
    elif OmegaConf.is_list(img_size) and len(img_size) == 2:
        sizes = list(img_size)
    else:
        sizes = None
    if sizes is None or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ConfigError(f"model.img_size={show(img_size)}: give a positive int or [height,width], e.g. model.img_size=224")
    for key in ("data.batch_size", "optim.batch_size", "optim.lr_base_batch", "train.checkpoint_every",
                "train.keep_checkpoints", "train.max_nonfinite_steps", "log.every", "log.images_every"):
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be positive")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    try:  # an interpolation that names nothing (train.output_dir='${oops}') stops here, not mid-run
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or 'a value'}: {str(e).splitlines()[0]}") from None
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} must be positive (train.max_steps=null runs the "
                          "whole schedule)")
    for key in ("optim.blr", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.weight_decay_end",
                "optim.clip_grad", "optim.momentum", "optim.epochs", "optim.warmup_epochs"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number")
    for key in ("optim.blr", "optim.lr", "optim.clip_grad"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    for key in ("optim.min_lr", "optim.weight_decay", "optim.weight_decay_end"):
        if (OmegaConf.select(cfg, key) or 0) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be >= 0")
    if not 0 <= cfg.optim.momentum < 1 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.momentum={cfg.optim.momentum} and optim.betas={list(cfg.optim.betas)} must be in [0, 1)")
    if cfg.optim.blr is None and cfg.optim.lr is None:
        raise ConfigError("set optim.blr (scaled by the global batch) or optim.lr (absolute)")
    if cfg.optim.blr is not None and cfg.optim.lr is not None:
        raise ConfigError(f"optim.lr={cfg.optim.lr} and optim.blr={cfg.optim.blr} are both set: keep one "
                          "(pass optim.blr=null to use an absolute lr)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={show(cfg.optim.betas)} must hold two values, e.g. optim.betas=[0.9,0.95]")
    if cfg.optim.schedule == "step" and (not cfg.optim.lr_milestones or not 0 < cfg.optim.lr_gamma < 1):
        raise ConfigError(f"optim.schedule=step needs optim.lr_milestones (epochs, e.g. [700]) and 0 < optim.lr_gamma "
                          f"< 1 (given {list(cfg.optim.lr_milestones)}, {cfg.optim.lr_gamma})")
    if cfg.optim.schedule == "cosine" and cfg.optim.lr_milestones:
        raise ConfigError(f"optim.lr_milestones={list(cfg.optim.lr_milestones)} is for optim.schedule=step; the "
                          "cosine schedule would ignore it")
    if cfg.optim.epochs <= 0 or not 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs:
        raise ConfigError(f"need 0 <= optim.warmup_epochs ({cfg.optim.warmup_epochs}) <= optim.epochs "
                          f"({cfg.optim.epochs}) and optim.epochs > 0")
    for split in ("train", "val"):
        spec = cfg.data[split]
        if spec is not None and not isinstance(spec, str) and not (
                OmegaConf.is_list(spec) and all(isinstance(s, str) for s in spec)):
            raise ConfigError(f"data.{split}={show(spec)}: give a shard pattern, a list of shards or an index .json")
        if spec and cfg.data.name == "digits":  # the embedded set would be used and the shards ignored
            shown = spec if isinstance(spec, str) else show(spec)
            raise ConfigError(f"data.{split}={shown} is given but data.name=digits reads the embedded digits "
                              "set and would ignore it: add data.name=shards to use your shards")
    if cfg.like and cfg.init != "random":
        raise ConfigError(f"like={cfg.like} describes the encoder of a random baseline: it goes with init=random "
                          f"(init={cfg.init} is read as it is)")
    scale = list(cfg.data.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale={scale}: need [min, max] with 0 < min <= max <= 1, e.g. [0.2,1.0]")
    if not 0 <= cfg.data.hflip <= 1 or not 0 <= cfg.data.random_erasing <= 1:
        raise ConfigError("data.hflip and data.random_erasing are probabilities in [0, 1]")
    if not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct={cfg.data.crop_pct} must be in (0, 1]")
    if not 0 < cfg.data.train_fraction <= 1:
        raise ConfigError(f"data.train_fraction={cfg.data.train_fraction} must be in (0, 1]")
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise ConfigError(f"data.holdout_fraction={cfg.data.holdout_fraction} must be in [0, 1), e.g. 0.1")
    if cfg.data.repeated_aug < 1:
        raise ConfigError(f"data.repeated_aug={cfg.data.repeated_aug} must be >= 1 (1: off; DeiT uses 3)")
    if cfg.train.sharding == "fsdp":
        unsupported = [key for key, on in (("train.ema_decay", cfg.train.ema_decay is not None),
                                           ("train.compile=true", cfg.train.compile),
                                           ("train.precision=fp16", cfg.train.precision == "fp16")) if on]
        if unsupported:
            raise ConfigError(f"train.sharding=fsdp does not go with {', '.join(unsupported)} here (an EMA of "
                              "sharded weights, compiling sharded blocks and fp16 loss scaling are not built): use "
                              "bf16, or train.sharding=ddp")
    if cfg.train.ema_decay is not None and not 0 < cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in (0, 1), e.g. 0.9999")
    if cfg.eval.knn_k <= 0 or cfg.eval.knn_temperature <= 0 or cfg.eval.every_epochs < 0 or cfg.eval.knn_every < 0:
        raise ConfigError("eval.knn_k and eval.knn_temperature must be positive; eval.every_epochs and "
                          "eval.knn_every >= 0")
    if cfg.data.train_transform == "randaug" and not cfg.data.auto_augment:
        raise ConfigError("data.train_transform=randaug needs data.auto_augment, e.g. rand-m9-mstd0.5-inc1")
    if cfg.model.in_chans < 1:
        raise ConfigError(f"model.in_chans={cfg.model.in_chans} must be positive (3 for RGB images)")
    if not 0 <= cfg.model.drop_path_rate < 1:
        raise ConfigError(f"model.drop_path_rate={cfg.model.drop_path_rate} must be in [0, 1), e.g. 0.1")
    if len(cfg.data.mean) != cfg.model.in_chans or len(cfg.data.std) != cfg.model.in_chans:
        raise ConfigError(f"data.mean / data.std need {cfg.model.in_chans} values (model.in_chans)")
    if not all(math.isfinite(m) for m in cfg.data.mean) or not all(math.isfinite(v) and v > 0 for v in cfg.data.std):
        # images are normalised as (x - mean) / std: a zero std makes every input inf or nan
        raise ConfigError(f"data.mean={list(cfg.data.mean)} and data.std={list(cfg.data.std)}: the means must be finite "
                          "and every std positive (the images are divided by it); ImageNet's are "
                          "data.std=[0.229,0.224,0.225]")


def show(value: Any) -> str:
    """A value as the user wrote it (a list, not an OmegaConf node), for messages."""
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else repr(value)


