"""The Swin encoder family against timm's SwinTransformer (keys, features, Microsoft's file layout, exports
reloaded by timm, tables and masks at another resolution and window), SimMIM's Swin (the mask-token
forward against timm's Swin with its patch embeddings replaced by hand, the loss as SimMIM's reference
computes it), layer decay and no-decay groups, the per-window attention pictures against timm's own
softmax, recipe errors, and the evaluation tools on a briefly pre-trained SimMIM Swin."""
import json
import re
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import ROOT, check_backbone_export_loads_in_timm
from conftest import run_command as run
from ssl_vit import recipes, create_encoder, export_backbone, load_weights
from ssl_vit.config import ConfigError
from ssl_vit.models import family_of
from ssl_vit.models.swin_attention import attention_maps, recompute_window_attention
from ssl_vit.tasks import SimMIM, build

# simmim_swin_digits' shape: 32 px, 4x4 patches (8x8 grid), windows of 4, two stages (stride 8)
DIGITS = dict(img_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
TIMM_DIGITS = {**DIGITS, "num_classes": 0}


def _max_diff(a, b):
    return (a - b).abs().max().item()


def randomized(model, std=0.05):
    """Non-trivial values everywhere (zero-initialised biases, tables and norms too)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model


def microsoft_layout(model):
    """A timm Swin's state dict as Microsoft's Swin-Transformer saves it: patch merging at the end of
    stages 1-3, the classifier `head`, relative position indices and attention masks included."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value
    for name, module in model.named_modules():
        for buffer in ("relative_position_index", "attn_mask"):
            if getattr(module, buffer, None) is not None:
                state[f"{name}.{buffer}"] = getattr(module, buffer)
    return state


@pytest.mark.parametrize("ours, theirs, timm_options", [
    ("swin_tiny_patch4_window7", "swin_tiny_patch4_window7_224", {}),
    ("swin_small_patch4_window7", "swin_small_patch4_window7_224", {}),
    ("swin_base_patch4_window7", "swin_base_patch4_window7_224", {}),
    ("swin_large_patch4_window12", "swin_large_patch4_window12_384", {}),
    ("swin_base_patch4_window6", "swin_base_patch4_window7_224", dict(img_size=192, window_size=6)),
])
def test_named_sizes_have_timms_keys_and_shapes(ours, theirs, timm_options):
    with torch.device("meta"):
        encoder = create_encoder(ours, num_classes=1000)
        reference = timm.create_model(theirs, num_classes=1000, **timm_options)
    assert {k: v.shape for k, v in encoder.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    window = encoder.config["window_size"]
    assert encoder.patch_size == 32 and encoder.grid_size == (window, window)   # the last stage is one window


def test_timm_and_microsoft_files_give_timms_features():
    torch.manual_seed(0)
    reference = randomized(timm.create_model("swin_tiny_patch4_window7_224", num_classes=10), std=0.02).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected_map = reference.forward_features(images)                       # [1, 7, 7, 768]
        expected = reference(images)
    for state in (reference.state_dict(), {"model": microsoft_layout(reference)}):
        encoder = create_encoder("swin_tiny_patch4_window7", num_classes=10).eval()
        report = load_weights(encoder, state, strict=True, verbose=False)
        assert not report.resized
        with torch.no_grad():
            tokens = encoder.forward_features(images)                           # [1, 49, 768]
            assert _max_diff(tokens, expected_map.flatten(1, 2)) < 1e-5
            assert _max_diff(encoder.forward_head(tokens), expected) < 1e-5
    assert report.format == "Microsoft / SimMIM Swin" and any("17 relative_position_index" in n for n in report.notes)


def test_exports_load_back_into_timm_by_the_json_command(tmp_path):
    torch.manual_seed(0)
    encoder = randomized(create_encoder("swin_tiny_patch4_window7", num_classes=5, **DIGITS)).eval()
    encoder.add_mask_token()  # kept out of the backbone: timm's Swin has none
    check_backbone_export_loads_in_timm(encoder, tmp_path, "SwinTransformer")


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # torch's note on timm's own resize (the reference)
def test_a_192px_window6_encoder_fine_tunes_at_224px_with_window7():
    """SimMIM's Swin-B path (Xie et al. 2022 §4.1): tables resized from window 6 to 7 and the shifted
    windows' masks rebuilt for 224 px, as timm's own set_input_size does to the same weights."""
    torch.manual_seed(0)
    small = dict(depths=[2, 2, 2, 2], embed_dim=32, num_heads=[1, 2, 4, 8])
    pretrained = randomized(create_encoder("swin_base_patch4_window6", img_size=192, **small), std=0.02)
    pretrained.add_mask_token()
    state = {f"encoder.{k}": v for k, v in pretrained.state_dict().items()}   # as SimMIM's model.safetensors
    state["decoder.0.weight"] = torch.zeros(3072, 256, 1, 1)
    finetune = create_encoder("swin_base_patch4_window7", img_size=224, **small).eval()
    report = load_weights(finetune, state, verbose=False)
    tables = [r for r in report.resized if "relative_position_bias_table" in r]
    assert len(tables) == 8 and "121x1 -> 169x1" in tables[0]                 # (2x6-1)^2 -> (2x7-1)^2
    assert sorted(report.unexpected) == ["decoder.0.weight", "mask_token"] and not report.missing
    reference = timm.create_model("swin_base_patch4_window7_224", img_size=192, window_size=6, num_classes=0, **small)
    reference.load_state_dict({k: v for k, v in pretrained.state_dict().items() if k != "mask_token"})
    reference.set_input_size(img_size=(224, 224), window_size=7)
    reference.eval()
    masks = [(ours.attn_mask, theirs.attn_mask) for ours, theirs in zip(finetune.modules(), reference.modules())
             if getattr(ours, "attn_mask", None) is not None]
    assert [m.shape[0] for m, _ in masks] == [64, 16, 4]                      # windows at 56, 28, 14 tokens
    assert all(torch.equal(ours, theirs) for ours, theirs in masks)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(finetune.forward_head(finetune.forward_features(images), pre_logits=True),
                         reference(images)) < 1e-5


def _timm_with_patches_replaced(reference, images, patch_mask, token):
    """SimMIM's SwinTransformerForSimMIM on timm's modules: patch embedding, masked patches blended
    with the token, then the stages and the final norm."""
    x = reference.patch_embed(images)                                            # [B, h0, w0, C]
    w = patch_mask.view(*x.shape[:3], 1).float()
    x = x * (1 - w) + token.view(1, 1, 1, -1) * w
    return reference.norm(reference.layers(x)).flatten(1, 2)                     # [B, L, D]


def test_mask_token_forward_equals_timms_swin_with_the_patches_replaced():
    torch.manual_seed(0)
    encoder = randomized(create_encoder("swin_tiny_patch4_window7", **DIGITS)).eval()
    token = encoder.add_mask_token()
    reference = timm.create_model("swin_tiny_patch4_window7_224", **TIMM_DIGITS).eval()
    reference.load_state_dict({k: v for k, v in encoder.state_dict().items() if k != "mask_token"})
    images = torch.randn(2, 3, 32, 32)
    cells = (torch.rand(2, 4, 4) < 0.6)                                           # the 4x4 grid of 8-px cells
    patches = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)              # each cell: 2x2 patches of 4 px
    with torch.no_grad():
        expected = _timm_with_patches_replaced(reference, images, patches, token)
        assert _max_diff(encoder.forward_features(images, mask=patches.flatten(1)), expected) < 1e-5
        assert _max_diff(encoder.forward_features(images, mask=cells.flatten(1)), expected) < 1e-5
        # the masked patches' pixels are never seen
        changed = images + 5 * patches.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
        assert _max_diff(encoder.forward_features(changed, mask=cells.flatten(1)), expected) < 1e-5
    with pytest.raises(ValueError, match=r"give \[batch, 64\] .* or \[batch, 16\]"):
        encoder.forward_features(images, mask=torch.zeros(2, 5))


def test_simmim_on_swin_is_the_references_head_and_loss():
    """SimMIM's model on Swin: a 1x1 convolution to stride^2 x 3 values per last-stage token,
    PixelShuffle(stride), L1 over the masked pixels with the mask at the patch level repeated over each
    patch's pixels (the reference's `mask.repeat_interleave(patch_size)`), / (masked + 1e-5) / C."""
    torch.manual_seed(0)
    simmim = SimMIM(randomized(create_encoder("swin_tiny_patch4_window7", **DIGITS)), mask_patch_size=8)
    assert simmim.stride == 8 and simmim.grid_size == (4, 4)
    assert simmim.decoder[0].weight.shape == (8 * 8 * 3, 32, 1, 1)              # last stage 32 wide
    images = torch.randn(2, 3, 32, 32)
    output = simmim(images)
    assert output.mask.shape == (2, 16) and output.mask.sum(1).tolist() == [10, 10]   # ceil(0.6 x 16)
    tokens = simmim.encoder.forward_features(images, mask=output.mask)
    pred = F.pixel_shuffle(simmim.decoder[0](tokens.transpose(1, 2).reshape(2, 32, 4, 4)), 8)
    patch_mask = simmim.encoder.patch_mask(output.mask).view(2, 8, 8)
    pixels = patch_mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    loss = (F.l1_loss(images, pred, reduction="none") * pixels).sum() / (pixels.sum() + 1e-5) / 3
    assert _max_diff(output.pred, pred) < 1e-5 and output.loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_simmims_released_layout_loads_into_the_task_with_every_tensor_used(tmp_path):
    """SimMIM's Swin checkpoints: {'model': {encoder.<Microsoft's keys, buffers>, encoder.mask_token,
    decoder.0.*}}; they load strictly into SimMIM on our Swin and give the same loss."""
    torch.manual_seed(0)
    original = SimMIM(randomized(create_encoder("swin_tiny_patch4_window7", **DIGITS)), mask_patch_size=8).eval()
    state = {f"encoder.{k}": v for k, v in microsoft_layout(original.encoder).items()}
    state.update({k: v for k, v in original.state_dict().items() if k.startswith("decoder.")})
    torch.save({"model": state}, tmp_path / "simmim_pretrain__swin.pth")
    again = SimMIM(create_encoder("swin_tiny_patch4_window7", **DIGITS), mask_patch_size=8).eval()
    report = load_weights(again, tmp_path / "simmim_pretrain__swin.pth", strict=True, verbose=False)
    assert report.format == "Microsoft / SimMIM Swin" and len(report.loaded) == len(again.state_dict())
    images, mask = torch.randn(2, 3, 32, 32), original.masking(2)
    with torch.no_grad():
        assert original(images, mask).loss.item() == pytest.approx(again(images, mask).loss.item(), rel=1e-6)


def test_paper_recipes_and_layer_decay():
    cfg = recipes.load(["recipe=simmim_swin_base"])
    assert (cfg.model.arch, cfg.model.img_size, cfg.model.window_size, cfg.task.mask_patch_size) == \
        ("swin_base_patch4_window6", 192, 6, 32)
    with torch.device("meta"):
        task = build(cfg)
    assert (task.stride, task.grid_size, task.masking.num_masked) == (32, (6, 6), 22)   # ceil(0.6 x 36)
    groups = task.param_groups(0.05, None)
    named = {id(p): n for n, p in task.named_parameters()}
    decay_of = {named[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    tables = [n for n in decay_of if n.endswith("relative_position_bias_table")]
    assert len(tables) == 24 and all(decay_of[n] == 0 for n in tables)         # timm's no_weight_decay()
    assert decay_of["encoder.mask_token"] == 0 and decay_of["encoder.layers.2.blocks.0.mlp.fc1.weight"] == 0.05
    # fine-tuning: each of Swin-B's 24 blocks its own lr scale, the stem below them, the head at 1
    cfg = recipes.load(["recipe=finetune_swin_base"])
    assert (cfg.model.img_size, cfg.model.window_size, cfg.optim.layer_decay) == (224, 7, 0.8)
    with torch.device("meta"):
        task = build(cfg, num_classes=1000)
    scale_of = {named: g["lr_scale"] for g in task.param_groups(0.05, 0.8) for p in g["params"]
                for named in [n for n, q in task.named_parameters() if q is p]}
    assert len(set(scale_of.values())) == 24 + 2 and scale_of["encoder.head.fc.weight"] == 1.0
    assert scale_of["encoder.patch_embed.proj.weight"] == pytest.approx(0.8 ** 25)
    assert scale_of["encoder.layers.3.blocks.1.mlp.fc1.weight"] == pytest.approx(0.8)


def test_finetune_swin_base_reads_the_exports_shape_and_the_commands_resolution(tmp_path):
    """finetune_swin_base's command: the export's JSON gives the widths, blocks and heads, the command
    line the 224 px and window 7 (it wins over the JSON's 192 px and window 6)."""
    from ssl_vit.cli.commands import load_config

    small = dict(depths=[2, 2, 2, 2], embed_dim=32, num_heads=[1, 2, 4, 8])
    export_backbone(create_encoder("swin_base_patch4_window6", img_size=192, **small), tmp_path / "backbone.safetensors")
    cfg = load_config(["recipe=finetune_swin_base", f"init={tmp_path / 'backbone.safetensors'}",
                       "model.arch=swin_base_patch4_window7", "model.img_size=224", "model.window_size=7"], "finetune.py")
    assert (cfg.model.img_size, cfg.model.window_size, list(cfg.model.depths), cfg.model.embed_dim) == (224, 7, [2, 2, 2, 2], 32)
    adopted = load_config(["recipe=finetune_swin_base", f"init={tmp_path / 'backbone.safetensors'}"], "finetune.py")
    assert (adopted.model.img_size, adopted.model.window_size) == (192, 6)   # without them, the export's own


@pytest.mark.parametrize("override, message", [
    (["model.window_size=7"], r"model.window_size=7 does not tile stage 1's 48x48 token grid .* use "
                              r"model.window_size=6 or model.img_size=224"),
    (["model.img_size=200"], r"model.img_size=200 is not a multiple of the total stride 32 .* model.img_size=192"),
    (["model.num_heads=4"], r"model.num_heads=4: give one positive integer per stage"),
    (["model.depths=[2,2,18]"], r"model.depths=\[2, 2, 18\] and model.num_heads=\[4, 8, 16, 32\] must give one"),
    (["task.mask_patch_size=16"], r"task.mask_patch_size=16 must be a multiple of the encoder's 32-pixel"),
    (["model.depth=12"], r"unknown key .model.depth.* Did you mean model.depths"),
])
def test_bad_recipes_are_explained(override, message):
    with pytest.raises(ConfigError, match=message):
        recipes.load(["recipe=simmim_swin_base", *override])


def _hooked_softmax(block, images, encoder):
    """timm's own attention weights of `block`: its unfused path, with a hook on its softmax."""
    captured = []
    block.attn.fused_attn = False
    handle = block.attn.softmax.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            encoder.forward_features(images)
    finally:
        handle.remove()
        block.attn.fused_attn = True
    return captured[0]                                                           # [B nW, H, N, N]


def test_attention_maps_are_timms_window_weights_tiled_back():
    """Block 1 of stage 1 attends in windows shifted by 2: the map of each head is the mean attention
    each token receives in its window, placed back by rolling the shifted grid as timm's block does."""
    torch.manual_seed(0)
    encoder = randomized(create_encoder("swin_tiny_patch4_window7", **DIGITS)).eval()
    block = encoder.layers[0].blocks[1]
    assert block.shift_size == (2, 2)
    images = torch.randn(2, 3, 32, 32)
    weights = _hooked_softmax(block, images, encoder)                            # [2 x 4, 1, 16, 16]
    received = weights.mean(dim=-2).view(2, 2, 2, 1, 4, 4)                       # [B, nh, nw, H, M, M]
    shifted = received.permute(0, 3, 1, 4, 2, 5).reshape(2, 1, 8, 8)            # the rolled grid
    expected = torch.roll(shifted, shifts=(2, 2), dims=(2, 3))
    maps = family_of(encoder).attention_maps(encoder, images, layer=1, rollout=True)
    assert set(maps) == {"mean", "head 0", "rollout"} and maps["mean"].shape == (2, 8, 8)
    assert _max_diff(maps["head 0"], expected[:, 0]) < 1e-6
    # the recorded weights are the module's: weights @ v is what it feeds to its output projection
    x = torch.randn(8, 16, 16)
    w, v = recompute_window_attention(block.attn, x, block.attn_mask)
    out = (w @ v).transpose(1, 2).reshape(8, 16, 16)
    assert _max_diff(block.attn.proj(out), block.attn(x, mask=block.attn_mask)) < 1e-5
    # the last stage is one 4x4 window: each map is a distribution over its 16 tokens; rollout through
    # its two blocks by hand (identity added, rows renormalised, multiplied in order)
    last = attention_maps(encoder, images, layer=-1, heads=False, rollout=True)
    assert torch.allclose(last["mean"].sum(dim=(1, 2)), torch.ones(2))
    rolled = torch.eye(16)
    for blk in encoder.layers[1].blocks:
        a = _hooked_softmax(blk, images, encoder).mean(dim=1) + torch.eye(16)
        rolled = (a / a.sum(-1, keepdim=True)) @ rolled
    assert _max_diff(last["rollout"], rolled.mean(dim=1).view(2, 4, 4)) < 1e-5
    with pytest.raises(ValueError, match="layer 4 does not exist: the encoder has 4 blocks over 2 stages"):
        attention_maps(encoder, images, layer=4)


# -------------------------------------------------------------------------------------------
# the commands on a briefly pre-trained SimMIM Swin (simmim_swin_digits, made smaller)

TINY_SWIN = ["model.embed_dim=16", "model.num_heads=[1,2]", "data.num_workers=1", "data.batch_size=32",
             "optim.batch_size=32", "eval.knn_every=0"]


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("simmim_swin")
    run([sys.executable, str(ROOT / "pretrain.py"), "recipe=simmim_swin_digits", f"train.output_dir={out}",
         "train.max_steps=2", "log.images_every=1", *TINY_SWIN], env)
    return out


def tool(name):
    return [sys.executable, str(ROOT / "tools" / f"{name}.py")]


@pytest.mark.slow  # five commands after a pre-training run (about 50-100 s on 2 shared cores)
def test_simmim_swin_run_exports_and_the_tools_read_its_backbone(swin_run, env, tmp_path):
    backbone = swin_run / "backbone.safetensors"
    description = json.loads((swin_run / "backbone.json").read_text())
    assert description["encoder"]["depths"] == [2, 2] and description["timm"]["kwargs"]["window_size"] == 4
    assert "encoder.mask_token" in load_file_keys(swin_run / "model.safetensors")
    # (recipe=: knn.py's default recipe, knn, carries mae_base's MAE task, whose rules refuse a Swin)
    knn = run([*tool("knn"), "recipe=simmim_swin_digits", f"init={backbone}", f"train.output_dir={tmp_path / 'knn'}"],
              env)
    assert "final: k-NN (k=20, T=0.07) top-1" in knn.stdout and "model.window_size=4" in knn.stdout
    probe = tmp_path / "probe"
    run([*tool("linear_probe"), "recipe=linprobe_digits", "init=random", f"like={swin_run}",
         f"train.output_dir={probe}", "optim.epochs=2", "optim.warmup_epochs=1", "task.lr_scales=[100]"], env)
    metrics = json.loads((probe / "metrics.json").read_text())
    assert metrics["num_samples"] == 360 and metrics["provenance"]["model"]["arch"] == "swin_tiny_patch4_window7"
    exported = json.loads((probe / "model.json").read_text())                  # the head folded into head.fc
    assert type(eval(exported["load_with_timm"], {"timm": timm})).__name__ == "SwinTransformer"
    tuned = tmp_path / "finetune"
    run([*tool("finetune"), "recipe=finetune_digits", f"init={backbone}", f"train.output_dir={tuned}",
         "train.max_steps=2", "data.num_workers=1"], env)
    assert json.loads((tuned / "metrics.json").read_text())["num_samples"] == 360
    picture = tmp_path / "attention.png"
    result = run([*tool("visualize"), "attention", "recipe=swin_tiny_digits", f"init={tuned / 'model.safetensors'}",
                  "num_images=2", "--rollout", f"out={picture}"], env)
    assert picture.is_file() and "columns: original | mean | head 0 | head 1 | rollout" in result.stdout
    recon = tmp_path / "reconstruct.png"
    run([*tool("visualize"), "reconstruct", f"init={swin_run / 'model.safetensors'}", "data.name=digits",
         "num_images=2", f"out={recon}"], env)
    assert recon.is_file()


def load_file_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
