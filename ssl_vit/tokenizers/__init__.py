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
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import CheckpointError, ConfigError
from ..models.base import compact
from .base import (FORMAT, HOW, KIND, RANDOM, Tokenizer, check_recorded, from_description_of, non_finite,
                   save_tokenizer, state_mismatch)
from .dall_e import DallETokenizer
from .vq import VQTokenizer, random_tokenizer_config

__all__ = ["RANDOM", "Tokenizer", "build_tokenizer", "load_tokenizer", "random_tokenizer", "read_description",
           "save_tokenizer", "tokenizer_kinds", "tokenizer_stride"]


def tokenizer_kinds() -> dict[str, type[Tokenizer]]:
    return {DallETokenizer.kind: DallETokenizer, VQTokenizer.kind: VQTokenizer}


def read_description(path: Union[str, Path], key: str = "task.tokenizer.path") -> dict[str, Any]:
    """A tokenizer file's description (its safetensors header only: no weights are read), or a
    ConfigError that says what the file is instead and how to get a tokenizer."""
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
    description = read_description(path, key)
    where = f"{key}={path}"
    kind = tokenizer_kinds()[description["type"]]
    with torch.device("meta"):  # the shapes the file must hold, before anything of the description's size exists
        expected = from_description_of(kind, description, where).encoder.state_dict()
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
    tokenizer = from_description_of(kind, description, where)
    tokenizer.encoder.load_state_dict(state, strict=True)
    check_recorded(tokenizer.freeze(), description, where)
    return tokenizer


def tokenizer_stride(path: Optional[str], key: str = "task.tokenizer.path") -> int:
    """Pixels per code of the tokenizer `path` names (the header only), or of the random one."""
    if not path:
        build_tokenizer(path, key=key)  # the error that says what to give
    if path == RANDOM:
        return 2 ** random_tokenizer_config()["num_downsamples"]
    return int(read_description(path, key)["stride"])


def random_tokenizer(seed: int = 0, in_chans: int = 3) -> Tokenizer:
    """An untrained tokenizer: the dvae encoder at its default size, drawn from `seed` alone (the same
    weights in every process and on every resume), normalising pixels as [0.5] / [0.5]."""
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
