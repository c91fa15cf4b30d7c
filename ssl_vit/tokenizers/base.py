"""The tokenizer contract and what is checked of a tokenizer file (its description, its tensors, its
values, its recorded stride); tokenizers/__init__.py picks the kind a file holds and loads it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..config import CheckpointError, ConfigError
from ..models.base import compact, shape_text

FORMAT, KIND = "ssl_vit", "tokenizer"
RANDOM = "random"  # task.tokenizer.path=random
HOW = ("convert DALL-E's encoder.pkl with `python tools/convert_tokenizer.py encoder.pkl "
       "dall_e_encoder.safetensors`, or train one with `python pretrain.py recipe=dvae_digits` (its "
       "tokenizer.safetensors)")


class Tokenizer(nn.Module):
    """The contract of a tokenizer kind: frozen, always in eval mode, fp32 unless it says otherwise."""
    kind: ClassVar[str]
    encoder: nn.Module                    # its weights: the file holds this module's state dict
    vocab_size: int                       # codes
    stride: int                           # pixels per code (side)
    in_chans: int

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] of images [B, C, H, W] with values in [0, 1]."""
        raise NotImplementedError

    def description(self) -> dict[str, Any]:
        """What the file records, from which `from_file` rebuilds the module."""
        return {"type": self.kind, "vocab_size": self.vocab_size, "stride": self.stride, "in_chans": self.in_chans}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "Tokenizer":
        """The module `description()` describes, its weights as initialised (the file's are loaded next)."""
        raise NotImplementedError

    def describe(self) -> str:
        count = sum(p.numel() for p in self.parameters()) / 1e6
        return (f"{self.kind} tokenizer: {self.vocab_size} codes, one per {self.stride}x{self.stride} pixels, "
                f"{count:.2f}M parameters, frozen")

    def freeze(self) -> "Tokenizer":
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Tokenizer":
        return super().train(False)  # never trained here: no dropout, no statistics


# -------------------------------------------------------------------------------------------
# files


def from_description_of(kind: type[Tokenizer], description: dict[str, Any], where: str) -> Tokenizer:
    try:
        return kind.from_description(description)
    except (KeyError, TypeError, ValueError) as e:  # the description's settings are the file's, not ours
        raise ConfigError(f"{where}: its description does not build a {kind.kind} tokenizer ({type(e).__name__}: "
                          f"{e}); the file is damaged: {HOW}") from None


def state_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> str:
    """The missing, unexpected and reshaped keys of a file's tensors against those of `what`, or ''."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = [f"{k} {shape_text(state[k])} ({what} has {shape_text(expected[k])})"
                for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    return "; ".join(f"{title}: {compact(keys)}" for title, keys in
                     (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped)) if keys)


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding NaN or inf."""
    return sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def check_recorded(tokenizer: Tokenizer, description: dict[str, Any], where: str) -> None:
    """The header's stride, vocab_size and in_chans (which runs read without loading the weights) must be
    the module's. The stride is measured: the codes of a dummy image of two codes a side."""
    for name in ("vocab_size", "in_chans"):
        if description[name] != getattr(tokenizer, name):
            raise CheckpointError(f"{where} records {name} {description[name]}, but its layers give "
                                  f"{getattr(tokenizer, name)}: the description was edited; {HOW}")
    side, recorded = 2 * tokenizer.stride, description["stride"]
    try:
        codes = tokenizer(torch.full((1, tokenizer.in_chans, side, side), 0.5))     # [1, h, w]
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its layers do not run on a {side}x{side} image "
                              f"({str(e).splitlines()[0]}); {HOW}") from None
    h, w = codes.shape[-2:]
    given = side // w if h == w and w and side % w == 0 else None
    if given != recorded:
        measured = f"stride {given}" if given else "no whole stride"
        raise CheckpointError(f"{where} records stride {recorded} (a code per {recorded}x{recorded} pixels), but its "
                              f"layers give {measured}: a {side}x{side} image gives {h}x{w} codes, so a run would cut "
                              f"its view for the wrong grid; the description was edited: write the tokenizer again "
                              f"({HOW})")


def save_tokenizer(tokenizer: Tokenizer, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """`path` (.safetensors) and the same description as JSON beside it; written under a temporary
    name and renamed, so an interrupted write never leaves a half file under the real name."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a tokenizer is written as .safetensors, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    description = tokenizer.description()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tokenizer.encoder.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "kind": KIND, "tokenizer": json.dumps(description)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 600; a tokenizer is meant to be shared
    os.replace(tmp, path)
    record = {"format": FORMAT, "kind": KIND, "file": path.name, "tokenizer": description, **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


