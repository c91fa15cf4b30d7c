"""BEiT: the task against a transcription of unilm's pre-training forward and loss (from a file in unilm's
layout), its masks, the frozen tokenizer kept outside the module tree, the two views of one crop, official
checkpoints loading into the task and into a fine-tuning classifier, the recipes and their errors; and
dvae_digits -> beit_digits end to end (a tokenizer trained and used, exports, exact resume)."""
import copy
import io
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.beit import Beit

from conftest import ROOT, TINY_VIT
from conftest import run_command as run
from ssl_vit import recipes, create_encoder, export_model, load_weights
from ssl_vit.config import ConfigError
from ssl_vit.tasks import BEiT, TwoViewCrop, build
from ssl_vit.tasks.beit import BEIT_FORMAT
from ssl_vit.models.dvae import DVAEEncoder
from ssl_vit.tokenizers.vq import VQTokenizer

IMG, PATCH, DIM, DEPTH, HEADS, VOCAB = 32, 8, 32, 2, 2, 16
GRID = IMG // PATCH
SHARED = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=False)


def tiny_tokenizer():
    torch.manual_seed(1)
    encoder = DVAEEncoder(img_size=8, hidden_dim=8, num_downsamples=1, num_res_blocks=1, code_dim=4, vocab_size=VOCAB)
    return VQTokenizer(encoder, [0.5] * 3, [0.5] * 3)


def tiny_beit(**masking):
    encoder = create_encoder("beit_base_patch16", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                             num_heads=HEADS, global_pool="token", **SHARED)
    return BEiT(encoder, tiny_tokenizer(), mean=[0.5] * 3, std=[0.5] * 3,
                **{"num_mask_patches": 6, "min_mask_patches_per_block": 2, **masking})


@pytest.fixture
def unilm_file(tmp_path):
    """A pre-training checkpoint in unilm's layout (beit/modeling_pretrain.py, saved as {'model': ...}):
    timm's Beit keys with the shared relative position table, plus mask_token, lm_head and the
    relative_position_index buffers; every tensor random."""
    torch.manual_seed(0)
    reference = Beit(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0,
                     init_values=0.1, use_fc_norm=False, global_pool="token", **SHARED)
    state = {k: torch.randn_like(v) * 0.1 for k, v in reference.state_dict().items()}
    state.update({"mask_token": torch.randn(1, 1, DIM) * 0.1, "lm_head.weight": torch.randn(VOCAB, DIM) * 0.1,
                  "lm_head.bias": torch.randn(VOCAB) * 0.1,
                  "rel_pos_bias.relative_position_index": reference.rel_pos_bias.relative_position_index.clone()})
    assert "rel_pos_bias.relative_position_bias_table" in state and "blocks.0.attn.q_bias" in state
    assert "blocks.1.gamma_2" in state and "cls_token" in state and "pos_embed" not in state
    torch.save({"model": state, "epoch": 799}, tmp_path / "beit_pt.pth")
    return tmp_path / "beit_pt.pth", state


def unilm_reference(state, images, mask, tokens):
    """unilm's VisionTransformerForMaskedImageModeling.forward(x, bool_masked_pos) and the cross-entropy of
    engine_for_pretraining.py, written out on timm's Beit loaded from the file's tensors by hand."""
    beit = Beit(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0,
                init_values=0.1, use_fc_norm=False, global_pool="token", **SHARED).eval()
    beit.load_state_dict({k: v for k, v in state.items() if not k.startswith(("lm_head", "mask_token"))
                          and not k.endswith("relative_position_index")}, strict=True)
    with torch.no_grad():
        x = beit.patch_embed(images)                                                  # [B, L, D]
        w = mask.unsqueeze(-1).float()
        x = x * (1 - w) + state["mask_token"].expand_as(x) * w
        x = torch.cat([beit.cls_token.expand(len(x), -1, -1), x], dim=1)
        bias = beit.rel_pos_bias()
        for block in beit.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        x = beit.norm(x)[:, 1:]
        logits = x[mask] @ state["lm_head.weight"].T + state["lm_head.bias"]          # the masked tokens only
        labels = tokens[mask]
        return F.cross_entropy(logits, labels), logits, (logits.argmax(-1) == labels).float().mean()


def test_the_loss_is_unilms_on_the_same_weights_masks_and_tokens(unilm_file):
    path, state = unilm_file
    model = tiny_beit().eval()
    report = load_weights(model, path, strict=True, verbose=False)
    assert report.format == BEIT_FORMAT and "relative_position_index" in " ".join(report.notes)
    images = torch.randn(3, 3, IMG, IMG)
    mask = torch.zeros(3, GRID * GRID, dtype=torch.bool)
    mask[0, [0, 1, 4, 5]] = True                                          # a 2x2 block
    mask[1, [2, 3, 6, 7, 10, 11]] = True
    mask[2, [15]] = True                                                  # samples mask different counts
    tokens = torch.randint(0, VOCAB, (3, GRID * GRID))
    out = model({"images": images}, mask=mask, tokens=tokens)
    loss, logits, accuracy = unilm_reference(state, images, mask, tokens)
    assert torch.allclose(out.loss, loss, atol=1e-5)
    assert torch.allclose(out.logits[out.valid], logits, atol=1e-5)       # the same positions, in raster order
    assert torch.allclose(out.metrics["mlm_top1"], 100 * accuracy)
    assert out.valid.sum(1).tolist() == [4, 6, 1] and out.logits.shape == (3, 6, VOCAB)


def test_tokens_come_from_the_tokenizer_view_or_from_the_images(unilm_file):
    model = tiny_beit()
    pixels = torch.rand(2, 3, 8, 8)                                       # the tokenizer's view: 4 codes x stride 2
    view = (pixels * 255).round().to(torch.uint8)
    expected = model.tokenizer(view.float() / 255).flatten(1)
    assert torch.equal(model.tokenize({"images": torch.randn(2, 3, IMG, IMG), "tokenizer_images": view}), expected)
    images = (F.interpolate(pixels, size=IMG, mode="nearest") - 0.5) / 0.5  # normalised model images
    assert model.tokenize({"images": images}).shape == (2, GRID * GRID)   # resized to the view when it is absent


def test_masks_are_blockwise_from_the_runs_random_numbers():
    model = tiny_beit(num_mask_patches=6, min_mask_patches_per_block=2)
    images = torch.randn(8, 3, IMG, IMG)
    torch.manual_seed(3)
    first = model(images)
    torch.manual_seed(3)
    again = model(images)
    assert torch.equal(first.mask, again.mask) and torch.equal(first.loss, again.loss)
    counts = first.mask.sum(1)
    assert (counts <= 6).all() and (counts >= 2).all() and (first.valid.sum(1) == counts).all()
    assert torch.equal(first.targets[first.valid], first.tokens[first.mask])


def test_the_tokenizer_is_frozen_and_outside_the_module_tree():
    model = tiny_beit()
    tokenizer = model.tokenizer
    assert not any("tokenizer" in k for k in model.state_dict())
    owned = {id(p) for p in model.parameters()}
    assert not any(id(p) in owned for p in tokenizer.parameters())
    grouped = {id(p) for g in model.param_groups(0.05) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    twin = copy.deepcopy(model)                                             # timm's EMA copies share it
    assert twin.tokenizer is tokenizer and twin.encoder is not model.encoder
    model.double()                                                          # .to() moves it with the task
    assert tokenizer.encoder.codebook.dtype == torch.float64
    model.float()
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()(torch.randn(4, 3, IMG, IMG)).loss.backward()
    optimizer.step()
    assert not tokenizer.training and all(p.grad is None and not p.requires_grad for p in tokenizer.parameters())
    assert all(torch.equal(before[k], v) for k, v in tokenizer.state_dict().items())
    assert model.lm_head.weight.grad is not None and model.encoder.mask_token.grad is not None


def test_two_views_of_one_crop():
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    image.paste((255, 0, 0), (0, 0, 12, 12))                                 # a red square, top left
    image.paste((0, 0, 255), (20, 16, 32, 32))
    png = io.BytesIO()
    image.save(png, "PNG")
    data = png.getvalue()
    whole = TwoViewCrop([24, 24], [8, 8], scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    views = whole(data)                                                     # the whole image, flipped
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = {"images": flipped.resize((24, 24), Image.BICUBIC), "tokenizer_images": flipped.resize((8, 8), Image.LANCZOS)}
    for key, picture in expected.items():
        assert views[key].dtype == torch.uint8
        assert torch.equal(views[key], torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    crops = TwoViewCrop([32, 32], [16, 16], scale=(0.2, 0.6), hflip=0.5)
    for seed in range(5):                                                   # random crops: the same one twice
        torch.manual_seed(seed)
        views = crops(data)
        torch.manual_seed(seed)
        assert torch.equal(crops(data)["images"], views["images"])
        small = F.interpolate(views["images"][None].float(), size=16, mode="bilinear", antialias=True)[0]
        assert (small - views["tokenizer_images"].float()).abs().mean() < 12   # 0..255: the same picture


def test_our_model_file_is_unilms_layout_and_official_files_fine_tune(unilm_file, tmp_path):
    path, state = unilm_file
    model = tiny_beit()
    export_model(model.eval(), tmp_path / "model.safetensors")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"mask_token", "lm_head.weight", "lm_head.bias", "cls_token", "blocks.0.attn.q_bias"} <= keys
    assert not any(k.startswith(("encoder.", "tokenizer")) for k in keys) and BEiT.checkpoint_format(load_file(
        tmp_path / "model.safetensors"))
    again = tiny_beit()
    load_weights(again, tmp_path / "model.safetensors", strict=True, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # the official file into a finetune_digits classifier: a table per block (copied from the shared one),
    # mean pooling with a fresh fc_norm; lm_head and mask_token dropped with notes
    cfg = recipes.load(["recipe=finetune_digits", "model.arch=beit_base_patch16", f"model.patch_size={PATCH}",
                       f"model.embed_dim={DIM}", f"model.depth={DEPTH}", f"model.num_heads={HEADS}"])
    classifier = build(cfg, num_classes=10).eval()
    report = load_weights(classifier, path, verbose=False)
    assert report.format == BEIT_FORMAT
    assert {"lm_head.weight", "lm_head.bias", "mask_token"} <= set(report.unexpected)
    assert any("lm_head" in note and f"{VOCAB} codes" in note for note in report.notes)
    assert any("each block's table" in item for item in report.resized)
    assert not [k for k in report.missing if not k.startswith(("encoder.head", "encoder.fc_norm"))]
    # the same features as a timm Beit with the same weights mapped by hand (the shared table in each block)
    reference = Beit(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=0,
                     init_values=0.1, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=False).eval()
    mapped = {k: v for k, v in state.items() if not k.startswith(("lm_head", "mask_token", "rel_pos_bias", "norm."))}
    mapped.update({f"blocks.{i}.attn.relative_position_bias_table": state["rel_pos_bias.relative_position_bias_table"]
                   for i in range(DEPTH)})
    mapped.update({k: v for k, v in reference.state_dict().items() if k.startswith("fc_norm")})
    reference.load_state_dict(mapped, strict=True)
    classifier.encoder.fc_norm.load_state_dict(reference.fc_norm.state_dict())
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = classifier.encoder.forward_head(classifier.encoder.forward_features(images), pre_logits=True)
        assert (ours - reference.forward_head(reference.forward_features(images), pre_logits=True)).abs().max() < 1e-5


def test_the_paper_recipe_is_beit_b_with_the_papers_settings():
    cfg = recipes.load(["recipe=beit_base"])
    assert cfg.model.arch == "beit_base_patch16" and cfg.model.use_shared_rel_pos_bias and not cfg.model.use_rel_pos_bias
    assert (cfg.model.layer_scale_init, cfg.model.drop_path_rate, cfg.model.global_pool) == (0.1, 0.1, "token")
    assert (cfg.task.num_mask_patches, cfg.task.min_mask_patches_per_block, cfg.task.color_jitter) == (75, 16, 0.4)
    optim = cfg.optim
    assert (optim.batch_size, optim.blr * optim.batch_size / optim.lr_base_batch, optim.warmup_epochs, optim.epochs,
            optim.clip_grad, optim.min_lr, optim.weight_decay, list(optim.betas)) == (2048, 1.5e-3, 10, 800, 3.0, 1e-5,
                                                                                     0.05, [0.9, 0.999])
    assert list(cfg.data.crop_scale) == [0.08, 1.0] and cfg.data.hflip == 0.5


TINY_BEIT = [*TINY_VIT[:4], "task.num_mask_patches=6", "task.min_mask_patches_per_block=2"]


@pytest.mark.parametrize("override, message", [
    ("task.num_mask_patches=20", r"task.num_mask_patches=20 must be in 1..16 .* use e.g. task.num_mask_patches=6"),
    ("task.min_mask_patches_per_block=7", r"task.min_mask_patches_per_block=7 must be in 1..task.num_mask_patches=6"),
    ("model.global_pool=avg", "set model.global_pool=token"),
    ("model.arch=timm:resnet18", "needs the encoder's mask_token forward"),
    ("data.train_transform=eval", "data.train_transform=eval would be ignored"),
    ("task.tokenizer.path=nowhere.safetensors", r"task.tokenizer.path=nowhere.safetensors: no such file; convert"),
])
def test_bad_recipes_are_explained(override, message):
    tiny = [] if override.startswith("model.arch") else TINY_BEIT
    with pytest.raises(ConfigError, match=message):
        recipes.load(["recipe=beit_digits", *tiny, override])


def test_a_run_needs_a_tokenizer():
    cfg = recipes.load(["recipe=beit_digits", *TINY_BEIT])
    with pytest.raises(ConfigError, match=r"task.tokenizer.path is required: .*recipe=dvae_digits.*=random"):
        build(cfg)


# -------------------------------------------------------------------------------------------
# end to end: dvae_digits trains a tokenizer, beit_digits pre-trains on its codes


TINY_DVAE = ["model.hidden_dim=16", "model.vocab_size=64", "model.code_dim=4", "data.batch_size=32",
             "optim.batch_size=32", "data.num_workers=1", "log.every=1"]


def pretrain(recipe, out, env, *overrides):
    return run([sys.executable, str(ROOT / "pretrain.py"), f"recipe={recipe}", f"train.output_dir={out}",
                *overrides], env)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory, env):
    """dvae_digits (tiny, 2 steps) and beit_digits on its tokenizer, stopped after 2 steps and resumed to 4."""
    root = tmp_path_factory.mktemp("beit_digits")
    pretrain("dvae_digits", root / "dvae", env, *TINY_DVAE, "train.max_steps=2", "log.images_every=2")
    tokenizer = root / "dvae" / "tokenizer.safetensors"
    beit = [*TINY_BEIT, "data.num_workers=1", f"task.tokenizer.path={tokenizer}", "data.batch_size=32",
            "optim.batch_size=32", "log.every=1", "train.checkpoint_every=2"]
    pretrain("beit_digits", root / "beit", env, *beit, "train.max_steps=2")
    result = pretrain("beit_digits", root / "beit", env, *beit, "train.max_steps=4")
    assert "resumed from" in result.stdout and "tokenizer: vq tokenizer: 64 codes" in result.stdout
    return root, beit


def test_the_dvae_run_writes_a_tokenizer_and_logs_its_codebook_use(digits_runs):
    root, _ = digits_runs
    lines = [json.loads(line) for line in (root / "dvae" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(1 <= line["perplexity"] <= 64 and 1 <= line["codes_used"] <= 64 for line in lines)
    description = json.loads((root / "dvae" / "tokenizer.json").read_text())
    assert description["tokenizer"]["type"] == "vq" and description["tokenizer"]["stride"] == 2
    from ssl_vit.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(root / "dvae" / "tokenizer.safetensors")
    encoder = create_encoder(**json.loads((root / "dvae" / "backbone.json").read_text())["encoder"])
    load_weights(encoder, root / "dvae" / "backbone.safetensors", strict=True, verbose=False)
    pixels = torch.rand(2, 3, 16, 16)
    assert torch.equal(tokenizer(pixels), encoder.codes((pixels - 0.5) / 0.5))   # the run's encoder and codebook


def test_the_beit_run_logs_exports_and_monitors(digits_runs):
    import timm

    root, _ = digits_runs
    lines = [json.loads(line) for line in (root / "beit" / "log.jsonl").read_text().splitlines() if "eval" not in line]
    assert [line["step"] for line in lines] == [1, 2, 3, 4] and all(0 <= line["mlm_top1"] <= 100 for line in lines)
    metrics = json.loads((root / "beit" / "metrics.json").read_text())
    assert metrics["task"] == "beit" and metrics["protocol"] == "knn" and metrics["num_samples"] == 360
    backbone = json.loads((root / "beit" / "backbone.json").read_text())
    eval(backbone["load_with_timm"], {"timm": timm})                               # strict: no mask token
    from safetensors.torch import load_file

    model = load_file(root / "beit" / "model.safetensors")
    assert model["lm_head.weight"].shape == (64, 32)                              # the tokenizer's 64 codes
    assert "mask_token" in model


@pytest.mark.slow  # one more run (about 10 s)
def test_a_resumed_beit_run_ends_with_the_weights_of_an_uninterrupted_one(digits_runs, env, tmp_path):
    """Masks, crops and the frozen tokenizer's codes all follow from the restored RNG and files."""
    from safetensors.torch import load_file

    root, beit = digits_runs
    pretrain("beit_digits", tmp_path, env, *beit, "train.max_steps=4", "train.checkpoint_every=100")
    resumed, straight = load_file(root / "beit" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in resumed)
