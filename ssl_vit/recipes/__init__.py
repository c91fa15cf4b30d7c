"""Recipes: YAML files read into a typed, validated config (files.py: where they are; loading.py: base
chains, overrides, imports:, the sections tasks and encoder families own; keys.py: the keys for
people: suggestions and --help; validation.py: the rules and the data a run needs).

    recipes.load(["recipe=mae_base", "optim.epochs=400"])  ->  the validated config
"""
from .files import available_recipes, recipe_header, recipe_task
from .keys import help_text, key_descriptions
from .loading import command_line_keys, import_plugins, load, to_yaml
from .validation import check_data, validate

__all__ = ["available_recipes", "check_data", "command_line_keys", "help_text", "import_plugins", "key_descriptions",
           "load", "recipe_header", "recipe_task", "to_yaml", "validate"]
