"""Swin Transformer (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows") as an encoder family: timm's `SwinTransformer`, subclassed, with the mask-token forward that
SimMIM pre-trains it with (Xie et al. 2022, SimMIM's `SwinTransformerForSimMIM`).

Why Swin: ViT's attention costs grow with the square of the tokens; Swin attends within windows of
M x M tokens (linear in the image), shifts the windows by M/2 every second block so that they
exchange information, adds a relative position bias per window, and halves the grid between stages
(patch merging), giving a hierarchy of 4 feature maps at strides 4, 8, 16, 32. MAE cannot pre-train it
(dropping tokens breaks the windows); SimMIM can: every position stays, the masked patch embeddings
are replaced by a learned token right after the patch embedding.

    image [B, C, H, W]
      -> patch_embed (+ norm)                    [B, H/4, W/4, C]        4x4 patches
      -> masked ones -> mask_token (mask)        [B, H/4, W/4, C]        (mask_token.py)
      -> stage 1: blocks of (shifted) window     [B, H/4, W/4, C]
         attention with relative position bias
      -> stages 2-4: patch merging, blocks       [B, H/32, W/32, 8C]
      -> norm, tokens row-major                  [B, L, 8C]              L = H/32 x W/32
      -> forward_head: mean of the tokens -> head.fc

The module speaks the token language of our ViT, so that tasks read every family alike:
`forward_features` returns the last stage's tokens [B, L, D] (no class token: `num_prefix_tokens`
is 0), `grid_size` is their grid (H/32, W/32) and `patch_size` the pixels per token side, i.e. the
total stride (patch 4 x 2^3 = 32): what SimMIM's one-layer head upsamples by (§3.3). The patch
embedding's own size and grid are `patch_embed.patch_size` / `patch_embed.grid_size` (and the
`model.patch_size` key). Keys are timm's (`layers.<stage>.blocks.<block>.*`, `head.fc.*`), so
timm's Swin state dicts load as they are, and Microsoft's and SimMIM's files through timm's
`checkpoint_filter_fn` (swin_weights.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange
from timm.models.swin_transformer import SwinTransformer

from ..config import ConfigError, ModelConfig
from .base import EncoderFamily, LoadReport, check_positive, named_size_kwargs, recipe_size, register_family
from .mask_token import new_mask_token, replace_masked_patches
from .swin_sizes import ARCHS, SIZES
from .swin_attention import attention_maps
from .swin_weights import config_from_state, fit_state_dict, timm_equivalent
from .vit_options import pair

@dataclass
class SwinConfig(ModelConfig):
    """The `model:` keys of the Swin encoder (model.arch = one of ARCHS); None: the named size's value."""
    arch: str = "swin_tiny_patch4_window7"
    patch_size: Optional[int] = None      # pixels per side of the patch embedding (4); the stride is 4 x 2^(stages-1)
    embed_dim: Optional[int] = None       # width C of stage 1; stage i is C x 2^(i-1) wide
    depths: Any = None                    # blocks per stage, e.g. [2, 2, 6, 2] (Swin-T)
    num_heads: Any = None                 # attention heads per stage, e.g. [3, 6, 12, 24] (Swin-T)
    window_size: Optional[int] = None     # window side M in tokens (7 at 224 px, 6 at 192, 12 at 384)
    mlp_ratio: Optional[float] = None     # MLP width / block width (4 in every named size)
    qkv_bias: bool = True                 # biases of the q, k, v projections (Swin's default)


class Swin(SwinTransformer):
    """timm's `SwinTransformer` with the mask-token forward (SimMIM), the token interface of our
    ViT (forward_features -> [B, L, D]) and the `config` our exports record. Keyword-only arguments
    as `SwinConfig`; global average pooling of the last stage feeds the head."""
    num_prefix_tokens = 0
    # what backbone exports leave out (models/base.py reads timm's pretrained config this way)
    pretrained_cfg = {"classifier": "head.fc", "first_conv": "patch_embed.proj"}

    def __init__(
            self,
            *,
            arch: str = "swin_tiny_patch4_window7",
            img_size: int | Sequence[int] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 0,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        img_size = pair(img_size, "img_size")
        depths, num_heads = _ints(depths, "depths"), _ints(num_heads, "num_heads")
        check_options(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depths=depths,
                      num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool="avg", embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                         window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate)
        # Recorded so that exports can say exactly how to rebuild this encoder.
        self.config = dict(
            arch=arch, img_size=list(img_size), patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=list(depths), num_heads=list(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.mask_token = None  # add_mask_token(): only for the mask-token forward (SimMIM)

    # ---------------------------------------------------------------------------------------
    # forward

    def add_mask_token(self) -> nn.Parameter:
        """The learned token `forward_features(mask=...)` puts in place of masked patch embeddings."""
        if self.mask_token is None:
            self.mask_token = new_mask_token(self.embed_dim, device=self.patch_embed.proj.weight.device)
        return self.mask_token

    def forward_features(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last stage's tokens after the final norm, [B, L, D] (L = H/32 x W/32, row-major). With
        `mask` [B, L'] (1 = masked) the masked patch embeddings are replaced by the mask token before
        the first stage, as SimMIM's `SwinTransformerForSimMIM`; L' is either the patch embedding's
        grid (H/4 x W/4, SimMIM's own mask) or the token grid `grid_size` (each entry masks the
        (stride / patch)^2 patches of one 32-pixel cell: the masks the SimMIM task draws). Without
        `mask`, timm's `forward_features` step for step."""
        x = self.patch_embed(images)                                             # [B, h0, w0, C]
        if mask is not None:
            height = x.shape[1]
            patches = rearrange(x, "b h w c -> b (h w) c")                       # [B, h0 w0, C]
            patches = replace_masked_patches(patches, self.patch_mask(mask), self.mask_token)
            x = rearrange(patches, "b (h w) c -> b h w c", h=height)
        x = self.norm(self.layers(x))                                            # [B, h, w, D]
        return rearrange(x, "b h w d -> b (h w) d")                             # [B, L, D]

    def patch_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask [B, L'] at the token grid or at the patch embedding's grid -> the patch grid [B, h0 w0]."""
        patches, tokens = tuple(self.patch_embed.grid_size), self.grid_size
        if mask.ndim == 2 and mask.shape[1] == patches[0] * patches[1]:
            return mask
        if mask.ndim != 2 or mask.shape[1] != tokens[0] * tokens[1]:
            raise ValueError(f"mask has shape {list(mask.shape)}: give [batch, {patches[0] * patches[1]}] (the "
                             f"{patches[0]}x{patches[1]} patches) or [batch, {tokens[0] * tokens[1]}] (the "
                             f"{tokens[0]}x{tokens[1]} grid of {self.patch_size}-pixel cells), row-major, 1 = masked")
        scale = patches[0] // tokens[0]                                          # patches per token side
        cells = mask.view(-1, *tokens)
        return cells.repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)   # [B, h0 w0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head (global average pool, dropout, fc) on the tokens [B, L, D] (or timm's map [B, h, w, D])."""
        if x.ndim == 3:
            x = rearrange(x, "b (h w) d -> b h w d", h=self.grid_size[0])
        return super().forward_head(x, pre_logits=pre_logits)

    # ---------------------------------------------------------------------------------------
    # what tasks, optimisers and wrappers ask

    @property
    def patch_size(self) -> int:
        """Pixels per side of one output token: the total stride, patch size x 2^(stages - 1)."""
        return self.patch_embed.patch_size[0] * 2 ** (len(self.layers) - 1)

    @property
    def grid_size(self) -> tuple[int, int]:
        """The last stage's token grid (H / stride, W / stride)."""
        return tuple(self.layers[-1].output_resolution)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's (every relative position bias table) and the mask token when there is one (SimMIM's
        Swin keeps both out of weight decay: its `no_weight_decay` and `no_weight_decay_keywords`)."""
        return super().no_weight_decay() | ({"mask_token"} if self.mask_token is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping (each block its own layer for layer-wise lr decay; a stage's patch merging
        with its first block), the mask token in the stem."""
        groups = super().group_matcher(coarse)
        return {**groups, "stem": r"^patch_embed|^mask_token"}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.config["num_classes"] = num_classes


def _ints(values: Sequence[int], name: str, key: str = "") -> list[int]:
    if isinstance(values, (int, float, str)) or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{key}{name}={values!r}: give one positive integer per stage, e.g. {key}{name}="
                         f"{SIZES['tiny'][name]} (Swin-T)")
    return [int(v) for v in values]


def check_options(*, img_size: tuple[int, int], patch_size: int, embed_dim: int, depths: Sequence[int],
                  num_heads: Sequence[int], window_size: int, mlp_ratio: float, key: str = "") -> None:
    """The constraints of a Swin build; `key` prefixes the names in the messages ("model." for recipes)."""
    stages = len(depths)
    if stages != len(num_heads):
        raise ValueError(f"{key}depths={list(depths)} and {key}num_heads={list(num_heads)} must give one value per "
                         "stage each")
    for stage, heads in enumerate(num_heads):
        width = embed_dim * 2 ** stage
        if width % heads:
            raise ValueError(f"stage {stage + 1} is {width} wide ({key}embed_dim={embed_dim} x 2^{stage}), not "
                             f"divisible by its {heads} heads ({key}num_heads={list(num_heads)})")
    if patch_size <= 0 or window_size <= 0 or mlp_ratio <= 0:
        raise ValueError(f"{key}patch_size={patch_size}, {key}window_size={window_size} and {key}mlp_ratio="
                         f"{mlp_ratio} must be positive")
    stride = patch_size * 2 ** (stages - 1)
    if img_size[0] % stride or img_size[1] % stride:
        fits = [max(stride, round(s / stride) * stride) for s in img_size]
        raise ValueError(f"{key}img_size={_size_text(img_size)} is not a multiple of the total stride {stride} "
                         f"({key}patch_size={patch_size} x 2^{stages - 1} for {stages} stages), so the stages' "
                         f"patch merging would pad: use e.g. {key}img_size={_size_text(fits)}")
    grids = [(img_size[0] // patch_size // 2 ** s, img_size[1] // patch_size // 2 ** s) for s in range(stages)]
    for stage, grid in enumerate(grids):
        # a grid no larger than the window is one window (timm's and Microsoft's rule: no shift then)
        if any(side > window_size and side % window_size for side in grid):
            tiles = [w for w in range(1, max(grids[0]) + 1)
                     if all(side <= w or side % w == 0 for g in grids for side in g)]
            window = min(tiles, key=lambda w: (abs(w - window_size), w))
            unit = stride * window_size
            image = [max(unit, round(s / unit) * unit) for s in img_size]
            raise ValueError(f"{key}window_size={window_size} does not tile stage {stage + 1}'s {grid[0]}x{grid[1]} "
                             f"token grid ({key}img_size={_size_text(img_size)}, {key}patch_size={patch_size}): use "
                             f"{key}window_size={window} or {key}img_size={_size_text(image)} (Swin: window 7 at "
                             "224 px, 12 at 384; SimMIM: 6 at 192)")


def _size_text(size: Sequence[int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"[{size[0]},{size[1]}]"


ENCODER_OPTIONS = [name for name in Swin.__init__.__kwdefaults__ if name != "arch"]


# -------------------------------------------------------------------------------------------
# the family


@register_family
class SwinFamily(EncoderFamily):
    """Swin Transformer (timm's SwinTransformer): shifted windows, relative position bias, 4 stages; SimMIM's mask-token forward."""
    name = "swin"
    Config = SwinConfig
    archs = ARCHS
    # No "visible" (MAE's subset forward): windows need every token of the grid.
    masked_forwards = frozenset({"mask_token"})
    # The window and image size are adopted too: a model rebuilt at another window would not compute
    # the features it was trained for (fine-tuning at another resolution says so on the command line).
    architecture_keys = ("arch", "img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads",
                         "window_size", "mlp_ratio", "qkv_bias")

    @classmethod
    def validate(cls, cfg) -> None:
        check_positive(cfg, "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio")
        m = recipe_size(cfg, ARCHS)
        try:
            depths = _ints(_plain(m["depths"]), "depths", key="model.")
            num_heads = _ints(_plain(m["num_heads"]), "num_heads", key="model.")
            check_options(img_size=pair(_plain(m["img_size"]), "model.img_size"), patch_size=m["patch_size"],
                          embed_dim=m["embed_dim"], depths=depths, num_heads=num_heads, window_size=m["window_size"],
                          mlp_ratio=m["mlp_ratio"], key="model.")
        except ValueError as e:
            raise ConfigError(f"{e}" if str(e).startswith("model.") else f"model: {e}") from None

    @classmethod
    def create(cls, arch: str = "swin_tiny_patch4_window7", **options: Any) -> Swin:
        """A named size; any constructor argument of `Swin` may be overridden."""
        arch = options.pop("arch", arch)
        return Swin(arch=arch, **named_size_kwargs(arch, ARCHS, options, ENCODER_OPTIONS))

    @classmethod
    def fsdp_units(cls, encoder: Swin) -> list[nn.Module]:
        return [block for layer in encoder.layers for block in layer.blocks]

    @classmethod
    def fit_state_dict(cls, encoder: Swin, state: dict[str, torch.Tensor], metadata: Mapping[str, str],
                       report: LoadReport) -> dict[str, torch.Tensor]:
        return fit_state_dict(encoder, state, report)

    @classmethod
    def backbone_state(cls, encoder: Swin) -> dict[str, torch.Tensor]:
        """Without the classifier and the mask token: exactly the keys of timm's `SwinTransformer`."""
        return {k: v for k, v in super().backbone_state(encoder).items() if k != "mask_token"}

    @classmethod
    def timm_equivalent(cls, config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        return timm_equivalent(config)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], num_heads: Optional[int] = None,
                          recipe: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        return config_from_state(state)

    @classmethod
    def draws_attention(cls, encoder: Swin) -> bool:
        return True

    @classmethod
    def attention_maps(cls, encoder: Swin, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                       rollout: bool = False) -> dict[str, torch.Tensor]:
        return attention_maps(encoder, images, layer=layer, heads=heads, rollout=rollout)


def _plain(value: Any) -> Any:
    """OmegaConf lists as Python lists."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
