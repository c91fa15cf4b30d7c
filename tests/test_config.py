"""Recipes, inheritance, overrides and the errors people get for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_vit import recipes
from ssl_vit.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("recipe", recipes.available_recipes())
def test_every_recipe_loads_and_says_where_it_comes_from(recipe):
    cfg = recipes.load([f"recipe={recipe}"])
    assert cfg.recipe == recipe
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("Command:" in line for line in header), f"{recipe} needs a header with its command"
    assert any("Reproduces:" in line for line in header), f"{recipe} needs a header saying what it reproduces"


def test_base_chain_and_overrides():
    cfg = recipes.load(["recipe=mae_large", "optim.epochs=1600", "optim.betas=[0.9,0.999]", "model.img_size=[224,320]"])
    assert cfg.model.arch == "vit_large_patch16"          # mae_large's own value
    assert cfg.optim.blr == pytest.approx(1.5e-4)          # from its base, mae_base
    assert cfg.optim.epochs == 1600.0 and list(cfg.optim.betas) == [0.9, 0.999]
    assert list(cfg.model.img_size) == [224, 320]
    assert cfg.train.output_dir == "runs/mae_large"


def test_recipe_file_with_relative_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: mae_base\noptim:\n  epochs: 5\n  warmup_epochs: 1\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ndata:\n  batch_size: 8\n")
    cfg = recipes.load([f"recipe={tmp_path / 'child.yaml'}"])
    assert (cfg.recipe, cfg.optim.epochs, cfg.data.batch_size, cfg.model.arch) == ("child", 5, 8, "vit_base_patch16")


def test_circular_bases_are_caught(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        recipes.load([f"recipe={tmp_path / 'a.yaml'}"])


@pytest.mark.parametrize("args,message", [
    (["recipe=mae_bsae"], r"unknown recipe 'mae_bsae'\. Did you mean mae_base.*Available recipes: .*mae_tiny_digits"),
    ([], "no recipe given: pass recipe=NAME"),
    (["recipe=mae_base", "optim.lrr=1"], r"unknown key 'optim.lrr'.*Did you mean optim.lr, optim.blr"),
    (["recipe=mae_base", "optim.learning_rate=1"], r"Did you mean optim.lr"),
    (["recipe=mae_base", "train.batch_size=8"], r"Did you mean data.batch_size, optim.batch_size"),
    (["recipe=mae_base", "train.resume=false"], r"unknown key 'train.resume'.*Did you mean resume\?"),  # top level
    (["recipe=mae_base", "optim.lr=abc"], r"bad value for optim.lr.*'abc'.*expected a number"),
    (["recipe=mae_base", "data.num_workers=1.5"], r"data.num_workers.*expected an integer"),
    (["recipe=mae_base", "train.precision=fp8"], r"train.precision='fp8' is not one of: auto, bf16, fp16, no"),
    (["recipe=mae_base", "model.img_size=[1,2,3]"], r"model.img_size=\[1, 2, 3\]"),
    (["recipe=mae_base", "optim.lr=0.1"], r"optim.lr=0.1 and optim.blr=0.00015 are both set"),
    (["recipe=mae_base", "optim.warmup_epochs=900"], r"warmup_epochs"),
    (["recipe=mae_base", "task.mask_ratio=1.0"], r"task.mask_ratio=1.0"),
    (["recipe=mae_base", "--lr", "0.1"], r"cannot parse argument '--lr'"),
])
def test_bad_input_is_explained(args, message):
    with pytest.raises(ConfigError, match=message):
        recipes.load(args)


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    (tmp_path / "typo.yaml").write_text("base: mae_base\noptim:\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.wieght_decay' in .*typo.yaml.*optim.weight_decay"):
        recipes.load([f"recipe={tmp_path / 'typo.yaml'}"])


def test_missing_training_data_is_explained_only_when_running():
    cfg = recipes.load(["recipe=mae_base"])  # loading (and print_config) works without data
    with pytest.raises(ConfigError, match=r"data.train is required by recipe 'mae_base'.*tools/make_shards.py"):
        recipes.check_data(cfg)


def test_yaml_boolean_words_stay_words_on_the_command_line(tmp_path):
    assert recipes.load(["recipe=mae_base", "train.precision=no"]).train.precision == "no"
    assert recipes.load(["recipe=mae_base", "train.compile=yes"]).train.compile is True
    (tmp_path / "r.yaml").write_text("base: mae_base\ntrain:\n  precision: no\n")
    with pytest.raises(ConfigError, match=r"train.precision='False' is not one of.*write precision: 'no'"):
        recipes.load([f"recipe={tmp_path / 'r.yaml'}"])


def test_brace_patterns_and_pipes_stay_strings():
    cfg = recipes.load(["recipe=mae_base", "data.train={000000..000009}.tar",
                       "data.val=pipe:curl -s http://host/x-{0..3}.tar"])
    assert cfg.data.train == "{000000..000009}.tar"
    assert cfg.data.val == "pipe:curl -s http://host/x-{0..3}.tar"


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_print_config_prints_the_resolved_recipe_and_exits(tmp_path):
    result = _run("recipe=mae_base", "print_config=true", "optim.epochs=1600", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["optim"]["epochs"] == 1600 and printed["optim"]["blr"] == pytest.approx(1.5e-4)
    assert printed["train"]["output_dir"] == "runs/mae_base"  # interpolation resolved
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,message", [
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["recipe=mae_base"], "data.train is required"),
    (["recipe=mae_base", "optim.lr=abc"], "bad value for optim.lr"),
    (["recipe=mae_base", "optim.lrr=1"], "unknown key 'optim.lrr'"),
])
def test_command_line_errors_are_one_line_and_exit_2(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_help_lists_recipes_and_keys():
    result = _run("--help")
    assert result.returncode == 0
    assert "mae_base" in result.stdout and "optim.blr = 0.00015" in result.stdout
