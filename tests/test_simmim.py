"""SimMIM against an independent implementation of Hugging Face's ViTForMaskedImageModeling (which
implements SimMIM) with weights mapped by hand; its head, loss, masks and pictures; its files; the
simmim_digits recipe end to end (exports, exact resume, reconstructions, fine-tuning and linear probing
of its backbone)."""
import json
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, TINY_VIT
from conftest import run_command as run
from ssl_vit import recipes, create_encoder, export_backbone, export_model, load_weights
from ssl_vit.config import ConfigError
from ssl_vit.tasks import SimMIM

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 32, 2, 2
GRID = IMG // PATCH


class HuggingFaceStyleSimMIM(nn.Module):
    """transformers' ViTForMaskedImageModeling, written out plainly: ViTEmbeddings with its mask token,
    ViTLayer (separate query / key / value, layernorm_before / _after), the final layernorm, the
    decoder (1x1 conv to stride^2 x C, PixelShuffle) and its masked L1 loss."""

    def __init__(self, eps=1e-6):  # the ViTConfig's layer_norm_eps, set to timm's (its default is 1e-12)
        super().__init__()
        self.patch_embeddings = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, DIM))
        self.layers = nn.ModuleList([nn.ModuleDict(dict(
            layernorm_before=nn.LayerNorm(DIM, eps=eps), query=nn.Linear(DIM, DIM), key=nn.Linear(DIM, DIM),
            value=nn.Linear(DIM, DIM), attention_output=nn.Linear(DIM, DIM), layernorm_after=nn.LayerNorm(DIM, eps=eps),
            intermediate=nn.Linear(DIM, 4 * DIM), output=nn.Linear(4 * DIM, DIM))) for _ in range(DEPTH)])
        self.layernorm = nn.LayerNorm(DIM, eps=eps)
        self.decoder = nn.Sequential(nn.Conv2d(DIM, PATCH ** 2 * 3, kernel_size=1), nn.PixelShuffle(PATCH))

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], HEADS, DIM // HEADS).transpose(1, 2)

    def forward(self, pixel_values, bool_masked_pos):
        b = pixel_values.shape[0]
        embeddings = self.patch_embeddings(pixel_values).flatten(2).transpose(1, 2)
        w = bool_masked_pos.unsqueeze(-1).type_as(embeddings)
        embeddings = embeddings * (1.0 - w) + self.mask_token.expand(b, GRID * GRID, -1) * w
        hidden = torch.cat([self.cls_token.expand(b, -1, -1), embeddings], dim=1) + self.position_embeddings
        for layer in self.layers:
            x = layer["layernorm_before"](hidden)
            q, k, v = self.heads(layer["query"](x)), self.heads(layer["key"](x)), self.heads(layer["value"](x))
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1)
            context = (probs @ v).transpose(1, 2).reshape(b, -1, DIM)
            hidden = layer["attention_output"](context) + hidden
            hidden = layer["output"](F.gelu(layer["intermediate"](layer["layernorm_after"](hidden)))) + hidden
        sequence = self.layernorm(hidden)[:, 1:]
        sequence = sequence.permute(0, 2, 1).reshape(b, DIM, GRID, GRID)
        reconstructed = self.decoder(sequence)
        mask = bool_masked_pos.reshape(-1, GRID, GRID).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
        mask = mask.unsqueeze(1).contiguous()
        loss = F.l1_loss(pixel_values, reconstructed, reduction="none")
        return (loss * mask).sum() / (mask.sum() + 1e-5) / 3, reconstructed


def huggingface_weights(simmim: SimMIM) -> dict:
    """Our SimMIM's tensors under Hugging Face's names (timm's fused qkv split into query, key, value)."""
    ours = simmim.state_dict()
    state = {"patch_embeddings.weight": ours["encoder.patch_embed.proj.weight"],
             "patch_embeddings.bias": ours["encoder.patch_embed.proj.bias"],
             "cls_token": ours["encoder.cls_token"], "mask_token": ours["encoder.mask_token"],
             "position_embeddings": ours["encoder.pos_embed"],
             "layernorm.weight": ours["encoder.norm.weight"], "layernorm.bias": ours["encoder.norm.bias"],
             "decoder.0.weight": ours["decoder.0.weight"], "decoder.0.bias": ours["decoder.0.bias"]}
    names = {"norm1": "layernorm_before", "attn.proj": "attention_output", "norm2": "layernorm_after",
             "mlp.fc1": "intermediate", "mlp.fc2": "output"}
    for i in range(DEPTH):
        for theirs, hf in names.items():
            for kind in ("weight", "bias"):
                state[f"layers.{i}.{hf}.{kind}"] = ours[f"encoder.blocks.{i}.{theirs}.{kind}"]
        for kind in ("weight", "bias"):
            query, key, value = ours[f"encoder.blocks.{i}.attn.qkv.{kind}"].chunk(3)
            state.update({f"layers.{i}.query.{kind}": query, f"layers.{i}.key.{kind}": key,
                          f"layers.{i}.value.{kind}": value})
    return state


def tiny_simmim(**encoder):
    options = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pos_embed="learn")
    return SimMIM(create_encoder("vit_tiny_patch16", **{**options, **encoder}), mask_patch_size=16, mask_ratio=0.6)


def test_loss_and_reconstruction_equal_hugging_faces():
    torch.manual_seed(0)
    model = tiny_simmim().eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial values everywhere (biases, norms, tokens)
            p.normal_(std=0.1)
    reference = HuggingFaceStyleSimMIM().eval()
    reference.load_state_dict(huggingface_weights(model), strict=True)
    images = torch.randn(3, 3, IMG, IMG)
    mask = model.masking(3)
    with torch.no_grad():
        ref_loss, ref_pred = reference(images, mask)
        out = model(images, mask=mask)
    assert out.pred.shape == (3, 3, IMG, IMG) and torch.equal(out.mask, mask.float())
    assert (out.pred - ref_pred).abs().max() < 1e-5
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_the_loss_is_l1_on_the_masked_pixels_only():
    torch.manual_seed(1)
    model = tiny_simmim()
    images, mask = torch.randn(2, 3, IMG, IMG), model.masking(2)
    pixels = model.mask_pixels(mask)                                        # [N, 1, H, W]
    assert pixels.sum() == 2 * 3 * 64 * 4 and pixels.shape == (2, 1, IMG, IMG)  # 3 of 4 cells, 16x16 px each
    pred = torch.randn_like(images)
    loss = model.forward_loss(images, pred, mask)
    noise_on_visible = torch.randn_like(images) * (1 - pixels)
    assert model.forward_loss(images, pred + noise_on_visible, mask) == pytest.approx(loss.item(), rel=1e-6)
    per_channel = [F.l1_loss(pred[b, c][pixels[b, 0] > 0], images[b, c][pixels[b, 0] > 0], reduction="sum")
                   for b in range(2) for c in range(3)]
    assert loss.item() == pytest.approx((sum(per_channel) / (pixels.sum() + 1e-5) / 3).item(), rel=1e-5)


@pytest.mark.parametrize("prefix", [dict(class_token=False, global_pool="avg", fc_norm=False), dict(),
                                    dict(dist_token=True)])
def test_the_head_reads_the_patch_tokens_and_every_token_goes_through_the_encoder(prefix):
    model = tiny_simmim(**prefix)
    seen = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.update(tokens=i[0].shape[1]))
    out = model(torch.randn(2, 3, IMG, IMG))                              # no mask: one is drawn
    assert seen["tokens"] == model.encoder.num_prefix_tokens + 16         # SimMIM keeps every position
    assert out.pred.shape == (2, 3, IMG, IMG) and out.mask.shape == (2, 16) and torch.all(out.mask.sum(1) == 12)
    out.loss.backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0 and model.decoder[0].weight.grad.abs().sum() > 0


def test_simmim_on_the_beit_encoder():
    encoder = create_encoder("beit_base_patch16", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                             num_heads=HEADS, global_pool="token", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    model = SimMIM(encoder, mask_patch_size=16)
    out = model(torch.randn(2, 3, IMG, IMG))
    out.loss.backward()
    assert out.pred.shape == (2, 3, IMG, IMG) and encoder.rel_pos_bias.relative_position_bias_table.grad is not None
    groups = model.param_groups(0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(encoder.mask_token) in no_decay and id(model.decoder[0].weight) not in no_decay


def test_reconstructions_paste_the_visible_pixels_back_and_a_seed_fixes_the_masks():
    model = tiny_simmim().eval()
    images = torch.randn(2, 3, IMG, IMG)
    pictures = model.reconstruct(images, seed=3)
    assert set(pictures) >= {"original", "masked", "reconstruction", "pasted", "mask"}
    visible = pictures["mask"] == 0
    assert torch.equal(pictures["pasted"][visible], images[visible])
    assert torch.equal(pictures["masked"][~visible], torch.zeros_like(images)[~visible])
    assert torch.equal(pictures["pasted"][~visible], pictures["reconstruction"][~visible])
    assert torch.equal(model.reconstruct(images, seed=3)["mask"], pictures["mask"])
    assert not torch.equal(model.reconstruct(images, seed=4)["mask"], pictures["mask"])


def test_model_file_is_simmims_layout_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = tiny_simmim().eval()
    export_model(model, tmp_path / "model.safetensors")
    description = json.loads((tmp_path / "model.json").read_text())
    assert "load_with_timm" not in description                              # it holds the head
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "encoder.mask_token" in keys and {"decoder.0.weight", "decoder.0.bias"} <= keys
    assert all(k.startswith(("encoder.", "decoder.0.")) for k in keys)       # no top-level mask_token
    again = tiny_simmim()
    report = load_weights(again, tmp_path / "model.safetensors", strict=True, verbose=False)
    assert report.format == "ssl_vit model"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert SimMIM.checkpoint_format(load_file(tmp_path / "model.safetensors"))
    # into a bare encoder (fine-tuning from model.safetensors): the encoder's tensors; mask token and head unused
    encoder = create_encoder("vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                             num_heads=HEADS, pos_embed="learn")
    report = load_weights(encoder, tmp_path / "model.safetensors", verbose=False)
    assert not report.missing and sorted(report.unexpected) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    export_backbone(model.encoder, tmp_path / "backbone.safetensors")
    assert "mask_token" not in load_file(tmp_path / "backbone.safetensors")


@pytest.mark.parametrize("override, message", [
    ("task.mask_patch_size=12", r"task.mask_patch_size=12 must be a multiple of the encoder's 8-pixel patches .* "
                                r"use e.g. task.mask_patch_size=8"),
    ("task.mask_patch_size=64", r"divide the 32-pixel images .* use e.g. task.mask_patch_size=32"),
    ("task.mask_ratio=1.0", r"task.mask_ratio=1.0 must be in \(0, 1\)"),
    ("task.mask_ratio=0", r"task.mask_ratio=0.0 must be in \(0, 1\)"),
    ("model.global_pool=avg", "set model.global_pool=token"),
    ("model.arch=timm:resnet18", "needs the encoder's mask_token forward"),
])
def test_bad_recipes_are_explained(override, message):
    tiny = TINY_VIT[:4] if override.startswith(("task.", "model.global_pool")) else []  # ViT keys
    with pytest.raises(ConfigError, match=message):
        recipes.load(["recipe=simmim_digits", *tiny, override])


def test_the_paper_recipe_is_beits_encoder_with_the_papers_settings():
    cfg = recipes.load(["recipe=simmim_vit_base"], check=False)
    assert cfg.model.arch == "beit_base_patch16" and cfg.model.use_shared_rel_pos_bias and not cfg.model.use_abs_pos_emb
    assert (cfg.task.mask_patch_size, cfg.task.mask_ratio, cfg.optim.batch_size, cfg.optim.epochs) == (32, 0.6, 2048, 800)
    assert list(cfg.data.crop_scale) == [0.67, 1.0] and cfg.model.layer_scale_init == 0.1


# -------------------------------------------------------------------------------------------
# end to end: pretrain.py, resume, tools/visualize.py, tools/finetune.py, tools/linear_probe.py


TINY_SIMMIM = [*TINY_VIT, "data.batch_size=32", "optim.batch_size=32", "log.every=1"]


def pretrain(out, env, *overrides):
    return run([sys.executable, str(ROOT / "pretrain.py"), "recipe=simmim_digits", f"train.output_dir={out}",
                *TINY_SIMMIM, *overrides], env)


@pytest.fixture(scope="module")
def simmim_run(tmp_path_factory, env):
    """simmim_digits, tiny, stopped after 2 steps and resumed to 4, pictures logged every 2 steps."""
    out = tmp_path_factory.mktemp("simmim")
    pretrain(out, env, "train.max_steps=2", "train.checkpoint_every=2", "log.images_every=2")
    result = pretrain(out, env, "train.max_steps=4", "train.checkpoint_every=2", "log.images_every=2")
    assert "resumed from" in result.stdout and "task simmim" in result.stdout
    return out


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(simmim_run, env, tmp_path):
    """The masks come from the run's RNG, which the checkpoint restores."""
    from safetensors.torch import load_file

    pretrain(tmp_path, env, "train.max_steps=4", "train.checkpoint_every=100", "log.images_every=100")
    resumed, straight = load_file(simmim_run / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_the_run_exports_logs_pictures_and_draws_reconstructions(simmim_run, env, tmp_path):
    import timm
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((simmim_run / "metrics.json").read_text())
    assert metrics["task"] == "simmim" and metrics["step"] == 4                   # the k-NN monitor
    backbone = json.loads((simmim_run / "backbone.json").read_text())
    eval(backbone["load_with_timm"], {"timm": timm})                               # strict: no mask token
    events = next((simmim_run / "tensorboard").rglob("events.out.tfevents.*"))
    images = EventAccumulator(str(events.parent)).Reload().Images("reconstructions")
    assert len(images) == 2 and (images[0].width, images[0].height) == (4 * 33 + 1, 8 * 33 + 1)
    out = tmp_path / "recon.png"
    result = run([sys.executable, str(ROOT / "tools" / "visualize.py"), "reconstruct",
                  f"init={simmim_run / 'model.safetensors'}", "data.name=digits", "num_images=2", f"out={out}"], env)
    assert "task simmim, mask ratio 0.6" in result.stdout and out.is_file()


@pytest.mark.slow  # two more commands (about 25 s); tests/test_tools.py runs them on an MAE backbone
def test_its_backbone_fine_tunes_and_linear_probes_as_maes(simmim_run, env, tmp_path):
    backbone = simmim_run / "backbone.safetensors"
    run([sys.executable, str(ROOT / "tools" / "finetune.py"), "recipe=finetune_digits", f"init={backbone}",
         f"train.output_dir={tmp_path / 'ft'}", "train.max_steps=2", "eval.every_epochs=0", "data.num_workers=1"], env)
    run([sys.executable, str(ROOT / "tools" / "linear_probe.py"), "recipe=linprobe_digits", f"init={backbone}",
         f"train.output_dir={tmp_path / 'probe'}", "optim.epochs=2", "optim.warmup_epochs=1", "task.lr_scales=[10]"],
        env)
    for name in ("ft", "probe"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["num_samples"] == 360 and 0 <= metrics["top1"] <= 100
