"""The BEiT encoder family against timm's Beit (keys, features, loading back exports, resized tables)
and against BEiT's reference maths (the mask-token forward, the initialisation, attention maps)."""
import math

import pytest
import timm
import torch
from timm.models.beit import checkpoint_filter_fn

from conftest import check_backbone_export_loads_in_timm
from ssl_vit import create_encoder, load_weights
from ssl_vit.models import family_of
from ssl_vit.models.beit import recompute_beit_attention
from ssl_vit.models.vit_attention import AttentionRecorder

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TIMM_TINY = dict(TINY, num_classes=0)
MODES = {  # (our options, timm's) for the three position schemes
    "per-block": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_abs_pos_emb=False),
    "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=False),
    "absolute": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=False, use_abs_pos_emb=True),
}


def _max_diff(a, b):
    return (a - b).abs().max().item()


def randomized(model, std=0.05):
    """Non-trivial values everywhere (zero-initialised biases and tables too)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model


@pytest.mark.parametrize("ours, theirs", [("beit_base_patch16", "beit_base_patch16_224"),
                                          ("beit_large_patch16", "beit_large_patch16_224")])
def test_named_configs_have_timm_keys_shapes_and_layer_scale(ours, theirs):
    with torch.device("meta"):
        encoder = create_encoder(ours, num_classes=1000)
        reference = timm.create_model(theirs, num_classes=1000)
    assert {k: v.shape for k, v in encoder.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert encoder.config["layer_scale_init"] == (0.1 if "base" in ours else 1e-5)   # BEiT: 0.1 B, 1e-5 L


def test_timm_beit_base_state_dict_gives_timms_features():
    torch.manual_seed(0)
    reference = randomized(timm.create_model("beit_base_patch16_224", num_classes=0)).eval()
    encoder = create_encoder("beit_base_patch16").eval()
    report = load_weights(encoder, reference.state_dict(), strict=True, verbose=False)
    assert not report.resized
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert _max_diff(encoder.forward_features(images), reference.forward_features(images)) < 1e-5
        assert _max_diff(encoder.forward_head(encoder.forward_features(images), pre_logits=True),
                         reference.forward_head(reference.forward_features(images), pre_logits=True)) < 1e-5


@pytest.mark.parametrize("mode", list(MODES))
def test_exports_load_back_into_timms_beit_by_the_json_command(tmp_path, mode):
    torch.manual_seed(0)
    pool = "token" if mode == "shared" else "avg"  # shared: as simmim_vit_base's backbone (final norm, class token)
    encoder = randomized(create_encoder("beit_base_patch16", num_classes=5, global_pool=pool, **TINY,
                                        **MODES[mode])).eval()
    encoder.add_mask_token()  # kept out of the backbone: timm's Beit has none
    check_backbone_export_loads_in_timm(encoder, tmp_path, "Beit")


@pytest.mark.parametrize("mode", ["per-block", "shared"])
def test_relative_tables_are_resized_as_timm_for_another_grid(mode):
    torch.manual_seed(0)
    source = randomized(timm.create_model("beit_base_patch16_224", **TIMM_TINY, **MODES[mode]))
    reference = timm.create_model("beit_base_patch16_224", **dict(TIMM_TINY, img_size=48), **MODES[mode]).eval()
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    encoder = create_encoder("beit_base_patch16", **dict(TINY, img_size=48), **MODES[mode]).eval()
    report = load_weights(encoder, source.state_dict(), strict=True, verbose=False)
    tables = [r for r in report.resized if "relative_position_bias_table" in r]
    assert len(tables) == (2 if mode == "per-block" else 1) and "52x2 -> 124x2" in tables[0]  # 4x4 grid: 7x7 + 3; 6x6: 11x11 + 3
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert _max_diff(encoder.forward_features(images), reference.forward_features(images)) < 1e-5


def test_a_shared_table_becomes_each_blocks_for_fine_tuning():
    """BEiT and SimMIM pre-train with one table for all blocks and fine-tune with one per block, each
    starting as the shared one: the same attention, so the same features."""
    torch.manual_seed(0)
    pretrained = randomized(create_encoder("beit_base_patch16", **TINY, **MODES["shared"])).eval()
    pretrained.add_mask_token()
    state = {f"encoder.{k}": v for k, v in pretrained.state_dict().items()}   # as SimMIM's model.safetensors
    state["relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)  # unilm files carry the index buffers
    finetune = create_encoder("beit_base_patch16", **TINY, **MODES["per-block"]).eval()
    report = load_weights(finetune, state, verbose=False)
    shared = pretrained.rel_pos_bias.relative_position_bias_table
    assert all(torch.equal(block.attn.relative_position_bias_table, shared) for block in finetune.blocks)
    assert report.unexpected == ["encoder.mask_token"] and not report.missing
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(finetune.forward_features(images), pretrained.forward_features(images)) < 1e-5


@pytest.mark.parametrize("mode", list(MODES))
def test_mask_token_forward_equals_timms_beit_with_the_patches_replaced(mode):
    """unilm's VisionTransformerForMaskedImageModeling: masked patch embeddings become the mask token
    before the class token and positions; timm's Beit with its patch embedding's output replaced so."""
    torch.manual_seed(0)
    encoder = randomized(create_encoder("beit_base_patch16", **TINY, **MODES[mode])).eval()
    token = encoder.add_mask_token()
    reference = timm.create_model("beit_base_patch16_224", **TIMM_TINY, **MODES[mode]).eval()
    reference.load_state_dict({k: v for k, v in encoder.state_dict().items() if k != "mask_token"})
    mask = torch.rand(2, 16) < 0.6
    w = mask.unsqueeze(-1).float()
    reference.patch_embed.register_forward_hook(lambda module, args, x: x * (1 - w) + token * w)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(encoder.forward_features(images, mask=mask), reference.forward_features(images)) < 1e-5
    assert "mask_token" in encoder.no_weight_decay() and "mask_token" not in family_of(encoder).backbone_state(encoder)


def test_initialisation_is_beits_pre_training_one():
    """unilm beit/modeling_pretrain.py: trunc-normal(0.02) cut at +-0.02, the output projections of block
    l (1-based) divided by sqrt(2 l); q/v biases and relative tables at 0, layer scale at its value."""
    torch.manual_seed(0)
    encoder = create_encoder("beit_base_patch16", depth=4, use_rel_pos_bias=True, use_shared_rel_pos_bias=True)
    cut_std = 0.02 * math.sqrt(1 - 2 * 0.3989423 * math.exp(-0.5) / 0.6826895)  # a normal truncated at +-1 std
    for l, block in enumerate(encoder.blocks, start=1):
        for weight, scale in ((block.attn.qkv.weight, 1), (block.mlp.fc1.weight, 1),
                              (block.attn.proj.weight, math.sqrt(2 * l)), (block.mlp.fc2.weight, math.sqrt(2 * l))):
            assert weight.abs().max() <= 0.02 / scale + 1e-7
            assert weight.std().item() == pytest.approx(cut_std / scale, rel=0.03)
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        assert torch.all(block.attn.relative_position_bias_table == 0) and torch.all(block.gamma_1 == 0.1)
    patch = encoder.patch_embed.proj.weight
    assert patch.abs().max() <= 0.02 and patch.std().item() == pytest.approx(cut_std, rel=0.05)
    assert encoder.cls_token.abs().max() <= 0.02 and torch.all(encoder.rel_pos_bias.relative_position_bias_table == 0)
    assert encoder.add_mask_token().abs().max() <= 0.02


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", ["per-block", "shared"])
def test_recorded_attention_is_what_beits_attention_computes(fused, mode):
    torch.manual_seed(0)
    encoder = randomized(create_encoder("beit_base_patch16", **TINY, use_rel_pos_bias=True,
                                        use_shared_rel_pos_bias=mode == "shared")).eval()
    before_proj = {}
    for i, block in enumerate(encoder.blocks):
        block.attn.fused_attn = fused
        block.attn.proj.register_forward_pre_hook(lambda m, args, i=i: before_proj.__setitem__(i, args[0]))
    inputs = {}
    for i, block in enumerate(encoder.blocks):
        block.attn.register_forward_pre_hook(lambda m, args, kwargs, i=i: inputs.__setitem__(i, (args[0], kwargs)),
                                             with_kwargs=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = encoder.forward_features(images)
        with AttentionRecorder(encoder, recompute=recompute_beit_attention) as recorder:
            assert torch.equal(encoder.forward_features(images), plain)  # the hooks only read
        for i, block in enumerate(encoder.blocks):
            x, kwargs = inputs[i]
            weights, values = recompute_beit_attention(block.attn, x, **kwargs)
            assert torch.equal(weights.float(), recorder.weights[i])
            assert _max_diff((weights @ values).transpose(1, 2).reshape(2, 17, 32), before_proj[i]) < 1e-5
        maps = family_of(encoder).attention_maps(encoder, images, rollout=True)
    assert set(maps) == {"mean", "head 0", "head 1", "rollout"} and maps["mean"].shape == (2, 4, 4)


def test_layer_decay_groups_and_no_weight_decay():
    from ssl_vit.tasks.param_groups import param_groups

    encoder = create_encoder("beit_base_patch16", **TINY, use_shared_rel_pos_bias=True)
    encoder.add_mask_token()
    groups = param_groups(encoder, 0.05, layer_decay=0.5)
    named = {id(p): n for n, p in encoder.named_parameters()}
    scale = {named[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {named[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    stem = 0.5 ** 3  # stem, block 0, block 1 (+ norm), head
    for name in ("mask_token", "cls_token", "rel_pos_bias.relative_position_bias_table", "patch_embed.proj.weight"):
        assert scale[name] == pytest.approx(stem), name
    assert scale["blocks.1.mlp.fc1.weight"] == pytest.approx(0.5 ** 1)
    assert decay["mask_token"] == decay["blocks.0.attn.relative_position_bias_table"] == 0
    assert decay["blocks.0.mlp.fc1.weight"] == 0.05


def test_a_timm_beit_file_is_read_from_its_shapes():
    from ssl_vit.models.beit import BEiTFamily
    from ssl_vit.models.vit import ViT

    state = timm.create_model("beit_base_patch16_224", **dict(TIMM_TINY, num_classes=7)).state_dict()
    with pytest.raises(ValueError, match="beit encoder family"):
        ViT.config_from_state(state)
    found = BEiTFamily.config_from_state(state)
    assert found == dict(embed_dim=32, depth=2, patch_size=8, in_chans=3, qkv_bias=True, use_abs_pos_emb=False,
                         use_rel_pos_bias=True, use_shared_rel_pos_bias=False, layer_scale_init=0.1, global_pool="avg",
                         num_classes=7, img_size=32, num_heads=2)
    encoder = create_encoder("beit_base_patch16", **found)
    load_weights(encoder, state, strict=True, verbose=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(img_size=100), "not a multiple of patch_size 16"),
    (dict(embed_dim=100), "divisible"),
    (dict(layer_scale_init=-1.0), ">= 0"),
    (dict(pos_embed="learn"), "unknown option"),
])
def test_bad_options_are_explained(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        create_encoder("beit_base_patch16", **kwargs)


@pytest.mark.parametrize("options", [dict(use_rel_pos_bias=True), dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
                                     dict(use_rel_pos_bias=True, use_abs_pos_emb=True)])
def test_a_smaller_grid_reads_the_relative_tables_by_offset(options):
    """DINO's local crops on a BEiT encoder: a 2x3 grid of a 4x4-grid model. Each block's (and the shared)
    relative position bias must be the large grid's bias between the same offsets: the rows and columns
    of the class token and of the top-left 2x3 patches of the large grid's bias matrix. The model's own
    grid is untouched afterwards."""
    torch.manual_seed(0)
    encoder = randomized(create_encoder("beit_base_patch16", **{**TINY, **options}, num_classes=0)).eval()
    small = torch.randn(2, 3, 16, 24)
    full = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = encoder.forward_features(full)
    tables = [m for m in encoder.modules() if getattr(m, "relative_position_index", None) is not None
              and getattr(m, "window_size", None) is not None]
    assert tables
    large = [m.relative_position_bias_table[m.relative_position_index.view(-1)].view(17, 17, -1) for m in tables]
    kept = [0] + [1 + i * 4 + j for i in range(2) for j in range(3)]
    # the same from BEiT's formula: offset (dy, dx) -> entry (dy + 3) * 7 + (dx + 3) of a 4x4 grid's table,
    # the class token's rows, columns and corner the table's last three entries
    cells = [(i, j) for i in range(2) for j in range(3)]
    entry = torch.full((7, 7), 0, dtype=torch.long)
    for q, (qi, qj) in enumerate(cells, 1):
        for k, (ki, kj) in enumerate(cells, 1):
            entry[q, k] = (qi - ki + 3) * 7 + (qj - kj + 3)
    entry[0, 1:], entry[1:, 0], entry[0, 0] = 49, 50, 51
    with encoder.other_grid((2, 3)):
        for module, bias in zip(tables, large):
            got = module.relative_position_bias_table[module.relative_position_index.view(-1)].view(7, 7, -1)
            assert torch.equal(got, bias[kept][:, kept])
            assert torch.equal(got, module.relative_position_bias_table[entry.view(-1)].view(7, 7, -1))
    with torch.no_grad():
        tokens = encoder.forward_features(small)
        assert tokens.shape == (2, 1 + 6, 32) and torch.isfinite(tokens).all()
        assert torch.equal(encoder.forward_features(full), before)  # restored
    with pytest.raises(ValueError, match="smaller grids only"):
        encoder.forward_features(torch.randn(1, 3, 40, 32))
