"""Our ViT exports as Hugging Face `transformers` models: a folder with config.json and model.safetensors
that `from_pretrained` loads offline, for people whose tools speak transformers.

    backbone.safetensors   -> ViTModel                    (the encoder; last_hidden_state = our tokens)
    model.safetensors      -> ViTForImageClassification   (a classifier: head -> classifier, labels named)
    model.safetensors      -> ViTMAEForPreTraining        (an MAE with its decoder; same loss for the same noise)

Keys are written in transformers' canonical (hub) layout, which every transformers version loads:
timm's fused `qkv` is split into query / key / value, `blocks.i` becomes `encoder.layer.i`, and so on.
Only what transformers' ViT can express is exported: a plain ViT (class token, token pooling, no
layer scale, no distillation token, no hybrid); anything else stops with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from ..config import CheckpointError
from ..models.files import export_description, read_checkpoint
from ..tasks.mae import decoder_depth

LAYER_NORM_EPS = 1e-6  # timm's and MAE's LayerNorm (transformers' ViT default is 1e-12)


def export_hf(path: str | Path, out: str | Path, classes: Optional[list[str]] = None) -> Path:
    """Write the transformers folder `out` for our export at `path`; returns the folder."""
    path, out = Path(path), Path(out)
    state, metadata = read_checkpoint(path)
    if metadata.get("format") != "ssl_vit":
        raise CheckpointError(f"{path} is not one of our exports (no ssl_vit metadata): export it with ssl_vit first")
    encoder = json.loads(metadata["encoder"])
    description = export_description(path)
    _check_expressible(encoder)
    if "decoder_pred.weight" in state:
        config, tensors = _mae(state, encoder, description.get("task") or {})
    else:
        config, tensors = _vit(state, encoder, classes or description.get("classes"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _check_expressible(encoder: dict) -> None:
    arch = str(encoder.get("arch", ""))
    problems = []
    if not arch.startswith("vit_") and arch != "custom":
        problems.append(f"arch {arch} (only our ViT)")
    for key, wanted in (("class_token", True), ("dist_token", False), ("reg_tokens", 0), ("global_pool", "token"),
                        ("layer_scale_init", None), ("patch_embed", "conv"), ("qkv_bias", True)):
        if encoder.get(key, wanted) != wanted:
            problems.append(f"{key}={encoder.get(key)} (transformers' ViT has {key}={wanted})")
    if encoder.get("fc_norm"):
        problems.append("fc_norm=True")
    if problems:
        raise CheckpointError("transformers' ViT cannot express this encoder: " + "; ".join(problems))


def _vit_config(encoder: dict) -> dict[str, Any]:
    size = encoder["img_size"]
    if size[0] != size[1]:
        raise CheckpointError(f"transformers' ViT takes square images; this encoder's are {size}")
    return dict(hidden_size=encoder["embed_dim"], num_hidden_layers=encoder["depth"],
                num_attention_heads=encoder["num_heads"], intermediate_size=int(encoder["embed_dim"] * encoder["mlp_ratio"]),
                image_size=size[0], patch_size=encoder["patch_size"], num_channels=encoder["in_chans"],
                qkv_bias=True, hidden_act="gelu", layer_norm_eps=LAYER_NORM_EPS,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _encoder_tensors(state: dict, depth: int, prefix: str) -> dict[str, torch.Tensor]:
    """timm's ViT keys -> transformers' ViT (or ViTMAE) encoder keys under `prefix`."""
    out = {f"{prefix}embeddings.cls_token": state["cls_token"],
           f"{prefix}embeddings.position_embeddings": state["pos_embed"],
           f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           f"{prefix}layernorm.weight": state["norm.weight"], f"{prefix}layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        out.update(_block(state, f"blocks.{i}.", f"{prefix}encoder.layer.{i}."))
    return out


def _block(state: dict, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    """One transformer block: timm's fused qkv split into query / key / value."""
    out = {}
    for kind in ("weight", "bias"):
        query, key, value = state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
        out.update({f"{theirs}attention.attention.query.{kind}": query, f"{theirs}attention.attention.key.{kind}": key,
                    f"{theirs}attention.attention.value.{kind}": value,
                    f"{theirs}attention.output.dense.{kind}": state[f"{ours}attn.proj.{kind}"],
                    f"{theirs}layernorm_before.{kind}": state[f"{ours}norm1.{kind}"],
                    f"{theirs}layernorm_after.{kind}": state[f"{ours}norm2.{kind}"],
                    f"{theirs}intermediate.dense.{kind}": state[f"{ours}mlp.fc1.{kind}"],
                    f"{theirs}output.dense.{kind}": state[f"{ours}mlp.fc2.{kind}"]})
    return out


def _vit(state: dict, encoder: dict, classes: Optional[list[str]]):
    config = {"model_type": "vit", **_vit_config(encoder)}
    classifier = encoder.get("num_classes", 0) > 0 and "head.weight" in state
    if not classifier:
        config["architectures"] = ["ViTModel"]
        return config, _encoder_tensors(state, encoder["depth"], "")
    labels = list(classes) if classes else [str(i) for i in range(encoder["num_classes"])]
    config.update(architectures=["ViTForImageClassification"], id2label=dict(enumerate(labels)),
                  label2id={name: i for i, name in enumerate(labels)})
    tensors = _encoder_tensors(state, encoder["depth"], "vit.")
    tensors.update({"classifier.weight": state["head.weight"], "classifier.bias": state["head.bias"]})
    return config, tensors


def _mae(state: dict, encoder: dict, task: dict):
    decoder_dim = state["decoder_embed.weight"].shape[0]
    depth = decoder_depth(state)
    heads = task.get("decoder_heads")
    if not heads:
        raise CheckpointError("the MAE export's JSON does not say its decoder_heads (task.decoder_heads)")
    mlp = state["decoder_blocks.0.mlp.fc1.weight"].shape[0]
    config = {"model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"], **_vit_config(encoder),
              "decoder_hidden_size": decoder_dim, "decoder_num_hidden_layers": depth,
              "decoder_num_attention_heads": heads, "decoder_intermediate_size": mlp,
              "mask_ratio": task.get("mask_ratio", 0.75), "norm_pix_loss": task.get("norm_pix_loss", True)}
    tensors = _encoder_tensors(state, encoder["depth"], "vit.")
    tensors.update({"decoder.mask_token": state["mask_token"], "decoder.decoder_pos_embed": state["decoder_pos_embed"],
                    "decoder.decoder_embed.weight": state["decoder_embed.weight"],
                    "decoder.decoder_embed.bias": state["decoder_embed.bias"],
                    "decoder.decoder_norm.weight": state["decoder_norm.weight"],
                    "decoder.decoder_norm.bias": state["decoder_norm.bias"],
                    "decoder.decoder_pred.weight": state["decoder_pred.weight"],
                    "decoder.decoder_pred.bias": state["decoder_pred.bias"]})
    for i in range(depth):
        tensors.update(_block(state, f"decoder_blocks.{i}.", f"decoder.decoder_layers.{i}."))
    return config, tensors
