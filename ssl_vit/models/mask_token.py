"""The mask-token forward that BEiT and SimMIM ask of an encoder (family capability "mask_token").

MAE drops the masked patches before the encoder; BEiT (Bao et al. 2022, §2.3) and SimMIM (Xie et al.
2022, §3.2) keep every position and put a learned `mask_token` in place of each masked patch
embedding, before the position embeddings and the class token are added:

    patch embeddings x [B, L, D], mask M [B, L] (1 = masked)
      -> x * (1 - M) + mask_token * M        [B, L, D]   (then + positions, prefix tokens, blocks)

The token is a parameter of the encoder (as in BEiT's `VisionTransformerForMaskedImageModeling` and
SimMIM's `VisionTransformerForSimMIM`), but only of an encoder that is pre-trained this way: the task
calls `encoder.add_mask_token()`. A plain encoder keeps exactly timm's keys, and backbone exports
leave the token out (timm's models have no such parameter, and timm's ViT loader reads a top-level
`mask_token` as the sign of a DINOv2 file); the task's model.safetensors keeps it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

# BEiT (unilm beit/modeling_pretrain.py) and SimMIM (models/simmim.py) draw the token from a normal
# of std 0.02 truncated at +-1 std
MASK_TOKEN_STD = 0.02


def new_mask_token(embed_dim: int, device: Optional[torch.device] = None) -> nn.Parameter:
    """A fresh learned mask token [1, 1, D]."""
    token = nn.Parameter(torch.zeros(1, 1, embed_dim, device=device))
    trunc_normal_(token, std=MASK_TOKEN_STD, a=-MASK_TOKEN_STD, b=MASK_TOKEN_STD)
    return token


def replace_masked_patches(x: torch.Tensor, mask: torch.Tensor, mask_token: Optional[torch.Tensor]) -> torch.Tensor:
    """Patch embeddings x [B, L, D] with the masked ones (mask [B, L], 1 or True = masked) replaced by
    the mask token, as BEiT and SimMIM blend them (so a soft mask would interpolate)."""
    if mask_token is None:
        raise RuntimeError("this encoder has no mask token: call encoder.add_mask_token() first (the SimMIM task "
                           "does), or use ids_keep=... to drop patches instead (MAE)")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask has shape {list(mask.shape)}, expected [batch, patches] = {list(x.shape[:2])} "
                         "(one entry per patch of the encoder's grid, row-major, 1 = masked)")
    w = mask.unsqueeze(-1).to(x.dtype)                                  # [B, L, 1]
    return x * (1 - w) + mask_token.to(x.dtype) * w
