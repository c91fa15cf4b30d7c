"""The keys of the recipe schema, for people: the nearest valid key to a mistyped one, the sections
that own a key, and `--help` (every key with its default and the comment beside it in the schema)."""
from __future__ import annotations

import difflib
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from ..config import SELECTED_SECTIONS, Config
from ..models import registered_families
from ..tasks import registered_tasks
from .files import available_recipes, recipe_header


def leaf_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.update(leaf_keys(type(default), prefix + f.name + "."))
        else:
            keys[prefix + f.name] = hints[f.name]
    return keys


# Names people type from other codebases, and ours.
ALIASES = {"learning_rate": "lr", "base_lr": "blr", "wd": "weight_decay", "lr_min": "min_lr",
           "warmup": "warmup_epochs", "epoch": "epochs", "bs": "batch_size", "workers": "num_workers",
           "model": "arch", "input_size": "img_size", "drop_path": "drop_path_rate", "amp": "precision",
           "mixed_precision": "precision", "decoder_embed_dim": "decoder_dim", "decoder_num_heads": "decoder_heads",
           "output": "output_dir", "out_dir": "output_dir", "save_every": "checkpoint_every"}


def suggest(key: str, keys: dict[str, Any]) -> str:
    sections = sorted({k.split(".")[0] for k in keys if "." in k})
    section, _, leaf = key.partition(".")
    if not leaf:
        close = difflib.get_close_matches(key, [k for k in keys if "." not in k] + sections, n=3, cutoff=0.6)
        return f" Did you mean {', '.join(close)}?" if close else f" Top-level keys: {', '.join(k for k in keys if '.' not in k)}; sections: {', '.join(sections)}"
    if section not in sections:
        close = difflib.get_close_matches(section, sections, n=2, cutoff=0.5)
        return f" Sections are {', '.join(sections)}" + (f"; did you mean {close[0]}.{leaf}?" if close else "")
    in_section = [k.split(".", 1)[1] for k in keys if k.startswith(section + ".")]
    leaf = ALIASES.get(leaf, leaf)
    close = [f"{section}.{k}" for k in difflib.get_close_matches(leaf, in_section, n=3, cutoff=0.6)]
    close += [k for k in keys if k.endswith("." + leaf) and k not in close]  # the same name in another section
    close += [leaf] if leaf in keys else []  # a top-level key written inside a section (train.resume: resume)
    if close:
        return f" Did you mean {', '.join(close)}?"
    owners = _owners_of(section, leaf)
    if owners:
        return f" {section}.{leaf} is a key of {owners}; valid keys here: {', '.join(in_section)}"
    return f" Valid keys in {section}: {', '.join(in_section)}"


def _owners_of(section: str, leaf: str) -> str:
    """Which tasks (or encoder families) have a key: `task.mask_ratio` given to a fine-tuning recipe."""
    if section == "task":
        owners = [f"task.name={name}" for name, cls in registered_tasks().items()
                  if leaf in {f.name for f in fields(cls.Config)}]
    elif section == "model":
        owners = [f"the {name} encoders" for name, family in registered_families().items()
                  if leaf in {f.name for f in fields(family.Config)}]
    else:
        return ""
    return " and ".join(owners)


def expected_type(kind: Any) -> str:
    if kind is None:
        return ""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = str(kind).replace("typing.", "")
    for python_type, name in names.items():
        if kind is python_type or text in (f"Optional[{python_type.__name__}]", python_type.__name__):
            return name + (" or null" if text.startswith("Optional") else "")
        if text == f"List[{python_type.__name__}]":
            return f"a list of {name.split(' ', 1)[1]}s, e.g. [0.9,0.95]" if python_type is float else f"a list of {python_type.__name__}"
    return text


def help_text(command: str, schema: type = Config, recipes: Optional[Sequence[str]] = None) -> str:
    """Usage, the recipes (each with its header line; `recipes`: the ones this command runs) and every
    key with its default and what it does (for `--help`); the `task:` and `model:` keys of each
    registered task and encoder family."""
    recipes = available_recipes() if recipes is None else list(recipes)
    width = max((len(name) for name in recipes), default=0)
    lines = [f"usage: {command} recipe=NAME [key=value ...] [print_config=true]", "",
             "recipes (or recipe=path/to/file.yaml):"]
    lines += [f"  {name:<{width}}  {recipe_header(name)}" for name in recipes]
    lines += ["", "keys, their defaults and what they do (a recipe overrides the defaults; key=value overrides the "
              "recipe):"]
    lines += _key_lines(schema)
    for name, cls in registered_tasks().items():
        lines += ["", f"task.name={name}: {_first_line(cls.__doc__)}"] + _key_lines(cls.Config, "task.")
    for name, family in registered_families().items():
        lines += ["", f"model.arch={family.arch_help()}: {_first_line(family.__doc__)}"]
        lines += _key_lines(family.Config, "model.")
    return "\n".join(lines)


def _key_lines(schema: type, prefix: str = "") -> list[str]:
    defaults = OmegaConf.structured(schema)
    described = key_descriptions(schema)
    rows = []
    for key in leaf_keys(schema):
        if not prefix and key.split(".")[0] in SELECTED_SECTIONS:
            continue
        value = OmegaConf.select(defaults, key, throw_on_missing=False)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        rows.append((f"{prefix}{key} = {value}", described.get(key, "")))
    width = min(44, max((len(left) for left, _ in rows), default=0))
    return [f"  {left:<{width}}  {text}".rstrip() for left, text in rows]


def key_descriptions(schema: type, prefix: str = "") -> dict[str, str]:
    """{key: the comment written beside the field in its dataclass}: the schema is the one place a
    key is documented (what `--help` prints)."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for cls in reversed(schema.__mro__[:-1]):  # a subclass's comment wins over its base's
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE):
            comments[match.group(1)] = match.group(2).strip()
    described = {}
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            described.update(key_descriptions(type(default), prefix + f.name + "."))
        else:
            described[prefix + f.name] = comments.get(f.name, "")
    return described


def _first_line(text: Optional[str]) -> str:
    return (text or "").strip().splitlines()[0] if text else ""
