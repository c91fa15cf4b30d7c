"""The encoder against timm (parity of keys and logits) and against the formulas it implements."""
from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn

from ssl_vit import ARCHS, create_encoder, load_weights
from ssl_vit.models.vit import sincos_2d_pos_embed

TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
              "vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
              "vit_huge_patch14": "vit_huge_patch14_224", "vit_giant_patch14": "vit_giant_patch14_224",
              "vit_gigantic_patch14": "vit_gigantic_patch14_224"}


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_named_configs_have_timm_keys_and_shapes(name, global_pool):
    with torch.device("meta"):  # shapes only: no memory for ViT-H, -g, -G
        ours = create_encoder(name, num_classes=1000, global_pool=global_pool)
        theirs = timm.create_model(TIMM_NAMES[name], num_classes=1000, global_pool=global_pool)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name, millions", [("vit_giant_patch14", 1011.2), ("vit_gigantic_patch14", 1842.8)])
def test_the_giant_sizes_have_the_papers_parameter_counts(name, millions):
    """Zhai et al. 2022, table 2: ViT-g/14 1011M and ViT-G/14 1843M parameters (no head)."""
    with torch.device("meta"):
        encoder = create_encoder(name, pos_embed="learn")
    assert sum(p.numel() for p in encoder.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("timm_name,arch", [("vit_tiny_patch16_224", "vit_tiny_patch16"),
                                            ("vit_small_patch16_224", "vit_small_patch16")])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("img_size", [224, (160, 192)])
def test_logits_match_timm(timm_name, arch, global_pool, img_size):
    torch.manual_seed(0)
    source = timm.create_model(timm_name, num_classes=7, global_pool=global_pool).eval()
    # timm's own answer at the new resolution: its model + its checkpoint filter (pos-embed resampling)
    reference = timm.create_model(timm_name, num_classes=7, global_pool=global_pool, img_size=img_size).eval()
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    ours = create_encoder(arch, num_classes=7, global_pool=global_pool, img_size=img_size).eval()
    report = load_weights(ours, source.state_dict(), strict=True, verbose=False)
    assert bool(report.resized) == (img_size != 224)
    images = torch.randn(2, 3, *((img_size, img_size) if isinstance(img_size, int) else img_size))
    with torch.no_grad():
        assert _max_diff(ours(images), reference(images)) < 1e-5


def test_distilled_logits_match_timm_deit():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5).eval()
    ours = create_encoder("vit_tiny_patch16", num_classes=5, dist_token=True).eval()
    load_weights(ours, {"model": deit.state_dict()}, strict=True, verbose=False)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = ours.forward_features(images)
        cls_logits, dist_logits = ours.forward_heads(features)
        deit.set_distilled_training(True)
        deit.train()  # timm returns both heads only in distilled training mode; no dropout is configured
        timm_cls, timm_dist = deit(images)
        deit.eval()
        assert _max_diff(cls_logits, timm_cls) < 1e-5
        assert _max_diff(dist_logits, timm_dist) < 1e-5
        assert _max_diff(ours(images), deit(images)) < 1e-5  # eval: mean of both heads
        assert _max_diff(ours(images), (cls_logits + dist_logits) / 2) < 1e-6


def test_hybrid_matches_a_timm_hybrid_vit():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet26d", features_only=True, out_indices=(3,))  # stride 16
    theirs = TimmViT(img_size=128, patch_size=1, embed_dim=96, depth=2, num_heads=3, num_classes=4,
                     embed_layer=partial(HybridEmbed, backbone=backbone)).eval()
    ours = create_encoder("vit_tiny_patch16", img_size=128, patch_embed="hybrid", backbone="resnet26d",
                          embed_dim=96, depth=2, num_heads=3, num_classes=4).eval()
    assert ours.grid_size == (8, 8) and ours.patch_size == 16
    load_weights(ours, theirs.state_dict(), strict=True, verbose=False)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert _max_diff(ours(images), theirs(images)) < 1e-5


def test_forward_features_on_kept_tokens_equals_blocks_by_hand():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=64, depth=3, dist_token=True, num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    ids_keep = torch.stack([torch.randperm(16)[:5] for _ in range(2)])  # [B, K]
    with torch.no_grad():
        patches = encoder.patch_embed(images) + encoder.pos_embed[:, 2:]
        kept = torch.stack([patches[b, ids_keep[b]] for b in range(2)])
        prefix = torch.cat([encoder.cls_token + encoder.pos_embed[:, :1],
                            encoder.dist_token + encoder.pos_embed[:, 1:2]], dim=1).expand(2, -1, -1)
        x = torch.cat([prefix, kept], dim=1)
        for block in encoder.blocks:
            x = block(x)
        expected = encoder.norm(x)
        got = encoder.forward_features(images, ids_keep=ids_keep)
    assert got.shape == (2, 2 + 5, 192)
    assert _max_diff(got, expected) < 1e-6
    # all tokens, in order, is the plain forward
    all_ids = torch.arange(16).expand(2, -1)
    assert _max_diff(encoder.forward_features(images, all_ids), encoder.forward_features(images)) < 1e-6


def _mae_reference_sincos(embed_dim, grid_h, grid_w):
    """Independent numpy transcription of MAE's util/pos_embed.py (generalised to H != W)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # w first
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_table_values():
    dim, h, w = 16, 3, 5
    table = sincos_2d_pos_embed(dim, (h, w), num_prefix_tokens=1)[0]
    assert table.shape == (1 + h * w, dim) and torch.all(table[0] == 0)
    quarter = dim // 4
    for row, col, k in [(0, 0, 0), (1, 4, 2), (2, 3, 3), (2, 0, 1)]:
        token = table[1 + row * w + col]
        freq = 1.0 / 10000 ** (k / quarter)
        assert token[k] == pytest.approx(np.sin(col * freq), abs=1e-6)          # column: first half
        assert token[quarter + k] == pytest.approx(np.cos(col * freq), abs=1e-6)
        assert token[2 * quarter + k] == pytest.approx(np.sin(row * freq), abs=1e-6)  # row: second half
        assert token[3 * quarter + k] == pytest.approx(np.cos(row * freq), abs=1e-6)
    reference = _mae_reference_sincos(dim, h, w)
    np.testing.assert_allclose(table.numpy(), reference, atol=1e-6)
    square = sincos_2d_pos_embed(768, (14, 14))[0].numpy()
    np.testing.assert_allclose(square, _mae_reference_sincos(768, 14, 14), atol=1e-6)


def test_sincos_pos_embed_is_saved_but_not_trained():
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, pos_embed="sincos")
    assert "pos_embed" not in dict(encoder.named_parameters())
    assert "pos_embed" in encoder.state_dict()
    assert torch.equal(encoder.state_dict()["pos_embed"], sincos_2d_pos_embed(192, (4, 4)))
    encoder(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    encoder(images).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in encoder.named_parameters()}
    encoder.zero_grad()
    encoder.set_grad_checkpointing(True)
    encoder(images).square().sum().backward()
    for name, param in encoder.named_parameters():
        assert _max_diff(param.grad, plain[name]) < 1e-6, name


def test_layer_scale_and_drop_path_are_timm_blocks():
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=4, layer_scale_init=1e-5,
                             drop_path_rate=0.3)
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, init_values=1e-5,
                               drop_path_rate=0.3, num_classes=0)
    assert set(encoder.state_dict()) == set(theirs.state_dict())
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("kwargs,message", [
    (dict(img_size=100), "not a multiple of patch_size 16"),
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(pos_embed="rope"), "pos_embed='rope'"),
    (dict(dist_token=True, global_pool="avg"), "dist_token=True"),
    (dict(patch_embed="hybrid"), "backbone"),
    (dict(patch_embed="hybrid", backbone="resnet18", backbone_stride=64), "strides"),
    (dict(embed_dim=100), "divisible"),
    (dict(widht=3), "unknown option"),
])
def test_bad_options_are_explained(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        create_encoder("vit_tiny_patch16", **kwargs)


def test_unknown_arch_lists_the_names():
    with pytest.raises(ValueError, match="vit_base_patch16"):
        create_encoder("vit_gigantic")


# -------------------------------------------------------------------------------------------
# the mask-token forward (SimMIM, BEiT) and the 2-D learned position table


def test_mask_token_forward_equals_blocks_by_hand():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=64, depth=2, dist_token=True, pos_embed="learn").eval()
    token = encoder.add_mask_token()
    assert encoder.add_mask_token() is token and token.shape == (1, 1, 192) and token.abs().max() <= 0.02
    images, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16) < 0.5
    with torch.no_grad():
        patches = encoder.patch_embed(images)
        patches = torch.where(mask.unsqueeze(-1), token.expand(2, 16, -1), patches) + encoder.pos_embed[:, 2:]
        prefix = torch.cat([encoder.cls_token + encoder.pos_embed[:, :1],
                            encoder.dist_token + encoder.pos_embed[:, 1:2]], dim=1).expand(2, -1, -1)
        x = torch.cat([prefix, patches], dim=1)
        for block in encoder.blocks:
            x = block(x)
        got = encoder.forward_features(images, mask=mask)
        assert got.shape == (2, 2 + 16, 192) and _max_diff(got, encoder.norm(x)) < 1e-5
        # nothing masked is the plain forward; everything masked does not see the image
        assert _max_diff(encoder.forward_features(images, mask=torch.zeros(2, 16)), encoder.forward_features(images)) < 1e-6
        everything = torch.ones(2, 16)
        assert _max_diff(encoder.forward_features(images, mask=everything),
                         encoder.forward_features(torch.randn(2, 3, 64, 64), mask=everything)) < 1e-6


def test_mask_token_is_a_trained_parameter_outside_timm_keys_and_backbones(tmp_path):
    from ssl_vit import export_backbone
    from ssl_vit.models import family_of

    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    plain_keys = set(encoder.state_dict())
    encoder.add_mask_token()
    assert set(encoder.state_dict()) == plain_keys | {"mask_token"} and "mask_token" in encoder.no_weight_decay()
    encoder.forward_features(torch.randn(2, 3, 32, 32), mask=torch.ones(2, 16)).sum().backward()
    assert encoder.mask_token.grad is not None and encoder.mask_token.grad.abs().sum() > 0
    assert "mask_token" not in family_of(encoder).backbone_state(encoder)
    export_backbone(encoder, tmp_path / "backbone.safetensors")  # loads in timm strictly: no mask token
    description = __import__("json").loads((tmp_path / "backbone.json").read_text())
    theirs = eval(description["load_with_timm"], {"timm": timm})
    assert set(theirs.state_dict()) == plain_keys


def test_mask_forward_errors_are_explained():
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=1)
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"no mask token: call encoder.add_mask_token\(\)"):
        encoder.forward_features(images, mask=torch.zeros(1, 16))
    encoder.add_mask_token()
    with pytest.raises(ValueError, match=r"mask has shape \[1, 9\], expected \[batch, patches\] = \[1, 16\]"):
        encoder.forward_features(images, mask=torch.zeros(1, 9))
    with pytest.raises(ValueError, match="not both"):
        encoder.forward_features(images, ids_keep=torch.zeros(1, 4, dtype=torch.long), mask=torch.zeros(1, 16))


def test_learned_2d_table_is_row_and_column_tables():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=(32, 48), patch_size=8, depth=1, pos_embed="learn2d").eval()
    assert "pos_embed" not in encoder.state_dict()
    rows, cols = encoder.pos_embed_row, encoder.pos_embed_col
    assert rows.shape == (1, 4, 96) and cols.shape == (1, 6, 96) and rows.std() > 0.01
    assert {"pos_embed_row", "pos_embed_col"} <= encoder.no_weight_decay()
    table = encoder.patch_positions()[0]                                  # [L, D]
    for i, j in [(0, 0), (1, 4), (3, 5), (2, 0)]:
        assert torch.equal(table[i * 6 + j], torch.cat([cols[0, j], rows[0, i]]))  # [column | row]
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():  # the class token gets no position embedding (it is learned itself)
        x = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(images) + table], dim=1)
        for block in encoder.blocks:
            x = block(x)
        assert _max_diff(encoder.forward_features(images), encoder.norm(x)) < 1e-6
    with pytest.raises(ValueError, match="embed_dim=195 is odd"):
        create_encoder("vit_tiny_patch16", embed_dim=195, num_heads=5, pos_embed="learn2d")


def test_learned_2d_table_exports_are_ours_and_load_into_a_1d_table(tmp_path):
    import json

    from ssl_vit import export_backbone

    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, pos_embed="learn2d").eval()
    export_backbone(encoder, tmp_path / "backbone.safetensors")
    description = json.loads((tmp_path / "backbone.json").read_text())
    assert "load_with_timm" not in description and "timm" not in description  # timm's ViT has no such tables
    again = create_encoder(**description["encoder"]).eval()
    load_weights(again, tmp_path / "backbone.safetensors", strict=True, verbose=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder.forward_features(images)
        assert torch.equal(again.forward_features(images), expected)
        # into a 1-D learned table (fine-tuning with model.pos_embed=learn): the same embeddings, so the same features
        learned = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, depth=1, pos_embed="learn").eval()
        report = load_weights(learned, tmp_path / "backbone.safetensors", strict=True, verbose=False)
        assert any("2-D row and column" in r for r in report.resized)
        assert _max_diff(learned.forward_features(images), expected) < 1e-6
        # at another grid each 1-D table is resampled along its axis
        larger = create_encoder("vit_tiny_patch16", img_size=48, patch_size=8, depth=1, pos_embed="learn2d")
        report = load_weights(larger, tmp_path / "backbone.safetensors", strict=True, verbose=False)
        assert larger.pos_embed_row.shape == (1, 6, 96) and len(report.resized) == 2
        # a 1-D table cannot become two: said, not silently dropped
        report = load_weights(encoder, learned.state_dict(), verbose=False)
        assert "pos_embed" in report.unexpected and any("learn2d" in note for note in report.notes)


# --- register tokens (Darcet et al. 2024, "Vision Transformers Need Registers") --------------------

@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_register_tokens_export_into_timms_vit_with_the_same_features(tmp_path, global_pool):
    """model.reg_tokens=N: N learned tokens after the class token, read by no head; the backbone export
    loads strictly into timm's VisionTransformer(reg_tokens=N) (its JSON's command) with the same
    tokens and pooled features."""
    import json

    from ssl_vit import export_backbone

    torch.manual_seed(0)
    ours = create_encoder("vit_tiny_patch16", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                          pos_embed="learn", reg_tokens=4, global_pool=global_pool, num_classes=0).eval()
    with torch.no_grad():
        ours.reg_token.normal_()  # registers that matter (timm initialises them near 0)
    assert ours.num_prefix_tokens == 5 and ours.reg_token.shape == (1, 4, 32) and "reg_token" in ours.no_weight_decay()
    export_backbone(ours, tmp_path / "backbone.safetensors")
    description = json.loads((tmp_path / "backbone.json").read_text())
    assert "reg_tokens=4" in description["load_with_timm"] and description["encoder"]["reg_tokens"] == 4
    theirs = eval(description["load_with_timm"], {"timm": timm}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ours.forward_features(images)
        assert tokens.shape == (2, 1 + 4 + 64, 32)
        assert torch.allclose(tokens, theirs.forward_features(images), atol=1e-6)
        assert torch.allclose(ours.forward_head(tokens, pre_logits=True), theirs(images), atol=1e-6)
    again = create_encoder(**description["encoder"])
    load_weights(again, tmp_path / "backbone.safetensors", strict=True, verbose=False)
    assert torch.equal(again.reg_token, ours.reg_token)


def test_register_tokens_are_left_out_of_attention_maps_and_refused_where_they_cannot_be():
    from ssl_vit import recipes
    from ssl_vit.config import ConfigError
    from ssl_vit.models.vit_attention import attention_maps

    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             reg_tokens=2, num_classes=0).eval()
    maps = attention_maps(encoder, torch.randn(2, 3, 32, 32), heads=True)
    assert all(m.shape == (2, 8, 8) for m in maps.values())  # the 8x8 patches only, not the 3 prefix tokens
    with pytest.raises(ValueError, match="reg_tokens with dist_token"):
        create_encoder("vit_tiny_patch16", img_size=32, patch_size=4, reg_tokens=2, dist_token=True)
    with pytest.raises(ConfigError, match="reg_tokens"):
        recipes.load(["recipe=mae_tiny_digits", "model.reg_tokens=4"])  # MAE has one prefix token
    with pytest.raises(ConfigError, match="reg_tokens"):
        recipes.load(["recipe=dino_tiny_digits", "model.reg_tokens=-1"])
    assert recipes.load(["recipe=dino_tiny_digits", "model.reg_tokens=4"]).model.reg_tokens == 4
