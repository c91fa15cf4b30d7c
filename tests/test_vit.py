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
              "vit_huge_patch14": "vit_huge_patch14_224"}


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_named_configs_have_timm_keys_and_shapes(name, global_pool):
    with torch.device("meta"):  # shapes only: no memory for ViT-H
        ours = create_encoder(name, num_classes=1000, global_pool=global_pool)
        theirs = timm.create_model(TIMM_NAMES[name], num_classes=1000, global_pool=global_pool)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


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
