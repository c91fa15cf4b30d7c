"""The rules every recipe is held to before anything is built: the general sections' (config.py), then
the encoder family's and the task's own; and the data a run needs, found where the recipe says."""
from __future__ import annotations

from typing import Optional, Sequence

from omegaconf import DictConfig

from ..config import check_general
from ..data import shard_source
from ..eval import protocol_for
from ..models import family_for_arch
from ..tasks import task_class


def validate(cfg: DictConfig) -> None:
    """The general sections' rules, then the encoder family's and the task's."""
    check_general(cfg)
    family_for_arch(cfg.model.arch).validate(cfg)
    task_class(cfg.task.name).validate(cfg)


def check_data(cfg: DictConfig, splits: Optional[Sequence[str]] = None) -> None:
    """The checks a run needs and `print_config` does not, before anything is built: the data the
    recipe must be given (by default the splits the recipe's task needs), found where it says."""
    if splits is None:
        splits = protocol_for(task_class(cfg.task.name)).required_splits(cfg)
    if cfg.data.name != "shards":
        return
    for split in splits:
        shard_source(cfg, split)  # given, and there (a folder of images says how to make shards of it)


