"""The shared ViT encoder (Dosovitskiy et al. 2021), built from timm's layers.

One module serves every task: supervised classification, MAE pre-training (which runs the
blocks on the visible patches only, He et al. 2022 §3), SimMIM pre-training (every position, the
masked ones replaced by a learned mask token, Xie et al. 2022 §3.2) and DeiT distillation (a second
prefix token, Touvron et al. 2021 §4). Parameter names equal timm's `VisionTransformer` /
`VisionTransformerDistilled`, so timm, official MAE and DeiT state dicts load without renaming
and our exports load in timm.

    image [B, C, H, W]
      -> patch_embed                      [B, L, D]      (conv patchify, or a timm CNN + 1x1 proj)
      -> masked ones -> mask_token (mask) [B, L, D]      (SimMIM, BEiT: mask_token.py)
      -> + position embedding (patches)   [B, L, D]      (learned 1-D / 2-D, sin-cos: vit_positions.py)
      -> keep ids_keep (MAE)              [B, K, D]
      -> prepend cls (+ dist) tokens      [B, P + K, D]  (each with its own position embedding)
      -> blocks -> norm                   [B, P + K, D]
      -> pool (cls token | mean) -> fc_norm -> head
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import (HybridEmbed, LayerNorm, PatchEmbed, calculate_drop_path_rates, resample_abs_pos_embed,
                         trunc_normal_)
from timm.models import checkpoint_seq, named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm

from ..config import ConfigError, ModelConfig, check_choice
from .base import EncoderFamily, LoadReport, check_positive, named_size_kwargs, recipe_size, register_family
from .mask_token import new_mask_token, replace_masked_patches
from .vit_attention import attention_maps
from .vit_options import ARCHS, POS_EMBEDS, check_divisible, check_options, hybrid_backbone, pair
from .vit_positions import learned_2d_table, sincos_2d_pos_embed
from .vit_weights import config_from_state, fit_state_dict, timm_equivalent

@dataclass
class ViTConfig(ModelConfig):
    """The `model:` keys of our ViT (model.arch = one of ARCHS); None: the named size's value."""
    patch_size: Optional[int] = None      # pixels per patch side (hybrids: feature-map cells)
    embed_dim: Optional[int] = None       # set these for custom sizes
    depth: Optional[int] = None           # transformer blocks
    num_heads: Optional[int] = None       # attention heads per block
    mlp_ratio: Optional[float] = None     # MLP width / embed_dim (4 in every named size)
    global_pool: str = "token"            # token | avg
    fc_norm: Optional[bool] = None        # None: on for avg pooling
    pos_embed: str = "sincos"             # learn | learn2d | sincos; MAE's encoder uses fixed sin-cos (§3)
    class_token: bool = True              # a class token before the patches
    dist_token: bool = False              # DeiT's distillation token (task.name=distill)
    reg_tokens: int = 0                   # register tokens after the class token (Darcet et al. 2024), dropped from the output
    layer_scale_init: Optional[float] = None  # LayerScale's initial value (CaiT, DeiT III); None: none
    patch_embed: str = "conv"             # conv | hybrid
    backbone: Optional[str] = None        # timm CNN of a hybrid, e.g. resnet26d
    backbone_stride: int = 16             # which of the CNN's feature maps a hybrid embeds (by stride)


class VisionTransformer(nn.Module):
    """ViT encoder with timm's parameter names that can run on a subset of the patch tokens.

    Args (keyword-only):
        img_size: int or (H, W), a multiple of the patch size (of the CNN stride for hybrids).
        patch_size: pixels per patch side; for `patch_embed="hybrid"` it is counted in CNN
            feature-map cells (1 = one token per cell, as the ViT paper's hybrids).
        num_classes: classifier outputs, 0 for features only.
        global_pool: "token" (class token) or "avg" (mean of the patch tokens).
        fc_norm: norm after pooling instead of before (None: on for "avg", as MAE fine-tuning).
        pos_embed: "learn" (a trained 1-D table), "learn2d" (trained row and column tables, the ViT
            paper's 2-D ablation; not loadable by timm) or "sincos" (MAE's fixed table: a buffer,
            still saved). See vit_positions.py.
        class_token / dist_token: prefix tokens; `dist_token` adds DeiT's distillation token and,
            with `num_classes > 0`, its `head_dist`.
        layer_scale_init: LayerScale init value (CaiT / DeiT III), None for none.
        patch_embed: "conv" (non-overlapping patches) or "hybrid" (a timm CNN's feature map).
        backbone / backbone_stride: the timm CNN of a hybrid and which feature map (by stride) to use.
    """

    def __init__(
            self,
            *,
            arch: str = "custom",
            img_size: int | Sequence[int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 0,
            global_pool: str = "token",
            fc_norm: Optional[bool] = None,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            pos_embed: str = "learn",
            class_token: bool = True,
            dist_token: bool = False,
            reg_tokens: int = 0,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            layer_scale_init: Optional[float] = None,
            patch_embed: str = "conv",
            backbone: Optional[str] = None,
            backbone_stride: int = 16,
    ) -> None:
        super().__init__()
        img_size = pair(img_size, "img_size")
        check_options(global_pool=global_pool, pos_embed=pos_embed, patch_embed=patch_embed,
                      class_token=class_token, dist_token=dist_token, backbone=backbone,
                      embed_dim=embed_dim, num_heads=num_heads, reg_tokens=reg_tokens)
        # Recorded so that exports can say exactly how to rebuild this encoder.
        self.config = dict(
            arch=arch, img_size=list(img_size), patch_size=patch_size, in_chans=in_chans,
            num_classes=num_classes, global_pool=global_pool, fc_norm=fc_norm, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            pos_embed=pos_embed, class_token=class_token, dist_token=dist_token, reg_tokens=reg_tokens,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, layer_scale_init=layer_scale_init, patch_embed=patch_embed,
            backbone=backbone, backbone_stride=backbone_stride)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        # class, distillation, then register tokens: the order of timm's ViT (cls, reg); the registers
        # are read by no head and dropped from every output (Darcet et al. 2024, §2.3)
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + int(dist_token) + reg_tokens
        # 1-D tables cover the prefix tokens too (timm/DeiT layout); the 2-D tables only the patches
        self.no_embed_class = pos_embed == "learn2d"
        self.grad_checkpointing = False
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        if patch_embed == "hybrid":
            self.patch_embed = HybridEmbed(hybrid_backbone(backbone, backbone_stride, in_chans),
                                           img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                           embed_dim=embed_dim)
        else:
            check_divisible(img_size, patch_size)
            # strict_img_size=False: other sizes run too (multi-crop views), the positions resampled
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = self.num_prefix_tokens + num_patches
        self.pos_embed_row = self.pos_embed_col = None
        if pos_embed == "sincos":
            # Fixed, not trained (MAE §3); a persistent buffer so checkpoints carry it, as MAE's do.
            self.register_buffer("pos_embed", sincos_2d_pos_embed(
                embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens))
        elif pos_embed == "learn2d":
            # ViT paper appendix D.4: "two sets of embeddings are learned, each for one of the axes ...
            # each with size D/2"; the class token is a learned vector already, it gets no position.
            self.pos_embed = None
            height, width = self.patch_embed.grid_size
            self.pos_embed_row = nn.Parameter(torch.zeros(1, height, embed_dim // 2))
            self.pos_embed_col = nn.Parameter(torch.zeros(1, width, embed_dim // 2))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.mask_token = None  # add_mask_token(): only for the mask-token forward (SimMIM, BEiT)

        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depth)  # linear rule, DeiT §6
        self.blocks = nn.Sequential(*[
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  init_values=layer_scale_init, drop_path=drop_path_rates[i], norm_layer=LayerNorm)
            for i in range(depth)])
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if dist_token:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------------------------------
    # initialisation: timm's ViT scheme (MAE and DeiT re-initialise what they need to)

    def init_weights(self) -> None:
        for table in (self.pos_embed, self.pos_embed_row, self.pos_embed_col):
            if isinstance(table, nn.Parameter):
                trunc_normal_(table, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # timm's
        # needs_reset=False: a hybrid's CNN keeps timm's own initialisation, as in timm's ViT
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    # ---------------------------------------------------------------------------------------
    # forward

    def add_mask_token(self) -> nn.Parameter:
        """The learned token that `forward_features(mask=...)` puts in place of masked patches; tasks
        that use it (SimMIM) add it. Not part of `config` nor of backbone exports (mask_token.py)."""
        if self.mask_token is None:
            self.mask_token = new_mask_token(self.embed_dim, device=self.blocks[0].norm1.weight.device)
        return self.mask_token

    def patch_positions(self, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The patches' position embeddings, [1, L, D]; for another `grid` than the model's (a view of
        another size: DINO's local crops), the table resampled on the fly, bicubic, as timm's
        `dynamic_img_size` and DINO's `interpolate_pos_encoding` do (the prefix tokens keep theirs)."""
        if self.pos_embed is None:
            table = learned_2d_table(self.pos_embed_row, self.pos_embed_col)
        else:
            table = self.pos_embed[:, self.num_prefix_tokens:]
        if grid is None or tuple(grid) == self.grid_size:
            return table
        return resample_abs_pos_embed(table, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=0)

    def prefix_tokens(self, batch_size: int) -> list[torch.Tensor]:
        """Class (distillation, register) tokens with their position embeddings added (a 1-D table has
        an entry for each, as timm's), [B, 1 or N, D] each."""
        tokens = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.pos_embed is not None:
            start, placed = 0, []
            for t in tokens:
                placed.append(t + self.pos_embed[:, start:start + t.shape[1]])
                start += t.shape[1]
            tokens = placed
        return [t.expand(batch_size, -1, -1) for t in tokens]

    def embed_patches(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch embedding (masked patches replaced by the mask token) plus position embedding:
        [B, C, H, W] -> [B, L, D]."""
        grid = None
        if tuple(images.shape[-2:]) != tuple(self.patch_embed.img_size):
            if not isinstance(self.patch_embed, PatchEmbed):
                raise ValueError(f"a hybrid ViT runs {tuple(self.patch_embed.img_size)} images only, not "
                                 f"{tuple(images.shape[-2:])}")
            check_divisible(tuple(images.shape[-2:]), self.patch_size)
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = self.patch_embed(images)                            # [B, L, D]
        if mask is not None:
            x = replace_masked_patches(x, mask, self.mask_token)
        return x + self.patch_positions(grid)

    def forward_features(self, images: torch.Tensor, ids_keep: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All tokens after the final norm, [B, P + L, D]. With `ids_keep` [B, K] only those patch
        tokens (in that order) plus the P prefix tokens go through the blocks: [B, P + K, D] (MAE).
        With `mask` [B, L] (1 = masked) every position does, the masked patches' embeddings replaced
        by the learned mask token before the positions are added (SimMIM, BEiT)."""
        if ids_keep is not None and mask is not None:
            raise ValueError("give ids_keep (drop patches, MAE) or mask (replace them by the mask token, "
                             "SimMIM / BEiT), not both")
        x = self.embed_patches(images, mask)                    # [B, L, D]
        if ids_keep is not None:
            x = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
        x = torch.cat([*self.prefix_tokens(x.shape[0]), x], dim=1)  # [B, P + K, D]
        return self.run_blocks(x)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer blocks and the final norm on a token sequence [B, N, D]."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D]: the class token, or the mean of the patch tokens."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, num_classes] from `forward_features`' output. With a distillation token, the
        mean of both heads' logits (DeiT's inference rule, §5); `forward_heads` gives each."""
        if self.head_dist is not None:
            logits, logits_dist = self.forward_heads(x, pre_logits=pre_logits)
            return (logits + logits_dist) / 2
        features = self.head_drop(self.fc_norm(self.pool(x)))
        return features if pre_logits else self.head(features)

    def forward_heads(self, x: torch.Tensor, pre_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(class-token logits, distillation-token logits) of a DeiT-distilled encoder."""
        if self.head_dist is None:
            raise RuntimeError("forward_heads needs an encoder built with dist_token=True")
        cls_features, dist_features = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return cls_features, dist_features
        return self.head(cls_features), self.head_dist(dist_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    # ---------------------------------------------------------------------------------------
    # what optimisers and wrappers ask of a timm model

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        """Pixels per patch side (for a hybrid: CNN stride times patch size in feature cells)."""
        if isinstance(self.patch_embed, HybridEmbed):
            return self.patch_embed.feat_ratio()
        return self.patch_embed.patch_size[0]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's names; the 2-D tables and the mask token too, when the encoder has them (SimMIM's
        Swin encoder and our MAE keep their mask tokens out of weight decay as well)."""
        present = {name for name in ("pos_embed_row", "pos_embed_col", "mask_token") if getattr(self, name) is not None}
        return {"pos_embed", "cls_token", "dist_token", "reg_token"} | present

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping (stem, then one group per block, final norm with the last block),
        used by timm's layer-wise lr decay."""
        return dict(stem=r"^cls_token|dist_token|reg_token|pos_embed|patch_embed|mask_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = self.config["num_classes"] = num_classes
        device = self.blocks[0].norm1.weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes else nn.Identity()
        if self.dist_token is not None:
            self.head_dist = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes else nn.Identity()


ENCODER_OPTIONS = [name for name in VisionTransformer.__init__.__kwdefaults__ if name != "arch"]


# -------------------------------------------------------------------------------------------
# the family: how recipes, checkpoints, exports and pictures reach this encoder


@register_family
class ViT(EncoderFamily):
    """our timm-compatible ViT: MAE's visible-patch and SimMIM's mask-token forwards, DeiT's distillation token, hybrids."""
    name = "vit"
    Config = ViTConfig
    archs = ARCHS
    masked_forwards = frozenset({"visible", "mask_token"})
    any_image_size = True
    architecture_keys = ("arch", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                         "class_token", "reg_tokens", "layer_scale_init", "patch_embed", "backbone", "backbone_stride")

    @classmethod
    def claims(cls, arch: str) -> bool:
        return arch in ARCHS or arch == "custom"  # "custom": a VisionTransformer built by hand

    @classmethod
    def validate(cls, cfg) -> None:
        check_positive(cfg, "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "backbone_stride")
        for key, options in (("model.global_pool", ("token", "avg")), ("model.pos_embed", POS_EMBEDS),
                             ("model.patch_embed", ("conv", "hybrid"))):
            check_choice(cfg, key, options)
        m = recipe_size(cfg, ARCHS)
        try:
            check_options(global_pool=m["global_pool"], pos_embed=m["pos_embed"], patch_embed=m["patch_embed"],
                          class_token=m["class_token"], dist_token=m["dist_token"], backbone=m.get("backbone"),
                          embed_dim=m["embed_dim"], num_heads=m["num_heads"], reg_tokens=m.get("reg_tokens", 0))
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        stride = m["patch_size"] * (m["backbone_stride"] if m["patch_embed"] == "hybrid" else 1)
        size = pair(m["img_size"], "model.img_size")
        if size[0] % stride or size[1] % stride:
            fits = [max(stride, s // stride * stride) for s in size]
            raise ConfigError(f"model.img_size={list(size) if size[0] != size[1] else size[0]} is not a multiple of "
                              f"the {stride}-pixel patches (model.patch_size={m['patch_size']}"
                              f"{', model.backbone_stride=' + str(m['backbone_stride']) if m['patch_embed'] == 'hybrid' else ''}): "
                              f"use e.g. model.img_size={fits[0] if fits[0] == fits[1] else fits}")

    @classmethod
    def create(cls, arch: str = "vit_base_patch16", **options: Any) -> VisionTransformer:
        """A named size; any constructor argument of `VisionTransformer` may be overridden."""
        arch = options.pop("arch", arch)
        kwargs = named_size_kwargs(arch, ARCHS, options, ENCODER_OPTIONS,
                                   hint=" (and override embed_dim/depth/num_heads/patch_size for custom sizes)")
        if kwargs.get("patch_embed") == "hybrid" and options.get("patch_size") is None:
            kwargs["patch_size"] = 1  # one token per CNN feature-map cell, as the ViT paper's hybrids
        return VisionTransformer(arch=arch, **kwargs)

    @classmethod
    def fit_state_dict(cls, encoder: VisionTransformer, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        return fit_state_dict(encoder, state, metadata, report)

    @classmethod
    def fsdp_units(cls, encoder: VisionTransformer) -> list[nn.Module]:
        return list(encoder.blocks)

    @classmethod
    def backbone_state(cls, encoder: VisionTransformer) -> dict[str, torch.Tensor]:
        """Without the classifier heads and the mask token (timm's ViT has none; mask_token.py)."""
        return {k: v for k, v in super().backbone_state(encoder).items() if k != "mask_token"}

    @classmethod
    def config_from_state(cls, state, num_heads: Optional[int] = None, recipe=None) -> dict[str, Any]:
        return config_from_state(state, num_heads=num_heads, recipe=recipe)

    @classmethod
    def timm_equivalent(cls, config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        return timm_equivalent(config)

    @classmethod
    def draws_attention(cls, encoder: VisionTransformer) -> bool:
        return encoder.cls_token is not None

    @classmethod
    def attention_maps(cls, encoder: VisionTransformer, images: torch.Tensor, *, layer: int = -1,
                       heads: bool = True, rollout: bool = False) -> dict[str, torch.Tensor]:
        return attention_maps(encoder, images, layer=layer, heads=heads, rollout=rollout)
