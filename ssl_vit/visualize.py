"""`python tools/visualize.py reconstruct|attention init=PATH [images=...] [key=value ...]`: pictures as PNG.

    argv -> what to draw, `--rollout`, key=value             -> a config (default recipe mae_base)
    init -> our export: its JSON says how the model was built and how its inputs were normalised
            a foreign file (official MAE, timm, DeiT): the tensors' shapes say the architecture
         -> an MAE with its decoder (reconstruct) or an encoder (attention), weights loaded
    images=a.jpg,b*.png  each resized and centre-cropped as the eval transform (data.crop_pct)
    or a shard split     the first num_images images of data.val (data.name=digits: the embedded set)
         -> ssl_vit/viz.py draws the grid -> out (PNG)
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

from omegaconf import OmegaConf

from . import config
from .commands import adopt_init_settings
from .config import Config, ConfigError, ModelConfig

MODES = ("reconstruct", "attention")
FLAGS = {"--rollout": "rollout=true", "--no-heads": "heads=false"}

USAGE = """\
usage: python tools/visualize.py reconstruct init=PATH [images=A,B,... | data.name=digits | data.val=SHARDS] [key=value ...]
       python tools/visualize.py attention   init=PATH [images=... | data.name=digits | data.val=SHARDS] [--rollout] [key=value ...]

Pictures of what a model does, written as one PNG with a row per image.

  reconstruct   MAE reconstructions (He et al. 2022, figures 2-4), columns: original | masked input |
                reconstruction | reconstruction with the visible patches pasted back. Only the masked
                patches are trained (the loss ignores the visible ones), so the last column is the
                one to judge. With models trained on per-patch normalised pixels (task.norm_pix_loss)
                the prediction is de-normalised with the mean and variance of each input patch.
                init: the model.safetensors of an MAE run (encoder + decoder; not backbone.safetensors)
                or an official MAE checkpoint with its decoder (mae_visualize_vit_large.pth).
  attention     where the class token looks, columns: original | mean over heads | each head (of
                block `layer`) | rollout (with --rollout: attention rolled out through every block,
                Abnar & Zuidema 2020). Heat maps are stretched to each map's own range (dark: little
                attention, bright: most). init: any encoder (backbone.safetensors, model.safetensors,
                timm, official MAE or DeiT checkpoints).

options:
  init=PATH          the weights (required). For our exports the JSON beside them gives the
                     architecture, mean / std and crop; for other files the tensors' shapes give
                     it (num_heads from the named size with that width and depth, or model.num_heads=).
  images=LIST        image files or globs, comma-separated (images='photos/*.jpg,cat.png'); each is
                     resized to model.img_size / data.crop_pct and centre-cropped (the eval transform).
  data.name=digits   or data.val=SHARDS: instead of files, the first num_images images of a shard split.
  split=val          the split read with data.name / data.val (val or train).
  num_images=8       images taken from the split.
  out=PATH           the PNG to write (default: reconstruct.png or attention.png).
  scale=N            upscale each tile N times (nearest); default: enough for tiles of at least 128 px.
  seed=0             reconstruct: the masks come from this seed; the same seed gives the same masks.
  mask_ratio=R       reconstruct: fraction of patches removed (default: the model's task.mask_ratio).
  --rollout          attention: add the rollout column (rollout=true).
  layer=-1           attention: the block whose class-token attention is shown (-1: the last).
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


@config.exit_on_error
def visualize(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE, end="")
        return 0 if argv else 2
    mode, argv = argv[0], [FLAGS.get(a, a) for a in argv[1:]]
    if mode not in MODES:
        raise ConfigError(f"the first argument says what to draw: {' or '.join(MODES)}, not {mode!r} "
                          "(see --help)")
    cfg, explicit = _load_config(argv)
    if cfg.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    if mode == "reconstruct" and cfg.rollout:
        raise ConfigError("--rollout is an option of `attention`, not of `reconstruct`")
    return draw(mode, cfg, explicit)


def _load_config(argv: list[str]):
    try:
        cfg = config.load(argv, schema=VisualizeConfig, command="visualize.py", default_recipe="mae_base")
    except ConfigError as e:
        if not str(e).startswith("unknown key"):
            raise
        raise ConfigError(f"{str(e).rstrip('.')}{_suggest_option(argv)}") from None
    explicit = config.command_line_keys(argv)
    if not cfg.init or cfg.init == "random":
        raise ConfigError("visualize.py needs init=PATH: the model.safetensors of an MAE run, a backbone, or an "
                          "official MAE / timm / DeiT checkpoint")
    if not Path(cfg.init).is_file():
        raise ConfigError(f"init={cfg.init}: no such file")
    adopt_init_settings(cfg, explicit)
    return cfg, explicit


def _suggest_option(argv: list[str]) -> str:
    """config's suggestions know the recipe keys; these are this command's own."""
    options = [f.name for f in fields(VisualizeConfig) if f.name not in {g.name for g in fields(Config)}]
    typed = [arg.split("=", 1)[0] for arg in argv if "=" in arg and "." not in arg.split("=", 1)[0]]
    close = [match for key in typed for match in difflib.get_close_matches(key, options, n=1, cutoff=0.6)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f".{hint} This command's options: {', '.join(options)} (see --help)"


def draw(mode: str, cfg, explicit: set[str]) -> int:
    import torch

    from . import viz
    from .data import DeviceNormalize

    if cfg.images is not None:
        image_paths(cfg.images)  # a mistyped path fails before a large checkpoint is read
    checkpoint = _read(cfg.init)
    model = _build_model(mode, cfg, explicit, checkpoint)
    images = load_images(cfg)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std)
    inputs = normalize(images)
    scale = cfg.scale or max(1, math.ceil(128 / max(images.shape[-2:])))
    if mode == "reconstruct":
        mask_ratio = cfg.task.mask_ratio if cfg.mask_ratio is None else cfg.mask_ratio
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={mask_ratio} must be in [0, 1)")
        model.mask_ratio = mask_ratio
        noise = torch.rand(len(images), model.num_patches, generator=torch.Generator().manual_seed(cfg.seed))
        grid = viz.reconstruction_grid(model.reconstruct(inputs, noise), normalize.denormalize, scale=scale)
        columns = " | ".join(viz.RECONSTRUCTION_COLUMNS)
        what = f"mask ratio {mask_ratio}, seed {cfg.seed}"
    else:
        try:
            maps = viz.attention_maps(model, inputs, layer=cfg.layer, heads=cfg.heads, rollout=cfg.rollout)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        grid = viz.attention_grid(normalize.denormalize(inputs), maps, scale=scale)
        columns = " | ".join(["original", *maps])
        what = f"class-token attention of block {cfg.layer % len(model.blocks)}"
    out = viz.save_png(grid, cfg.out or f"{mode}.png")
    print(f"wrote {out} ({grid.shape[2]}x{grid.shape[1]} px): {len(images)} image(s), {what}; columns: {columns}")
    return 0


# -------------------------------------------------------------------------------------------
# the model: its settings from the file, then its weights


def _read(path: str) -> dict:
    from .checkpoint import FORMAT, CheckpointError, read_checkpoint, unwrap

    try:
        raw, metadata = read_checkpoint(path)
        state, _ = unwrap(raw)
    except CheckpointError as e:
        raise ConfigError(f"init={path}: {e}") from None
    args = raw.get("args") if isinstance(raw, dict) else None  # official MAE / DeiT training arguments
    args = args if isinstance(args, dict) else vars(args) if hasattr(args, "__dict__") else {}
    return dict(raw=raw, state=state, metadata=metadata, args=args, ours=metadata.get("format") == FORMAT)


def _build_model(mode: str, cfg, explicit: set[str], checkpoint: dict):
    from .checkpoint import CheckpointError, load_weights
    from .tasks import build_encoder, build_mae

    has_decoder = "decoder_pred.weight" in checkpoint["state"]
    if mode == "reconstruct" and not has_decoder:
        raise ConfigError(f"init={cfg.init} holds no MAE decoder, so nothing can be reconstructed: give the "
                          "model.safetensors of an MAE run (not backbone.safetensors) or an official MAE "
                          "checkpoint with its decoder (mae_visualize_vit_*.pth)")
    for key, value in _settings_of(cfg, checkpoint, explicit).items():
        if key not in explicit:  # the command line wins over the file
            OmegaConf.update(cfg, key, value)
    cfg.model.drop_path_rate = 0.0
    config.validate(cfg)
    if mode == "reconstruct" and not checkpoint["ours"]:
        print(f"reading {cfg.init} as an MAE with norm_pix_loss={cfg.task.norm_pix_loss} and "
              f"decoder_heads={cfg.task.decoder_heads} (override with task.norm_pix_loss= / task.decoder_heads=)")

    if mode == "reconstruct":
        task = cfg.task
        if task.decoder_dim % task.decoder_heads:
            raise ConfigError(f"task.decoder_dim={task.decoder_dim} (the file's) is not divisible by "
                              f"task.decoder_heads={task.decoder_heads}: give task.decoder_heads=")
        model = build_mae(cfg, num_classes=0)
    else:
        model = build_encoder(cfg.model)
    try:  # our exports by path (their metadata records the grid), foreign files as already read
        report = load_weights(model, cfg.init if checkpoint["ours"] else checkpoint["raw"])
    except CheckpointError as e:
        raise ConfigError(f"init={cfg.init}: {e}") from None
    if report.missing:
        shown = ", ".join(report.missing[:6]) + (", ..." if len(report.missing) > 6 else "")
        raise ConfigError(f"init={cfg.init} lacks {len(report.missing)} of the model's tensors ({shown}); the "
                          "picture would show random weights. Check model.* / task.* against the file")
    return model.eval()


def _settings_of(cfg, checkpoint: dict, explicit: set[str]) -> dict[str, Any]:
    """What the file says about the model, as {recipe key: value}. Our exports record the whole
    encoder (in the safetensors metadata) and the run's task (in the JSON beside); official MAE,
    timm and DeiT files carry no config, so the tensors' shapes say what they can."""
    from .checkpoint import export_description

    state = checkpoint["state"]
    if checkpoint["ours"]:
        encoder = json.loads(checkpoint["metadata"]["encoder"])
        settings = {f"model.{f.name}": encoder[f.name] for f in fields(ModelConfig) if f.name in encoder}
        recorded = export_description(cfg.init).get("task") or {}
    else:
        settings = _architecture_of(cfg, state, explicit)
        recorded = checkpoint["args"]
    if "decoder_pred.weight" in state:
        settings["task.decoder_dim"] = state["decoder_embed.weight"].shape[0]
        settings["task.decoder_depth"] = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        for key in ("decoder_heads", "norm_pix_loss", "mask_ratio"):
            if recorded.get(key) is not None:
                settings[f"task.{key}"] = recorded[key]
        if "task.norm_pix_loss" not in settings and "visualize" in Path(cfg.init).name:
            # the MAE demo's checkpoints record nothing; they are "an MAE model trained with pixels as
            # targets for visualization" (facebookresearch/mae, demo/mae_visualize.ipynb)
            settings["task.norm_pix_loss"] = False
    return settings


def _architecture_of(cfg, state: dict, explicit: set[str]) -> dict[str, Any]:
    """A foreign ViT's build settings from its tensors; the number of heads (which shapes cannot
    tell) from model.num_heads=, the named size with that width and depth, or a recipe of that width."""
    from .models.vit import ARCHS

    kernel = state.get("patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 4 or "blocks.0.norm1.weight" not in state:
        raise ConfigError(f"init={cfg.init} is not a ViT with a convolutional patch embedding that this tool "
                          "can read the architecture of; give recipe=... with its model.* settings")
    embed_dim, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    prefix = int("cls_token" in state) + int("dist_token" in state)
    found = dict(embed_dim=embed_dim, depth=depth, patch_size=patch, in_chans=in_chans,
                 class_token="cls_token" in state, dist_token="dist_token" in state,
                 global_pool="avg" if "fc_norm.weight" in state else "token",
                 num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
                 pos_embed="sincos" if "decoder_pred.weight" in state else "learn")  # MAE: fixed sin-cos
    if "blocks.0.ls1.gamma" in state:
        found["layer_scale_init"] = 1.0e-5  # any value builds the LayerScale; the file's gamma is loaded
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[1] - prefix
        if math.isqrt(tokens) ** 2 == tokens:
            found["img_size"] = math.isqrt(tokens) * patch
    named = [name for name, arch in ARCHS.items() if (arch["embed_dim"], arch["depth"]) == (embed_dim, depth)]
    recipe_width = cfg.model.embed_dim or ARCHS.get(cfg.model.arch, {}).get("embed_dim")
    if named:
        found["arch"], found["num_heads"] = named[0], ARCHS[named[0]]["num_heads"]
    elif cfg.model.num_heads and recipe_width == embed_dim:
        found["num_heads"] = cfg.model.num_heads  # a recipe describing this file
    elif "model.num_heads" not in explicit:
        raise ConfigError(f"init={cfg.init} holds a ViT with embed_dim={embed_dim}, depth={depth}, patch {patch}, "
                          "which is none of the named sizes, so its number of heads is unknown: give "
                          "model.num_heads=N (or a recipe=... describing it)")
    return {f"model.{key}": value for key, value in found.items()}


# -------------------------------------------------------------------------------------------
# the images


def load_images(cfg):
    """uint8 [N, 3, H, W] at model.img_size: the files of `images=`, through the eval transform
    (resize to img_size / data.crop_pct, centre crop), or the first num_images of a shard split."""
    import torch

    from .data.loaders import image_size
    from .data.transforms import build_transform

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
    from .data import build_eval_loader

    split = cfg.split
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r}: use val or train")
    if cfg.data.name != "digits" and not cfg.data[split]:
        raise ConfigError(f"no images: give images=PATH[,PATH...] (files or globs), or a shard split with "
                          f"data.name=digits or data.{split}=SHARDS (the first num_images={cfg.num_images} are drawn)")
    if cfg.num_images <= 0:
        raise ConfigError(f"num_images={cfg.num_images} must be positive")
    cfg.data.num_workers = 0  # one batch: no worker processes to start
    batch = next(iter(build_eval_loader(cfg, split, batch_size=cfg.num_images)), None)
    if batch is None:
        raise ConfigError(f"the {split} split holds no images")
    return batch["images"]
