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

A file is trusted for nothing it can be checked for: `load_tokenizer` refuses, in one line naming the
file, tensors other than those its description builds, non-finite weights (argmax over NaN gives code 0
everywhere, and BEiT would train on it without a complaint), and a recorded stride other than the one
its layers give (BEiT cuts the tokenizer's view by the recorded stride, and would fail at the first step).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..config import ConfigError
from ..models.base import CheckpointError, compact, shape_text

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
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file; {HOW}")
    if path.suffix != ".safetensors":
        raise ConfigError(f"{key}={path} is not a safetensors tokenizer file (a pickle would run code on loading); "
                          f"{HOW}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors' own errors carry the reason
        raise ConfigError(f"{key}={path} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT or meta.get("kind") != KIND or "tokenizer" not in meta:
        kind = meta.get("kind", "unnamed")
        what = f"an ssl_vit {kind} export" if meta.get("format") == FORMAT else "not an ssl_vit file"
        raise ConfigError(f"{key}={path} is {what}, not a tokenizer; {HOW}")
    try:
        description = json.loads(meta["tokenizer"])
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}={path}: its 'tokenizer' metadata is not JSON ({e}); the file is damaged: "
                          f"{HOW}") from None
    if not isinstance(description, dict):
        raise ConfigError(f"{key}={path}: its description is a JSON {type(description).__name__}, not an object; "
                          f"the file is damaged: {HOW}")
    if description.get("type") not in tokenizer_kinds():
        raise ConfigError(f"{key}={path}: unknown tokenizer type {description.get('type')!r} (known: "
                          f"{', '.join(tokenizer_kinds())})")
    for name in ("stride", "vocab_size", "in_chans"):  # what runs read from the header alone
        value = description.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            found = f"has no {name}" if value is None else f"has {name}={value!r}"
            raise ConfigError(f"{key}={path}: its description {found}, not a positive integer; the file is "
                              f"damaged: {HOW}")
    return description


def load_tokenizer(path: Union[str, Path], key: str = "task.tokenizer.path") -> Tokenizer:
    """The frozen tokenizer stored at `path` (tools/convert_tokenizer.py's, or a dvae run's), once its
    tensors, their values and its recorded stride are checked (the module docstring says why)."""
    from safetensors.torch import load_file

    description = read_description(path, key)
    where = f"{key}={path}"
    kind = tokenizer_kinds()[description["type"]]
    with torch.device("meta"):  # the shapes the file must hold, before anything of the description's size exists
        expected = _from_description(kind, description, where).encoder.state_dict()
    state = load_file(str(path))
    mismatch = state_mismatch(state, expected, f"the description's {kind.kind} tokenizer")
    if mismatch:
        raise CheckpointError(f"{where}: its tensors are not those its description builds ({mismatch}); the "
                              f"file was edited or damaged: {HOW}")
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{where}: non-finite weights (NaN or inf) in {compact(bad)}: its codes would be "
                              "meaningless (argmax over NaN); train the tokenizer again (a dvae run that diverged: "
                              "lower optim.lr) or convert DALL-E's encoder.pkl again")
    tokenizer = _from_description(kind, description, where)
    tokenizer.encoder.load_state_dict(state, strict=True)
    check_recorded(tokenizer.freeze(), description, where)
    return tokenizer


def _from_description(kind: type[Tokenizer], description: dict[str, Any], where: str) -> Tokenizer:
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
