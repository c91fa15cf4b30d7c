"""The encoder-family contract: what an encoder module answers, and what its family registers.

An encoder family (our ViT, any timm model, ...) is one file in ssl_vit/models/ holding one class
decorated with `@register_family`; `model.arch` picks the family that claims it:

    @register_family
    class ViT(EncoderFamily):
        name = "vit"                    # how messages and `--help` call it
        Config = ViTConfig              # the `model:` keys of this family (extends config.ModelConfig)
        archs = {...}                   # the named sizes it builds (or override `claims`)
        masked_forwards = {"visible"}   # what `forward_features` can do besides the plain forward:
                                        #   "visible": ids_keep=[B, K], only those patches (MAE)
                                        #   "mask_token": mask=[B, L], masked patches replaced (SimMIM, BEiT)
        any_image_size = True           # forward_features runs images of another size than img_size, the
                                        #   position table resampled on the fly (multi-crop: DINO's local views)
        validate(cfg)                   # derived constraints, before anything is built
        create(arch, **options)         # the module
        fit_state_dict(encoder, state, metadata, report)   # a file's tensors -> this module's shapes
        config_from_state(state)        # the model: keys of a foreign file, from its tensors (optional)
        backbone_state(encoder)         # the state dict without classifier heads (backbone exports)
        timm_equivalent(config)         # how timm.create_model rebuilds an export, or None
        attention_maps(encoder, images) # where the encoder looks, for pictures (optional)

The module it builds answers what timm's models answer, so that the training loop, the optimizer,
evaluation and exports never ask which family they hold:

    forward_features(images, ...)      tokens [B, N, D] (or a feature map)
    forward_head(x, pre_logits=False)  logits [B, classes], or the pooled features [B, D]
    num_features, num_classes          widths
    config                             a dict with "arch" and what rebuilds the module (exports record it)
    group_matcher(coarse=False)        timm's parameter grouping (layer-wise lr decay)
    no_weight_decay()                  names of parameters kept out of weight decay (optional, as in timm)
    set_grad_checkpointing(enable)     activation checkpointing
    reset_classifier(num_classes)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..config import CheckpointError, ConfigError, ModelConfig


@dataclass
class LoadReport:
    """What loading a file did: filled in by the checkpoint format's converter, the encoder family's
    `fit_state_dict`, the task's, and finally `load_state_dict`."""
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the module, not in the file: left as initialised
    unexpected: list[str] = field(default_factory=list)    # in the file, not used
    resized: list[str] = field(default_factory=list)       # loaded after resampling or conversion
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        for title, items in (("resized", self.resized), ("missing (left as initialised)", self.missing),
                             ("unexpected (ignored)", self.unexpected)):
            if items:
                lines.append(f"  {title}: {compact(items)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class EncoderFamily:
    """Base of the registered families; the defaults fit any module with timm's interface."""
    name: ClassVar[str]
    Config: ClassVar[type] = ModelConfig
    archs: ClassVar[Mapping[str, dict]] = {}
    masked_forwards: ClassVar[frozenset] = frozenset()
    any_image_size: ClassVar[bool] = False  # forward_features runs images of another size than img_size
    # the keys of an export's encoder config that decide the weights' shapes (and the input size):
    # evaluation tools adopt them from `init=` unless the command line says otherwise
    architecture_keys: ClassVar[tuple[str, ...]] = ("arch", "img_size", "in_chans")
    # config keys that change what the weights compute without changing a tensor's shape: an export
    # that records another value is refused (checked where the module's config has the key too)
    shape_free_keys: ClassVar[tuple[str, ...]] = ("num_heads",)

    @classmethod
    def claims(cls, arch: str) -> bool:
        return arch in cls.archs

    @classmethod
    def arch_help(cls) -> str:
        """How `--help` lists the values of model.arch this family takes."""
        return "|".join(cls.archs)

    @classmethod
    def validate(cls, cfg) -> None:
        """Rules of the `model:` section (and its interplay with `data:`), checked before building."""

    @classmethod
    def create(cls, arch: str, **options: Any) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def fit_state_dict(cls, encoder: nn.Module, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        """Make a file's tensors (keys relative to the encoder) fit the module: by default a
        classifier of another size is dropped (the module keeps its new head) and any other shape
        difference is an error."""
        return drop_other_heads(encoder, state, report)

    @classmethod
    def fsdp_units(cls, encoder: nn.Module) -> list[nn.Module]:
        """The modules FSDP shards one by one (gathered one at a time in the forward and backward:
        the encoder's blocks); [] to shard the encoder with its task as one unit."""
        return []

    @classmethod
    def backbone_state(cls, encoder: nn.Module) -> dict[str, torch.Tensor]:
        """The encoder's tensors without its classifier heads."""
        classifier = classifier_prefixes(encoder)
        return {k: v for k, v in encoder.state_dict().items() if not k.startswith(classifier)}

    @classmethod
    def timm_equivalent(cls, config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """{"model_name": ..., "kwargs": {...}} that timm.create_model rebuilds this encoder from, or None."""
        return None

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None,
                          recipe: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The `model:` keys of a foreign file of this family, read from its tensors (tools/visualize.py
        reads official checkpoints this way); a ValueError says why they cannot be read."""
        raise ValueError(f"{cls.name} encoders are not read from a file's tensors")

    @classmethod
    def draws_attention(cls, encoder: nn.Module) -> bool:
        return False

    @classmethod
    def attention_maps(cls, encoder: nn.Module, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                       rollout: bool = False) -> dict[str, torch.Tensor]:
        """Where the encoder looks, on its patch grid: {"mean": [B, h, w], "head i": ..., "rollout": ...}."""
        raise ConfigError(f"{encoder.config.get('arch')} encoders ({cls.name} family) have no attention maps to draw")


def named_size_kwargs(arch: str, archs: Mapping[str, Mapping[str, Any]], options: Mapping[str, Any],
                      valid: Sequence[str], hint: str = "") -> dict[str, Any]:
    """The constructor arguments of the named size `arch` with `options` over them (None: the size's
    own value). An unknown size or option stops, naming the valid ones (`hint` adds to the first)."""
    if arch not in archs:
        raise ConfigError(f"unknown encoder {arch!r}; choose one of {', '.join(archs)}{hint}")
    unknown = set(options) - set(valid)
    if unknown:
        raise TypeError(f"create_encoder({arch!r}) got unknown option(s) {sorted(unknown)}; "
                        f"valid options: {', '.join(valid)}")
    return {**archs[arch], **{k: v for k, v in options.items() if v is not None}}


def recipe_size(cfg, archs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The options a recipe's `model:` section gives a family's named size (`archs[model.arch]`), its
    own keys over the size's (None: the size's own)."""
    return {**archs[cfg.model.arch], **{k: v for k, v in cfg.model.items() if v is not None and k != "arch"}}


def check_positive(cfg, *keys: str) -> None:
    """Sizes and counts of an encoder (`model.<key>`, a number or a list of them; None: the named
    size's own) must be positive: a patch size of 0 divides by zero, a depth of 0 builds no encoder."""
    from omegaconf import OmegaConf

    for key in keys:
        value = OmegaConf.select(cfg, f"model.{key}")
        values = list(value) if OmegaConf.is_list(value) else [value]
        if value is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                         for v in values):
            shown = list(value) if OmegaConf.is_list(value) else value
            raise ConfigError(f"model.{key}={shown} must be positive (or left out for model.arch's own)")


def drop_other_heads(encoder: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Classifier heads of another size are dropped, as timm and MAE do (the module keeps its new
    head); any other tensor whose shape differs from the module's is an error."""
    target = encoder.state_dict()
    classifier = classifier_prefixes(encoder)
    for key in list(state):
        if key in target and state[key].shape != target[key].shape:
            if not key.startswith(classifier):
                raise CheckpointError(f"{key}: file has shape {shape_text(state[key])} but the module needs "
                                      f"{shape_text(target[key])}; is the recipe's model.arch (and its size keys) right?")
            if key.endswith(".weight"):
                report.notes.append(f"{key[:-7]}: the file's has {state[key].shape[0]} outputs, the module's "
                                    f"{target[key].shape[0]}; the module keeps its own (new) head")
            del state[key]
    return state


def register_unique(registry: dict, kind: str, cls: type) -> type:
    """Add `cls` to `registry` under `cls.name`; another class of that name is an error (the same
    class again, as when a plugin file is imported twice, is not)."""
    known = registry.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"two {kind} are named {cls.name!r}: {known.__module__} and {cls.__module__}")
    registry[cls.name] = cls
    return cls


def classifier_prefixes(encoder: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of an encoder's classifier heads: timm's pretrained config names them
    (`head`, `fc`, `head.fc`, ...); a distilled DeiT has a second one."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    names += ("head_dist",) if "head_dist" not in names else ()
    return tuple(f"{name}." for name in names)


# -------------------------------------------------------------------------------------------
# the registry

_FAMILIES: dict[str, type[EncoderFamily]] = {}


def register_family(cls: type[EncoderFamily]) -> type[EncoderFamily]:
    """Class decorator: make an encoder family available to `model.arch` (and the exports' loaders)."""
    if not issubclass(cls, EncoderFamily) or not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__}: an encoder family subclasses EncoderFamily and sets `name`")
    return register_unique(_FAMILIES, "encoder families", cls)


def registered_families() -> dict[str, type[EncoderFamily]]:
    return dict(_FAMILIES)


def family_for_arch(arch: str) -> type[EncoderFamily]:
    for family in _FAMILIES.values():
        if family.claims(str(arch)):
            return family
    named = ", ".join(name for family in _FAMILIES.values() for name in family.archs)
    raise ConfigError(f"model.arch={arch!r} is not an encoder we know: use one of {named}, or timm:NAME for any "
                      "timm model (e.g. timm:resnet18); an encoder family of your own registers itself with "
                      "@register_family in a module named under imports:")


def family_of(encoder: nn.Module) -> type[EncoderFamily]:
    config = getattr(encoder, "config", None)
    if not isinstance(config, Mapping) or "arch" not in config:
        raise TypeError(f"{type(encoder).__name__} is not an encoder built by ssl_vit (it has no config['arch'])")
    return family_for_arch(config["arch"])


def shape_text(x) -> str:
    return "x".join(str(s) for s in (x.shape if isinstance(x, torch.Tensor) else x))


def compact(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
