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

import json
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from .checkpoint import export_backbone, export_model

INPUT_KEYS = ("mean", "std", "crop_pct")  # data: keys an export records about its input


def describe_run(cfg, step: int, samples_seen: int) -> dict:
    """The part of an export's JSON that says how it was made and what it expects as input."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return {"recipe": cfg.recipe, "task": OmegaConf.to_container(cfg.task, resolve=True),
            "data": {k: data[k] for k in INPUT_KEYS}, "step": step, "samples_seen": samples_seen}


def export_run(task, output_dir: Path, cfg, step: int, samples_seen: int, best: Optional[dict] = None) -> None:
    """backbone.safetensors and model.safetensors (each with its JSON), or with `best` (the best
    evaluation's metrics) model_best.safetensors. `task` is the module itself, not a DDP or
    torch.compile wrapper."""
    extra = describe_run(cfg, step, samples_seen)
    if best is not None:
        export_model(task, output_dir / "model_best.safetensors", extra={**extra, "best": best})
        return
    export_backbone(task.encoder, output_dir / "backbone.safetensors", extra=extra)
    export_model(task, output_dir / "model.safetensors", extra=extra)


def write_metrics(output_dir: Path, cfg, evaluation: str, step: int, final: dict, best: dict) -> str:
    """metrics.json of a run's final evaluation; returns the line that reports it."""
    metrics = {"recipe": cfg.recipe, "task": cfg.task.name, "init": cfg.init, "step": step, **final}
    if evaluation == "top-k":
        metrics["best"] = best
    path = output_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    prefix, what = ("", "") if evaluation == "top-k" else ("knn_", "k-NN ")
    improved = (f" (best {best['top1']:.2f}% at step {best['step']})"
                if evaluation == "top-k" and best.get("step") != step else "")
    return (f"final: {what}top-1 {final[prefix + 'top1']:.2f}%, top-5 {final[prefix + 'top5']:.2f}% on "
            f"{final[prefix + 'num_samples']} validation samples{improved}; {path}")
