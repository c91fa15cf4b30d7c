"""Position embeddings of our ViT, the ones the ViT paper compares (Dosovitskiy et al. 2021, appendix
D.4, table 8) and MAE's:

    pos_embed="learn"     a learned 1-D table, one vector per token (prefix tokens included): timm's
                          `pos_embed` [1, P + H*W, D]
    pos_embed="learn2d"   the paper's "2-dimensional embedding": an X table [1, W, D/2] and a Y table
                          [1, H, D/2], learned; patch (i, j) gets [X_j | Y_i] (`pos_embed_col`,
                          `pos_embed_row`); the prefix tokens, themselves learned, get none
    pos_embed="sincos"    MAE's fixed 2-D sine-cosine table (He et al. 2022 §3), a saved buffer
    relative              BEiT's relative position bias inside attention: the `beit` family (beit.py)
"""
from __future__ import annotations

from typing import Sequence

import torch


def sincos_2d_pos_embed(embed_dim: int, grid_size: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position table, [1, prefix + H*W, D] (He et al. 2022 §3, A.1).

    Laid out exactly as MAE's `get_2d_sincos_pos_embed`: its meshgrid puts the *column* index
    first, so the first D/2 channels encode the column and the last D/2 the row, each as
    [sin(pos * w_k) | cos(pos * w_k)] with w_k = 1 / 10000^(k / (D/4)), k = 0..D/4-1. Prefix
    tokens get zeros. Computed in float64 (as the released checkpoints were), stored as float32.
    timm's `build_sincos2d_pos_embed` orders the channels differently, hence our own.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    height, width = grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def encode(positions: torch.Tensor) -> torch.Tensor:  # [H*W] -> [H*W, D/2]
        angles = positions.reshape(-1, 1).double() * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    table = torch.cat([encode(cols), encode(rows)], dim=1)  # [H*W, D]
    table = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), table])
    return table.float().unsqueeze(0)


def learned_2d_table(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The patches' position embeddings from the two learned 1-D tables: rows [1, H, D/2] and
    cols [1, W, D/2] -> [1, H*W, D], row-major, patch (i, j) = [cols_j | rows_i] (the column first,
    as our sin-cos table)."""
    height, width = rows.shape[1], cols.shape[1]
    x = cols[:, None].expand(-1, height, -1, -1)                  # [1, H, W, D/2]
    y = rows[:, :, None].expand(-1, -1, width, -1)                # [1, H, W, D/2]
    return torch.cat([x, y], dim=-1).flatten(1, 2)                # [1, H*W, D]
