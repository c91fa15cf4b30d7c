"""A run never silently does the wrong thing: data it was given is used or refused, a resume with
other settings stops, baselines are built like the run they are compared with, mistakes stop before
anything runs, and every output says what produced it."""
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_VIT
from conftest import run_command as run
from ssl_vit import config, recipes
from ssl_vit.config import ConfigError

PRETRAIN = [sys.executable, str(ROOT / "pretrain.py")]
TINY_MAE = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=32",
            "optim.batch_size=32", "log.every=1"]


def tool(name):
    return [sys.executable, str(ROOT / "tools" / f"{name}.py")]


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


# -------------------------------------------------------------------------------------------
# 1. shard paths given to a recipe of the embedded data


@pytest.mark.parametrize("split", ["train", "val"])
def test_shard_paths_with_a_digits_recipe_stop_and_say_data_name_shards(split):
    with pytest.raises(ConfigError, match=rf"data.{split}=my-{split}.json is given but data.name=digits .*"
                                          r"add data.name=shards"):
        recipes.load(["recipe=linprobe_digits", f"data.{split}=my-{split}.json"])


# -------------------------------------------------------------------------------------------
# 2. a resume with other settings stops; starting over moves the old run aside


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_a_run_with_another_recipe_does_not_resume_the_old_one(tmp_path, env):
    out = tmp_path / "run"
    base = [*PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY_MAE]
    run([*base, "train.max_steps=2", "train.checkpoint_every=1"], env)
    result = run([*base, "train.max_steps=2", "optim.blr=0.01", "train.seed=3"], env, expect=2)
    assert "optim.blr: 0.0015 -> 0.01" in result.stderr and "train.seed: 0 -> 3" in result.stderr
    assert "resume=false" in result.stderr and "train.output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    # what may change on a resume does: more steps
    result = run([*base, "train.max_steps=3", "train.checkpoint_every=1", "log.images_every=7"], env)
    assert "resumed from" in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if "eval" not in line]
    assert steps == [1, 2, 3]  # each step once
    # starting over: the old run moves aside whole, nothing of it is mixed into the new one
    old_backbone = (out / "backbone.safetensors").read_bytes()
    result = run([*base, "train.max_steps=1", "resume=false", "optim.blr=0.01"], env)
    assert "set aside in" in result.stdout and "resumed" not in result.stdout
    (previous,) = (out / "previous").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert (previous / "backbone.safetensors").read_bytes() == old_backbone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if "eval" not in line] == [1]
    # and the next re-run resumes the new run, not the old one
    result = run([*base, "train.max_steps=2", "optim.blr=0.01"], env)
    assert "resumed from" in result.stdout and "step_00000001" in result.stdout


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_going_back_to_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, env):
    out = tmp_path / "run"
    base = [*PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY_MAE, "train.checkpoint_every=1",
            "train.keep_checkpoints=5"]
    run([*base, "train.max_steps=3"], env)
    result = run([*base, "train.max_steps=3", f"resume={out / 'checkpoints' / 'step_00000001'}"], env)
    assert "set aside in" in result.stdout and "resumed from" in result.stdout
    (previous,) = (out / "previous").iterdir()
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    # the run went on from step 1 and wrote its own steps 2 and 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002",
                                                                      "step_00000003"]


def test_starting_over_sets_aside_every_file_of_the_old_run(tmp_path, env, tiny_mae_run):
    """resume=false moves whatever the old run wrote, not a list of the loop's own files: a task's
    outputs too (the dVAE's tokenizer.safetensors was overwritten in place)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_mae_run, out)
    (out / "tokenizer.safetensors").write_bytes(b"the old run's tokenizer")
    old = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    run([*PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY_MAE, "train.max_steps=1",
         "resume=false", "eval.knn_every=0"], env)
    (previous,) = (out / "previous").iterdir()
    assert sorted(p.name for p in previous.iterdir() if p.name != "WHY") == old
    assert (previous / "tokenizer.safetensors").read_bytes() == b"the old run's tokenizer"
    assert not (out / "tokenizer.safetensors").exists()


def test_a_changed_init_is_refused_rather_than_resumed(tmp_path, env, tiny_mae_run):
    """The README's `# or init=random` into the same folder used to 'resume' the MAE probe."""
    out = tmp_path / "probe"
    base = [*tool("linear_probe"), "recipe=linprobe_digits", f"train.output_dir={out}", "optim.epochs=2",
            "optim.warmup_epochs=1"]
    run([*base, f"init={tiny_mae_run / 'backbone.safetensors'}"], env)
    kept = (out / "metrics.json").read_bytes()
    result = run([*base, "init=random", f"like={tiny_mae_run}"], env, expect=2)
    assert "init: " in result.stderr and "-> 'random'" in result.stderr and "resume=false" in result.stderr
    assert (out / "metrics.json").read_bytes() == kept


# -------------------------------------------------------------------------------------------
# 3. a random baseline built like the run it is compared with


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_random_baselines_take_the_architecture_of_a_run(tmp_path, env, tiny_mae_run):
    out = tmp_path / "random_probe"
    result = run([*tool("linear_probe"), "recipe=linprobe_digits", "init=random", f"like={tiny_mae_run}",
                  f"train.output_dir={out}", "optim.epochs=1", "optim.warmup_epochs=0"], env)
    assert f"from like={tiny_mae_run}: model.arch=vit_tiny_patch16" in result.stdout
    assert "model.embed_dim=32" in result.stdout and "data.mean=[0.5, 0.5, 0.5]" in result.stdout
    assert "task linear_probe on a vit_tiny_patch16 encoder (embed_dim 32, depth 2" in result.stdout
    m = metrics(out)
    assert m["provenance"]["init"] == "random" and m["provenance"]["like"] == str(tiny_mae_run)
    assert m["provenance"]["model"]["embed_dim"] == 32 and m["provenance"]["model"]["depth"] == 2
    knn = run([*tool("knn"), "init=random", f"like={tiny_mae_run / 'backbone.safetensors'}", "data.name=digits",
               f"train.output_dir={tmp_path / 'knn'}"], env)
    assert "randomly initialised vit_tiny_patch16 encoder (embed_dim 32, depth 2" in knn.stdout
    # the advice for a pre-training recipe names the way that works
    wrong = run([*tool("linear_probe"), "recipe=mae_tiny_digits", "init=random"], env, expect=2)
    assert "linprobe_digits" in wrong.stderr and "init=random like=runs/" in wrong.stderr
    missing = run([*tool("knn"), "init=random", f"like={tmp_path}", "data.name=digits"], env, expect=2)
    assert "no export of ours there" in missing.stderr


# -------------------------------------------------------------------------------------------
# 4. mistakes stop before anything runs, in one line


@pytest.mark.parametrize("args, message", [
    (["recipe=mae_tiny_digits", "model.img_size=60", "model.patch_size=8"],
     "model.img_size=60 is not a multiple of the 8-pixel patches (model.patch_size=8): use e.g. model.img_size=56"),
    (["recipe=deit_tiny_distilled_digits", "task.teacher.weights=no/such/teacher.safetensors"],
     "task.teacher.weights=no/such/teacher.safetensors: no such file"),
    (["recipe=mae_tiny_digits", "init=no/such/file.pth"], "init=no/such/file.pth: no such file"),
])
def test_mistakes_stop_before_anything_runs(args, message, env):
    for extra in ([], ["print_config=true"]):
        result = run([*PRETRAIN, *args, *extra], env, expect=2)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_folder_of_images_is_named_with_the_command_that_makes_shards(tmp_path, env):
    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "cats" / "a.jpg")
    result = run([*PRETRAIN, "recipe=mae_base", f"data.train={folder}"], env, expect=2)
    assert f"data.train={folder} is a folder of images" in result.stderr
    assert f"python tools/make_shards.py {folder} shards/photos" in result.stderr
    assert "task mae" not in result.stdout  # nothing was built


# -------------------------------------------------------------------------------------------
# 5. what produced a result, one schema for every tool


def test_metrics_say_what_produced_them(tmp_path, env, tiny_mae_run):
    backbone = tiny_mae_run / "backbone.safetensors"
    out = tmp_path / "knn"
    run([*tool("knn"), f"init={backbone}", "data.name=digits", f"train.output_dir={out}"], env)
    m = metrics(out)
    assert {"protocol", "top1", "top5", "num_samples", "provenance"} <= set(m) and m["protocol"] == "knn"
    p = m["provenance"]
    assert p["init"] == str(backbone) and p["init_sha256"] == hashlib.sha256(backbone.read_bytes()).hexdigest()
    assert p["data"]["train"] == "digits (embedded)" and p["data"]["train_fraction"] == 1.0 and p["seed"] == 0
    assert p["code"]["ssl_vit"] and len(p["code"]["commit"] or "x" * 40) == 40
    assert recipes.load([f"recipe={out / 'config.yaml'}"]).init == str(backbone)  # knn.py writes config.yaml too
    monitor = metrics(tiny_mae_run)  # the k-NN monitor of pre-training: the same schema
    assert monitor["protocol"] == "knn" and {"top1", "top5", "num_samples"} <= set(monitor)


def test_the_linear_probe_says_where_it_chose_its_learning_rate(tmp_path, env, tiny_mae_run):
    base = [*tool("linear_probe"), "recipe=linprobe_digits", f"init={tiny_mae_run / 'backbone.safetensors'}",
            "optim.epochs=2", "optim.warmup_epochs=1", "task.lr_scales=[1,100]"]
    run([*base, f"train.output_dir={tmp_path / 'val'}"], env)
    assert metrics(tmp_path / "val")["selected_on"] == "val"
    result = run([*base, f"train.output_dir={tmp_path / 'holdout'}", "data.holdout_fraction=0.2"], env)
    m = metrics(tmp_path / "holdout")
    assert m["selected_on"] == "holdout" and m["num_samples"] == 360
    held_out = m["holdout"]["num_samples"]
    assert 0.15 * 1437 < held_out < 0.25 * 1437
    assert f"cached the train features of {1437 - held_out} samples" in result.stdout  # never trained on
    chosen = max(m["heads"], key=lambda head: head["holdout_top1"])
    assert m["best_lr_scale"] == chosen["lr_scale"] and m["top1"] == chosen["top1"]


# -------------------------------------------------------------------------------------------
# also found: TensorBoard, file modes, class names, predictions, transformers, pictures, --help


def test_tensorboard_holds_one_run_of_curves_that_change(tiny_mae_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tiny_mae_run / "tensorboard"
    folders = {p.parent for p in board.rglob("events.out.tfevents.*")}
    assert len(folders) == 1 and not list(board.rglob("hparams.yml"))  # no second, empty run
    tags = set(EventAccumulator(str(folders.pop())).Reload().Tags()["scalars"])
    assert "val/knn_top1" in tags and "train/loss" in tags
    assert not tags & {"val/knn_k", "val/knn_temperature", "val/knn_num_samples", "train/step"}


def test_exports_are_readable_as_the_umask_says(tiny_mae_run):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("backbone.safetensors", "model.safetensors", "backbone.json"):
        assert stat.S_IMODE((tiny_mae_run / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, env, tiny_mae_run):
    out = tmp_path_factory.mktemp("classifier")
    run([*tool("finetune"), "recipe=finetune_digits", f"init={tiny_mae_run / 'backbone.safetensors'}",
         f"train.output_dir={out}", "train.max_steps=2", "model.global_pool=token"], env)  # (as transformers' ViT)
    return out


def test_a_classifier_names_its_classes_and_predicts_files(classifier, tmp_path, env):
    description = json.loads((classifier / "model.json").read_text())
    assert description["classes"] == [str(d) for d in range(10)]  # from the shard index
    from ssl_vit.data import build_eval_loader
    cfg = recipes.load(["recipe=finetune_digits", *TINY_VIT[:4]])
    batch = next(iter(build_eval_loader(cfg, "val", batch_size=2)))
    files = []
    for i, image in enumerate(batch["images"]):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(files[-1])
    result = run([*tool("predict"), str(classifier / "model.safetensors"), *map(str, files), "--top-k", "3", "--json"],
                 env)
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["image"] for line in lines] == list(map(str, files))
    for line in lines:
        assert len(line["top"]) == 3 and all(t["class"] in description["classes"] for t in line["top"])
        probabilities = [t["probability"] for t in line["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    bad = run([*tool("predict"), str(classifier / "backbone.safetensors"), str(files[0])], env, expect=2)
    assert "without a classifier" in bad.stderr


@pytest.mark.slow  # importing transformers alone takes ~10 s
def test_exports_load_in_hugging_face_transformers(classifier, tmp_path, env, tiny_mae_run):
    transformers = pytest.importorskip("transformers")
    from ssl_vit import create_encoder, load_weights
    from ssl_vit.tasks import MAE

    images = torch.randn(2, 3, 32, 32)
    # the backbone: ViTModel's last hidden state is our encoder's tokens
    run([*tool("export_hf"), str(tiny_mae_run / "backbone.safetensors"), str(tmp_path / "backbone")], env)
    hf = transformers.ViTModel.from_pretrained(str(tmp_path / "backbone"), add_pooling_layer=False).eval()
    ours = create_encoder(**json.loads((tiny_mae_run / "backbone.json").read_text())["encoder"]).eval()
    load_weights(ours, tiny_mae_run / "backbone.safetensors", strict=True, verbose=False)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=images).last_hidden_state, ours.forward_features(images), atol=1e-5)
    # a classifier: the same logits, the class names
    run([*tool("export_hf"), str(classifier / "model.safetensors"), str(tmp_path / "classifier")], env)
    cfg = recipes.load(["recipe=finetune_digits", *TINY_VIT[:4]])  # mean pooling: transformers' ViT has none
    from ssl_vit.weights import export_model
    from ssl_vit.tasks import build
    export_model(build(cfg, num_classes=10), tmp_path / "avg" / "model.safetensors")
    refused = run([*tool("export_hf"), str(tmp_path / "avg" / "model.safetensors"), str(tmp_path / "no")], env,
                  expect=2)
    assert "cannot express this encoder: global_pool=avg" in refused.stderr and not (tmp_path / "no").exists()
    hf = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "classifier")).eval()
    assert hf.config.id2label[3] == "3"
    model = create_encoder(**json.loads((classifier / "model.json").read_text())["encoder"]).eval()
    load_weights(model, classifier / "model.safetensors", strict=True, verbose=False)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=images).logits, model(images), atol=1e-5)
    # an MAE with its decoder: transformers' ViTMAE gives our loss for the same masks
    run([*tool("export_hf"), str(tiny_mae_run / "model.safetensors"), str(tmp_path / "mae")], env)
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "mae")).eval()
    cfg = recipes.load([f"recipe={tiny_mae_run / 'config.yaml'}"])
    mae = MAE.build(cfg).eval()
    load_weights(mae, tiny_mae_run / "model.safetensors", strict=True, verbose=False)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert abs(hf(pixel_values=images, noise=noise).loss.item() - mae(images, noise=noise).loss.item()) < 1e-5


def test_a_validation_split_written_in_order_shows_several_classes(tmp_path):
    """Shards of a split written class by class (make_shards --shuffle false): the pictures are spread
    over the split, not its first images (all of one class)."""
    from ssl_vit.data.writer import Item, write_shards
    from ssl_vit.cli.visualize import VisualizeConfig, load_images

    items = []
    for label, shade in ((0, 0), (1, 255)):
        for i in range(20):
            png = tmp_path / f"{label}_{i}.png"
            Image.new("RGB", (8, 8), (shade,) * 3).save(png)
            items.append(Item(str(png), label, f"{label}_{i:02d}"))
    write_shards(items, ["black", "white"], tmp_path / "val", shuffle=False, progress=False)
    cfg = recipes.load(["recipe=mae_base", f"data.val={tmp_path / 'val.json'}", "model.img_size=16", "model.patch_size=4",
                       "num_images=4"], schema=VisualizeConfig)
    images = load_images(cfg)
    brightness = images.float().mean(dim=(1, 2, 3))
    assert len(images) == 4 and brightness.min() < 10 and brightness.max() > 245


def test_help_describes_every_key_and_lists_the_recipes_a_tool_runs():
    from ssl_vit.models import registered_families
    from ssl_vit.recipes import key_descriptions
    from ssl_vit.tasks import registered_tasks

    schemas = [config.Config] + [t.Config for t in registered_tasks().values()]
    schemas += [f.Config for f in registered_families().values()]
    undescribed = [f"{schema.__name__}.{key}" for schema in schemas for key, text in key_descriptions(schema).items()
                   if not text and not key.startswith(("task.", "model."))]
    assert not undescribed, f"keys without a one-line description: {undescribed}"
    result = subprocess.run([*tool("linear_probe"), "--help"], capture_output=True, text=True, timeout=120)
    recipes = [line.split()[0] for line in result.stdout.split("recipes (or")[1].split("\n\n")[0].splitlines()[1:]]
    assert recipes == ["linprobe_base", "linprobe_digits", "linprobe_huge", "linprobe_large"]
    assert "linprobe_digits  Linear probing on the embedded digits set" in result.stdout
    assert "optim.blr = 0.00015" in result.stdout and "base lr: lr = blr * batch_size / lr_base_batch" in result.stdout


def test_fine_tuning_runs_log_their_attention_pictures(classifier):
    """finetune_digits' runs are shorter than log.images_every: the last step draws them anyway."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (classifier / "tensorboard").rglob("events.out.tfevents.*")}
    assert "attention" in EventAccumulator(str(folder)).Reload().Tags()["images"]
