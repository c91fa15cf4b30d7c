"""Reading recipes: `base:` chains, `key=value` overrides, `imports:`, and the `task:` / `model:`
sections typed by the task and encoder family they select; errors that name the key, the file and
what fits (keys.py); the rules every recipe is held to (validation.py).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..config import SELECTED_SECTIONS, Config, ConfigError, show
from ..models import family_for_arch
from ..tasks import task_class
from .files import available_recipes, is_path, read_recipe, recipe_chain
from .keys import expected_type, help_text, leaf_keys, suggest
from .validation import validate


# -------------------------------------------------------------------------------------------
# the sections tasks and encoder families own


def section_schema(section: str, value: str) -> type:
    """The dataclass of a selected section: the `Config` of the task registered as `value`, or of
    the encoder family that builds model.arch=`value`."""
    return task_class(value).Config if section == "task" else family_for_arch(value).Config


def import_plugins(names: Sequence[str], relative_to: Optional[Path] = None) -> list[str]:
    """Import the modules or .py files of `imports:` (where tasks and encoder families of one's own
    register themselves); returns them as absolute paths / module names, as the saved config records."""
    done = []
    for name in names:
        name = str(name)
        if name.endswith(".py"):
            candidates = ([relative_to / name] if relative_to is not None else []) + [Path(name)]
            path = next((p.resolve() for p in candidates if p.is_file()), None)
            if path is None:
                raise ConfigError(f"imports: {name} does not exist (give a .py file, relative to the recipe or the "
                                  "current folder, or an importable module name)")
            module_name = f"ssl_vit_plugin_{path.stem}_{abs(hash(str(path))) % 10 ** 8}"
            if module_name not in sys.modules:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            done.append(str(path))
        else:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"imports: cannot import {name!r}: {e}") from None
            done.append(name)
    return done


# -------------------------------------------------------------------------------------------
# loading


def load(argv: Sequence[str], schema: type = Config, command: str = "pretrain.py",
         default_recipe: Optional[str] = None, adopted: Optional[tuple[str, dict[str, Any]]] = None,
         check: bool = True, recipes: Optional[Callable[[], Sequence[str]]] = None) -> DictConfig:
    """Parse `recipe=NAME key=value ...` into a validated, typed config; `--help` prints the keys.
    `adopted`: (where from, {key: value}) settings a tool takes from a file (the JSON beside init=),
    applied over the recipe and under the command line. `check=False` skips `validate`. `recipes`:
    the recipes the command runs, for `--help`."""
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text(command, schema, recipes() if recipes is not None else None))
        raise SystemExit(0)
    args = _parse_args(argv)
    recipe = args.pop("recipe", default_recipe)
    if recipe is None:
        raise ConfigError(f"no recipe given: pass recipe=NAME (available: {', '.join(available_recipes())}) "
                          "or recipe=path/to/file.yaml")
    overrides = OmegaConf.create()
    for key, value in args.items():
        OmegaConf.update(overrides, key, value, force_add=True)
    chain = recipe_chain(recipe)
    sources = [(str(path), read_recipe(path), path.parent) for path in chain]
    if adopted:
        node = OmegaConf.create()
        for key, value in adopted[1].items():
            OmegaConf.update(node, key, value, force_add=True)
        sources.append((adopted[0], node, None))
    sources.append(("the command line", overrides, None))
    imported = []
    for _, node, folder in sources:
        if "imports" in node:
            imported += import_plugins(list(node["imports"]) if OmegaConf.is_list(node["imports"])
                                       else [node["imports"]], relative_to=folder)

    cfg = OmegaConf.structured(schema)
    general = leaf_keys(schema)
    for source, node, _ in sources:
        rest = OmegaConf.masked_copy(node, [k for k in node if k not in SELECTED_SECTIONS and k != "imports"])
        cfg = _merge(cfg, rest, source, general)
    for section, selector in SELECTED_SECTIONS.items():
        cfg[section] = _merge_selected(section, selector, cfg[section][selector], sources, general)
    cfg.imports = list(dict.fromkeys(imported))
    cfg.recipe = Path(recipe).stem if is_path(recipe) else recipe
    if check:
        validate(cfg)
    return cfg


def _merge_selected(section: str, selector: str, default: str, sources, general: dict) -> DictConfig:
    """The typed `section` of a recipe chain + command line. A source that selects another task (or an
    encoder of another family) starts the section again from that one's defaults, keeping the keys
    given so far that it also has (e.g. a fine-tuning recipe built on an MAE recipe sheds MAE's
    decoder keys, a distillation recipe keeps its classification base's mixup); every key a source
    gives must be one of the section's as selected at that point."""
    schema = section_schema(section, default)
    given: dict[str, Any] = {}
    for source, node, _ in sources:
        part = node.get(section)
        if part is None:
            continue
        if not isinstance(part, DictConfig):
            raise ConfigError(f"{section}: in {source} must be a mapping of keys, got {show(part)}")
        if selector in part:
            try:
                schema_now = section_schema(section, part[selector])
            except ConfigError as e:
                raise ConfigError(f"{e} (in {source})") from None
            if schema_now is not schema:
                names = {f.name for f in fields(schema_now)}
                given = {k: v for k, v in given.items() if k in names}
            schema = schema_now
        keys = {**general, **leaf_keys(schema, section + ".")}
        merged = _merge(OmegaConf.create({section: OmegaConf.structured(schema)}),
                        OmegaConf.create({section: given}), "the recipe chain", keys)
        _merge(merged, OmegaConf.create({section: part}), source, keys)  # (checks keys and types)
        given = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(given), part))
    node = OmegaConf.structured(schema)
    return OmegaConf.merge(node, given) if given else node


def command_line_keys(argv: Sequence[str]) -> set[str]:
    """The keys set on the command line (they win over anything a tool would adopt from a file)."""
    return {arg.split("=", 1)[0].strip() for arg in argv if "=" in arg and not arg.startswith("-")}


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config (interpolations filled in), as saved next to a run's outputs."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise ConfigError(f"cannot parse argument {arg!r}: arguments are key=value pairs such as "
                              "recipe=mae_tiny_digits optim.epochs=10 (see the README)")
        key, raw = arg.split("=", 1)
        try:
            value = OmegaConf.from_dotlist([f"value={raw}"]).value
        except OmegaConfBaseException:
            value = raw  # e.g. a shard pattern such as {000..009}.tar that YAML cannot parse
        except Exception:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw  # YAML 1.1 reads no / off / yes / on as booleans: train.precision=no means "no"
        args[key.strip()] = value
    return args


def _merge(cfg: DictConfig, update: DictConfig, source: str, keys: dict[str, Any]) -> DictConfig:
    """OmegaConf's merge, its errors turned into one line naming the key, the source and what fits;
    `keys` are the valid keys with their types (for suggestions)."""
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"unknown key {key!r} in {source}.{suggest(key, keys)}") from None
    except ValidationError as e:
        key = e.full_key
        if key:
            wanted = expected_type(keys.get(key.split("[")[0]))
            raise ConfigError(f"bad value for {key} in {source}: {e.msg.splitlines()[0]}"
                              f"{f' (expected {wanted})' if wanted else ''}") from None
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None


