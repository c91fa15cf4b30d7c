"""Weights in (timm, official MAE, DeiT, ours) and out (safetensors that timm loads), safely."""
import argparse
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from ssl_vit import create_encoder, export_backbone, export_model, load_weights
from ssl_vit.weights import CheckpointError, encoder_config_of

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def _timm_tiny(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **kwargs}).eval()


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_timm_state_dict_file_loads_strictly(tmp_path):
    source = _timm_tiny(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    ours = create_encoder("vit_tiny_patch16", num_classes=10, **TINY).eval()
    report = load_weights(ours, tmp_path / "timm.pth", strict=True, verbose=False)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(source.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(_images()), source(_images()), atol=1e-6)


def _mae_checkpoint(encoder, decoder_dim=32):
    """An official-MAE-layout checkpoint: {'model': encoder keys + decoder_* + mask_token}."""
    state = dict(encoder.state_dict())
    state.pop("head.weight", None), state.pop("head.bias", None)
    state.update({"mask_token": torch.randn(1, 1, decoder_dim),
                  "decoder_embed.weight": torch.randn(decoder_dim, encoder.embed_dim),
                  "decoder_embed.bias": torch.zeros(decoder_dim),
                  "decoder_pos_embed": torch.zeros(1, 1 + encoder.patch_embed.num_patches, decoder_dim),
                  "decoder_pred.weight": torch.randn(8 * 8 * 3, decoder_dim),
                  "decoder_pred.bias": torch.zeros(8 * 8 * 3)})
    return {"model": state, "epoch": 799, "args": argparse.Namespace(blr=1.5e-4, mask_ratio=0.75)}


def test_official_mae_checkpoint_into_an_encoder(tmp_path, capsys):
    pretrained = create_encoder("vit_tiny_patch16", pos_embed="sincos", **TINY)
    torch.save(_mae_checkpoint(pretrained), tmp_path / "mae_pretrain.pth")
    # pre-training encoder: everything but the decoder loads
    encoder = create_encoder("vit_tiny_patch16", pos_embed="sincos", **TINY)
    report = load_weights(encoder, tmp_path / "mae_pretrain.pth")
    assert report.format == "official MAE (with decoder)"
    assert sorted(report.unexpected) == sorted(["mask_token", "decoder_embed.weight", "decoder_embed.bias",
                                                "decoder_pos_embed", "decoder_pred.weight", "decoder_pred.bias"])
    assert not report.missing
    assert "decoder" in capsys.readouterr().out
    # fine-tuning layout (MAE main_finetune.py): avg pool + new fc_norm + new head; `norm` unused
    finetune = create_encoder("vit_tiny_patch16", num_classes=10, global_pool="avg", **TINY)
    report = load_weights(finetune, tmp_path / "mae_pretrain.pth", verbose=False)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias"} <= set(report.unexpected)
    assert torch.equal(finetune.pos_embed.data, pretrained.pos_embed)  # the sin-cos table, now trainable
    assert torch.equal(finetune.blocks[1].mlp.fc2.weight, pretrained.blocks[1].mlp.fc2.weight)


def test_deit_checkpoint_with_ema_and_distillation(tmp_path):
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=4, **TINY).eval()
    ema = {k: v + 1 for k, v in deit.state_dict().items()}
    torch.save({"model": deit.state_dict(), "model_ema": ema, "epoch": 299,
                "args": argparse.Namespace(distillation_type="hard")}, tmp_path / "deit.pth")
    ours = create_encoder("vit_tiny_patch16", num_classes=4, dist_token=True, **TINY).eval()
    report = load_weights(ours, tmp_path / "deit.pth", strict=True, verbose=False)
    assert report.format == "DeiT distilled"
    assert any("use_ema=True" in n for n in report.notes)
    with torch.no_grad():
        assert torch.allclose(ours(_images()), deit(_images()), atol=1e-6)
    load_weights(ours, tmp_path / "deit.pth", use_ema=True, strict=True, verbose=False)
    assert torch.equal(ours.dist_token, ema["dist_token"])
    # a plain (non-distilled) encoder drops the distillation token and its position row
    plain = create_encoder("vit_tiny_patch16", num_classes=4, **TINY)
    report = load_weights(plain, tmp_path / "deit.pth", verbose=False)
    assert set(report.unexpected) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert torch.equal(plain.pos_embed[:, 1:], deit.pos_embed[:, 2:])


def test_distillation_token_added_to_a_backbone_without_one():
    source = create_encoder("vit_tiny_patch16", **TINY)
    student = create_encoder("vit_tiny_patch16", dist_token=True, num_classes=3, **TINY)
    report = load_weights(student, source.state_dict(), verbose=False)
    assert torch.equal(student.dist_token, source.cls_token)
    assert torch.equal(student.pos_embed[:, 1], source.pos_embed[:, 0])
    assert torch.equal(student.pos_embed[:, 2:], source.pos_embed[:, 1:])
    assert any("dist_token" in r for r in report.resized)


def test_position_embedding_resampled_and_head_dropped():
    source = _timm_tiny(num_classes=10)
    ours = create_encoder("vit_tiny_patch16", num_classes=3, **{**TINY, "img_size": 48})
    report = load_weights(ours, source.state_dict(), verbose=False)
    assert report.resized == ["pos_embed grid (4, 4) -> (6, 6) (bicubic, as timm)"]
    assert set(report.missing) == {"head.weight", "head.bias"}
    with pytest.raises(CheckpointError, match="strict"):
        load_weights(ours, source.state_dict(), strict=True, verbose=False)


def test_sincos_encoder_recomputes_its_table_on_another_grid():
    source = create_encoder("vit_tiny_patch16", pos_embed="sincos", **TINY)
    target = create_encoder("vit_tiny_patch16", pos_embed="sincos", **{**TINY, "img_size": 64})
    expected = target.pos_embed.clone()
    report = load_weights(target, source.state_dict(), verbose=False)
    assert "recomputed" in report.resized[0]
    assert torch.equal(target.pos_embed, expected)


def test_wrong_architecture_is_explained():
    source = _timm_tiny()
    with pytest.raises(CheckpointError, match="model.arch"):
        load_weights(create_encoder("vit_tiny_patch16", **{**TINY, "embed_dim": 96, "num_heads": 3}),
                     source.state_dict(), verbose=False)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _timm_tiny().state_dict(), "payload": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load .*weights_only"):
        load_weights(create_encoder("vit_tiny_patch16", **TINY), tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(create_encoder("vit_tiny_patch16", **TINY), tmp_path / "nope.pth")


@pytest.mark.parametrize("options", [
    dict(),
    dict(global_pool="avg"),
    dict(pos_embed="sincos", img_size=[32, 48]),
    dict(dist_token=True),
    dict(layer_scale_init=1e-4, class_token=False, global_pool="avg"),
])
def test_exported_backbone_loads_in_timm_with_the_same_features(tmp_path, options):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", num_classes=6, **{**TINY, **options}).eval()
    path = export_backbone(encoder, tmp_path / "backbone.safetensors")
    description = json.loads(path.with_suffix(".json").read_text())
    assert not any(k.startswith("head") for k in load_file(path))
    assert encoder_config_of(path)["num_classes"] == 0
    images = _images(size=32) if "img_size" not in options else torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
        if encoder.dist_token is not None:
            expected = torch.stack(encoder.forward_heads(encoder.forward_features(images), pre_logits=True)).mean(0)
        kwargs = {k: v for k, v in description["timm"]["kwargs"].items() if k != "num_classes"}
        # the documented call (non-strict in timm, since num_classes differs from the cfg's 1000) ...
        loose = timm.create_model(description["timm"]["model_name"], pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
        # ... and the strict one the JSON recommends
        strict = eval(description["load_with_timm"], {"timm": timm}).eval()
        for model in (loose, strict):
            assert torch.allclose(model(images), expected, atol=1e-5)


def test_exported_model_with_head_loads_in_timm_and_back(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny_patch16", num_classes=6, **TINY).eval()
    path = export_model(encoder, tmp_path / "model.safetensors")
    description = json.loads(Path(path).with_suffix(".json").read_text())
    timm_model = eval(description["load_with_timm"], {"timm": timm}).eval()
    with torch.no_grad():
        assert torch.allclose(timm_model(_images()), encoder(_images()), atol=1e-5)
    again = create_encoder("vit_tiny_patch16", num_classes=6, **TINY).eval()
    report = load_weights(again, path, strict=True, verbose=False)
    assert report.format == "ssl_vit model"
    with torch.no_grad():
        assert torch.equal(again(_images()), encoder(_images()))


def test_exports_are_safetensors_only(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        export_backbone(create_encoder("vit_tiny_patch16", **TINY), tmp_path / "backbone.pth")
