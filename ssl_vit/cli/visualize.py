"""`python tools/visualize.py reconstruct|attention init=PATH [images=...] [key=value ...]`: pictures as PNG.

    argv -> what to draw, `--rollout`, key=value             -> a config (default recipe mae_base)
    init -> our export: its JSON says how the model was built and how its inputs were normalised
            a foreign file (official MAE, timm, DeiT): the tensors' shapes say the architecture
            (an encoder family's `config_from_state`, a task's `config_from_state`)
         -> the task that reconstructs (reconstruct: the file's, e.g. MAE with its decoder) or the
            encoder (attention: its family's `attention_maps`), weights loaded
    images=a.jpg,b*.png  each resized and centre-cropped as the eval transform (data.crop_pct)
    or a shard split     num_images images spread over data.val (data.name=digits: the embedded set)
         -> ssl_vit/tasks/pictures.py draws the grid -> out (PNG)
"""
from __future__ import annotations

import difflib
import glob
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from webdataset.tariterators import tarfile_samples

from .. import recipes
from ..config import CheckpointError, Config, ConfigError
from ..data.loaders import image_size, shard_source
from ..data.transforms import IMAGE_KEYS, DeviceNormalize, build_transform
from ..models import build_encoder, family_for_arch, family_of, registered_families
from ..models.files import FORMAT, export_description, read_checkpoint, unwrap
from ..tasks import pictures, registered_tasks, task_class
from ..weights import load_weights
from .commands import init_settings
from .exits import exit_on_error

MODES = ("reconstruct", "attention")
FLAGS = {"--rollout": "rollout=true", "--no-heads": "heads=false"}

USAGE = """\
usage: python tools/visualize.py reconstruct init=PATH [images=A,B,... | data.name=digits | data.val=SHARDS] [key=value ...]
       python tools/visualize.py attention   init=PATH [images=... | data.name=digits | data.val=SHARDS] [--rollout] [key=value ...]

Pictures of what a model does, written as one PNG with a row per image.

  reconstruct   reconstructions of a model that predicts masked pixels: MAE (He et al. 2022,
                figures 2-4) or SimMIM; columns: original | masked input | reconstruction |
                reconstruction with the visible patches pasted back. Only the masked patches are
                trained (the loss ignores the visible ones), so the last column is the one to judge.
                With models trained on per-patch normalised pixels (task.norm_pix_loss) the
                prediction is de-normalised with the mean and variance of each input patch.
                init: the model.safetensors of an MAE or SimMIM run (with its decoder or head; not
                backbone.safetensors) or an official MAE checkpoint with its decoder
                (mae_visualize_vit_large.pth).
  attention     where the class token looks, columns: original | mean over heads | each head (of
                block `layer`) | rollout (with --rollout: attention rolled out through every block,
                Abnar & Zuidema 2020). Heat maps are stretched to each map's own range (dark: little
                attention, bright: most). init: any encoder (backbone.safetensors, model.safetensors,
                timm, official MAE or DeiT checkpoints). Swin (no class token): the attention each
                token receives inside its window, tiled onto the stage's grid; --rollout stays
                within the stage of block `layer`.

options:
  init=PATH          the weights (required). For our exports the JSON beside them gives the
                     architecture, mean / std and crop; for other files the tensors' shapes give
                     it (num_heads from the named size with that width and depth, or model.num_heads=).
  images=LIST        image files or globs, comma-separated (images='photos/*.jpg,cat.png'); each is
                     resized to model.img_size / data.crop_pct and centre-cropped (the eval transform).
  data.name=digits   or data.val=SHARDS: instead of files, num_images images spread evenly over a shard split.
  split=val          the split read with data.name / data.val (val or train).
  num_images=8       images taken from the split, spread evenly over it.
  out=PATH           the PNG to write (default: reconstruct.png or attention.png).
  scale=N            upscale each tile N times (nearest); default: enough for tiles of at least 128 px.
  seed=0             reconstruct: the masks come from this seed; the same seed gives the same masks.
  mask_ratio=R       reconstruct: fraction of patches removed (default: the model's task.mask_ratio).
  --rollout          attention: add the rollout column (rollout=true).
  layer=-1           attention: the block whose attention is shown (-1: the last).
  --no-heads         attention: only the mean over heads, not each head (heads=false).
  recipe=NAME        a recipe for what the file does not say (default mae_base: ImageNet mean / std,
                     crop_pct 0.875); any recipe key (model.*, task.*, data.*) may be given, and
                     keys given here win over the file's.
"""


@dataclass
class VisualizeConfig(Config):
    """The recipe schema plus the options of this command (top-level keys)."""
    images: Any = None                    # comma-separated files or globs, or a list
    split: str = "val"
    num_images: int = 8
    out: Optional[str] = None
    scale: Optional[int] = None
    seed: int = 0
    mask_ratio: Optional[float] = None
    rollout: bool = False
    layer: int = -1
    heads: bool = True


@exit_on_error
def visualize(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE, end="")
        return 0 if argv else 2
    mode, argv = argv[0], [FLAGS.get(a, a) for a in argv[1:]]
    if mode not in MODES:
        raise ConfigError(f"the first argument says what to draw: {' or '.join(MODES)}, not {mode!r} "
                          "(see --help)")
    cfg = _load_config(argv, check=False)
    if not cfg.init or cfg.init == "random":
        raise ConfigError("visualize.py needs init=PATH: the model.safetensors of an MAE run, a backbone, or an "
                          "official MAE / timm / DeiT checkpoint")
    if not Path(cfg.init).is_file():
        raise ConfigError(f"init={cfg.init}: no such file")
    if mode == "reconstruct" and cfg.rollout:
        raise ConfigError("--rollout is an option of `attention`, not of `reconstruct`")
    if cfg.images is not None:
        image_paths(cfg.images)  # a mistyped path fails before a large checkpoint is read
    checkpoint = _read(cfg.init)
    settings, task = _settings_of(mode, cfg, checkpoint, recipes.command_line_keys(argv))
    cfg = _load_config(argv, adopted=(f"{Path(cfg.init).name}", settings))
    if cfg.print_config:
        print(recipes.to_yaml(cfg), end="")
        return 0
    if task is not None and not checkpoint["ours"]:  # what was read from the tensors, and assumed
        shown = ", ".join(f"{k}={v}" for k, v in cfg.task.items())
        print(f"reading {cfg.init} as an {task.__name__} with {shown} (override any with task.KEY=)")
    return draw(mode, cfg, checkpoint, task)


def _load_config(argv: list[str], **adopted):
    try:
        return recipes.load(argv, schema=VisualizeConfig, command="visualize.py", default_recipe="mae_base", **adopted)
    except ConfigError as e:
        if not str(e).startswith("unknown key"):
            raise
        raise ConfigError(f"{str(e).rstrip('.')}{_suggest_option(argv)}") from None


def _suggest_option(argv: list[str]) -> str:
    """config's suggestions know the recipe keys; these are this command's own."""
    options = [f.name for f in fields(VisualizeConfig) if f.name not in {g.name for g in fields(Config)}]
    typed = [arg.split("=", 1)[0] for arg in argv if "=" in arg and "." not in arg.split("=", 1)[0]]
    close = [match for key in typed for match in difflib.get_close_matches(key, options, n=1, cutoff=0.6)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f".{hint} This command's options: {', '.join(options)} (see --help)"


def draw(mode: str, cfg, checkpoint: dict, task) -> int:
    model = _build_model(mode, cfg, checkpoint, task)
    images = load_images(cfg)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std)
    inputs = normalize(images)
    scale = cfg.scale or max(1, math.ceil(128 / max(images.shape[-2:])))
    if mode == "reconstruct":
        grid = pictures.reconstruction_grid(model.reconstruct(inputs, seed=cfg.seed), normalize.denormalize,
                                            scale=scale)
        columns = " | ".join(pictures.RECONSTRUCTION_COLUMNS)
        what = f"task {model.name}, mask ratio {cfg.task.get('mask_ratio')}, seed {cfg.seed}"
    else:
        try:
            maps = family_of(model).attention_maps(model, inputs, layer=cfg.layer, heads=cfg.heads,
                                                   rollout=cfg.rollout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        grid = pictures.attention_grid(normalize.denormalize(inputs), maps, scale=scale)
        columns = " | ".join(["original", *maps])
        what = f"attention of layer {cfg.layer}"
    out = pictures.save_png(grid, cfg.out or f"{mode}.png")
    print(f"wrote {out} ({grid.shape[2]}x{grid.shape[1]} px): {len(images)} image(s), {what}; columns: {columns}")
    return 0


# -------------------------------------------------------------------------------------------
# the model: its settings from the file, then its weights


def _read(path: str) -> dict:
    try:
        raw, metadata = read_checkpoint(path)
        state, _ = unwrap(raw)
    except CheckpointError as e:
        raise ConfigError(f"init={path}: {e}") from None
    args = raw.get("args") if isinstance(raw, dict) else None  # official MAE / DeiT training arguments
    args = args if isinstance(args, dict) else vars(args) if hasattr(args, "__dict__") else {}
    return dict(raw=raw, state=state, metadata=metadata, args=args, ours=metadata.get("format") == FORMAT)


def _settings_of(mode: str, cfg, checkpoint: dict, explicit: set[str]):
    """What the file says about the model, as {recipe key: value}, and (reconstruct) the task that
    draws it. Our exports record the whole encoder (in the safetensors metadata), the run's task and
    input (in the JSON beside); official MAE, timm and DeiT files carry no config, so the tensors'
    shapes say what they can (the families' and tasks' `config_from_state`)."""
    state = checkpoint["state"]
    if checkpoint["ours"]:
        encoder = json.loads(checkpoint["metadata"]["encoder"])
        family = family_for_arch(encoder["arch"])
        names = {f.name for f in fields(family.Config)}
        settings = {f"model.{k}": v for k, v in encoder.items() if k in names}
        settings.update({k: v for k, v in init_settings(cfg, explicit).items() if k.startswith("data.")})
        recorded = export_description(cfg.init).get("task") or {}
    else:
        num_heads = cfg.model.get("num_heads") if "model.num_heads" in explicit else None
        settings, reasons = None, []
        for family in registered_families().values():
            try:
                found = family.config_from_state(state, num_heads=num_heads, recipe=cfg.model)
            except ValueError as e:
                reasons.append(str(e))
                continue
            settings = {f"model.{k}": v for k, v in found.items()}
            break
        if settings is None:
            raise ConfigError(f"init={cfg.init}: cannot tell its architecture: {'; '.join(reasons)}")
        recorded = checkpoint["args"]
    settings["model.drop_path_rate"] = 0.0
    if mode != "reconstruct":
        return settings, None
    name = recorded.get("name") if checkpoint["ours"] else None
    tasks = [task_class(name)] if name else [t for t in registered_tasks().values() if t.checkpoint_format(state)]
    task = next((t for t in tasks if t.reconstructs and t.checkpoint_format(state)), None)
    if task is None:
        raise ConfigError(f"init={cfg.init} holds no MAE decoder (nor another model that reconstructs images), so "
                          "nothing can be reconstructed: give the model.safetensors of an MAE run (not "
                          "backbone.safetensors) or an official MAE checkpoint with its decoder (mae_visualize_vit_*.pth)")
    settings["task.name"] = task.name
    settings.update({f"task.{k}": v for k, v in task.config_from_state(state, recorded, cfg.init).items()})
    if cfg.mask_ratio is not None:
        settings["task.mask_ratio"] = cfg.mask_ratio
    return {k: v for k, v in settings.items() if k not in explicit}, task


def _build_model(mode: str, cfg, checkpoint: dict, task):
    model = task.build(cfg, 0) if mode == "reconstruct" else build_encoder(cfg.model)
    try:  # our exports by path (their metadata records the grid), foreign files as already read
        report = load_weights(model, cfg.init if checkpoint["ours"] else checkpoint["raw"])
    except CheckpointError as e:
        raise ConfigError(f"init={cfg.init}: {e}") from None
    if report.missing:
        shown = ", ".join(report.missing[:6]) + (", ..." if len(report.missing) > 6 else "")
        raise ConfigError(f"init={cfg.init} lacks {len(report.missing)} of the model's tensors ({shown}); the "
                          "picture would show random weights. Check model.* / task.* against the file")
    return model.eval()


# -------------------------------------------------------------------------------------------
# the images


def load_images(cfg):
    """uint8 [N, 3, H, W] at model.img_size: the files of `images=`, through the eval transform
    (resize to img_size / data.crop_pct, centre crop), or num_images spread over a shard split."""
    if cfg.images is None:
        return _split_images(cfg)
    transform = build_transform(cfg.data, image_size(cfg), training=False)
    images = []
    for path in image_paths(cfg.images):
        try:
            images.append(transform(path.read_bytes()))
        except OSError:  # PIL's UnidentifiedImageError is an OSError
            raise ConfigError(f"images: {path} is not an image file that PIL can read") from None
    return torch.stack(images)


def image_paths(spec) -> list[Path]:
    """Comma-separated (or listed) files and globs, in the order given; each must exist."""
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    paths = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"images: the pattern {item!r} matches no files")
            paths += [Path(m) for m in matches]
        elif Path(item).is_file():
            paths.append(Path(item))
        else:
            raise ConfigError(f"images: {item} does not exist (give image files or globs, comma-separated)")
    if not paths:
        raise ConfigError(f"images={spec!r} names no files")
    return paths


def _split_images(cfg):
    """num_images images spread evenly over a shard split (a split written class by class still shows
    several classes); only those are decoded."""
    split = cfg.split
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r}: use val or train")
    if cfg.data.name != "digits" and not cfg.data[split]:
        raise ConfigError(f"no images: give images=PATH[,PATH...] (files or globs), or a shard split with "
                          f"data.name=digits or data.{split}=SHARDS (num_images={cfg.num_images} spread over it are drawn)")
    if cfg.num_images <= 0:
        raise ConfigError(f"num_images={cfg.num_images} must be positive")
    source = shard_source(cfg, split)
    positions = spread(source.num_samples, cfg.num_images)
    transform = build_transform(cfg.data, image_size(cfg), training=False)
    images = []
    for index, sample in enumerate(tarfile_samples({"url": url} for url in source.urls)):
        if index in positions:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is not None:
                images.append(transform(sample[key]))
        if len(images) == len(positions) or index >= max(positions):
            break
    if not images:
        raise ConfigError(f"the {split} split holds no images")
    return torch.stack(images)


def spread(total, count: int) -> set[int]:
    """`count` sample positions spread evenly over a split of `total` (the first `count` when the
    split's size is unknown)."""
    if not total or total <= count:
        return set(range(count))
    return {round(i * total / count) for i in range(count)}
