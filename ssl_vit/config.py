"""Recipes: a typed schema, YAML files that extend each other, and `key=value` overrides.

    recipe=NAME | recipe=path.yaml  ->  recipes/NAME.yaml (+ its `base:` chain, oldest first)
                                    ->  merged onto the schema's defaults
                                    ->  `a.b=c` overrides from the command line
                                    ->  validated: unknown keys, wrong types, bad choices and
                                        missing data stop here with a message naming the key.

The defaults below are the MAE-Base pre-training settings (He et al. 2022, appendix A.1);
recipes say only what differs and cite where each value comes from.
"""
from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MAKE_SHARDS_HINT = ("make shards with `python tools/make_shards.py /path/to/images shards/NAME` and pass "
                    "e.g. data.train='shards/NAME-{000000..000099}.tar' or data.train=shards/NAME.json")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to do instead."""


# -------------------------------------------------------------------------------------------
# schema


@dataclass
class ModelConfig:
    arch: str = "vit_base_patch16"       # a named size in ssl_vit.models.ARCHS
    img_size: Any = 224                   # int, or [height, width]
    patch_size: Optional[int] = None      # None: the arch's
    in_chans: int = 3
    embed_dim: Optional[int] = None       # None: the arch's (set for custom sizes)
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    num_classes: int = 0                  # 0: features only
    global_pool: str = "token"            # token | avg
    fc_norm: Optional[bool] = None        # None: on for avg pooling
    pos_embed: str = "sincos"             # learn | sincos; MAE's encoder uses fixed sin-cos (§3)
    class_token: bool = True
    dist_token: bool = False
    drop_path_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    patch_embed: str = "conv"             # conv | hybrid
    backbone: Optional[str] = None        # timm CNN of a hybrid, e.g. resnet26d
    backbone_stride: int = 16


@dataclass
class TeacherConfig:
    """DeiT distillation's teacher (Touvron et al. 2021 §4): any timm model, built here and loaded
    from a local file (never downloaded), frozen."""
    arch: Optional[str] = None            # a timm name, e.g. regnety_160 (DeiT's), resnet18; "timm:" optional
    weights: Optional[str] = None         # our model.safetensors, a timm or torchvision state dict (.pth)
    img_size: Optional[int] = None        # None: our export's JSON, else timm's pretrained config (else the student's)
    mean: Optional[List[float]] = None    # None: as img_size
    std: Optional[List[float]] = None


@dataclass
class TaskConfig:
    name: str = "mae"                     # mae | classify | linear_probe | distill
    # MAE (He et al. 2022): 75% masking (§4, fig. 5), 512-d 8-block decoder (table 1a-b),
    # per-patch normalised pixel targets (table 1c)
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # classification (fine-tuning, supervised) and linear probing
    label_smoothing: float = 0.0
    mixup: float = 0.0                    # mixup alpha (timm's Mixup); 0 = off
    cutmix: float = 0.0                   # cutmix alpha; 0 = off
    mixup_prob: float = 1.0               # probability of mixing a batch
    mixup_switch_prob: float = 0.5        # probability of cutmix instead of mixup when both are on
    head_init_std: float = 0.02           # trunc-normal std of a new classifier head
    lr_scales: List[float] = field(default_factory=lambda: [1.0])  # linear probe: one head per lr multiplier
    # DeiT distillation (Touvron et al. 2021 §5); defaults are DeiT's code: hard, alpha 0.5, tau 1
    distillation: str = "hard"            # none | soft | hard
    distillation_alpha: float = 0.5       # weight of the distillation-token loss; 1 - alpha on the class token's
    distillation_tau: float = 1.0         # soft: temperature
    eval_head: str = "mean"               # distilled encoders at evaluation: mean of both heads | cls | dist
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class DataConfig:
    name: str = "shards"                  # shards (data.train / data.val) | digits (embedded)
    train: Any = None                     # brace pattern, a::b, [list], pipe: command, or index .json
    val: Any = None
    batch_size: int = 64                  # per device; optim.batch_size is the global batch
    num_workers: int = 8
    samples_per_epoch: Optional[int] = None  # None: the shard index's count
    shuffle_buffer: int = 5000            # samples, per loader worker
    # worker-side augmentation (ssl_vit/data/transforms.py)
    train_transform: str = "rrc"          # rrc | randaug | eval
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5
    auto_augment: Optional[str] = None    # timm RandAugment spec for randaug, e.g. rand-m9-mstd0.5-inc1
    crop_pct: float = 0.875               # eval: resize to img_size / crop_pct, centre crop
    random_erasing: float = 0.0           # on the device, after normalisation
    train_fraction: float = 1.0           # keep this fraction of the training samples (few-label runs)
    repeated_aug: int = 1                 # k augmented views of each decoded sample (DeiT: 3, Hoffer et al. 2020)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet statistics
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    name: str = "adamw"                   # adamw | lars
    batch_size: int = 4096                # global batch, over all devices and accumulation steps
    blr: Optional[float] = 1.5e-4         # base lr: lr = blr * batch_size / lr_base_batch (MAE A.1)
    lr: Optional[float] = None            # absolute lr; set it instead of blr
    lr_base_batch: int = 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.9                 # LARS / SGD
    epochs: float = 800
    warmup_epochs: float = 40
    clip_grad: Optional[float] = None
    layer_decay: Optional[float] = None   # layer-wise lr decay (BEiT, MAE fine-tuning)


@dataclass
class TrainConfig:
    output_dir: str = "runs/${recipe}"
    seed: int = 0
    precision: str = "auto"               # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | no
    compile: bool = False
    grad_checkpointing: bool = False
    max_steps: Optional[int] = None       # stop early; the schedule still follows optim.epochs
    checkpoint_every: int = 1000          # optimizer steps
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10         # stop (with a checkpoint) after this many skipped steps in a row
    ema_decay: Optional[float] = None     # keep an exponential moving average of the weights (timm's)


@dataclass
class EvalConfig:
    every_epochs: int = 1                 # classification: evaluate on data.val every N epochs (0: at the end only)
    batch_size: Optional[int] = None      # None: data.batch_size
    knn_k: int = 20                       # k-NN monitor (DINO, Caron et al. 2021): k and temperature
    knn_temperature: float = 0.07
    knn_every: int = 0                    # steps between k-NN evaluations during training (0: off)


@dataclass
class LogConfig:
    every: int = 20                       # optimizer steps between scalar logs
    images_every: int = 1000              # optimizer steps between image logs
    tensorboard: bool = True


@dataclass
class Config:
    recipe: str = ""
    init: Optional[str] = None            # weights to start from: a path, or "random"
    resume: str = "auto"                  # auto (newest checkpoint in output_dir) | false | PATH
    print_config: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Choices checked by `validate`, each with what it means.
CHOICES = {
    "model.global_pool": ("token", "avg"),
    "model.pos_embed": ("learn", "sincos"),
    "model.patch_embed": ("conv", "hybrid"),
    "task.name": ("mae", "classify", "linear_probe", "distill"),
    "task.distillation": ("none", "soft", "hard"),
    "task.eval_head": ("mean", "cls", "dist"),
    "data.name": ("shards", "digits"),
    "data.train_transform": ("rrc", "randaug", "eval"),
    "optim.name": ("adamw", "lars"),
    "train.precision": ("auto", "bf16", "fp16", "no"),
}


# -------------------------------------------------------------------------------------------
# loading


def load(argv: Sequence[str], schema: type = Config, command: str = "pretrain.py",
         default_recipe: Optional[str] = None) -> DictConfig:
    """Parse `recipe=NAME key=value ...` into a validated, typed config; `--help` prints the keys."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(command, schema))
        raise SystemExit(0)
    args = _parse_args(argv)
    recipe = args.pop("recipe", default_recipe)
    if recipe is None:
        raise ConfigError(f"no recipe given: pass recipe=NAME (available: {', '.join(available_recipes())}) "
                          "or recipe=path/to/file.yaml")
    cfg = OmegaConf.structured(schema)
    for path in _recipe_chain(recipe):
        cfg = _merge(cfg, _read_recipe(path), source=str(path))
    overrides = OmegaConf.create()
    for key, value in args.items():
        OmegaConf.update(overrides, key, value, force_add=True)
    cfg = _merge(cfg, overrides, source="the command line")
    cfg.recipe = Path(recipe).stem if _is_path(recipe) else recipe
    validate(cfg)
    return cfg


def command_line_keys(argv: Sequence[str]) -> set[str]:
    """The keys set on the command line (they win over anything a tool would adopt from a file)."""
    return {arg.split("=", 1)[0].strip() for arg in argv if "=" in arg and not arg.startswith("-")}


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config (interpolations filled in), as saved next to a run's outputs."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def available_recipes() -> list[str]:
    return sorted({p.stem for d in _recipe_dirs() for p in d.glob("*.yaml")})


def _recipe_dirs() -> list[Path]:
    dirs = [Path.cwd() / "recipes", REPO_RECIPES]
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _is_path(recipe: str) -> bool:
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe


def _find_recipe(recipe: str, relative_to: Optional[Path] = None) -> Path:
    if _is_path(recipe):
        candidates = [Path(recipe)]
        if relative_to is not None:
            candidates.insert(0, relative_to / recipe)
        for path in candidates:
            if path.is_file():
                return path
        raise ConfigError(f"recipe file {recipe!r} does not exist")
    for d in _recipe_dirs():
        path = d / f"{recipe}.yaml"
        if path.is_file():
            return path
    close = difflib.get_close_matches(recipe, available_recipes(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe {recipe!r}.{hint} Available recipes: {', '.join(available_recipes())} "
                      f"(in {', '.join(str(d) for d in _recipe_dirs())}); or pass recipe=path/to/file.yaml")


def _recipe_chain(recipe: str) -> list[Path]:
    """The recipe file and the files it extends through `base:`, base first."""
    chain: list[Path] = []
    path = _find_recipe(recipe)
    while True:
        if path.resolve() in [p.resolve() for p in chain]:
            names = " -> ".join(p.stem for p in reversed(chain + [path]))
            raise ConfigError(f"recipes extend each other in a circle: {names}")
        chain.append(path)
        base = _read_recipe(path, keep_base=True).get("base")
        if base is None:
            return list(reversed(chain))
        path = _find_recipe(str(base), relative_to=path.parent)


def _read_recipe(path: Path, keep_base: bool = False) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors carry line and column
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, optim:, ...)")
    if not keep_base and "base" in node:
        node = OmegaConf.masked_copy(node, [k for k in node if k != "base"])
    return node


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"cannot parse argument {arg!r}: arguments are key=value pairs such as "
                              "recipe=mae_tiny_digits optim.epochs=10 (see the README)")
        key, raw = arg.split("=", 1)
        try:
            value = OmegaConf.from_dotlist([f"value={raw}"]).value
        except OmegaConfBaseException:
            value = raw  # e.g. a shard pattern such as {000..009}.tar that YAML cannot parse
        except Exception:
            value = raw
        args[key.strip()] = value
    return args


def _merge(cfg: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown key {key!r} in {source}.{_suggest(key)}") from None
    except ValidationError as e:
        key = e.full_key
        if key:
            wanted = _expected_type(key)
            raise ConfigError(f"bad value for {key} in {source}: {e.msg.splitlines()[0]}"
                              f"{f' (expected {wanted})' if wanted else ''}") from None
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None


def _leaf_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.update(_leaf_keys(type(default), prefix + f.name + "."))
        else:
            keys[prefix + f.name] = hints[f.name]
    return keys


# Names people type from other codebases, and ours.
ALIASES = {"learning_rate": "lr", "base_lr": "blr", "wd": "weight_decay", "lr_min": "min_lr",
           "warmup": "warmup_epochs", "epoch": "epochs", "bs": "batch_size", "workers": "num_workers",
           "model": "arch", "input_size": "img_size", "drop_path": "drop_path_rate", "amp": "precision",
           "mixed_precision": "precision", "decoder_embed_dim": "decoder_dim", "decoder_num_heads": "decoder_heads",
           "output": "output_dir", "out_dir": "output_dir", "save_every": "checkpoint_every"}


def _suggest(key: str) -> str:
    keys = list(_leaf_keys())
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    section, _, leaf = key.partition(".")
    if not leaf:
        close = difflib.get_close_matches(key, [k for k in keys if "." not in k] + sections, n=3, cutoff=0.6)
        return f" Did you mean {', '.join(close)}?" if close else f" Top-level keys: {', '.join(k for k in keys if '.' not in k)}; sections: {', '.join(sections)}"
    if section not in sections:
        close = difflib.get_close_matches(section, sections, n=2, cutoff=0.5)
        return f" Sections are {', '.join(sections)}" + (f"; did you mean {close[0]}.{leaf}?" if close else "")
    in_section = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
    leaf = ALIASES.get(leaf, leaf)
    close = [f"{section}.{k}" for k in difflib.get_close_matches(leaf, in_section, n=3, cutoff=0.6)]
    close += [k for k in keys if k.endswith("." + leaf) and k not in close]  # the same name in another section
    if close:
        return f" Did you mean {', '.join(close)}?"
    return f" Valid keys in {section}: {', '.join(in_section)}"


def _expected_type(key: str) -> str:
    kind = _leaf_keys().get(key.split("[")[0])
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = str(kind).replace("typing.", "")
    for python_type, name in names.items():
        if kind is python_type or text in (f"Optional[{python_type.__name__}]", python_type.__name__):
            return name + (" or null" if text.startswith("Optional") else "")
        if text == f"List[{python_type.__name__}]":
            return f"a list of {name.split(' ', 1)[1]}s, e.g. [0.9,0.95]" if python_type is float else f"a list of {python_type.__name__}"
    return text


def help_text(command: str, schema: type = Config) -> str:
    """Usage, the available recipes and every key with its default (for `--help`)."""
    lines = [f"usage: {command} recipe=NAME [key=value ...] [print_config=true]", "",
             f"recipes: {', '.join(available_recipes())} (or recipe=path/to/file.yaml)", "",
             "keys and their defaults (a recipe overrides them; key=value overrides the recipe):"]
    defaults = OmegaConf.structured(schema)
    for key in _leaf_keys(schema):
        value = OmegaConf.select(defaults, key, throw_on_missing=False)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# validation: what the types alone cannot say


def validate(cfg: DictConfig) -> None:
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")
    img_size = cfg.model.img_size
    if isinstance(img_size, (int, float)) and not isinstance(img_size, bool):
        sizes = [img_size]
    elif OmegaConf.is_list(img_size) and len(img_size) == 2:
        sizes = list(img_size)
    else:
        sizes = None
    if sizes is None or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ConfigError(f"model.img_size={_show(img_size)}: give a positive int or [height,width], e.g. model.img_size=224")
    for key in ("data.batch_size", "optim.batch_size", "optim.lr_base_batch", "train.checkpoint_every",
                "train.keep_checkpoints", "train.max_nonfinite_steps", "log.every", "log.images_every"):
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be positive")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if not 0.0 <= cfg.task.mask_ratio < 1.0:
        raise ConfigError(f"task.mask_ratio={cfg.task.mask_ratio} must be in [0, 1)")
    if cfg.optim.blr is None and cfg.optim.lr is None:
        raise ConfigError("set optim.blr (scaled by the global batch) or optim.lr (absolute)")
    if cfg.optim.blr is not None and cfg.optim.lr is not None:
        raise ConfigError(f"optim.lr={cfg.optim.lr} and optim.blr={cfg.optim.blr} are both set: keep one "
                          "(pass optim.blr=null to use an absolute lr)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={_show(cfg.optim.betas)} must hold two values, e.g. optim.betas=[0.9,0.95]")
    if cfg.optim.epochs <= 0 or not 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs:
        raise ConfigError(f"need 0 <= optim.warmup_epochs ({cfg.optim.warmup_epochs}) <= optim.epochs "
                          f"({cfg.optim.epochs}) and optim.epochs > 0")
    for split in ("train", "val"):
        spec = cfg.data[split]
        if spec is not None and not isinstance(spec, str) and not (
                OmegaConf.is_list(spec) and all(isinstance(s, str) for s in spec)):
            raise ConfigError(f"data.{split}={_show(spec)}: give a shard pattern, a list of shards or an index .json")
    scale = list(cfg.data.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale={scale}: need [min, max] with 0 < min <= max <= 1, e.g. [0.2,1.0]")
    if not 0 <= cfg.data.hflip <= 1 or not 0 <= cfg.data.random_erasing <= 1:
        raise ConfigError("data.hflip and data.random_erasing are probabilities in [0, 1]")
    if not 0 < cfg.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct={cfg.data.crop_pct} must be in (0, 1]")
    if not 0 < cfg.data.train_fraction <= 1:
        raise ConfigError(f"data.train_fraction={cfg.data.train_fraction} must be in (0, 1]")
    if not cfg.task.lr_scales or min(cfg.task.lr_scales) <= 0:
        raise ConfigError(f"task.lr_scales={_show(cfg.task.lr_scales)}: give positive multipliers, e.g. [0.1,1,10]")
    if min(cfg.task.mixup, cfg.task.cutmix, cfg.task.label_smoothing) < 0:
        raise ConfigError("task.mixup, task.cutmix and task.label_smoothing must be >= 0")
    if cfg.data.repeated_aug < 1:
        raise ConfigError(f"data.repeated_aug={cfg.data.repeated_aug} must be >= 1 (1: off; DeiT uses 3)")
    if not 0 <= cfg.task.distillation_alpha <= 1 or cfg.task.distillation_tau <= 0:
        raise ConfigError(f"task.distillation_alpha={cfg.task.distillation_alpha} must be in [0, 1] and "
                          f"task.distillation_tau={cfg.task.distillation_tau} positive")
    if cfg.task.name == "distill" and not cfg.model.dist_token:
        raise ConfigError("task.name=distill needs model.dist_token=true (DeiT's distillation token)")
    if cfg.model.arch.startswith("timm:") and cfg.task.name != "classify":
        raise ConfigError(f"model.arch={cfg.model.arch}: timm models train with task.name=classify only "
                          "(MAE, linear probe and distillation need our ViT encoder)")
    if cfg.train.ema_decay is not None and not 0 < cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in (0, 1), e.g. 0.9999")
    if cfg.eval.knn_k <= 0 or cfg.eval.knn_temperature <= 0 or cfg.eval.every_epochs < 0 or cfg.eval.knn_every < 0:
        raise ConfigError("eval.knn_k and eval.knn_temperature must be positive; eval.every_epochs and "
                          "eval.knn_every >= 0")
    if cfg.data.train_transform == "randaug" and not cfg.data.auto_augment:
        raise ConfigError("data.train_transform=randaug needs data.auto_augment, e.g. rand-m9-mstd0.5-inc1")
    if len(cfg.data.mean) != cfg.model.in_chans or len(cfg.data.std) != cfg.model.in_chans:
        raise ConfigError(f"data.mean / data.std need {cfg.model.in_chans} values (model.in_chans)")


def check_data(cfg: DictConfig, splits: Sequence[str] = ("train",)) -> None:
    """The checks a run needs and `print_config` does not: the data the recipe must be given."""
    if cfg.data.name != "shards":
        return
    for split in splits:
        if not cfg.data[split]:
            raise ConfigError(f"data.{split} is required by recipe {cfg.recipe!r} (data.name=shards): "
                              + MAKE_SHARDS_HINT
                              + " -- or try the embedded digits data with data.name=digits")


def _show(value: Any) -> str:
    return str(OmegaConf.to_container(value)) if OmegaConf.is_config(value) else repr(value)


def exit_on_error(fn):
    """Decorator for command-line entry points: a ConfigError becomes one line on stderr, exit 2."""
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
