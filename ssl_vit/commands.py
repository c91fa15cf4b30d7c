"""The commands users run: pretrain.py, tools/finetune.py, tools/linear_probe.py, tools/knn.py.

All but k-NN are the same training loop with a different task (the recipe's task.name); they only
differ in what they insist on: fine-tuning and linear probing need `init=` (a file, or `random` for
the baseline every pre-training result is compared with).

When `init` is one of our exports, its JSON says how the encoder was built and how its inputs were
normalised; those settings are adopted (architecture, patch size, image size, mean / std, crop),
unless given on the command line, so that `init=runs/x/backbone.safetensors` is all a user types.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from . import config
from .config import ConfigError

# what an export's JSON decides about the model it holds (the recipe keeps the rest: pooling,
# drop path, position embedding type, distillation token, number of classes)
ADOPTED_MODEL_KEYS = ("arch", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                      "class_token", "layer_scale_init", "patch_embed", "backbone", "backbone_stride")
ADOPTED_DATA_KEYS = ("mean", "std", "crop_pct")


def _argv(argv: Optional[Sequence[str]]) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def load_config(argv: Sequence[str], command: str, default_recipe: Optional[str] = None):
    cfg = config.load(argv, command=command, default_recipe=default_recipe)
    adopted = adopt_init_settings(cfg, config.command_line_keys(argv))
    if adopted and int(os.environ.get("RANK", "0")) == 0 and not cfg.print_config:
        shown = ", ".join(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value}"
                          for key in adopted for value in [OmegaConf.select(cfg, key)])
        print(f"from {Path(cfg.init).with_suffix('.json').name} beside init: {shown}", flush=True)
    return cfg


def adopt_init_settings(cfg, explicit: set[str]) -> list[str]:
    """Take the encoder's build and input settings from the JSON beside an `init` export."""
    if not cfg.init or cfg.init == "random":
        return []
    path = Path(cfg.init)
    if not path.exists():
        raise ConfigError(f"init={cfg.init}: no such file; give a checkpoint (ours, timm, official MAE or DeiT) "
                          "or init=random")
    from .checkpoint import export_description

    saved = export_description(path) if path.suffix == ".safetensors" else {}
    if not saved:
        return []
    adopted = []
    for key in ADOPTED_MODEL_KEYS:
        if f"model.{key}" not in explicit and key in saved.get("encoder", {}):
            value = saved["encoder"][key]
            if key == "img_size" and isinstance(value, list) and value[0] == value[1]:
                value = value[0]
            cfg.model[key] = value
            adopted.append(f"model.{key}")
    for key in ADOPTED_DATA_KEYS:
        if f"data.{key}" not in explicit and key in saved.get("data", {}):
            cfg.data[key] = saved["data"][key]
            adopted.append(f"data.{key}")
    config.validate(cfg)
    return adopted


def _require(cfg, command: str, tasks: Sequence[str], needs_init: bool) -> None:
    if cfg.task.name not in tasks:
        raise ConfigError(f"{command} runs recipes with task.name in {list(tasks)}; recipe {cfg.recipe!r} has "
                          f"task.name={cfg.task.name!r}")
    if needs_init and not cfg.init:
        raise ConfigError(f"{command} needs init=PATH (our backbone.safetensors, a timm, official MAE or DeiT "
                          "checkpoint) or init=random for the randomly initialised baseline")


def _train(argv, command: str, tasks: Sequence[str], needs_init: bool) -> int:
    from .train import Trainer

    argv = _argv(argv)
    cfg = load_config(argv, command)
    if cfg.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    _require(cfg, command, tasks, needs_init)
    config.check_data(cfg, ("train", "val") if cfg.task.name != "mae" else ("train",))
    return Trainer(cfg).run()


@config.exit_on_error
def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch pretrain.py recipe=NAME [key=value ...]`: any task."""
    return _train(argv, "pretrain.py", ("mae", "classify", "linear_probe", "distill"), needs_init=False)


@config.exit_on_error
def finetune(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/finetune.py recipe=finetune_base init=PATH [key=value ...]`."""
    return _train(argv, "finetune.py", ("classify", "distill"), needs_init=True)


@config.exit_on_error
def linear_probe(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/linear_probe.py recipe=linprobe_base init=PATH [key=value ...]`."""
    return _train(argv, "linear_probe.py", ("linear_probe",), needs_init=True)


@config.exit_on_error
def knn(argv: Optional[Sequence[str]] = None) -> int:
    """`python tools/knn.py init=PATH [recipe=NAME] [key=value ...]`: k-NN top-1 / top-5 of an encoder's
    features on data.val with data.train as memory (DINO's protocol), written to output_dir/metrics.json."""
    import torch
    from accelerate import Accelerator

    from .checkpoint import load_weights
    from .data import DeviceNormalize, num_classes, shard_source
    from .evaluate import knn_evaluate
    from .tasks import build_encoder
    from .train import mixed_precision

    argv = _argv(argv)
    cfg = load_config(argv, "knn.py", default_recipe="knn")
    if cfg.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    if not cfg.init:
        raise ConfigError("knn.py needs init=PATH (an encoder's weights) or init=random")
    config.check_data(cfg, ("train", "val"))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.train.precision))
    if cfg.init == "random":
        torch.manual_seed(cfg.train.seed)  # the encoder's initialisation
    encoder = build_encoder(cfg.model, num_classes=0)
    if cfg.init != "random":
        load_weights(encoder, cfg.init, verbose=accelerator.is_main_process)
    elif accelerator.is_main_process:
        shape = encoder.config
        print(f"init=random: a randomly initialised encoder of recipe {cfg.recipe!r}: {shape['arch']}, "
              f"{shape['embed_dim']} wide, {shape['depth']} blocks, {shape['patch_size']}-pixel patches, "
              f"images {shape['img_size']} (compare with recipe=<the pre-training recipe> init=random)")
    encoder.to(accelerator.device)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std).to(accelerator.device)
    metrics = knn_evaluate(encoder, cfg, accelerator, normalize, num_classes(cfg, shard_source(cfg, "train")))
    if accelerator.is_main_process:
        output = Path(cfg.train.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        record = {"recipe": cfg.recipe, "init": cfg.init, "protocol": "knn", **metrics,
                  "model": OmegaConf.to_container(cfg.model),
                  "data": {k: OmegaConf.to_container(cfg.data)[k] for k in ADOPTED_DATA_KEYS}}
        (output / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(output / "tensorboard")) as writer:
                for key in ("top1", "top5"):
                    writer.add_scalar(f"val/knn_{key}", metrics[key], global_step=0)
        print(f"k-NN (k={metrics['k']}, T={metrics['temperature']}): top-1 {metrics['top1']:.2f}%, "
              f"top-5 {metrics['top5']:.2f}% on {metrics['num_samples']} validation samples "
              f"({metrics['num_train_samples']} training samples as memory); {output / 'metrics.json'}")
    return 0
