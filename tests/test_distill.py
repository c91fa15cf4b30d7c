"""DeiT distillation: the losses against hand-written formulas, the frozen teacher, where the
gradients go, inference with two heads, teachers from files, and parity with timm's DeiT."""
import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
import torch.nn as nn

from conftest import TINY_VIT, run_command
from ssl_vit import config, recipes, create_encoder, load_weights
from ssl_vit.config import ConfigError
from ssl_vit.run.optim import build_optimizer
from ssl_vit.tasks import Distill, Teacher, build, build_teacher
from ssl_vit.tasks.distill import TeacherConfig, hard_distillation_loss, soft_distillation_loss

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
C = 5


def test_soft_loss_is_deits_definition():
    torch.manual_seed(0)
    student, teacher, tau = torch.randn(4, C), torch.randn(4, C), 3.0
    total = 0.0
    for s, t in zip(student, teacher):  # KL(p_t || p_s) at temperature tau, summed over classes
        p_t, p_s = torch.softmax(t / tau, 0), torch.softmax(s / tau, 0)
        total += sum(p_t[c] * (math.log(p_t[c]) - math.log(p_s[c])) for c in range(C))
    expected = total * tau ** 2 / (4 * C)  # DeiT divides by batch x classes (outputs_kd.numel())
    assert soft_distillation_loss(student, teacher, tau).item() == pytest.approx(float(expected), rel=1e-5)


def test_hard_loss_is_cross_entropy_to_the_teachers_argmax():
    student = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[0.0, 5.0, 1.0], [9.0, 1.0, 3.0]])  # decides 1 and 0
    expected = -(torch.log_softmax(student[0], 0)[1] + torch.log_softmax(student[1], 0)[0]) / 2
    assert hard_distillation_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


class PixelTeacher(nn.Module):
    """A small classifier on raw pixels, with BatchNorm (must stay frozen in eval mode)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.BatchNorm2d(3), nn.Linear(3 * 16 * 16, C)
        self.num_classes = C

    def forward(self, x):
        return self.fc(self.norm(x).flatten(1))


def _task(distillation="hard", alpha=0.5, **kwargs):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", num_classes=C, dist_token=True, **TINY)
    teacher = Teacher(PixelTeacher(), student_mean=[0.5] * 3, student_std=[0.5] * 3, mean=[0.5] * 3, std=[0.5] * 3)
    return Distill(encoder, teacher if distillation != "none" else None, distillation=distillation, alpha=alpha,
                   tau=2.0, **kwargs)


def _batch():
    torch.manual_seed(1)
    return {"images": torch.randn(6, 3, 16, 16), "labels": torch.randint(0, C, (6,))}


@pytest.mark.parametrize("kind", ["hard", "soft", "none"])
def test_total_loss_weights_the_two_tokens(kind):
    task, batch = _task(kind, alpha=0.3), _batch()
    out = task(batch)
    cls_logits, dist_logits = task.encoder.forward_heads(task.encoder.forward_features(batch["images"]))
    class_loss = nn.functional.cross_entropy(cls_logits, batch["labels"])
    if kind == "none":
        token_loss = nn.functional.cross_entropy(dist_logits, batch["labels"])
    else:
        teacher_logits = task.teacher(batch["images"])
        token_loss = (hard_distillation_loss(dist_logits, teacher_logits) if kind == "hard"
                      else soft_distillation_loss(dist_logits, teacher_logits, 2.0))
    assert out.loss.item() == pytest.approx((0.7 * class_loss + 0.3 * token_loss).item(), rel=1e-5)


def test_the_teacher_is_frozen_and_outside_the_weights():
    task, batch = _task("soft"), _batch()
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    optimizer = build_optimizer(recipes.load(["recipe=deit_tiny_distilled_digits"]).optim, task)
    task.train()
    assert not task.teacher.training and not task.teacher.model.norm.training
    task(batch).loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in task.teacher.state_dict().items())  # BN statistics too
    assert not any(k.startswith("teacher") for k in task.state_dict())  # not in checkpoints or exports
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in task.teacher.parameters()}
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(task, decay=0.9)  # deep-copies the task: the copy shares the frozen teacher
    assert ema.module.teacher is task.teacher
    assert ema.module.encoder.head.weight is not task.encoder.head.weight
    assert torch.equal(ema.module.encoder.head.weight, task.encoder.head.weight)
    task.to(torch.float64)  # .to() still moves / casts the teacher with the task
    assert task.teacher.model.fc.weight.dtype == torch.float64


def test_each_head_learns_only_from_its_own_loss():
    task, batch = _task("hard", alpha=0.5), _batch()
    encoder = task.encoder

    def head_grads(loss):
        task.zero_grad()
        loss.backward()
        return tuple(torch.zeros_like(w) if w.grad is None else w.grad.clone()  # None: no gradient reached it
                     for w in (encoder.head.weight, encoder.head_dist.weight))

    head_total, dist_total = head_grads(task(batch).loss)
    cls_logits, dist_logits = encoder.forward_heads(encoder.forward_features(batch["images"]))
    head_cls, dist_from_cls = head_grads(0.5 * nn.functional.cross_entropy(cls_logits, batch["labels"]))
    assert torch.count_nonzero(dist_from_cls) == 0  # the class-token loss does not reach head_dist
    cls_logits, dist_logits = encoder.forward_heads(encoder.forward_features(batch["images"]))
    head_from_dist, head_dist = head_grads(0.5 * hard_distillation_loss(dist_logits, task.teacher(batch["images"])))
    assert torch.count_nonzero(head_from_dist) == 0
    assert torch.allclose(dist_total, head_dist, atol=1e-6) and torch.allclose(head_total, head_cls, atol=1e-6)


def test_inference_averages_the_two_heads_or_takes_one():
    task, images = _task(), _batch()["images"]
    task.eval()
    with torch.no_grad():
        cls_logits, dist_logits = task.encoder.forward_heads(task.encoder.forward_features(images))
        assert torch.allclose(task.predict({"images": images}), (cls_logits + dist_logits) / 2, atol=1e-6)
        task.eval_head = "cls"
        assert torch.allclose(task.predict({"images": images}), cls_logits)
        task.eval_head = "dist"
        assert torch.allclose(task.predict({"images": images}), dist_logits)


def test_timm_deit_distilled_weights_give_timms_logits_through_the_task():
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=7).eval()
    cfg = recipes.load(["recipe=deit_tiny_distilled", "task.distillation=none", "model.num_classes=7"])
    task = build(cfg, num_classes=7)
    load_weights(task, deit.state_dict(), strict=True, verbose=False)
    task.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(task.predict({"images": images}), deit(images), atol=1e-5)


def test_teacher_sees_its_own_normalisation_and_size():
    seen = {}

    class Probe(nn.Module):
        num_classes = C

        def forward(self, x):
            seen["x"] = x
            return torch.zeros(x.shape[0], C)

    teacher = Teacher(Probe(), student_mean=[0.5] * 3, student_std=[0.5] * 3, mean=[0.485, 0.456, 0.406],
                      std=[0.229, 0.224, 0.225], img_size=[24, 24])
    pixels = torch.rand(2, 3, 16, 16)
    teacher((pixels - 0.5) / 0.5)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = nn.functional.interpolate((pixels - mean) / std, size=[24, 24], mode="bicubic", antialias=True)
    assert seen["x"].shape == (2, 3, 24, 24) and torch.allclose(seen["x"], expected, atol=1e-5)


def _teacher_cfg(**kwargs):
    return config.OmegaConf.merge(config.OmegaConf.structured(TeacherConfig), kwargs)


def test_teachers_load_from_our_exports_and_from_state_dicts(tmp_path):
    from ssl_vit.weights import export_model
    from ssl_vit.models import build_encoder
    from ssl_vit.tasks import Classify

    cfg = recipes.load(["recipe=supervised_resnet_digits", "model.num_classes=10"])
    resnet = Classify(build_encoder(cfg.model, num_classes=10))
    export_model(resnet, tmp_path / "model.safetensors", extra={"data": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    images = torch.randn(2, 3, 32, 32)
    # our export: the architecture and the input from its JSON, no task.teacher.arch needed
    ours = build_teacher(_teacher_cfg(weights=str(tmp_path / "model.safetensors")), num_classes=10,
                         student_img_size=[32, 32], student_mean=[0.5] * 3, student_std=[0.5] * 3)
    with torch.no_grad():
        assert torch.allclose(ours(images), resnet.eval().encoder(images), atol=1e-5)
    assert ours.same_normalisation and ours.img_size == [32, 32]
    # a torchvision-style .pth (DDP's module. prefix, inside "model"): arch named; timm's config gives the input
    torch.save({"model": {f"module.{k}": v for k, v in resnet.encoder.state_dict().items()}}, tmp_path / "r.pth")
    other = build_teacher(_teacher_cfg(arch="resnet18", weights=str(tmp_path / "r.pth")), num_classes=10,
                          student_img_size=[32, 32], student_mean=[0.5] * 3, student_std=[0.5] * 3)
    assert other.img_size == [224, 224] and not other.same_normalisation  # resnet18's pretrained config
    assert all(torch.equal(a, b) for a, b in zip(other.model.state_dict().values(), resnet.encoder.state_dict().values()))
    with pytest.raises(ConfigError, match="arch is needed"):
        build_teacher(_teacher_cfg(weights=str(tmp_path / "r.pth")), num_classes=10, student_img_size=[32, 32],
                      student_mean=[0.5] * 3, student_std=[0.5] * 3)
    with pytest.raises(ConfigError, match="predicts 10 classes, the student 3"):
        build_teacher(_teacher_cfg(weights=str(tmp_path / "model.safetensors")), num_classes=3,
                      student_img_size=[32, 32], student_mean=[0.5] * 3, student_std=[0.5] * 3)
    with pytest.raises(ConfigError, match="does not fit"):
        build_teacher(_teacher_cfg(arch="resnet34", weights=str(tmp_path / "r.pth")), num_classes=10,
                      student_img_size=[32, 32], student_mean=[0.5] * 3, student_std=[0.5] * 3)
    with pytest.raises(ConfigError, match="no such file"):
        build_teacher(_teacher_cfg(weights=str(tmp_path / "nope.pth")), num_classes=10, student_img_size=[32, 32],
                      student_mean=[0.5] * 3, student_std=[0.5] * 3)
    assert json.loads((tmp_path / "model.json").read_text())["load_with_timm"].startswith("timm.create_model('resnet18'")


def test_distillation_config_errors():
    with pytest.raises(ConfigError, match="dist_token"):
        recipes.load(["recipe=deit_tiny_distilled_digits", "model.dist_token=false"])
    with pytest.raises(ConfigError, match="task.distillation="):
        recipes.load(["recipe=deit_tiny_distilled_digits", "task.distillation=medium"])
    with pytest.raises(ConfigError, match="task.name=mae needs the encoder's visible forward, which "
                                          "model.arch=timm:resnet18 .timm encoders. does not have"):
        recipes.load(["recipe=mae_tiny_digits", "model.arch=timm:resnet18"])
    with pytest.raises(ConfigError, match="task.teacher.weights"):
        build(recipes.load(["recipe=deit_tiny_distilled_digits"]), num_classes=10)
    with pytest.raises(ConfigError, match="timm has no model"):
        build(recipes.load(["recipe=supervised_resnet_digits", "model.arch=timm:resnet_nonexistent"]), num_classes=10)


# -------------------------------------------------------------------------------------------
# the CPU recipes end to end, as users run them

def _run(args, env, expect=0):
    return run_command([sys.executable, *args], env, expect)


@pytest.fixture(scope="module")
def resnet_teacher(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("resnet")
    _run(["pretrain.py", "recipe=supervised_resnet_digits", f"train.output_dir={out}", "train.max_steps=3",
          "data.num_workers=1", "log.images_every=1"], env)  # a convnet: no attention to picture, no error
    return out


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def test_supervised_timm_model_trains_and_exports_for_timm(resnet_teacher):
    m = _metrics(resnet_teacher)
    assert m["task"] == "classify" and m["num_samples"] == 360 and {"top1", "top5", "best"} <= set(m)
    description = json.loads((resnet_teacher / "model.json").read_text())
    model = eval(description["load_with_timm"], {"timm": timm}).eval()  # timm loads our export as it is
    assert description["encoder"]["arch"] == "timm:resnet18" and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # the backbone (any encoder family): the convnet without its classifier `fc`, timm's pooled features
    backbone = json.loads((resnet_teacher / "backbone.json").read_text())
    features = eval(backbone["load_with_timm"], {"timm": timm}).eval()
    assert not any(k.startswith("fc.") for k in load_file(resnet_teacher / "backbone.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(features(images), model.forward_head(model.forward_features(images), pre_logits=True))


def test_deit_distilled_digits_trains_resumes_and_exports_for_timm(tmp_path, env, resnet_teacher):
    out = tmp_path / "deit"
    args = ["pretrain.py", "recipe=deit_tiny_distilled_digits", f"task.teacher.weights={resnet_teacher / 'model.safetensors'}",
            f"train.output_dir={out}", "train.checkpoint_every=2", *TINY_VIT]
    _run([*args, "train.max_steps=2"], env)
    result = _run([*args, "train.max_steps=4"], env)
    assert "resumed from" in result.stdout and "teacher: timm:resnet18" in result.stdout
    m = _metrics(out)
    assert m["task"] == "distill" and m["step"] == 4 and m["num_samples"] == 360
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("distillation_loss" in line for line in lines)
    description = json.loads((out / "model.json").read_text())
    deit = eval(description["load_with_timm"], {"timm": timm}).eval()
    ours = create_encoder(**description["encoder"]).eval()
    load_weights(ours, out / "model.safetensors", strict=True, verbose=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # timm's distilled DeiT averages its two heads at inference, as ours
        assert torch.allclose(deit(images), ours(images), atol=1e-5)


def test_distillation_fine_tunes_a_backbone_without_a_distillation_token(tmp_path, env, resnet_teacher, tiny_mae_run):
    out = tmp_path / "ft"
    result = _run(["tools/finetune.py", "recipe=finetune_distilled_digits", f"init={tiny_mae_run / 'backbone.safetensors'}",
                   f"task.teacher.weights={resnet_teacher / 'model.safetensors'}", f"train.output_dir={out}",
                   "train.max_steps=2", "data.train_fraction=0.1"], env)
    assert "dist_token (initialised from the class token" in result.stdout
    assert _metrics(out)["task"] == "distill"
    without = _run(["pretrain.py", "recipe=deit_tiny_distilled_digits", f"train.output_dir={tmp_path / 'x'}"], env, expect=2)
    assert "task.teacher.weights" in without.stderr and "Traceback" not in without.stderr
