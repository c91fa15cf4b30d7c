"""What a run leaves for its users besides checkpoints: the exports and metrics.json.

    backbone.safetensors + .json    the encoder without classifier heads, timm key names, and the
                                    timm.create_model command that loads it (for families timm has)
    model.safetensors + .json       the task's own export: MAE with its decoder (official layout), a
                                    classifier, a linear probe's best head folded into the encoder
    model_best.safetensors + .json  top-k tasks: the model at its best evaluation so far
    metrics.json                    the final evaluation and what produced it

Each JSON records the recipe, the task's config and the input normalisation, which the evaluation
tools adopt (`init=runs/x/backbone.safetensors` is all a user types).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from ..weights import export_backbone, export_model

INPUT_KEYS = ("mean", "std", "crop_pct")  # data: keys an export records about its input


def describe_run(cfg, step: int, samples_seen: int, classes: Optional[list[str]] = None) -> dict:
    """The part of an export's JSON that says how it was made, what it expects as input and (for a
    classifier) the names of its classes, from the training shards' index."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    description = {"recipe": cfg.recipe, "task": OmegaConf.to_container(cfg.task, resolve=True),
                   "data": {k: data[k] for k in INPUT_KEYS}, "step": step, "samples_seen": samples_seen}
    if classes:
        description["classes"] = list(classes)
    return description


def export_run(task, output_dir: Path, cfg, step: int, samples_seen: int, evaluation: Optional[dict] = None,
               best: Optional[dict] = None, classes: Optional[list[str]] = None) -> None:
    """backbone.safetensors and model.safetensors (each with its JSON) at `evaluation` (the final one,
    if any), or with `best` (the best evaluation's metrics) model_best.safetensors at that one. `task`
    is the module itself, not a DDP or torch.compile wrapper."""
    extra = describe_run(cfg, step, samples_seen, classes)
    if best is not None:
        export_model(task, output_dir / "model_best.safetensors", extra={**extra, "best": best}, evaluation=best)
        return
    export_backbone(task.evaluated_encoder(), output_dir / "backbone.safetensors", extra={k: v for k, v in extra.items()
                                                                               if k != "classes"})
    export_model(task, output_dir / "model.safetensors", extra=extra, evaluation=evaluation)


def write_metrics(output_dir: Path, cfg, metrics: dict, *, step: Optional[int] = None,
                  best: Optional[dict] = None) -> str:
    """metrics.json, one schema for every tool: the evaluation (`protocol`: "knn" or "top-k"; `top1`,
    `top5` in percent, `num_samples`; for top-k runs the best evaluation and on which split choices
    were made) and what produced it (`provenance`). Returns the line that reports it."""
    record = {"recipe": cfg.recipe, "task": cfg.task.name, "step": step, **metrics}
    if best:
        record["best"] = best
    record["provenance"] = provenance(cfg)
    path = output_dir / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)  # a kill while writing never leaves a cut metrics.json (a rerun would keep it)
    return f"final: {describe_metrics(metrics, best, step)}; {path}"


def describe_metrics(metrics: dict, best: Optional[dict] = None, step: Optional[int] = None) -> str:
    """One line: "k-NN (k=20, T=0.07) top-1 89.44%, top-5 99.44% on 360 validation samples", ..."""
    what = f"k-NN (k={metrics['k']}, T={metrics['temperature']}) " if metrics["protocol"] == "knn" else ""
    text = (f"{what}top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['num_samples']} "
            "validation samples")
    if metrics.get("selected_on") == "holdout":
        text += f" (chosen on {metrics['holdout']['num_samples']} held-out training samples)"
    if best and step is not None and best.get("step") != step:
        text += f" (best {best['top1']:.2f}% at step {best['step']})"
    return text


def provenance(cfg) -> dict:
    """What produced a result: the weights it started from (and their checksum), the data, the seed
    and the code."""
    data = cfg.data
    splits = {"name": data.name, "train_fraction": data.train_fraction, "holdout_fraction": data.holdout_fraction}
    if data.name == "digits":
        splits.update(train="digits (embedded)", val="digits (embedded)")
    else:
        splits.update(train=OmegaConf.to_container(data.train) if OmegaConf.is_config(data.train) else data.train,
                      val=OmegaConf.to_container(data.val) if OmegaConf.is_config(data.val) else data.val)
    init = cfg.init
    return {"init": init, "init_sha256": file_sha256(init) if init and init != "random" else None,
            "like": cfg.get("like"), "seed": cfg.train.seed, "data": splits,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "input": {k: OmegaConf.to_container(data, resolve=True)[k] for k in INPUT_KEYS}, "code": code_version()}


_SHA256: dict[tuple, str] = {}


def file_sha256(path: str) -> Optional[str]:
    """sha256 of a file (remembered per path, size and modification time: a run asks more than once)."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def code_version() -> dict:
    """ssl_vit's version, and the git commit of a checkout (with whether it had uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent.parent
    info = {"ssl_vit": version("ssl_vit"), "commit": None, "uncommitted_changes": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ssl_vit"],
                                    capture_output=True, text=True, timeout=10)
            info.update(commit=commit.stdout.strip(), uncommitted_changes=bool(status.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return info
