"""The commands users run: pretrain.py, tools/finetune.py, tools/linear_probe.py, tools/knn.py.

All but k-NN are the same training loop with a different task (the recipe's task.name); they only
differ in the tasks they run (fine-tuning: tasks that train the encoder on labels; linear probing:
heads on a frozen encoder, as each task declares) and in needing `init=` (a file, or `random` for
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
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from . import config
from .config import ConfigError


def _argv(argv: Optional[Sequence[str]]) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def load_config(argv: Sequence[str], command: str, default_recipe: Optional[str] = None, schema: type = config.Config):
    """The recipe + what the JSON beside an `init` export says about its encoder and input + the
    command line, validated."""
    cfg = config.load(argv, schema=schema, command=command, default_recipe=default_recipe, check=False)
    adopted = init_settings(cfg, config.command_line_keys(argv))
    if not adopted:
        config.validate(cfg)
        return cfg
    where = f"{Path(cfg.init).with_suffix('.json').name} beside init"
    cfg = config.load(argv, schema=schema, command=command, default_recipe=default_recipe, adopted=(where, adopted))
    if int(os.environ.get("RANK", "0")) == 0 and not cfg.print_config:
        shown = ", ".join(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value}"
                          for key in adopted for value in [OmegaConf.select(cfg, key)])
        print(f"from {where}: {shown}", flush=True)
    return cfg


def init_settings(cfg, explicit: set[str]) -> dict[str, Any]:
    """What the JSON beside an `init` export decides, as {recipe key: value}: the encoder's
    architecture (its family's `architecture_keys`) and the input normalisation; the recipe keeps the
    rest (pooling, drop path, number of classes), and the command line wins over both."""
    if not cfg.init or cfg.init == "random":
        return {}
    path = Path(cfg.init)
    if not path.exists():
        raise ConfigError(f"init={cfg.init}: no such file; give a checkpoint (ours, timm, official MAE or DeiT) "
                          "or init=random")
    from .checkpoint import export_description
    from .models import family_for_arch
    from .outputs import INPUT_KEYS

    saved = export_description(path) if path.suffix == ".safetensors" else {}
    encoder = saved.get("encoder") or {}
    if not encoder:
        return {}
    adopted: dict[str, Any] = {}
    for key in family_for_arch(encoder["arch"]).architecture_keys:
        if f"model.{key}" not in explicit and key in encoder:
            value = encoder[key]
            if key == "img_size" and isinstance(value, list) and value[0] == value[1]:
                value = value[0]
            adopted[f"model.{key}"] = value
    for key in INPUT_KEYS:
        if f"data.{key}" not in explicit and key in saved.get("data", {}):
            adopted[f"data.{key}"] = saved["data"][key]
    return adopted


def _require(cfg, command: str, accepts, what: str, needs_init: bool) -> None:
    """The tasks a command runs, by what they say of themselves (tasks/base.py)."""
    from .tasks import registered_tasks, task_class

    if not accepts(task_class(cfg.task.name)):
        fitting = [name for name, cls in registered_tasks().items() if accepts(cls)]
        raise ConfigError(f"{command} runs {what} (task.name in {fitting}); recipe {cfg.recipe!r} has "
                          f"task.name={cfg.task.name!r}: use pretrain.py for it, or a recipe of this command")
    if needs_init and not cfg.init:
        raise ConfigError(f"{command} needs init=PATH (our backbone.safetensors, a timm, official MAE or DeiT "
                          "checkpoint) or init=random for the randomly initialised baseline")


def _train(argv, command: str, accepts, what: str, needs_init: bool) -> int:
    from .train import Trainer

    argv = _argv(argv)
    cfg = load_config(argv, command)
    if cfg.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    _require(cfg, command, accepts, what, needs_init)
    config.check_data(cfg)
    return Trainer(cfg).run()


@config.exit_on_error
def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch pretrain.py recipe=NAME [key=value ...]`: any task."""
    return _train(argv, "pretrain.py", lambda task: True, "any task", needs_init=False)


@config.exit_on_error
def finetune(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/finetune.py recipe=finetune_base init=PATH [key=value ...]`."""
    return _train(argv, "finetune.py", lambda task: task.needs_labels and task.trains_encoder,
                  "tasks that train the encoder on labels", needs_init=True)


@config.exit_on_error
def linear_probe(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/linear_probe.py recipe=linprobe_base init=PATH [key=value ...]`."""
    return _train(argv, "linear_probe.py", lambda task: task.needs_labels and not task.trains_encoder,
                  "tasks that train heads on a frozen encoder", needs_init=True)


@config.exit_on_error
def knn(argv: Optional[Sequence[str]] = None) -> int:
    """`python tools/knn.py init=PATH [recipe=NAME] [key=value ...]`: k-NN top-1 / top-5 of an encoder's
    features on data.val with data.train as memory (DINO's protocol), written to output_dir/metrics.json."""
    import torch
    from accelerate import Accelerator

    from .checkpoint import load_weights
    from .data import DeviceNormalize, num_classes, shard_source
    from .evaluate import knn_evaluate
    from .models import build_encoder
    from .outputs import INPUT_KEYS
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
              f"{shape.get('embed_dim')} wide, {shape.get('depth')} blocks, {shape.get('patch_size')}-pixel patches, "
              f"images {shape.get('img_size')} (compare with recipe=<the pre-training recipe> init=random)")
    encoder.to(accelerator.device)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std).to(accelerator.device)
    metrics = knn_evaluate(encoder, cfg, accelerator, normalize, num_classes(cfg, shard_source(cfg, "train")))
    if accelerator.is_main_process:
        output = Path(cfg.train.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        record = {"recipe": cfg.recipe, "init": cfg.init, "protocol": "knn", **metrics,
                  "model": OmegaConf.to_container(cfg.model),
                  "data": {k: OmegaConf.to_container(cfg.data)[k] for k in INPUT_KEYS}}
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
