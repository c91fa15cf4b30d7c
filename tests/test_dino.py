"""DINO against the paper: its loss, centering and teacher update against an independent
implementation written from Algorithm 1 and eq. 3-4 (Caron et al. 2021); the schedules against
main_dino.py's formulas; the multi-crop views; the ViT on views of another size against timm's
dynamic_img_size; the dino_tiny_digits recipe end to end (exact resume of student, teacher and center;
exports: the teacher as the backbone)."""
import math
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT
from conftest import run_command as run
from ssl_vit import create_encoder, recipes
from ssl_vit.config import ConfigError
from ssl_vit.run.optim import WeightDecaySchedule
from ssl_vit.tasks import DINO, Progress, build
from ssl_vit.tasks.dino import MultiCrop, dino_loss

TINY_DINO = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "task.out_dim=64", "task.hidden_dim=32",
             "task.bottleneck_dim=16", "task.local_crops_number=2"]


def tiny_dino(*overrides):
    torch.manual_seed(0)
    return build(recipes.load(["recipe=dino_tiny_digits", *TINY_DINO, *overrides]))


# --- Algorithm 1, written out ----------------------------------------------------------------

def reference_H(t, s, center, tps, tpt):
    """Algorithm 1's H: the teacher sharpened and centred, the student's log-probabilities; per sample."""
    t = t.detach()
    s = F.softmax(s / tps, dim=1)
    t = F.softmax((t - center) / tpt, dim=1)
    return -(t * torch.log(s)).sum(dim=1).mean()


def reference_loss(student_views, teacher_views, center, tps, tpt):
    """Eq. 3 with multi-crop: every (teacher global view, student view) pair of different views, averaged."""
    terms = [reference_H(t, s, center, tps, tpt) for i, t in enumerate(teacher_views)
             for v, s in enumerate(student_views) if v != i]
    return sum(terms) / len(terms)


def test_the_loss_is_the_papers_over_every_pair_of_different_views():
    torch.manual_seed(0)
    batch, prototypes = 5, 17
    student = [torch.randn(batch, prototypes) for _ in range(6)]   # 2 global + 4 local views
    teacher = [torch.randn(batch, prototypes) for _ in range(2)]
    center = torch.randn(1, prototypes) * 0.1
    ours = dino_loss(torch.cat(student), torch.cat(teacher), center, 0.1, 0.04)
    expected = reference_loss(student, teacher, center, 0.1, 0.04)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    # 2 x 6 - 2 pairs: a wrong pairing (e.g. keeping the same-view pairs) gives another number
    same_view_too = sum(reference_H(t, s, center, 0.1, 0.04) for t in teacher for s in student) / 12
    assert abs(same_view_too.item() - ours.item()) > 1e-3


def test_a_step_matches_algorithm_1_loss_teacher_and_center():
    """The task's forward on a multi-crop batch, then its step hook: the loss of Algorithm 1 on the
    same outputs, the teacher lerped towards the student by 1 - m(step) (cosine from 0.996 to 1), the
    center by eq. 4 from the mean teacher output."""
    task = tiny_dino("task.teacher_temp=0.04", "task.warmup_teacher_temp=0.04").eval()  # the paper's; no drop path
    progress = Progress(step=3, total_steps=10, steps_per_epoch=5)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    center = torch.randn(1, 64) * 0.1
    task.center.copy_(center)
    # the student trained a little: its weights differ from the teacher's
    with torch.no_grad():
        for p in task.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    task.start_step(progress)
    output = task({"images": views})
    # the same outputs by hand: the class token through each network's head
    def outputs(encoder, head, images):
        return torch.cat([head(encoder.forward_features(x)[:, 0]) for x in images])
    with torch.no_grad():
        teacher_out = outputs(task.teacher_encoder, task.teacher_head, views[:2])
        student_out = outputs(task.encoder, task.head, views)
    assert torch.allclose(output.teacher, teacher_out, atol=1e-5)
    assert torch.allclose(output.student, student_out, atol=1e-5)
    expected = reference_loss(student_out.chunk(4), teacher_out.chunk(2), center, 0.1, 0.04)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the step hook after the update
    student_before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in task.teacher_encoder.state_dict().items()}
    task.after_update(progress)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 3 / 10) + 1) / 2    # main_dino.py's cosine_scheduler(0.996, 1)
    key = "blocks.0.attn.qkv.weight"
    assert torch.allclose(task.teacher_encoder.state_dict()[key],
                          m * teacher_before[key] + (1 - m) * student_before[key], atol=1e-7)
    assert torch.allclose(task.center, 0.9 * center + 0.1 * teacher_out.mean(dim=0, keepdim=True), atol=1e-6)


def test_schedules_are_main_dinos():
    """Teacher temperature: np.linspace(warmup, final, warmup_epochs) per epoch, then final; weight
    decay: a cosine from start to end per step (cosine_scheduler without warm-up)."""
    task = tiny_dino("task.warmup_teacher_temp=0.04", "task.teacher_temp=0.07", "task.warmup_teacher_temp_epochs=30")
    expected = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    assert [task.teacher_temperature(epoch) for epoch in range(100)] == pytest.approx(expected.tolist())
    total = 1000
    schedule = WeightDecaySchedule(0.04, 0.4, total)
    iters = np.arange(total)
    reference = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * iters / len(iters)))
    assert [schedule(i) for i in range(total)] == pytest.approx(reference.tolist())
    progress = [Progress(i, total, 10) for i in (0, 500, 999)]
    momentum = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * np.array([0, 500, 999]) / total))
    assert [task.momentum(p) for p in progress] == pytest.approx(momentum.tolist())


def test_the_last_layer_is_frozen_in_the_first_epoch_only():
    task = tiny_dino()
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    for step, frozen in ((0, True), (9, True), (10, False)):
        task.zero_grad(set_to_none=True)
        task.start_step(Progress(step, 100, 10))
        task({"images": views}).loss.backward()
        grad = task.head.last_layer.weight_v.grad
        assert grad is not None and (grad.abs().sum().item() == 0) == frozen
        assert task.head.mlp[0].weight.grad.abs().sum() > 0


def test_the_vit_runs_views_of_another_size_as_timms_dynamic_img_size():
    """A 32-px model on 16-px views: the position table resampled on the fly, as timm's ViT with
    dynamic_img_size=True (the same weights, the same features)."""
    torch.manual_seed(0)
    ours = create_encoder("vit_tiny_patch16", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          pos_embed="learn", num_classes=0).eval()
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=0, dynamic_img_size=True).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    for size in (32, 16, 24):
        x = torch.randn(2, 3, size, size)
        assert torch.allclose(ours.forward_features(x), reference.forward_features(x), atol=1e-5), size


def test_multi_crop_views_are_the_papers_sizes_and_follow_the_seed():
    cfg = recipes.load(["recipe=dino_vit_small"])
    from PIL import Image
    import io
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buffer, "PNG")
    transform = MultiCrop(cfg, 224)
    torch.manual_seed(1), __import__("random").seed(1)
    views = transform(buffer.getvalue())
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(v.dtype == torch.uint8 for v in views)
    torch.manual_seed(1), __import__("random").seed(1)
    again = transform(buffer.getvalue())
    assert all(torch.equal(a, b) for a, b in zip(views, again))


@pytest.mark.parametrize("overrides, message", [
    (["model.global_pool=avg"], "global_pool=token"),
    (["train.sharding=fsdp"], "train.sharding=ddp"),
    (["task.local_crop_size=18"], "multiple of model.patch_size"),
    (["task.global_crops_scale=[0.5,1.5]"], "task.global_crops_scale"),
    (["task.blur=[1.0,0.1]"], "task.blur"),
    (["task.teacher_temp=0"], "task.teacher_temp"),
])
def test_bad_settings_are_refused_before_anything_is_built(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        recipes.load(["recipe=dino_tiny_digits", *overrides])


def test_an_encoder_that_runs_one_image_size_only_is_refused_and_beits_runs():
    with pytest.raises(ConfigError, match="multi-crop"):  # Swin: windows of one size
        recipes.load(["recipe=dino_tiny_digits", "model.arch=swin_tiny_patch4_window7", "model.img_size=32",
                      "model.patch_size=4", "model.embed_dim=64", "model.depths=[2,2]", "model.num_heads=[2,4]",
                      "model.window_size=4"])
    # BEiT's encoder runs the local crops (its relative position tables read by offset): a whole step
    task = build(recipes.load(["recipe=dino_tiny_digits", *TINY_DINO, "model.arch=beit_base_patch16",
                               "model.img_size=32", "model.patch_size=4", "model.global_pool=token"]))
    views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    task.start_step(Progress(20, 100, 10))
    output = task({"images": views})
    output.loss.backward()
    task.after_update(Progress(20, 100, 10))
    assert torch.isfinite(output.loss) and output.student.shape == (8, 64)


# --- end to end ---------------------------------------------------------------------------------

def pretrain(out, env, *overrides):
    return run([sys.executable, str(ROOT / "pretrain.py"), "recipe=dino_tiny_digits", f"train.output_dir={out}",
                *TINY_DINO, "data.batch_size=32", "optim.batch_size=32", "log.every=1", "eval.knn_every=0",
                "log.images_every=100", "data.num_workers=1", *overrides], env)


@pytest.fixture(scope="module")
def dino_resumed(tmp_path_factory, env):
    """dino_tiny_digits, tiny, stopped after 3 steps (inside the first epoch) and resumed to 6."""
    out = tmp_path_factory.mktemp("dino")
    pretrain(out, env, "train.max_steps=3", "train.checkpoint_every=3")
    result = pretrain(out, env, "train.max_steps=6", "train.checkpoint_every=3")
    assert "resumed from" in result.stdout and "task dino" in result.stdout
    return out


def test_a_resumed_run_ends_with_the_student_teacher_and_center_of_an_uninterrupted_one(dino_resumed, env, tmp_path):
    pretrain(tmp_path, env, "train.max_steps=6", "train.checkpoint_every=100")
    resumed, straight = load_file(dino_resumed / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert {"center", "teacher_encoder.cls_token", "head.last_layer.weight_v", "teacher_head.mlp.0.weight",
            "cls_token"} <= set(resumed)
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    # the teacher moved (EMA of a student that trained), and is not the student
    assert not torch.equal(resumed["teacher_encoder.blocks.0.attn.qkv.weight"], resumed["blocks.0.attn.qkv.weight"])
    # the backbone is the teacher's encoder (DINO evaluates the teacher), in timm's names
    backbone = load_file(dino_resumed / "backbone.safetensors")
    assert torch.equal(backbone["blocks.0.attn.qkv.weight"], resumed["teacher_encoder.blocks.0.attn.qkv.weight"])
    # the weight decay followed its cosine, logged per step
    import json
    lines = [json.loads(line) for line in (dino_resumed / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "wd" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4, 5, 6]
    cfg = recipes.load([f"recipe={dino_resumed / 'config.yaml'}"])
    total = json.loads((dino_resumed / "plan.json").read_text())["total_steps"]
    schedule = WeightDecaySchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    assert [line["wd"] for line in steps] == pytest.approx([schedule(i) for i in range(6)])
    assert "teacher_entropy" in steps[0]


def test_the_teachers_backbone_loads_into_timm(dino_resumed):
    """The JSON's load_with_timm command builds timm's ViT from the file (strict), with the features of
    the teacher encoder the file holds."""
    import json
    from ssl_vit import load_weights
    description = json.loads((dino_resumed / "backbone.json").read_text())
    theirs = eval(description["load_with_timm"], {"timm": timm}).eval()
    ours = create_encoder(**description["encoder"]).eval()
    load_weights(ours, dino_resumed / "backbone.safetensors", strict=True, verbose=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours.forward_head(ours.forward_features(images), pre_logits=True)
        assert (theirs(images) - expected).abs().max().item() < 1e-5


def test_a_dino_task_is_built_as_the_recipe_says():
    task = tiny_dino()
    assert isinstance(task, DINO)
    assert all(not p.requires_grad for p in task.teacher_encoder.parameters())
    assert not task.head.last_layer.weight_g.requires_grad      # norm_last_layer: true
    assert all(torch.equal(a, b) for a, b in zip(task.encoder.state_dict().values(),
                                                  task.teacher_encoder.state_dict().values()))
    names = {n for g in task.param_groups(0.04, None) for p in g["params"] for n, q in task.named_parameters() if p is q}
    assert not any(n.startswith("teacher_") for n in names) and "head.last_layer.weight_v" in names


# --- two processes (DDP) against one ----------------------------------------------------------

DINO_BATCH = """
views = [torch.randint(0, 256, (16, 3, s, s), dtype=torch.uint8, generator=g) for s in (32, 32, 16, 16)]
batch = dict(images=views, labels=torch.zeros(16, dtype=torch.long))
"""


def test_two_processes_give_the_losses_teacher_and_center_of_one(tmp_path, env):
    """1 process x 2 accumulation steps and 2 DDP processes x 1, on the same views: the same loss at
    every step, and the same student, teacher and center after 3 steps (to fp32 rounding), with no
    broadcast of the teacher (each rank updates its own from the all-reduced student)."""
    from conftest import free_port, run_steps
    tiny = [*TINY_DINO, "model.drop_path_rate=0.0", "data.batch_size=8", "optim.batch_size=16", "log.every=1",
            "data.num_workers=1", "optim.warmup_epochs=0.1", "eval.knn_every=0"]
    results = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", free_port()])):
        out, steps = run_steps(tmp_path, env, name, launcher, "dino_tiny_digits", tiny, DINO_BATCH)
        results[name] = (steps, load_file(out / "model.safetensors"))
    (one, a), (two, b) = results["one"], results["two"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-6, rtol=1e-4), key
    assert not torch.equal(a["center"], torch.zeros_like(a["center"]))


def test_dinos_released_checkpoints_load_the_teacher_into_our_vit(tmp_path):
    """facebookresearch/dino releases the teacher's backbone (timm's names) and full checkpoints
    {'student': DDP-wrapped backbone and head, 'teacher': backbone and head, 'dino_loss': center,
    'args': Namespace, ...}: both load into our ViT as the teacher's encoder, every tensor of it."""
    import argparse

    from ssl_vit import load_weights

    task = tiny_dino()
    with torch.no_grad():  # a teacher that differs from the student
        for p in task.teacher_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    teacher = task.teacher_encoder.state_dict()
    full = {"student": {**{f"module.backbone.{k}": v for k, v in task.encoder.state_dict().items()},
                        **{f"module.head.{k}": v for k, v in task.head.state_dict().items()}},
            "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                        **{f"head.{k}": v for k, v in task.teacher_head.state_dict().items()}},
            "dino_loss": {"center": task.center.clone()}, "epoch": 3, "args": argparse.Namespace(arch="vit_small")}
    torch.save(full, tmp_path / "checkpoint.pth")
    torch.save(teacher, tmp_path / "dino_backbone.pth")
    for name in ("checkpoint.pth", "dino_backbone.pth"):
        encoder = create_encoder(**task.teacher_encoder.config)
        report = load_weights(encoder, tmp_path / name, verbose=False)
        assert len(report.loaded) == len(teacher), name
        assert all(torch.equal(encoder.state_dict()[k], v) for k, v in teacher.items()), name


def test_the_pictures_are_the_teachers_class_token_attention_per_head():
    task = tiny_dino()
    assert task.picture_split() == "val"
    images = torch.randn(3, 3, 32, 32)
    grids = task.pictures(images, lambda x: (x.clamp(-1, 1) + 1) / 2)
    (grid,) = grids.values()
    assert list(grids) == ["teacher_attention"] and grid.shape[0] == 3 and 0 <= grid.min() <= grid.max() <= 1
    # one column for the image, one for the mean and one per head (2 heads in TINY_DINO)
    from ssl_vit.models.vit_attention import attention_maps
    assert len(attention_maps(task.teacher_encoder, images, heads=True)) == 3
