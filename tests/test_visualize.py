"""Pictures of what a model does: recomputed attention, rollout, reconstructions, tools/visualize.py,
and the pictures the training loop logs to TensorBoard."""
import argparse
import math
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_VIT
from conftest import run_command as run
from ssl_vit import config, recipes, create_encoder
from ssl_vit.tasks import pictures as viz
from ssl_vit.models.vit_attention import AttentionRecorder, attention_rollout, class_token_attention, recompute_attention
from ssl_vit.tasks import MAE
from ssl_vit.data import DeviceNormalize
from ssl_vit.cli.visualize import VisualizeConfig, load_images, visualize

IMG, PATCH = 32, 8
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def mae_run(tiny_mae_run):
    """A briefly pre-trained tiny MAE run (model.safetensors holds the decoder, backbone.safetensors not)."""
    return tiny_mae_run


@pytest.fixture
def photo(tmp_path):
    """An image at its own (non-square) resolution, as users pass them."""
    path = tmp_path / "photo.png"
    Image.fromarray(torch.randint(0, 256, (45, 60, 3), dtype=torch.uint8).numpy()).save(path)
    return path


def tool(*args):
    return [sys.executable, str(ROOT / "tools" / "visualize.py"), *args]


def grid_size(rows, columns, tile, padding=1):
    """(width, height) of a grid of square tiles separated by padding."""
    return columns * (tile + padding) + padding, rows * (tile + padding) + padding


# -------------------------------------------------------------------------------------------
# attention, recomputed


@pytest.mark.parametrize("fused", [True, False])
def test_recorded_attention_is_what_the_model_computes(fused):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", num_classes=5, **TINY).eval()
    for block in encoder.blocks:
        block.attn.fused_attn = fused  # fused: the weights never exist inside the model
    images = torch.randn(2, 3, IMG, IMG)
    inputs, before_proj = {}, {}
    for i, block in enumerate(encoder.blocks):
        block.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        block.attn.proj.register_forward_pre_hook(lambda m, args, i=i: before_proj.__setitem__(i, args[0]))
    with torch.no_grad():
        logits = encoder(images)
        with AttentionRecorder(encoder) as recorder:
            recorded_logits = encoder(images)
        after = encoder(images)
    assert torch.equal(recorded_logits, logits) and torch.equal(after, logits)  # the hooks only read
    assert sorted(recorder.weights) == [0, 1] and recorder.stacked().shape == (2, 2, 2, 17, 17)

    heads, dim = 2, 16
    for i, block in enumerate(encoder.blocks):
        x = inputs[i]                                                    # [B, N, D]
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        q, k, v = [(x @ w[j * 32:(j + 1) * 32].T + b[j * 32:(j + 1) * 32]).view(2, 17, heads, dim).transpose(1, 2)
                   for j in range(3)]                                    # by hand, [B, H, N, d]
        by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim), dim=-1)
        assert torch.allclose(recorder.weights[i], by_hand, atol=1e-6)
        assert torch.allclose(by_hand.sum(-1), torch.ones(2, heads, 17))
        weights, values = recompute_attention(block.attn, x)
        output = (weights @ values).transpose(1, 2).reshape(2, 17, 32)  # what the module feeds to proj
        assert torch.allclose(output, before_proj[i], atol=1e-6)
        assert torch.allclose(values, v, atol=1e-6)


def test_recorder_rejects_a_block_that_does_not_exist():
    encoder = create_encoder("vit_tiny_patch16", **TINY)
    with pytest.raises(ValueError, match="the encoder has 2 blocks"):
        AttentionRecorder(encoder, layers=[2])


# -------------------------------------------------------------------------------------------
# rollout (Abnar & Zuidema 2020)


def test_rollout_matches_the_papers_recipe():
    torch.manual_seed(0)
    weights = torch.rand(3, 2, 4, 5, 5).softmax(dim=-1)                 # [layers, B, H, N, N]
    expected = torch.eye(5).expand(2, 5, 5)
    for layer in weights:
        mixed = 0.5 * layer.mean(dim=1) + 0.5 * torch.eye(5)            # heads averaged, residual added
        expected = mixed @ expected
    assert torch.allclose(attention_rollout(weights), expected[:, 0, 1:], atol=1e-6)
    # every token attending only to itself: nothing flows from the patches to the class token
    identity = torch.eye(5).expand(3, 2, 4, 5, 5)
    assert torch.equal(attention_rollout(identity), torch.zeros(2, 4))


def test_uniform_attention_gives_uniform_maps():
    """With q = k = 0 every token attends equally to all 17: so does the rollout over the 16 patches."""
    encoder = create_encoder("vit_tiny_patch16", **TINY).eval()
    for block in encoder.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    with torch.no_grad(), AttentionRecorder(encoder) as recorder:
        encoder.forward_features(torch.randn(2, 3, IMG, IMG))
    weights = recorder.stacked()
    assert torch.allclose(class_token_attention(weights[-1]), torch.full((2, 2, 16), 1 / 17))
    rollout = attention_rollout(weights)
    assert torch.allclose(rollout, rollout[:, :1].expand_as(rollout)) and rollout.min() > 0


# -------------------------------------------------------------------------------------------
# reconstructions (He et al. 2022)


def tiny_mae(norm_pix_loss):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", **TINY)
    return MAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix_loss).eval()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_a_perfect_prediction_reconstructs_the_image(norm_pix_loss, monkeypatch):
    """With norm_pix_loss the decoder predicts each patch normalised by its own mean and variance:
    reconstruct() undoes exactly that, so the target itself gives back the image."""
    model = tiny_mae(norm_pix_loss)
    images = torch.randn(2, 3, IMG, IMG) * 2 + 0.5
    monkeypatch.setattr(model, "forward_decoder", lambda latent, ids_restore: model.target(images))
    pictures = model.reconstruct(images, torch.rand(2, 16))
    assert torch.allclose(pictures["reconstruction"], images, atol=1e-4)
    visible = pictures["mask"] == 0
    assert 0 < visible.float().mean() < 1
    assert torch.equal(pictures["pasted"][visible], images[visible])


# -------------------------------------------------------------------------------------------
# tools/visualize.py


def test_reconstruct_on_a_trained_mae(mae_run, env, tmp_path):
    out = tmp_path / "recon.png"
    result = run(tool("reconstruct", f"init={mae_run / 'model.safetensors'}", "data.name=digits", "num_images=3",
                      "scale=1", f"out={out}"), env)
    assert "columns: original | masked | reconstruction | pasted" in result.stdout
    assert Image.open(out).size == grid_size(rows=3, columns=4, tile=IMG)


def test_attention_with_rollout(mae_run, env, photo, tmp_path):
    out = tmp_path / "attn.png"
    result = run(tool("attention", f"init={mae_run / 'backbone.safetensors'}", f"images={photo},{photo}",
                      f"out={out}", "--rollout"), env)
    assert "columns: original | mean | head 0 | head 1 | rollout" in result.stdout
    # the default scale makes 32-pixel tiles 128 pixels
    assert Image.open(out).size == grid_size(rows=2, columns=5, tile=4 * IMG)


def test_a_bad_image_path_is_a_clear_error(mae_run, env, tmp_path):
    result = run(tool("attention", f"init={mae_run / 'backbone.safetensors'}", f"images={tmp_path}/nope.jpg"),
                 env, expect=2)
    assert f"{tmp_path}/nope.jpg does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "init={run}/backbone.safetensors", "data.name=digits"], "holds no MAE decoder"),
    (["reconstruct", "init={run}/model.safetensors"], "give images=PATH"),
    (["reconstruct", "init={run}/model.safetensors", "images={run}/config.yaml"], "is not an image file"),
    (["reconstruct", "init={run}/model.safetensors", "images={run}/*.jpg"], "matches no files"),
    (["attention", "init={run}/model.safetensors", "data.name=digits", "layer=2"], "the encoder has 2 blocks"),
    (["attention", "init={run}/model.safetensors", "num_image=2"], "Did you mean num_images?"),
    (["draw", "init={run}/model.safetensors"], "reconstruct or attention"),
])
def test_mistakes_are_named(mae_run, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        visualize([arg.format(run=mae_run) for arg in args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_describes_every_option(capsys):
    assert visualize(["--help"]) == 0
    usage = capsys.readouterr().out
    options = [name for name in VisualizeConfig.__dataclass_fields__ if name not in config.Config.__dataclass_fields__]
    assert all(f"{name}=" in usage or f"--{name}" in usage or f"--no-{name}" in usage for name in options)


def test_the_same_seed_gives_the_same_masks(mae_run, photo, tmp_path):
    def draw(name, *args):
        assert visualize(["reconstruct", f"init={mae_run / 'model.safetensors'}", f"images={photo}",
                          f"out={tmp_path / name}", *args]) == 0
        return (tmp_path / name).read_bytes()

    first = draw("a.png", "seed=3")
    assert draw("b.png", "seed=3") == first
    assert draw("c.png", "seed=4") != first
    assert draw("d.png", "seed=3", "mask_ratio=0.25") != first


def official_checkpoint(tmp_path, name, args=True, **encoder):
    """An MAE checkpoint in the official layout ({'model': encoder + decoder, 'args': ...})."""
    torch.manual_seed(0)
    model = MAE(create_encoder("vit_tiny_patch16", img_size=IMG, patch_size=PATCH, **encoder), decoder_dim=32,
                decoder_depth=1, decoder_heads=16, norm_pix_loss=False).eval()
    state = model.export_state().state
    path = tmp_path / name
    checkpoint = {"model": state}
    if args:  # what main_pretrain.py saves beside the weights
        checkpoint["args"] = argparse.Namespace(norm_pix_loss=False, mask_ratio=0.75)
    torch.save(checkpoint, path)
    return model, path


def test_official_mae_checkpoints_are_read_from_their_shapes(tmp_path, photo, capsys):
    """A ViT-Ti-sized MAE (the named size says 3 heads) with a 16-head decoder, as official files:
    the tool reproduces the model's own reconstruction, pixel for pixel."""
    model, path = official_checkpoint(tmp_path, "mae_visualize_vit_tiny.pth")
    assert visualize(["reconstruct", f"init={path}", f"images={photo}", "seed=1", "scale=1",
                      f"out={tmp_path / 'tool.png'}"]) == 0
    assert "norm_pix_loss=False" in capsys.readouterr().out

    cfg = recipes.load(["recipe=mae_base", "model.img_size=32", f"images={photo}"], schema=VisualizeConfig)
    normalize = DeviceNormalize(cfg.data.mean, cfg.data.std)
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(1))
    expected = viz.reconstruction_grid(model.reconstruct(normalize(load_images(cfg)), noise), normalize.denormalize)
    viz.save_png(expected, tmp_path / "expected.png")
    assert (tmp_path / "tool.png").read_bytes() == (tmp_path / "expected.png").read_bytes()


@pytest.mark.parametrize("name, norm_pix_loss", [("mae_visualize_vit_x.pth", False), ("mae_x.pth", True)])
def test_files_without_arguments_say_norm_pix_loss_by_name(tmp_path, photo, capsys, name, norm_pix_loss):
    """The MAE demo's mae_visualize_* files record nothing and were trained on plain pixels; other
    files keep the recipe's norm_pix_loss (true), and the tool says what it assumed."""
    _, path = official_checkpoint(tmp_path, name, args=False, embed_dim=48, depth=2, num_heads=4)
    assert visualize(["reconstruct", f"init={path}", f"images={photo}", "model.num_heads=4",
                      f"out={tmp_path / 'r.png'}"]) == 0
    assert f"norm_pix_loss={norm_pix_loss}" in capsys.readouterr().out


def test_a_foreign_checkpoint_of_unknown_size_needs_its_heads(tmp_path, photo, capsys):
    _, path = official_checkpoint(tmp_path, "mae_custom.pth", embed_dim=48, depth=2, num_heads=4)
    with pytest.raises(SystemExit) as exit_info:
        visualize(["attention", f"init={path}", f"images={photo}", f"out={tmp_path / 'a.png'}"])
    assert exit_info.value.code == 2 and "give model.num_heads=N" in capsys.readouterr().err
    assert visualize(["attention", f"init={path}", f"images={photo}", f"out={tmp_path / 'a.png'}",
                      "model.num_heads=4", "scale=1"]) == 0
    assert Image.open(tmp_path / "a.png").size == grid_size(rows=1, columns=6, tile=IMG)  # original, mean, 4 heads


# -------------------------------------------------------------------------------------------
# the training loop's pictures


def tensorboard_images(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((out / "tensorboard").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent)).Reload()
    assert tag in accumulator.Tags()["images"], accumulator.Tags()["images"]
    return accumulator.Images(tag)


def test_an_mae_run_logs_reconstructions(mae_run):
    pictures = tensorboard_images(mae_run, "reconstructions")
    assert len(pictures) == 3  # one per step, of the first 8 training images
    assert (pictures[0].width, pictures[0].height) == grid_size(rows=8, columns=4, tile=IMG)


def test_a_classification_run_logs_attention_maps(env, tmp_path):
    out = tmp_path / "ft"
    run([sys.executable, str(ROOT / "tools" / "finetune.py"), "recipe=finetune_digits", "init=random",
         f"train.output_dir={out}", "train.max_steps=2", "log.images_every=1", "eval.every_epochs=0",
         *TINY_VIT[:4]], env)
    pictures = tensorboard_images(out, "attention")
    assert len(pictures) == 2  # one per step
    # 8 validation images; original, mean, 2 heads, rollout
    assert (pictures[0].width, pictures[0].height) == grid_size(rows=8, columns=5, tile=IMG)
