"""The task and encoder contracts: every registered task and family honours them (one parametrised
test each), and a method or an encoder defined here, outside ssl_vit/, trains end to end through
pretrain.py (the recipe's `imports:` names this file), checkpoints, resumes and exports.

This file is also imported by those pretrain.py runs, as a plugin: it must not import conftest at
module level.
"""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ssl_vit import recipes, load_weights
from ssl_vit.config import ConfigError, ModelConfig, TaskConfig
from ssl_vit.models import EncoderFamily, build_encoder, create_encoder, family_of, register_family, registered_families
from ssl_vit.eval import TopKAccuracy, protocol_for
from ssl_vit.tasks import Task, TaskOutput, build, register_task, registered_tasks
from ssl_vit.weights import claiming_task

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()


# -------------------------------------------------------------------------------------------
# a method of our own: rotation prediction (Gidaris et al. 2018, "Unsupervised Representation
# Learning by Predicting Image Rotations"), one class and its config


@dataclass
class RotationConfig(TaskConfig):
    name: str = "toy_rotation"
    rotations: int = 4                    # 0, 90, 180, 270 degrees (the paper's best, table 1)


@register_task
class ToyRotation(Task):
    """rotation prediction: the encoder learns which way up an image is."""
    name = "toy_rotation"
    Config = RotationConfig
    evaluation = "knn"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.task.rotations not in (2, 4):
            raise ConfigError(f"task.rotations={cfg.task.rotations}: use 2 (0/180 degrees) or 4")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "ToyRotation":
        return cls(build_encoder(cfg.model, num_classes=0), cfg.task.rotations)

    def __init__(self, encoder: nn.Module, rotations: int):
        super().__init__()
        self.encoder, self.rotations = encoder, rotations
        self.head = nn.Linear(encoder.num_features, rotations)

    def forward(self, batch: dict) -> TaskOutput:
        images = batch["images"]
        turns = torch.arange(len(images), device=images.device) % self.rotations    # [B]
        rotated = torch.stack([torch.rot90(image, int(k) * 4 // self.rotations, dims=(1, 2))
                               for image, k in zip(images, turns)])
        logits = self.head(self.encoder.forward_head(self.encoder.forward_features(rotated), pre_logits=True))
        accuracy = 100.0 * (logits.argmax(1) == turns).float().mean()  # stays on the device
        return TaskOutput(loss=F.cross_entropy(logits.float(), turns), metrics={"rotation_top1": accuracy})


# -------------------------------------------------------------------------------------------
# a method with more of the loop: a student and an EMA teacher (a "mean teacher", Tarvainen &
# Valpola 2017), the teacher updated by the contract's step hook, never inside forward


@dataclass
class MeanTeacherConfig(TaskConfig):
    name: str = "toy_mean_teacher"
    momentum: float = 0.9                 # the teacher's EMA
    nan_at_step: Optional[int] = None     # a non-finite loss at this step (the hook must not run after it)


@register_task
class ToyMeanTeacher(Task):
    """mean teacher: the student matches an EMA teacher on a flipped view."""
    name = "toy_mean_teacher"
    Config = MeanTeacherConfig
    evaluation = "knn"

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "ToyMeanTeacher":
        torch.manual_seed(cfg.train.seed)
        return cls(build_encoder(cfg.model, num_classes=0), build_encoder(cfg.model, num_classes=0), cfg.task)

    def __init__(self, encoder: nn.Module, teacher: nn.Module, task_cfg):
        super().__init__()
        self.encoder, self.teacher = encoder, teacher
        self.teacher.load_state_dict(encoder.state_dict())
        self.teacher.requires_grad_(False)
        self.momentum, self.nan_at_step = task_cfg.momentum, task_cfg.nan_at_step
        # what the hooks saw, checkpointed with the task: updates taken, the last one's index, steps started
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_update", torch.full((), -1, dtype=torch.long))
        self.register_buffer("starts", torch.zeros((), dtype=torch.long))
        self.step_at_hand: Optional[int] = None

    def start_step(self, progress) -> None:
        self.step_at_hand = progress.step
        self.starts += 1

    @torch.no_grad()
    def after_update(self, progress) -> None:
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1 - self.momentum)
        self.updates += 1
        self.last_update.fill_(progress.step)

    def evaluated_encoder(self) -> nn.Module:
        return self.teacher

    def forward(self, batch: dict) -> TaskOutput:
        images = batch["images"]
        student = self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)
        with torch.no_grad():
            target = self.teacher.forward_head(self.teacher.forward_features(images.flip(-1)), pre_logits=True)
        loss = F.mse_loss(F.normalize(student.float(), dim=-1), F.normalize(target.float(), dim=-1))
        if self.nan_at_step is not None and self.step_at_hand == self.nan_at_step:
            loss = loss * float("nan")
        return TaskOutput(loss=loss, metrics={})


# -------------------------------------------------------------------------------------------
# an encoder family of our own: a small convnet, one class for the module, one for the family


@dataclass
class ToyConvConfig(ModelConfig):
    arch: str = "toy_conv"
    width: int = 16                       # channels of every block
    depth: int = 2                        # 3x3 conv blocks after the stem


class ToyConvNet(nn.Module):
    def __init__(self, *, width: int = 16, depth: int = 2, in_chans: int = 3, num_classes: int = 0,
                 img_size=None, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = dict(arch="toy_conv", width=width, depth=depth, in_chans=in_chans, num_classes=num_classes,
                           img_size=img_size)
        self.num_features, self.num_classes = width, num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(images))                                   # [B, W, H, W]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.norm(x.mean(dim=(2, 3)))                                # [B, W]
        return features if pre_logits else self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError("toy_conv has no activation checkpointing")


@register_family
class ToyConv(EncoderFamily):
    """a small convnet, to show that an encoder family is one file."""
    name = "toy_conv"
    Config = ToyConvConfig
    archs = {"toy_conv": {}}
    architecture_keys = ("arch", "width", "depth", "in_chans", "img_size")

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.model.width <= 0 or cfg.model.depth < 0:
            raise ConfigError(f"model.width={cfg.model.width} must be positive and model.depth >= 0")

    @classmethod
    def create(cls, arch: str = "toy_conv", **options) -> ToyConvNet:
        return ToyConvNet(**options)


# -------------------------------------------------------------------------------------------
# every task and every family honours its contract

TINY_VIT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8"]
TASK_RECIPES = {  # a CPU-sized recipe of each task
    "mae": ["recipe=mae_tiny_digits", *TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2"],
    "simmim": ["recipe=simmim_digits", *TINY_VIT],
    "classify": ["recipe=finetune_digits", *TINY_VIT],
    "linear_probe": ["recipe=linprobe_digits", *TINY_VIT],
    "distill": ["recipe=deit_tiny_distilled_digits", *TINY_VIT, "task.distillation=none"],
    "toy_rotation": ["recipe=mae_tiny_digits", *TINY_VIT, "task.name=toy_rotation"],
    "beit": ["recipe=beit_digits", *TINY_VIT, "task.num_mask_patches=6", "task.min_mask_patches_per_block=2",
             "task.tokenizer.path=random"],
    "dvae": ["recipe=dvae_digits", "model.hidden_dim=8", "model.code_dim=4", "model.vocab_size=32"],
    "dino": ["recipe=dino_tiny_digits", *TINY_VIT, "model.patch_size=4", "task.out_dim=64", "task.hidden_dim=32",
             "task.bottleneck_dim=16", "task.local_crops_number=2"],
    "toy_mean_teacher": ["recipe=mae_tiny_digits", *TINY_VIT, "task.name=toy_mean_teacher"],
}


@pytest.mark.parametrize("name", sorted(registered_tasks()))
def test_every_task_honours_the_contract(name, tmp_path):
    cls = registered_tasks()[name]
    assert cls.Config().name == name and issubclass(cls.Config, TaskConfig) and cls.__doc__
    cfg = recipes.load(TASK_RECIPES[name])
    torch.manual_seed(0)
    task = build(cfg, num_classes=10)
    assert isinstance(task, cls) and isinstance(task.describe(), str)
    images = torch.randn(4, 3, 32, 32)
    if cls.needs_any_image_size:  # multi-crop views: two global, two local (data/transforms.py's Transform)
        images = [images, torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    batch = {"images": images, "labels": torch.tensor([0, 1, 2, 3])}
    output = task.train()(batch)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss) and isinstance(output.metrics, dict)
    # the parameter groups hold every trainable parameter exactly once, and nothing frozen
    groups = task.param_groups(0.05, cfg.optim.layer_decay)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in task.parameters() if p.requires_grad)
    assert all("lr_scale" in g and "weight_decay" in g for g in groups)
    protocol = protocol_for(cls)  # the task names a protocol the evaluation layer has
    if protocol is TopKAccuracy:
        logits = task.eval().predict({"images": images})
        logits = [logits] if isinstance(logits, torch.Tensor) else logits
        assert all(l.shape == (4, 10) for l in logits)
        results = [{"top1": 50.0 + i, "top5": 90.0, "num_samples": 4} for i in range(len(logits))]
        assert set(task.summarize(results)) >= {"top1"}
        assert task.summarize(results) == task.summarize(results)  # pure: what it chooses is in what it returns
    assert set(protocol.required_splits(cfg)) <= {"train", "val"}
    # its FSDP units are modules of its own (blocks), each once
    units = task.fsdp_units()
    assert len({id(u) for u in units}) == len(units) and all(any(u is m for m in task.modules()) for u in units)
    # model.safetensors loads back, every tensor of the file used: into the encoder its JSON describes
    # when it is a plain encoder with a head (timm loads it too), else into a freshly built task
    from ssl_vit import export_model

    export_model(task.eval(), tmp_path / "model.safetensors")
    description = json.loads((tmp_path / "model.json").read_text())
    again = create_encoder(**description["encoder"]) if task.export_state().timm_loadable else build(cfg, 10)
    report = load_weights(again, tmp_path / "model.safetensors", strict=task.export_state().timm_loadable,
                          verbose=False)
    assert not report.unexpected and report.loaded
    reloaded = again.state_dict() if isinstance(again, nn.Module) and not isinstance(again, Task) else \
        again.export_state().state
    for key, value in load_file(tmp_path / "model.safetensors").items():
        assert torch.equal(value, reloaded[key]), key
    # its own file is claimed by itself alone, or by no task (a plain encoder with a head)
    owner, _ = claiming_task(load_file(tmp_path / "model.safetensors"))
    assert owner in (cls, None) and (owner is cls) == (cls.checkpoint_format(load_file(tmp_path / "model.safetensors"))
                                                       is not None)


def test_a_task_without_forward_or_build_is_refused_when_it_registers():
    class Incomplete(Task):
        """a task that forgot its forward."""
        name = "incomplete"

        @classmethod
        def build(cls, cfg, num_classes: int = 0):
            return cls()

    with pytest.raises(TypeError, match=r"Incomplete \(task 'incomplete'\) does not define forward"):
        register_task(Incomplete)
    assert "incomplete" not in registered_tasks()


def test_every_protocol_a_task_may_name_exists():
    from ssl_vit.tasks.base import EVALUATIONS

    assert all(protocol_for(type("T", (), {"evaluation": name})).name == name for name in EVALUATIONS)


FAMILY_OPTIONS = {"vit": ("vit_tiny_patch16", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)),
                  "timm": ("timm:resnet18", dict(img_size=32)),
                  "beit": ("beit_base_patch16", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                     use_shared_rel_pos_bias=True)),
                  "swin": ("swin_tiny_patch4_window7", dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                                            num_heads=[1, 2], window_size=4)),
                  "dvae": ("dvae", dict(img_size=32, hidden_dim=8, num_downsamples=1, num_res_blocks=1, code_dim=4,
                                        vocab_size=16)),
                  "toy_conv": ("toy_conv", dict(width=8, depth=2))}


@pytest.mark.parametrize("name", sorted(registered_families()))
def test_every_encoder_family_honours_the_contract(name, tmp_path):
    family = registered_families()[name]
    arch, options = FAMILY_OPTIONS[name]
    encoder = create_encoder(arch, num_classes=5, **options)
    assert family_of(encoder) is family and family.claims(encoder.config["arch"])
    images = torch.randn(2, 3, 32, 32)
    features = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
    assert features.shape == (2, encoder.num_features) and encoder(images).shape == (2, 5)
    names = dict(encoder.named_parameters())
    no_decay = encoder.no_weight_decay() if hasattr(encoder, "no_weight_decay") else set()  # optional, as in timm
    assert set(no_decay) <= set(names) | {"pos_embed", "cls_token", "dist_token", "reg_token"}  # as timm: listed if absent
    assert isinstance(encoder.group_matcher(), dict)
    backbone = family.backbone_state(encoder)
    assert backbone and len(backbone) < len(encoder.state_dict())  # the classifier is left out
    # the backbone export rebuilds from its JSON and loads strictly
    from ssl_vit import export_backbone

    export_backbone(encoder, tmp_path / "backbone.safetensors")
    description = json.loads((tmp_path / "backbone.json").read_text())
    rebuilt = create_encoder(**description["encoder"])
    load_weights(rebuilt, tmp_path / "backbone.safetensors", strict=True, verbose=False)
    with torch.no_grad():
        expected = encoder.eval().forward_head(encoder.forward_features(images), pre_logits=True)
        assert torch.allclose(rebuilt.eval().forward_head(rebuilt.forward_features(images), pre_logits=True), expected)


# -------------------------------------------------------------------------------------------
# end to end, outside ssl_vit/: a recipe that imports this file


def _pretrain(recipe: Path, out: Path, env: dict, *overrides: str, expect: int = 0):
    command = [sys.executable, str(ROOT / "pretrain.py"), f"recipe={recipe}", f"train.output_dir={out}",
               "data.num_workers=1", "log.every=1", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture
def env(tmp_path_factory):
    import os
    return {**os.environ, "SSL_VIT_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


def test_a_task_defined_outside_the_package_trains_resumes_and_exports(tmp_path, env):
    recipe = tmp_path / "rotation.yaml"
    recipe.write_text(f"# Reproduces: nothing; Command: the test\nbase: mae_tiny_digits\nimports: [{THIS_FILE}]\n"
                      "model:\n  embed_dim: 32\n  depth: 2\n  num_heads: 2\n  patch_size: 8\n"
                      "task:\n  name: toy_rotation\n  rotations: 4\n"
                      "data:\n  batch_size: 32\noptim:\n  batch_size: 32\n")
    out = tmp_path / "run"
    _pretrain(recipe, out, env, "train.max_steps=2", "train.checkpoint_every=1")
    result = _pretrain(recipe, out, env, "train.max_steps=4", "train.checkpoint_every=1")
    assert "resumed from" in result.stdout and "task toy_rotation" in result.stdout
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "eval" not in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and all("rotation_top1" in line for line in lines)
    saved = recipes.load([f"recipe={out / 'config.yaml'}"])  # the saved config names the plugin file
    assert saved.task.name == "toy_rotation" and saved.task.rotations == 4 and str(THIS_FILE) in saved.imports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "toy_rotation" and metrics["num_samples"] == 360  # the k-NN monitor, generic
    assert metrics["protocol"] == "knn"
    # the exports: the encoder (timm keys, loads in timm) and the task with its own head
    encoder = create_encoder(**json.loads((out / "backbone.json").read_text())["encoder"])
    load_weights(encoder, out / "backbone.safetensors", strict=True, verbose=False)
    model = load_file(out / "model.safetensors")
    assert "head.weight" in model and "blocks.0.attn.qkv.weight" in model
    assert "load_with_timm" not in json.loads((out / "model.json").read_text())  # not a plain timm model
    # its config section is its own: keys checked, MAE's gone
    with pytest.raises(ConfigError, match=r"unknown key 'task.rotatons'.*Did you mean task.rotations"):
        recipes.load([f"recipe={recipe}", "task.rotatons=2"])
    with pytest.raises(ConfigError, match=r"task.mask_ratio is a key of task.name=mae"):
        recipes.load([f"recipe={recipe}", "task.mask_ratio=0.5"])
    with pytest.raises(ConfigError, match="task.rotations=3: use 2"):
        recipes.load([f"recipe={recipe}", "task.rotations=3"])


def test_a_task_with_step_hooks_defined_outside_the_package_gets_them_from_the_loop(tmp_path, env):
    """The step hooks are the contract's, not DINO's: a mean teacher defined here is started before
    every step and updated after every update taken (not after a skipped non-finite one), with the
    update's index; its hook state survives a resume, and its teacher is what is evaluated and exported."""
    recipe = tmp_path / "mean_teacher.yaml"
    recipe.write_text(f"# Reproduces: nothing; Command: the test\nbase: mae_tiny_digits\nimports: [{THIS_FILE}]\n"
                      "model:\n  embed_dim: 32\n  depth: 2\n  num_heads: 2\n  patch_size: 8\n"
                      "task:\n  name: toy_mean_teacher\n  nan_at_step: 1\n"
                      "data:\n  batch_size: 32\noptim:\n  batch_size: 32\n")
    out = tmp_path / "run"
    _pretrain(recipe, out, env, "train.max_steps=2", "train.checkpoint_every=2", "eval.knn_every=0")
    _pretrain(recipe, out, env, "train.max_steps=5", "train.checkpoint_every=2", "eval.knn_every=0")
    model = load_file(out / "model.safetensors")
    # 5 steps started, step index 1 skipped (its loss is NaN): 4 updates, the last one index 4
    assert (model["starts"].item(), model["updates"].item(), model["last_update"].item()) == (5, 4, 4)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "eval" not in line]
    assert [line["skipped"] for line in lines] == [0, 1, 0, 0, 0]
    # the teacher moved towards the student, and the backbone export is the teacher
    assert not torch.equal(model["teacher.blocks.0.attn.qkv.weight"], model["blocks.0.attn.qkv.weight"])
    backbone = load_file(out / "backbone.safetensors")
    assert torch.equal(backbone["blocks.0.attn.qkv.weight"], model["teacher.blocks.0.attn.qkv.weight"])


def test_an_encoder_family_defined_outside_the_package_trains_resumes_and_exports(tmp_path, env):
    recipe = tmp_path / "toy_conv.yaml"
    recipe.write_text(f"# Reproduces: nothing; Command: the test\nbase: finetune_digits\nimports: [{THIS_FILE}]\n"
                      "model:\n  arch: toy_conv\n  width: 8\n  depth: 2\n")
    out = tmp_path / "run"
    _pretrain(recipe, out, env, "train.max_steps=2", "train.checkpoint_every=1", "log.images_every=1")
    result = _pretrain(recipe, out, env, "train.max_steps=4", "train.checkpoint_every=1", "log.images_every=1")
    assert "resumed from" in result.stdout and "task classify on a toy_conv encoder" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["num_samples"] == 360 and "top1" in metrics
    description = json.loads((out / "model.json").read_text())
    assert description["encoder"] == {"arch": "toy_conv", "width": 8, "depth": 2, "in_chans": 3, "num_classes": 10,
                                      "img_size": 32}
    model = create_encoder(**description["encoder"])
    load_weights(model, out / "model.safetensors", strict=True, verbose=False)
    backbone = load_file(out / "backbone.safetensors")
    assert "stem.weight" in backbone and not any(k.startswith("head.") for k in backbone)
    # layer decay (finetune_digits: 0.75) through the family's group_matcher: each block its own lr
    cfg = recipes.load([f"recipe={recipe}"])
    groups = build(cfg, num_classes=10).param_groups(0.05, 0.75)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales == [round(0.75 ** k, 6) for k in (3, 2, 1, 0)]  # stem, block 0, block 1 with norm, head
    # ViT keys do not belong to this family
    with pytest.raises(ConfigError, match=r"unknown key 'model.patch_size'.*model.patch_size is a key of the vit"):
        recipes.load([f"recipe={recipe}", "model.patch_size=4"])


def test_unregistered_names_say_how_to_register(tmp_path):
    with pytest.raises(ConfigError, match=r"task.name='nope' is not one of: .*@register_task .*imports:"):
        recipes.load(["recipe=mae_tiny_digits", "task.name=nope"])
    with pytest.raises(ConfigError, match=r"model.arch='nope' is not an encoder we know.*@register_family"):
        recipes.load(["recipe=mae_tiny_digits", "model.arch=nope"])
    with pytest.raises(ConfigError, match=r"imports: no_such_plugin.py does not exist"):
        recipes.load(["recipe=mae_tiny_digits", "imports=[no_such_plugin.py]"])


# -------------------------------------------------------------------------------------------
# timm models through their family: img_size, their own group_matcher and no_weight_decay


def test_timm_models_get_img_size_layer_decay_and_no_decay_lists():
    swin = "timm:swin_tiny_patch4_window7_224"
    cfg = recipes.load(["recipe=supervised_resnet_digits", f"model.arch={swin}"])  # 32 px digits
    task = build(cfg, num_classes=10)
    assert tuple(task.encoder.patch_embed.img_size) == (32, 32)  # honoured, not timm's 224
    assert task({"images": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}).loss.isfinite()
    groups = task.param_groups(0.05, 0.75)
    named = {id(p): n for n, p in task.named_parameters()}
    scale_of = {named[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {named[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    # Swin-T has 2 + 2 + 6 + 2 blocks: each its own scale, the stem below them and the head at 1
    assert len(set(scale_of.values())) == 12 + 2
    assert scale_of["encoder.layers.0.blocks.0.mlp.fc1.weight"] < scale_of["encoder.layers.3.blocks.1.mlp.fc1.weight"] < 1
    assert scale_of["encoder.head.fc.weight"] == 1.0
    tables = [n for n in decay_of if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12 and all(decay_of[n] == 0 for n in tables)  # timm's no_weight_decay()
    assert decay_of["encoder.layers.0.blocks.0.mlp.fc1.weight"] == 0.05


def test_a_size_a_timm_model_cannot_take_stops_before_anything_runs():
    with pytest.raises(ConfigError, match=r"timm's convnext_atto cannot run on 24x24 images \(model.img_size=24\)"):
        recipes.load(["recipe=supervised_resnet_digits", "model.arch=timm:convnext_atto", "model.img_size=24"])
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet_nonexistent'"):
        recipes.load(["recipe=supervised_resnet_digits", "model.arch=timm:resnet_nonexistent"])
