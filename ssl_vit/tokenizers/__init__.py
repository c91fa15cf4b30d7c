"""Visual tokenizers: a frozen image -> one discrete code per patch (BEiT's targets, Bao et al. 2022 §2.2).

    tokenizer(pixels [B, C, H, W], floats in [0, 1])  ->  codes [B, H / stride, W / stride] (long)

Each kind maps the pixels the way it was trained (DALL-E's logit-Laplace `map_pixels`, or the mean
and std of the run that trained it), so any tokenizer takes the same input. Two kinds:

    dall_e.py   OpenAI's DALL-E dVAE encoder (Ramesh et al. 2021: 8192 codes, stride 8), which BEiT v1
                used. Its published `encoder.pkl` is a pickle of a whole module; tools/convert_tokenizer.py
                (dall_e_pickle.py) turns it into safetensors without running anything from it
    vq.py       the encoder of a vector-quantised VAE that ssl_vit trains (task.name=dvae, recipe
                dvae_digits), for data where no tokenizer exists and for offline use

A tokenizer file is safetensors (never a pickle) whose metadata says what it is:
{"format": "ssl_vit", "kind": "tokenizer", "tokenizer": JSON of `description()`}, with the same JSON
written beside it. `load_tokenizer(path)` reads either kind; `random_tokenizer(seed)` is an untrained
one (BEST-RQ's random-projection quantiser, Chiu et al. 2022, in image form), the control for what a
trained tokenizer adds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn as nn

from ..config import ConfigError

FORMAT, KIND = "ssl_vit", "tokenizer"
RANDOM = "random"  # task.tokenizer.path=random


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
    def from_state(cls, state: dict[str, torch.Tensor], description: dict[str, Any]) -> "Tokenizer":
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


def tokenizer_kinds() -> dict[str, type[Tokenizer]]:
    from .dall_e import DallETokenizer
    from .vq import VQTokenizer

    return {DallETokenizer.kind: DallETokenizer, VQTokenizer.kind: VQTokenizer}


# -------------------------------------------------------------------------------------------
# files


def read_description(path: Union[str, Path], key: str = "task.tokenizer.path") -> dict[str, Any]:
    """A tokenizer file's description (its safetensors header only: no weights are read), or a
    ConfigError that says what the file is instead and how to get a tokenizer."""
    from safetensors import safe_open

    path = Path(path)
    how = ("convert DALL-E's encoder.pkl with `python tools/convert_tokenizer.py encoder.pkl "
           "dall_e_encoder.safetensors`, or train one with `python pretrain.py recipe=dvae_digits` (its "
           "tokenizer.safetensors)")
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; {how}")
    if path.suffix != ".safetensors":
        raise ConfigError(f"{key}={path} is not a safetensors tokenizer file (a pickle would run code on loading); "
                          f"{how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors' own errors carry the reason
        raise ConfigError(f"{key}={path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT or meta.get("kind") != KIND or "tokenizer" not in meta:
        what = f"an ssl_vit {meta['kind']} export" if meta.get("format") == FORMAT else "not an ssl_vit file"
        raise ConfigError(f"{key}={path} is {what}, not a tokenizer; {how}")
    description = json.loads(meta["tokenizer"])
    if description.get("type") not in tokenizer_kinds():
        raise ConfigError(f"{key}={path}: unknown tokenizer type {description.get('type')!r} (known: "
                          f"{', '.join(tokenizer_kinds())})")
    return description


def load_tokenizer(path: Union[str, Path], key: str = "task.tokenizer.path") -> Tokenizer:
    """The frozen tokenizer stored at `path` (tools/convert_tokenizer.py's, or a dvae run's)."""
    from safetensors.torch import load_file

    description = read_description(path, key)
    state = load_file(str(path))
    return tokenizer_kinds()[description["type"]].from_state(state, description).freeze()


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


def tokenizer_stride(path: Optional[str], key: str = "task.tokenizer.path") -> int:
    """Pixels per code of the tokenizer `path` names (the header only), or of the random one."""
    if not path:
        build_tokenizer(path, key=key)  # the error that says what to give
    if path == RANDOM:
        from .vq import random_tokenizer_config

        return 2 ** random_tokenizer_config()["num_downsamples"]
    return int(read_description(path, key)["stride"])


def random_tokenizer(seed: int = 0, in_chans: int = 3) -> Tokenizer:
    """An untrained tokenizer: the dvae encoder at its default size, drawn from `seed` alone (the same
    weights in every process and on every resume), normalising pixels as [0.5] / [0.5]."""
    from .vq import VQTokenizer, random_tokenizer_config

    return VQTokenizer.random(random_tokenizer_config(in_chans), seed)


def build_tokenizer(path: Optional[str], *, seed: int = 0, in_chans: int = 3,
                    key: str = "task.tokenizer.path") -> Tokenizer:
    """What task.tokenizer.path names: a tokenizer file, or `random`."""
    if not path:
        raise ConfigError(f"{key} is required: a tokenizer file (DALL-E's, converted with tools/convert_tokenizer.py, "
                          "or the tokenizer.safetensors of a `pretrain.py recipe=dvae_digits` run), or "
                          f"{key}=random for an untrained one")
    tokenizer = random_tokenizer(seed, in_chans) if path == RANDOM else load_tokenizer(path, key)
    if tokenizer.in_chans != in_chans:
        raise ConfigError(f"{key}={path} reads {tokenizer.in_chans}-channel images, the model "
                          f"{in_chans} (model.in_chans)")
    return tokenizer
