"""BEiT's encoder (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers") as a family:
timm's `Beit` with the mask-token forward that BEiT and SimMIM pre-train it with.

Why a family of its own, on timm's class, and not options on our ViT: BEiT's ViT differs from timm's
`VisionTransformer` in its parameters, not only in its options (q and v biases instead of a qkv bias,
`gamma_1` / `gamma_2` layer scale, relative position tables per block or shared), so the same module
cannot hold both key sets; timm's `Beit` already has all of it, with BEiT's initialisation rescaling,
and subclassing it keeps timm's key names exactly: timm's `beit_*` state dicts load as they are and
our exports load back into timm's `Beit` (the command in the JSON).

    image [B, C, H, W]
      -> patch_embed                        [B, L, D]
      -> masked ones -> mask_token (mask)   [B, L, D]      (mask_token.py)
      -> prepend cls (+ pos_embed if any)   [B, 1 + L, D]
      -> blocks (relative position bias     [B, 1 + L, D]  per block, or one table shared by all)
      -> norm (token pooling) | mean + fc_norm (avg pooling) -> head

Options (the `model:` keys): `use_rel_pos_bias` (one table per block: BEiT fine-tuning and timm's
`beit_*_224`), `use_shared_rel_pos_bias` (one table for all blocks: BEiT's and SimMIM's pre-training),
`use_abs_pos_emb` (off in BEiT), `layer_scale_init` (0.1 for Base, 1e-5 for Large; 0 for none),
`qkv_bias` (BEiT's q and v biases), `global_pool` (avg + fc_norm, or token).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table, trunc_normal_
from timm.models._manipulate import checkpoint
from timm.models.beit import Beit

from ..config import CheckpointError, ConfigError, ModelConfig, check_choice
from .base import (EncoderFamily, LoadReport, check_positive, drop_other_heads, named_size_kwargs, recipe_size,
                   register_family, shape_text)
from .mask_token import new_mask_token, replace_masked_patches
from .vit_attention import attention_maps
from .vit_options import check_divisible, pair

# BEiT-B and BEiT-L (Bao et al. 2022: the ViT-B and ViT-L shapes); layer scale 0.1 for Base and 1e-5 for
# Large (unilm beit/README.md: "--layer_scale_init_value: 0.1 for base, 1e-5 for large")
ARCHS: dict[str, dict[str, Any]] = {
    "beit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, layer_scale_init=0.1),
    "beit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                               layer_scale_init=1e-5),
}
INIT_STD = 0.02                           # unilm beit/modeling_pretrain.py `init_std`
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
TABLE = ".relative_position_bias_table"


@dataclass
class BEiTConfig(ModelConfig):
    """The `model:` keys of the BEiT encoder (model.arch = one of ARCHS); None: the named size's value."""
    arch: str = "beit_base_patch16"
    patch_size: Optional[int] = None      # None: the named size's (16)
    embed_dim: Optional[int] = None       # set these for custom sizes
    depth: Optional[int] = None           # transformer blocks
    num_heads: Optional[int] = None       # attention heads per block
    mlp_ratio: Optional[float] = None     # MLP width / embed_dim (4 in both named sizes)
    global_pool: str = "avg"              # avg (+ fc_norm: BEiT fine-tuning, timm) | token (final norm, class token)
    fc_norm: Optional[bool] = None        # None: on for avg pooling
    qkv_bias: bool = True                 # BEiT's q and v biases (k has none)
    layer_scale_init: Optional[float] = None  # 0.1 Base, 1e-5 Large (the named size's); 0: no layer scale
    use_abs_pos_emb: bool = False         # BEiT pre-trains without (run_beit_pretraining.py --abs_pos_emb off)
    use_rel_pos_bias: bool = True         # one table per block (BEiT fine-tuning; timm's beit_*_224)
    use_shared_rel_pos_bias: bool = False  # one table for all blocks (BEiT and SimMIM pre-training)


class BEiT(Beit):
    """timm's `Beit` with the mask-token forward, BEiT's pre-training initialisation and the `config`
    our exports record. Keyword-only arguments as `BEiTConfig`; `layer_scale_init` is timm's
    `init_values`, `fc_norm` its `use_fc_norm`."""

    def __init__(
            self,
            *,
            arch: str = "beit_base_patch16",
            img_size: int | tuple[int, int] | list[int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 0,
            global_pool: str = "avg",
            fc_norm: Optional[bool] = None,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            layer_scale_init: Optional[float] = 0.1,
            use_abs_pos_emb: bool = False,
            use_rel_pos_bias: bool = True,
            use_shared_rel_pos_bias: bool = False,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        img_size = pair(img_size, "img_size")
        check_options(global_pool=global_pool, embed_dim=embed_dim, num_heads=num_heads,
                      layer_scale_init=layer_scale_init)
        check_divisible(img_size, patch_size)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         qkv_bias=qkv_bias, mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         init_values=layer_scale_init or None, use_abs_pos_emb=use_abs_pos_emb,
                         use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias,
                         use_fc_norm=fc_norm)
        # Recorded so that exports can say exactly how to rebuild this encoder.
        self.config = dict(
            arch=arch, img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, fc_norm=fc_norm, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_scale_init=layer_scale_init, use_abs_pos_emb=use_abs_pos_emb,
            use_rel_pos_bias=use_rel_pos_bias, use_shared_rel_pos_bias=use_shared_rel_pos_bias, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate)
        self.mask_token = None  # add_mask_token(): only for the mask-token forward (SimMIM, BEiT)
        self.patch_embed.strict_img_size = False  # smaller grids run too: see other_grid()

    def init_weights(self, needs_reset: bool = True) -> None:
        """BEiT's pre-training initialisation (unilm beit/modeling_pretrain.py; SimMIM's ViT the same):
        the linear layers, the patch-embedding convolution, the class token and the absolute positions
        from a normal of std 0.02 truncated at +-1 std, biases 0; then in block l = 1..depth the output
        projections of attention and MLP divided by sqrt(2 l) (`fix_init_weight`). timm's modules keep
        theirs: relative position tables and q/v biases 0, layer scale at its init value, LayerNorms
        1 and 0, and the classifier (timm's trunc-normal x 0.001, BEiT fine-tuning's `init_scale`).
        timm's `Beit.init_weights` follows the fine-tuning code instead (normal not truncated at 1 std,
        PyTorch's default for the convolution)."""
        super().init_weights(needs_reset)          # calls timm's modules' resets and sets the classifier
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module is not self.head:
                trunc_normal_(module.weight, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for token in (self.cls_token, self.pos_embed):
            if token is not None:
                trunc_normal_(token, std=INIT_STD, a=-INIT_STD, b=INIT_STD)
        self.fix_init_weight()

    # ---------------------------------------------------------------------------------------
    # forward

    def add_mask_token(self) -> nn.Parameter:
        """The learned token `forward_features(mask=...)` puts in place of masked patches (mask_token.py)."""
        if self.mask_token is None:
            self.mask_token = new_mask_token(self.embed_dim, device=self.cls_token.device)
        return self.mask_token

    def forward_features(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All tokens after the final norm, [B, 1 + L, D]; with `mask` [B, L] (1 = masked) the masked
        patches' embeddings are replaced by the learned mask token before the class token and positions
        are added (BEiT's `VisionTransformerForMaskedImageModeling`, SimMIM's `VisionTransformerForSimMIM`).
        Without `mask`, timm's `Beit.forward_features` step for step."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if grid != self.grid_size and self._grid is None:
            check_divisible(tuple(images.shape[-2:]), self.patch_size)
            with self.other_grid(grid):
                return self.forward_features(images, mask)
        x = self.patch_embed(images)                                            # [B, L, D]
        if mask is not None:
            x = replace_masked_patches(x, mask, self.mask_token)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + L, D]
        if self.pos_embed is not None:
            x = x + (self.pos_embed if self._grid is None else resample_abs_pos_embed(
                self.pos_embed, new_size=list(self._grid), old_size=list(self.grid_size), num_prefix_tokens=1))
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # [heads, N, N]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, shared_rel_pos_bias=rel_pos_bias)
            else:
                x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    _grid: Optional[tuple[int, int]] = None  # the grid a forward runs at (other_grid), when not the model's

    @contextmanager
    def other_grid(self, grid: tuple[int, int]) -> Iterator[None]:
        """Run a smaller grid of patches (DINO's local crops) with the same relative position tables:
        every (query, key) pair of the small grid reads the table entry of its offset, which the model's
        grid has too (the small grid placed in the top-left corner of the large one: offsets are all
        that the tables know), the class token's entries unchanged. Exact, no interpolation. The
        absolute positions (use_abs_pos_emb) are resampled on the fly, bicubic, as the ViT's."""
        height, width = self.grid_size
        if grid[0] > height or grid[1] > width:
            raise ValueError(f"a BEiT encoder of a {height}x{width} patch grid runs smaller grids only, not "
                             f"{grid[0]}x{grid[1]}: its relative position tables hold no larger offsets")
        kept = torch.tensor([0] + [1 + i * width + j for i in range(grid[0]) for j in range(grid[1])])
        tables = [m for m in self.modules() if getattr(m, "relative_position_index", None) is not None
                  and getattr(m, "window_size", None) is not None]
        saved = [(m, m.window_size, m.relative_position_index, getattr(m, "window_area", None)) for m in tables]
        try:
            for module in tables:
                index = module.relative_position_index
                module.relative_position_index = index[kept.to(index.device)][:, kept.to(index.device)]
                module.window_size = tuple(grid)
                if hasattr(module, "window_area"):
                    module.window_area = grid[0] * grid[1]
            self._grid = tuple(grid)
            yield
        finally:
            for module, window, index, area in saved:
                module.relative_position_index, module.window_size = index, window
                if area is not None:
                    module.window_area = area
            self._grid = None

    # ---------------------------------------------------------------------------------------
    # what tasks, optimisers and wrappers ask

    @property
    def patch_size(self) -> int:
        """Pixels per patch side (the encoder's stride)."""
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's (positions, class token, relative position tables) and the mask token when there is one."""
        return super().no_weight_decay() | ({"mask_token"} if self.mask_token is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping, the mask token in the stem."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed|rel_pos_bias|mask_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.config["num_classes"] = num_classes


def check_options(*, global_pool, embed_dim, num_heads, layer_scale_init) -> None:
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool={global_pool!r}: use 'avg' (mean of the patch tokens + fc_norm) or 'token'")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    if layer_scale_init is not None and layer_scale_init < 0:
        raise ValueError(f"layer_scale_init={layer_scale_init} must be >= 0 (0: no layer scale)")


ENCODER_OPTIONS = [name for name in BEiT.__init__.__kwdefaults__ if name != "arch"]


# -------------------------------------------------------------------------------------------
# attention maps: BEiT's attention adds q/v biases and relative position bias to timm's ViT's


def recompute_beit_attention(attn: nn.Module, x: torch.Tensor,
                             shared_rel_pos_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [B, H, N, N] and values [B, H, N, d] of timm's BEiT `Attention` for its input x
    [B, N, D]: its unfused path (q/v biases, k none; the block's and the shared relative position
    bias added to the logits), so `weights @ values` is what it feeds to `proj`."""
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
    qkv = F.linear(x, attn.qkv.weight, bias)                                     # [B, N, 3 * H * d]
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    logits = (q * attn.scale) @ k.transpose(-2, -1)                              # [B, H, N, N]
    if attn.relative_position_bias_table is not None:
        logits = logits + attn._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias
    return logits.softmax(dim=-1), v


# -------------------------------------------------------------------------------------------
# the family


@register_family
class BEiTFamily(EncoderFamily):
    """BEiT's ViT (timm's Beit): relative position bias (per block or shared), layer scale, q/v biases; the mask-token forward."""
    name = "beit"
    Config = BEiTConfig
    archs = ARCHS
    # No "visible" (MAE's subset forward): the relative position bias is laid out for the whole grid.
    masked_forwards = frozenset({"mask_token"})
    any_image_size = True  # smaller grids, the relative position tables indexed by offset (BEiT.other_grid)
    # The relative position options are left to the recipe that loads an export: BEiT and SimMIM
    # fine-tune with a table per block, copied from the pre-trained shared one (fit_state_dict), and a
    # missing table starts at zero, which is no bias.
    architecture_keys = ("arch", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                         "mlp_ratio", "qkv_bias", "layer_scale_init", "use_abs_pos_emb")

    @classmethod
    def validate(cls, cfg) -> None:
        check_positive(cfg, "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
        check_choice(cfg, "model.global_pool", ("avg", "token"))
        m = recipe_size(cfg, ARCHS)
        try:
            check_options(global_pool=m["global_pool"], embed_dim=m["embed_dim"], num_heads=m["num_heads"],
                          layer_scale_init=m["layer_scale_init"])
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        size, patch = pair(m["img_size"], "model.img_size"), m["patch_size"]
        if size[0] % patch or size[1] % patch:
            fits = [max(patch, s // patch * patch) for s in size]
            raise ConfigError(f"model.img_size={size[0] if size[0] == size[1] else list(size)} is not a multiple of "
                              f"model.patch_size={patch}: use e.g. model.img_size={fits[0] if fits[0] == fits[1] else fits}")

    @classmethod
    def create(cls, arch: str = "beit_base_patch16", **options: Any) -> BEiT:
        """A named size; any constructor argument of `BEiT` may be overridden."""
        arch = options.pop("arch", arch)
        return BEiT(arch=arch, **named_size_kwargs(arch, ARCHS, options, ENCODER_OPTIONS))

    @classmethod
    def fsdp_units(cls, encoder: BEiT) -> list[nn.Module]:
        return list(encoder.blocks)

    @classmethod
    def fit_state_dict(cls, encoder: BEiT, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        """timm's, unilm's (BEiT) and SimMIM's files to this module: what timm's `checkpoint_filter_fn`
        does (index buffers dropped, tables and positions resized to the grid), plus the shared table
        copied into each block's (BEiT run_class_finetuning.py, SimMIM utils.py)."""
        target = encoder.state_dict()
        indices = [k for k in state if k.endswith("relative_position_index")]
        for key in indices:  # persistent in unilm's and SimMIM's files; recomputed from the grid here
            del state[key]
        if indices:
            report.notes.append(f"{len(indices)} relative_position_index buffers in the file: recomputed for the grid")
        report.unexpected += [k for k in state if k.startswith("lm_head.")]   # BEiT's visual-token classifier
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        _check_same_architecture(state, encoder)
        # (a task's model.safetensors has it under `encoder.`: load_weights strips the prefix only from
        # the keys the module has)
        shared = next((k for k in (SHARED_TABLE, f"encoder.{SHARED_TABLE}") if k in state), None)
        if shared and SHARED_TABLE not in target and f"blocks.0.attn{TABLE}" in target:
            table = state.pop(shared)
            for i in range(len(encoder.blocks)):
                state.setdefault(f"blocks.{i}.attn{TABLE}", table.clone())
            report.resized.append(f"{SHARED_TABLE} -> each block's table (as BEiT and SimMIM fine-tuning)")
        file_grid = _grid_of(metadata)
        for key in [k for k in state if k.endswith(TABLE) and k in target]:
            if state[key].shape != target[key].shape:
                window = encoder.get_submodule(key[:-len(TABLE)]).window_size
                report.resized.append(f"{key} {shape_text(state[key])} -> {shape_text(target[key])} (as timm / BEiT)")
                state[key] = resize_rel_pos_bias_table(state[key], new_window_size=window,
                                                       new_bias_shape=target[key].shape, old_window_size=file_grid)
        if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
            report.resized.append(f"pos_embed {shape_text(state['pos_embed'])} -> {shape_text(target['pos_embed'])} "
                                  "(bicubic, as timm)")
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(encoder.grid_size),
                                                        old_size=file_grid, num_prefix_tokens=1)
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and kernel.shape[-2:] != target["patch_embed.proj.weight"].shape[-2:]:
            report.resized.append("patch_embed.proj.weight (FlexiViT resampling, as timm)")
            state["patch_embed.proj.weight"] = resample_patch_embed(kernel, list(encoder.patch_embed.patch_size))
        return drop_other_heads(encoder, state, report)

    @classmethod
    def backbone_state(cls, encoder: BEiT) -> dict[str, torch.Tensor]:
        """Without the classifier and the mask token: exactly the keys of timm's `Beit` (mask_token.py)."""
        return {k: v for k, v in super().backbone_state(encoder).items() if k != "mask_token"}

    @classmethod
    def timm_equivalent(cls, config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """timm's `Beit` with our options (timm's checkpoint_filter_fn then loads the file strictly)."""
        fc_norm = config["global_pool"] == "avg" if config["fc_norm"] is None else config["fc_norm"]
        kwargs = dict(img_size=list(config["img_size"]), patch_size=config["patch_size"], in_chans=config["in_chans"],
                      embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
                      mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"],
                      init_values=config["layer_scale_init"] or None, use_abs_pos_emb=config["use_abs_pos_emb"],
                      use_rel_pos_bias=config["use_rel_pos_bias"],
                      use_shared_rel_pos_bias=config["use_shared_rel_pos_bias"], global_pool=config["global_pool"],
                      use_fc_norm=fc_norm, num_classes=config["num_classes"])
        return dict(model_name="beit_base_patch16_224", kwargs=kwargs)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None,
                          recipe: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """A foreign BEiT file's `model:` keys from its tensors (the relative tables say the heads)."""
        kernel = state.get("patch_embed.proj.weight")
        block_table = state.get(f"blocks.0.attn{TABLE}")
        table = state.get(SHARED_TABLE, block_table)
        if kernel is None or kernel.ndim != 4 or not ("blocks.0.attn.q_bias" in state or "blocks.0.gamma_1" in state
                                                      or table is not None):
            raise ValueError("not a BEiT encoder (no q/v biases, layer scale gamma or relative position tables)")
        embed_dim, in_chans, patch = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        found = dict(embed_dim=embed_dim, depth=depth, patch_size=patch, in_chans=in_chans,
                     qkv_bias="blocks.0.attn.q_bias" in state, use_abs_pos_emb="pos_embed" in state,
                     use_rel_pos_bias=block_table is not None, use_shared_rel_pos_bias=SHARED_TABLE in state,
                     layer_scale_init=0.1 if "blocks.0.gamma_1" in state else 0.0,  # any > 0 builds it; the file's is loaded
                     global_pool="avg" if "fc_norm.weight" in state else "token",
                     num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0)
        side = math.isqrt((table.shape[0] - 3)) if table is not None else None
        if side is not None and side * side == table.shape[0] - 3:
            found["img_size"] = (side + 1) // 2 * patch
        named = [name for name, arch in ARCHS.items() if (arch["embed_dim"], arch["depth"]) == (embed_dim, depth)]
        if named:
            found["arch"] = named[0]
        heads = num_heads or (table.shape[1] if table is not None else None) or (
            ARCHS[named[0]]["num_heads"] if named else None)
        if heads is None:
            raise ValueError(f"a BEiT encoder with embed_dim={embed_dim}, depth={depth} is none of the named sizes "
                             "and has no relative position table, so its number of heads is unknown: give model.num_heads=N")
        found["num_heads"] = heads
        return found

    @classmethod
    def draws_attention(cls, encoder: BEiT) -> bool:
        return True  # BEiT always has its class token

    @classmethod
    def attention_maps(cls, encoder: BEiT, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                       rollout: bool = False) -> dict[str, torch.Tensor]:
        return attention_maps(encoder, images, layer=layer, heads=heads, rollout=rollout,
                              recompute=recompute_beit_attention)


def _check_same_architecture(state: Mapping[str, torch.Tensor], encoder: BEiT) -> None:
    width = state["blocks.0.norm1.weight"].shape[0] if "blocks.0.norm1.weight" in state else None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if (width is not None or depth) and (width, depth) != (encoder.embed_dim, len(encoder.blocks)):
        raise CheckpointError(f"the file holds a BEiT with embed_dim={width} and depth={depth}, the module has "
                              f"embed_dim={encoder.embed_dim} and depth={len(encoder.blocks)}: set model.arch (or "
                              "model.embed_dim / depth / num_heads) to the file's")


def _grid_of(metadata: Mapping[str, str]) -> Optional[tuple[int, int]]:
    """The patch grid our exports record; None for foreign files (timm then assumes a square grid)."""
    if "encoder" not in metadata:
        return None
    config = json.loads(metadata["encoder"])
    return config["img_size"][0] // config["patch_size"], config["img_size"][1] // config["patch_size"]
