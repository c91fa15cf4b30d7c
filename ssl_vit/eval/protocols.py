"""Evaluation protocols: what a task is measured by during and after training, as objects the loop
calls without asking which one it has. A task names its protocol (`Task.evaluation`); the run builds
it and calls it, the same way on 1 or N processes:

    protocol.required_splits(cfg)      the data splits the run needs (classmethod)
    protocol.needs_labels(cfg)         whether the training split's labels are read (classmethod)
    protocol.due(step, plan)           whether to evaluate after this step (the last is evaluated anyway)
    protocol.measure(ema_module)       one flat dict with its `protocol`
    protocol.scalars(metrics)          what TensorBoard draws of it
    protocol.best(metrics, best, step, epoch)   the new best record, or None: the best-model rule
    protocol.keeps_best                whether it keeps a best model (model_best, `best` in metrics.json)

    "top-k"  the task's predict() on data.val (or its own validation batches), summarised by the task
             (a linear probe's sweep reports its best head); with data.holdout_fraction the choices
             (the best model, the best head) are made on held-out training images; the EMA's too
    "knn"    the k-NN monitor of the encoder's features (data.train as memory, data.val as queries),
             every eval.knn_every steps when set
    "none"   nothing (a tokenizer: its codebook use and reconstructions are logged instead)
"""
from __future__ import annotations

from typing import ClassVar, Optional

from ..data.loaders import build_eval_loader
from ..data.features import Rounds
from .metrics import evaluate, knn_evaluate

_PROTOCOLS: dict[str, type["Protocol"]] = {}


def register_protocol(cls: type["Protocol"]) -> type["Protocol"]:
    _PROTOCOLS[cls.name] = cls
    return cls


def protocol_for(task_class) -> type["Protocol"]:
    """The protocol a task names (checked when the task registers: tasks/base.py EVALUATIONS)."""
    return _PROTOCOLS[task_class.evaluation]


class Protocol:
    name: ClassVar[str]
    keeps_best: ClassVar[bool] = False

    def __init__(self, cfg, task, accelerator, normalize, num_classes: int, rounds: Rounds = None):
        self.cfg, self.task, self.accelerator, self.normalize = cfg, task, accelerator, normalize
        self.num_classes, self.rounds = num_classes, rounds
        self.batch_size = cfg.eval.batch_size or cfg.data.batch_size

    @classmethod
    def runs(cls, cfg) -> bool:
        """Whether the run evaluates at all."""
        return True

    @classmethod
    def required_splits(cls, cfg) -> tuple[str, ...]:
        return ("train", "val") if cls.runs(cfg) else ("train",)

    @classmethod
    def needs_labels(cls, cfg) -> bool:
        return False

    def due(self, step: int, plan) -> bool:
        return False

    def measure(self, ema_module=None) -> dict:
        raise NotImplementedError

    def scalars(self, metrics: dict) -> dict:
        return {f"val/{k}": v for k, v in metrics.items() if k.endswith(("top1", "top5"))}

    def best(self, metrics: dict, best: dict, step: int, epoch: float) -> Optional[dict]:
        return None


@register_protocol
class NoEvaluation(Protocol):
    name = "none"

    @classmethod
    def runs(cls, cfg) -> bool:
        return False


@register_protocol
class KNNMonitor(Protocol):
    name = "knn"

    @classmethod
    def runs(cls, cfg) -> bool:
        return cfg.eval.knn_every > 0

    @classmethod
    def needs_labels(cls, cfg) -> bool:
        return cls.runs(cfg)  # the memory's labels vote

    def due(self, step: int, plan) -> bool:
        return step % self.cfg.eval.knn_every == 0

    def measure(self, ema_module=None) -> dict:
        metrics = knn_evaluate(self.task.evaluated_encoder(), self.cfg, self.accelerator, self.normalize, self.num_classes,
                               features=self.task.features, rounds=self.rounds)
        return {"protocol": self.name, **metrics}

    def scalars(self, metrics: dict) -> dict:
        # the accuracies, named as k-NN ones, not the constants beside them (k, temperature)
        return {f"val/knn_{k}": v for k, v in metrics.items() if k.endswith(("top1", "top5"))}


@register_protocol
class TopKAccuracy(Protocol):
    name = "top-k"
    keeps_best = True

    def due(self, step: int, plan) -> bool:
        """Every eval.every_epochs epochs, at an epoch's last step."""
        epochs_done, into_epoch = divmod(step, plan.steps_per_epoch)
        every = self.cfg.eval.every_epochs
        return bool(every) and into_epoch == 0 and epochs_done % every == 0

    def accuracy(self, module=None, split: str = "val") -> list[dict]:
        module = module or self.task
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batches = module.validation_batches(rank, world, self.batch_size, split=split)
        normalize = None
        if batches is None:
            batches = build_eval_loader(self.cfg, split, rank=rank, world_size=world, batch_size=self.batch_size)
            normalize = self.normalize
        was_training = module.training
        module.eval()
        try:
            with self.accelerator.autocast():
                return evaluate(module.predict, batches, device=self.accelerator.device, normalize=normalize,
                                accelerator=self.accelerator, description=f"evaluating on {split}", rounds=self.rounds)
        finally:
            module.train(was_training)

    def measure(self, ema_module=None) -> dict:
        selection = self.accuracy(split="holdout") if self.cfg.data.holdout_fraction > 0 else None
        metrics = {"protocol": self.name, **self.task.summarize(self.accuracy(), selection)}
        if ema_module is not None:
            metrics.update({f"ema_{k}": v for k, v in self.accuracy(ema_module)[0].items()})
        return metrics

    def scalars(self, metrics: dict) -> dict:
        scalars = super().scalars(metrics)
        scalars.update({f"val/holdout_{k}": v for k, v in metrics.get("holdout", {}).items() if k.endswith("top1")})
        return scalars

    def best(self, metrics: dict, best: dict, step: int, epoch: float) -> Optional[dict]:
        """The best model is chosen on the held-out part of the training split when there is one (then
        data.val is not looked at for choices), else on data.val."""
        score = metrics.get("holdout", metrics)["top1"]
        if score <= best.get("score", -1.0):
            return None
        return {**{k: v for k, v in metrics.items() if k != "heads"}, "score": score, "step": step, "epoch": epoch}
