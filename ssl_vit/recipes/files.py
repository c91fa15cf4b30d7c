"""Where recipes are: `recipes/NAME.yaml` in the current folder or the repository, or a path; a
recipe's `base:` chain, its task and its header line, read from its files only."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ..config import Config, ConfigError

REPO_RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"


def available_recipes() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def recipe_dirs() -> list[Path]:
    dirs = [Path.cwd() / "recipes", REPO_RECIPES]
    unique = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def is_path(recipe: str) -> bool:
    return recipe.endswith((".yaml", ".yml")) or "/" in recipe


def find_recipe(recipe: str, relative_to: Optional[Path] = None) -> Path:
    if is_path(recipe):
        candidates = [Path(recipe)]
        if relative_to is not None:
            candidates.insert(0, relative_to / recipe)
        for path in candidates:
            if path.is_file():
                return path
        raise ConfigError(f"recipe file {recipe!r} does not exist")
    for d in recipe_dirs():
        path = d / f"{recipe}.yaml"
        if path.is_file():
            return path
    close = difflib.get_close_matches(recipe, available_recipes(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe {recipe!r}.{hint} Available recipes: {', '.join(available_recipes())} "
                      f"(in {', '.join(str(d) for d in recipe_dirs())}); or pass recipe=path/to/file.yaml")


def recipe_chain(recipe: str) -> list[Path]:
    """The recipe file and the files it extends through `base:`, base first."""
    chain: list[Path] = []
    path = find_recipe(recipe)
    while True:
        if path.resolve() in [p.resolve() for p in chain]:
            names = " -> ".join(p.stem for p in reversed(chain + [path]))
            raise ConfigError(f"recipes extend each other in a circle: {names}")
        chain.append(path)
        base = read_recipe(path, keep_base=True).get("base")
        if base is None:
            return list(reversed(chain))
        path = find_recipe(str(base), relative_to=path.parent)


def read_recipe(path: Path, keep_base: bool = False) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors carry line and column
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, optim:, ...)")
    if not keep_base and "base" in node:
        node = OmegaConf.masked_copy(node, [k for k in node if k != "base"])
    return node


def recipe_task(recipe: str) -> Optional[str]:
    """The task.name a recipe (with its base chain) selects, read from its files only."""
    name = Config().task.name
    for path in recipe_chain(recipe):
        task = read_recipe(path).get("task")
        if isinstance(task, DictConfig) and "name" in task:
            name = task["name"]
    return name


def recipe_header(recipe: str) -> str:
    """The first sentence of a recipe's header comment (what it is), on at most two lines."""
    lines = [line.lstrip("#").strip() for line in find_recipe(recipe).read_text().splitlines()
             if line.startswith("#")]
    text = lines[0] if lines else ""
    if len(lines) > 1 and not text.endswith((".", ":")) and ":" not in lines[1].split(" ")[0]:
        text += " " + lines[1]
    return text
