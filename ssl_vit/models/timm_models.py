"""Any timm model as an encoder: `model.arch=timm:NAME` (e.g. a convnet teacher for DeiT, trained here),
built locally (pretrained=False: nothing is downloaded).

timm's models already answer the encoder protocol (forward_features, forward_head(pre_logits=True),
group_matcher, no_weight_decay, set_grad_checkpointing, num_features); the family adds the `config`
our exports record, passes `img_size` to the models that take one, and finds the classifier for
backbone exports in timm's pretrained config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch.nn as nn

from ..config import ConfigError, ModelConfig
from .base import EncoderFamily, register_family

PREFIX = "timm:"


@dataclass
class TimmConfig(ModelConfig):
    """A timm model's `model:` keys: the common ones (timm's own defaults decide the rest)."""
    arch: str = "timm:resnet50"


def timm_model_name(arch: str, key: str = "model.arch") -> str:
    """The timm name in `arch` ("timm:" optional), checked against timm's registry; `key` is the
    recipe key that gave it, for the error."""
    import timm

    name = arch.removeprefix(PREFIX)
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"{key}={arch}: timm has no model {name!r} (similar: {', '.join(close) or 'none'})")
    return name


@register_family
class Timm(EncoderFamily):
    """any timm model, built locally (no download), for supervised training and as a teacher."""
    name = "timm"
    Config = TimmConfig

    @classmethod
    def claims(cls, arch: str) -> bool:
        return arch.startswith(PREFIX)

    @classmethod
    def arch_help(cls) -> str:
        return "timm:NAME"

    @classmethod
    def validate(cls, cfg) -> None:
        """Builds the model and runs it on one image on the meta device (shapes only: no memory, no
        time), so that a size timm's model cannot take is an error now, not after start-up."""
        import torch

        size = cfg.model.img_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        with torch.device("meta"):
            model = cls.create(cfg.model.arch, num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans,
                               img_size=size, drop_path_rate=cfg.model.drop_path_rate)
            try:
                model.eval()(torch.empty(1, cfg.model.in_chans, height, width))
            except NotImplementedError:  # an operation without a meta kernel: nothing learnt
                pass
            except (RuntimeError, AssertionError, ValueError) as e:
                raise ConfigError(f"timm's {cfg.model.arch.removeprefix(PREFIX)} cannot run on {height}x{width} "
                                  f"images (model.img_size={size}): {type(e).__name__}: {str(e).splitlines()[0]}"
                                  "; choose another model.img_size or model") from None

    @classmethod
    def create(cls, arch: str, *, num_classes: int = 0, in_chans: int = 3, img_size: Any = None,
               drop_path_rate: Optional[float] = None, takes_img_size: Optional[bool] = None,
               key: str = "model.arch") -> nn.Module:
        """timm's model `arch`, with `config` (what our exports record, so that init= and
        task.teacher.weights= rebuild it). img_size goes to the models whose constructor takes one;
        `takes_img_size`, which exports record, is found out again here."""
        import timm

        name = timm_model_name(arch, key)
        kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate or None)
        size = None if img_size is None else [img_size, img_size] if isinstance(img_size, int) else list(img_size)
        try:
            try:
                model = timm.create_model(name, pretrained=False, **kwargs,
                                          **({"img_size": tuple(size)} if size is not None else {}))
                takes_img_size = size is not None
            except TypeError as e:  # convnets take any size and no img_size argument
                if "img_size" not in str(e):
                    raise
                model, takes_img_size = timm.create_model(name, pretrained=False, **kwargs), False
        except (AssertionError, ValueError, RuntimeError, TypeError) as e:
            given = {**kwargs, **({"img_size": size} if size is not None else {})}
            raise ConfigError(f"timm cannot build {name} with {', '.join(f'{k}={v}' for k, v in given.items())}: "
                              f"{type(e).__name__}: {e or 'an assertion failed'} (check model.img_size against the "
                              "model's patch and window sizes)") from None
        model.config = {"arch": f"{PREFIX}{name}", "num_classes": num_classes, "in_chans": in_chans}
        if size is not None:  # the training input (a teacher's is decided by its Teacher)
            model.config["img_size"] = size
            model.config["takes_img_size"] = takes_img_size
        return model

    @classmethod
    def timm_equivalent(cls, config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        name = config["arch"].removeprefix(PREFIX)
        kwargs = dict(in_chans=config["in_chans"], num_classes=config["num_classes"])
        if config.get("takes_img_size"):
            kwargs["img_size"] = list(config["img_size"])
        return dict(model_name=name, kwargs=kwargs)
