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

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import tempfile

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from .. import recipes
from ..config import Config, ConfigError
from ..data.loaders import num_classes, shard_source
from ..data.transforms import DeviceNormalize
from ..data.worker_start import ignore_stop_signals, start_worker_server
from ..eval import knn_evaluate
from ..models import build_encoder, describe_encoder, family_for_arch
from ..recipes import recipe_task
from ..run import Trainer, check_batch, close_processes, mixed_precision
from ..run.outputs import INPUT_KEYS, write_metrics
from ..run.stops import catch_stop_signals_early
from ..tasks import registered_tasks, task_class
from ..weights import export_description, load_weights
from .exits import exit_on_error


def _argv(argv: Optional[Sequence[str]]) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def load_config(argv: Sequence[str], command: str, default_recipe: Optional[str] = None, schema: type = Config,
                accepts=None):
    """The recipe + what the JSON beside an `init` export (or `like=` with init=random) says about its
    encoder and input + the command line, validated. `accepts`: the tasks the command runs (its
    --help lists their recipes only)."""
    listed = (lambda: runnable_recipes(accepts)) if accepts is not None else None
    cfg = recipes.load(argv, schema=schema, command=command, default_recipe=default_recipe, check=False,
                       recipes=listed)
    adopted = init_settings(cfg, recipes.command_line_keys(argv))
    if not adopted:
        recipes.validate(cfg)
        return cfg
    where = (f"{Path(cfg.init).with_suffix('.json').name} beside init" if cfg.init != "random"
             else f"like={cfg.like}")
    cfg = recipes.load(argv, schema=schema, command=command, default_recipe=default_recipe, adopted=(where, adopted))
    if int(os.environ.get("RANK", "0")) == 0 and not cfg.print_config:
        shown = ", ".join(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value}"
                          for key in adopted for value in [OmegaConf.select(cfg, key)])
        print(f"from {where}: {shown}", flush=True)
    return cfg


def init_settings(cfg, explicit: set[str]) -> dict[str, Any]:
    """What the JSON beside an `init` export decides, as {recipe key: value}: the encoder's
    architecture (its family's `architecture_keys`) and the input normalisation; the recipe keeps the
    rest (pooling, drop path, number of classes), and the command line wins over both."""
    if not cfg.init:
        return {}
    if cfg.init == "random":
        if not cfg.like:
            return {}
        path = like_export(cfg.like)
    else:
        path = Path(cfg.init)
        if not path.is_file():
            raise ConfigError(f"init={cfg.init}: no such file; give a checkpoint (ours, timm, official MAE or DeiT) "
                              "or init=random")
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


def like_export(like: str) -> Path:
    """The export that `like=` names: a .safetensors export, the JSON beside one, or a run folder
    (its backbone.safetensors)."""
    path = Path(like)
    if path.is_dir():
        path = next((path / name for name in ("backbone.safetensors", "model.safetensors")
                     if (path / name).is_file()), path / "backbone.safetensors")
    elif path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.with_suffix(".json").is_file():
        raise ConfigError(f"like={like}: no export of ours there (a backbone.safetensors with its JSON, or the run "
                          "folder holding one), so the architecture of the random baseline is unknown")
    return path


def _require(cfg, command: str, accepts, what: str, needs_init: bool) -> None:
    """The tasks a command runs, by what they say of themselves (tasks/base.py)."""
    if not accepts(task_class(cfg.task.name)):
        fitting = [name for name, cls in registered_tasks().items() if accepts(cls)]
        recipes = ", ".join(runnable_recipes(accepts)) or "none"
        raise ConfigError(f"{command} runs {what} (task.name in {fitting}); recipe {cfg.recipe!r} has "
                          f"task.name={cfg.task.name!r}. Use one of its recipes ({recipes}); for the random "
                          f"baseline of a pre-trained encoder: {command} recipe=<one of those> init=random "
                          "like=runs/<the pre-training run> (its architecture and input normalisation)")
    if needs_init and not cfg.init:
        raise ConfigError(f"{command} needs init=PATH (our backbone.safetensors, a timm, official MAE or DeiT "
                          "checkpoint) or init=random for the randomly initialised baseline")


def runnable_recipes(accepts) -> list[str]:
    """The recipes whose task a command runs (for its errors and --help)."""
    tasks = registered_tasks()
    return [name for name in recipes.available_recipes()
            if (task := recipe_task(name)) in tasks and accepts(tasks[task])]


def _train(argv, command: str, accepts, what: str, needs_init: bool) -> int:
    catch_stop_signals_early()
    argv = _argv(argv)
    cfg = load_config(argv, command, accepts=accepts)
    if cfg.print_config:
        print(recipes.to_yaml(cfg), end="")
        return 0
    _require(cfg, command, accepts, what, needs_init)
    check_before_start(cfg)
    start_worker_server()  # several processes: it loads torch while the trainer builds (data/worker_start.py)
    trainer = Trainer(cfg)
    code = trainer.run()
    trainer.close()
    # nothing is left to save or to stop: a late Ctrl-C or SIGTERM would only print a traceback from
    # inside Python's exit (its atexit callbacks), which takes a moment
    ignore_stop_signals()
    return code


def check_before_start(cfg) -> None:
    """What can be known before any process group, model or data loader exists: the data is there,
    the global batch splits over the processes the launcher started, the output folder can be written."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise ConfigError("accelerate launch --use_fsdp hands the model to Accelerate's FSDP plugin, which this loop "
                          "does not use: launch as for DDP (--multi_gpu) and pass train.sharding=fsdp")
    recipes.check_data(cfg)
    check_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    folder = Path(cfg.train.output_dir).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    checkpoints = folder / "checkpoints"  # a resumed run's, maybe on another file system (a link)
    for target in [existing] + ([checkpoints] if checkpoints.exists() else []):
        problem = _cannot_write_into(target)
        if problem:
            raise ConfigError(f"train.output_dir={cfg.train.output_dir}: cannot write into {target} ({problem}): "
                              "give a train.output_dir you can write, or make it writable")


def _cannot_write_into(folder: Path) -> Optional[str]:
    """Why a folder cannot be written, found by writing: permission bits do not stop root, while a
    read-only or full file system stops everyone."""
    if not folder.is_dir():
        return "a file where a folder should be"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write_check_", dir=folder))
    except OSError as error:
        return error.strerror or str(error)
    return None


@exit_on_error
def pretrain(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch pretrain.py recipe=NAME [key=value ...]`: any task."""
    return _train(argv, "pretrain.py", lambda task: True, "any task", needs_init=False)


@exit_on_error
def finetune(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/finetune.py recipe=finetune_base init=PATH [key=value ...]`."""
    return _train(argv, "finetune.py", lambda task: task.needs_labels and task.trains_encoder,
                  "tasks that train the encoder on labels", needs_init=True)


@exit_on_error
def linear_probe(argv: Optional[Sequence[str]] = None) -> int:
    """`accelerate launch tools/linear_probe.py recipe=linprobe_base init=PATH [key=value ...]`."""
    return _train(argv, "linear_probe.py", lambda task: task.needs_labels and not task.trains_encoder,
                  "tasks that train heads on a frozen encoder", needs_init=True)


@exit_on_error
def knn(argv: Optional[Sequence[str]] = None) -> int:
    """`python tools/knn.py init=PATH [recipe=NAME] [key=value ...]`: k-NN top-1 / top-5 of an encoder's
    features on data.val with data.train as memory (DINO's protocol), written to output_dir/metrics.json."""
    argv = _argv(argv)
    # the digits set without a recipe: the digits encoder (recipes/knn_digits.yaml), not ViT-B/16 at 224 px
    cfg = load_config(argv, "knn.py", default_recipe="knn_digits" if "data.name=digits" in argv else "knn")
    if cfg.print_config:
        print(recipes.to_yaml(cfg), end="")
        return 0
    if not cfg.init:
        raise ConfigError("knn.py needs init=PATH (an encoder's weights) or init=random like=<an export or run "
                          "folder> for a randomly initialised encoder of the same architecture")
    recipes.check_data(cfg, ("train", "val"))
    start_worker_server()  # several processes: it loads torch while the encoder loads (data/worker_start.py)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.train.precision))
    if cfg.init == "random":
        torch.manual_seed(cfg.train.seed)  # the encoder's initialisation
    encoder = build_encoder(cfg.model, num_classes=0)
    if accelerator.is_main_process:
        choose = (f" (recipe {cfg.recipe}; another architecture: like=<an export or run folder>, model.arch=... or "
                  "recipe=...)" if cfg.init == "random" and not cfg.like else "")
        print(f"{'randomly initialised ' if cfg.init == 'random' else ''}{describe_encoder(encoder)}{choose}",
              flush=True)
    if cfg.init != "random":
        load_weights(encoder, cfg.init, verbose=accelerator.is_main_process,
                     min_encoder_fraction=0.0 if cfg.init_partial else 0.5)
    encoder.to(accelerator.device)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std).to(accelerator.device)
    metrics = knn_evaluate(encoder, cfg, accelerator, normalize, num_classes(cfg, shard_source(cfg, "train")))
    if accelerator.is_main_process:
        output = Path(cfg.train.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(f"# resolved recipe {cfg.recipe!r}, written by knn.py; reusable as "
                                            "recipe=<this file>\n" + recipes.to_yaml(cfg))
        line = write_metrics(output, cfg, {"protocol": "knn", **metrics})
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(output / "tensorboard")) as writer:
                for key in ("top1", "top5"):
                    writer.add_scalar(f"val/knn_{key}", metrics[key], global_step=0)
        print(f"{line} ({metrics['num_train_samples']} training samples as memory)")
    close_processes(accelerator)
    return 0
