"""The documentation cannot drift from the code: every fenced command in README.md and docs/*.md
that names a recipe is read as the shell would split it, its recipe must exist, and its keys must
load and validate as the command would take them (without training or reading data). Files the
command would read (`init=`, `like=`, a tokenizer, a teacher's weights) are produced by earlier
commands of the same page, so they are left out; everything else is checked."""
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT
from ssl_vit import recipes
from ssl_vit.cli import commands
from ssl_vit.cli.visualize import FLAGS, MODES, VisualizeConfig
from ssl_vit.config import ConfigError

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what each command runs (cli/commands.py): the tasks it accepts, as its own check says
COMMANDS = {
    "pretrain.py": (lambda task: True, "any task"),
    "tools/finetune.py": (lambda task: task.needs_labels and task.trains_encoder, "tasks that train the encoder"),
    "tools/linear_probe.py": (lambda task: task.needs_labels and not task.trains_encoder, "frozen-encoder tasks"),
    "tools/knn.py": (None, "k-NN"),
    "tools/visualize.py": (None, "pictures"),
}
# keys whose value is a file an earlier command writes (or the user's own): left out of the check
FILE_KEYS = {"init", "like", "resume", "task.teacher.weights", "task.tokenizer.path", "images", "out"}
SHELL_ENDS = {"&&", "||", ";", "|", ">", "2>", "&"}


def fenced_blocks(text: str):
    """(first line number, lines) of each fenced block in a shell-like language or none."""
    lines, block, start, language = text.splitlines(), None, 0, ""
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if block is None:
                block, start, language = [], number + 1, line[3:].strip()
            else:
                if language in ("", "bash", "sh", "shell", "console"):
                    yield start, block
                block = None
        elif block is not None:
            block.append(line)


def documented_commands():
    """(where, script, arguments) for each command line that runs one of COMMANDS with recipe=."""
    found = []
    for page in PAGES:
        for start, block in fenced_blocks(page.read_text()):
            joined, first = "", None
            for offset, line in enumerate(block):
                first = start + offset if not joined else first
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                found += list(commands_in(joined, f"{page.relative_to(ROOT)}:{first}"))
                joined = ""
    return found


def commands_in(line: str, where: str):
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose-like text: not a command
        return
    for index, word in enumerate(words):
        if word in COMMANDS:
            arguments = []
            for argument in words[index + 1:]:
                if argument in SHELL_ENDS:
                    break
                arguments.append(argument)
            if any(a.startswith("recipe=") for a in arguments):
                yield where, word, arguments


DOCUMENTED = documented_commands()


def test_the_pages_document_recipe_commands_and_each_is_found():
    """The reader finds the commands (a change to the fence style or the parser would find none)."""
    assert len(DOCUMENTED) >= 40, DOCUMENTED
    pages = {where.split(":")[0] for where, _, _ in DOCUMENTED}
    assert {"README.md", "docs/pretraining.md", "docs/evaluation.md", "docs/simmim.md", "docs/beit.md"} <= pages


def checked_arguments(arguments: list[str]) -> list[str]:
    kept = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if not _:
            continue  # a flag or a positional argument (the visualize mode, --rollout)
        if key in FILE_KEYS and value != "random":
            continue
        kept.append(re.sub(r"\$\{?(\w+)\}?", r"\1", argument))  # $OUT -> OUT: a name, not a path to read
    return kept


@pytest.mark.parametrize("where, script, arguments", DOCUMENTED, ids=[w for w, _, _ in DOCUMENTED])
def test_documented_command_names_a_recipe_that_exists_and_keys_that_validate(where, script, arguments):
    recipe = next(a.split("=", 1)[1] for a in arguments if a.startswith("recipe="))
    if recipe.endswith((".yaml", ".yml")):  # a file of the user's (rotation.yaml, runs/x/config.yaml)
        pytest.skip(f"recipe={recipe} is a file the page's reader writes")
    assert recipe in recipes.available_recipes(), f"{where}: recipe={recipe} is not under recipes/"
    argv = checked_arguments(arguments)
    accepts, what = COMMANDS[script]
    try:
        if script == "tools/visualize.py":
            assert arguments[0] in MODES, f"{where}: the first argument is the mode, not {arguments[0]!r}"
            argv = [FLAGS.get(a, a) for a in argv]
            recipes.load(argv, schema=VisualizeConfig, command="visualize.py")
        else:
            cfg = commands.load_config(argv, Path(script).name)
            if accepts is not None:
                commands._require(cfg, Path(script).name, accepts, what, needs_init=False)
    except ConfigError as error:
        pytest.fail(f"{where}: {script} {' '.join(arguments)}\n  {error}")


def test_a_command_with_a_mistyped_key_or_recipe_is_caught():
    """The check is not vacuous: a wrong key, a wrong value, a missing recipe, a wrong tool fail."""
    with pytest.raises(ConfigError):
        commands.load_config(["recipe=mae_tiny_digits", "optim.bathc_size=8"], "pretrain.py")
    with pytest.raises(ConfigError):
        commands.load_config(["recipe=mae_tiny_digits", "task.mask_ratio=1.5"], "pretrain.py")
    assert "mae_tiny_digit" not in recipes.available_recipes()
    cfg = commands.load_config(["recipe=mae_tiny_digits"], "linear_probe.py")
    accepts, what = COMMANDS["tools/linear_probe.py"]
    with pytest.raises(ConfigError):
        commands._require(cfg, "linear_probe.py", accepts, what, needs_init=False)
    found = list(commands_in("accelerate launch tools/finetune.py recipe=finetune_digits init=$B  # 94.72%", "x:1"))
    assert found == [("x:1", "tools/finetune.py", ["recipe=finetune_digits", "init=$B"])]
    assert checked_arguments(["recipe=x", "init=$B", "init=random", "train.output_dir=$OUT", "--rollout"]) == [
        "recipe=x", "init=random", "train.output_dir=OUT"]
