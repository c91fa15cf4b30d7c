"""Reading recipes: `base:` chains, `key=value` overrides, `imports:`, and the `task:` / `model:`
sections typed by the task and encoder family they select; errors that name the key, the file and
what fits; `--help`.
"""
from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .config import REPO_RECIPES, SELECTED_SECTIONS, Config, ConfigError, _show, validate


# -------------------------------------------------------------------------------------------
# the sections tasks and encoder families own


def section_schema(section: str, value: str) -> type:
    """The dataclass of a selected section: the `Config` of the task registered as `value`, or of
    the encoder family that builds model.arch=`value`. Importing the registries imports torch: only here."""
    if section == "task":
        from .tasks import task_class

        return task_class(value).Config
    from .models import family_for_arch

    return family_for_arch(value).Config


def import_plugins(names: Sequence[str], relative_to: Optional[Path] = None) -> list[str]:
    """Import the modules or .py files of `imports:` (where tasks and encoder families of one's own
    register themselves); returns them as absolute paths / module names, as the saved config records."""
    import importlib
    import importlib.util

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
    chain = _recipe_chain(recipe)
    sources = [(str(path), _read_recipe(path), path.parent) for path in chain]
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
    general = _leaf_keys(schema)
    for source, node, _ in sources:
        rest = OmegaConf.masked_copy(node, [k for k in node if k not in SELECTED_SECTIONS and k != "imports"])
        cfg = _merge(cfg, rest, source, general)
    for section, selector in SELECTED_SECTIONS.items():
        cfg[section] = _merge_selected(section, selector, cfg[section][selector], sources, general)
    cfg.imports = list(dict.fromkeys(imported))
    cfg.recipe = Path(recipe).stem if _is_path(recipe) else recipe
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
            raise ConfigError(f"{section}: in {source} must be a mapping of keys, got {_show(part)}")
        if selector in part:
            try:
                schema_now = section_schema(section, part[selector])
            except ConfigError as e:
                raise ConfigError(f"{e} (in {source})") from None
            if schema_now is not schema:
                names = {f.name for f in fields(schema_now)}
                given = {k: v for k, v in given.items() if k in names}
            schema = schema_now
        keys = {**general, **_leaf_keys(schema, section + ".")}
        merged = _merge(OmegaConf.create({section: OmegaConf.structured(schema)}),
                        OmegaConf.create({section: given}), "the recipe chain", keys)
        _merge(merged, OmegaConf.create({section: part}), source, keys)  # (checks keys and types)
        given = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(given), part))
    node = OmegaConf.structured(schema)
    return OmegaConf.merge(node, given) if given else node


def recipe_task(recipe: str) -> Optional[str]:
    """The task.name a recipe (with its base chain) selects, read from its files only."""
    name = Config().task.name
    for path in _recipe_chain(recipe):
        task = _read_recipe(path).get("task")
        if isinstance(task, DictConfig) and "name" in task:
            name = task["name"]
    return name


def recipe_header(recipe: str) -> str:
    """The first sentence of a recipe's header comment (what it is), on at most two lines."""
    lines = [line.lstrip("#").strip() for line in _find_recipe(recipe).read_text().splitlines()
             if line.startswith("#")]
    text = lines[0] if lines else ""
    if len(lines) > 1 and not text.endswith((".", ":")) and ":" not in lines[1].split(" ")[0]:
        text += " " + lines[1]
    return text


def command_line_keys(argv: Sequence[str]) -> set[str]:
    """The keys set on the command line (they win over anything a tool would adopt from a file)."""
    return {arg.split("=", 1)[0].strip() for arg in argv if "=" in arg and not arg.startswith("-")}


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config (interpolations filled in), as saved next to a run's outputs."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def available_recipes() -> list[str]:
    return sorted({p.stem for d in _recipe_dirs() for p in d.glob("*.yaml")})


def _recipe_dirs() -> list[Path]:
    dirs = [Path.cwd() / "recipes", REPO_RECIPES]
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def _is_path(recipe: str) -> bool:
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe


def _find_recipe(recipe: str, relative_to: Optional[Path] = None) -> Path:
    if _is_path(recipe):
        candidates = [Path(recipe)]
        if relative_to is not None:
            candidates.insert(0, relative_to / recipe)
        for path in candidates:
            if path.is_file():
                return path
        raise ConfigError(f"recipe file {recipe!r} does not exist")
    for d in _recipe_dirs():
        path = d / f"{recipe}.yaml"
        if path.is_file():
            return path
    close = difflib.get_close_matches(recipe, available_recipes(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe {recipe!r}.{hint} Available recipes: {', '.join(available_recipes())} "
                      f"(in {', '.join(str(d) for d in _recipe_dirs())}); or pass recipe=path/to/file.yaml")


def _recipe_chain(recipe: str) -> list[Path]:
    """The recipe file and the files it extends through `base:`, base first."""
    chain: list[Path] = []
    path = _find_recipe(recipe)
    while True:
        if path.resolve() in [p.resolve() for p in chain]:
            names = " -> ".join(p.stem for p in reversed(chain + [path]))
            raise ConfigError(f"recipes extend each other in a circle: {names}")
        chain.append(path)
        base = _read_recipe(path, keep_base=True).get("base")
        if base is None:
            return list(reversed(chain))
        path = _find_recipe(str(base), relative_to=path.parent)


def _read_recipe(path: Path, keep_base: bool = False) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors carry line and column
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, optim:, ...)")
    if not keep_base and "base" in node:
        node = OmegaConf.masked_copy(node, [k for k in node if k != "base"])
    return node


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
        raise ConfigError(f"unknown key {key!r} in {source}.{_suggest(key, keys)}") from None
    except ValidationError as e:
        key = e.full_key
        if key:
            wanted = _expected_type(keys.get(key.split("[")[0]))
            raise ConfigError(f"bad value for {key} in {source}: {e.msg.splitlines()[0]}"
                              f"{f' (expected {wanted})' if wanted else ''}") from None
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value in {source}: {str(e).splitlines()[0]}") from None


def _leaf_keys(schema: type = Config, prefix: str = "") -> dict[str, Any]:
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys.update(_leaf_keys(type(default), prefix + f.name + "."))
        else:
            keys[prefix + f.name] = hints[f.name]
    return keys


# Names people type from other codebases, and ours.
ALIASES = {"learning_rate": "lr", "base_lr": "blr", "wd": "weight_decay", "lr_min": "min_lr",
           "warmup": "warmup_epochs", "epoch": "epochs", "bs": "batch_size", "workers": "num_workers",
           "model": "arch", "input_size": "img_size", "drop_path": "drop_path_rate", "amp": "precision",
           "mixed_precision": "precision", "decoder_embed_dim": "decoder_dim", "decoder_num_heads": "decoder_heads",
           "output": "output_dir", "out_dir": "output_dir", "save_every": "checkpoint_every"}


def _suggest(key: str, keys: dict[str, Any]) -> str:
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
        from .tasks import registered_tasks

        owners = [f"task.name={name}" for name, cls in registered_tasks().items()
                  if leaf in {f.name for f in fields(cls.Config)}]
    elif section == "model":
        from .models import registered_families

        owners = [f"the {name} encoders" for name, family in registered_families().items()
                  if leaf in {f.name for f in fields(family.Config)}]
    else:
        return ""
    return " and ".join(owners)


def _expected_type(kind: Any) -> str:
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
    from .models import registered_families
    from .tasks import registered_tasks

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
    for key in _leaf_keys(schema):
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
