"""Where a Swin looks: its window attention, recomputed, tiled back onto the stage's grid.

A ViT's pictures show what the class token attends to; Swin has no class token (the head pools
every token) and each token attends only to the M x M tokens of its window, so that picture does not
exist. What is drawn instead, per block: how much attention each token *receives* from the tokens
of its window, averaged over them (the column mean of the window's attention matrix; each window's
values sum to 1), tiled back onto the stage's token grid with shifted windows shifted back. In the
last stage of the named sizes the grid is one window (7x7 at 224 px), so the map is global there.

    tokens entering block l's attention     [B * windows, N, C]   (N = M^2, the windows of the
                                                                   (cyclically shifted) grid)
      -> qkv, heads, + relative position bias (+ the shifted windows' mask), softmax
                                            weights [B, windows, H, N, N]
      -> mean over the queries, unshifted   [B, H, h, w]          "mean" (over heads) and "head i"
    rollout: the blocks of the stage, each as a full [h w, h w] matrix (heads averaged, identity
    added for the residual path, rows renormalised; Abnar & Zuidema 2020), multiplied from the
    stage's first block to `layer`, then the mean over the output tokens. It stops at the stage's
    start: the patch merging before it is no attention.

timm's `WindowAttention` runs fused attention by default, which never materialises the weights;
forward pre-hooks read each block's input and recompute them from its own `qkv`, `scale`, relative
position bias and mask, exactly as its unfused path does (the hooks only read).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from einops import rearrange


def recompute_window_attention(attn: nn.Module, x: torch.Tensor,
                               mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [B * windows, H, N, N] and values [B * windows, H, N, d] of timm's `WindowAttention`
    for its input x [B * windows, N, C]: its unfused path (relative position bias added to the
    logits, and the shifted windows' 0 / -100 mask [windows, N, N]), so `weights @ values` is what it
    feeds to `proj`."""
    qkv = attn.qkv(x)                                                            # [B nW, N, 3 H d]
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()   # [B nW, H, N, N]
    if mask is not None:
        windows = mask.shape[0]
        logits = rearrange(logits, "(b w) h n m -> b w h n m", w=windows) + mask[None, :, None]
        logits = rearrange(logits, "b w h n m -> (b w) h n m")
    return logits.softmax(dim=-1), v


def window_positions(block: nn.Module) -> torch.Tensor:
    """Where each token of each window of a block sits on the stage's grid: [windows, N] flat
    row-major indices. A shifted block rolls the grid by -shift first, so its row r holds row
    (r + shift) mod h."""
    (height, width), (wh, ww), (sh, sw) = block.input_resolution, block.window_size, block.shift_size
    rows = (torch.arange(height) + sh) % height
    cols = (torch.arange(width) + sw) % width
    index = rows[:, None] * width + cols[None, :]                                # [h, w]
    return rearrange(index, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=wh, ww=ww)


def blocks_of(encoder) -> list[tuple[int, nn.Module]]:
    """Every block with its stage, in order: what `layer` counts (0-based, negative from the end)."""
    return [(stage, block) for stage, layer in enumerate(encoder.layers) for block in layer.blocks]


@torch.no_grad()
def attention_maps(encoder, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                   rollout: bool = False) -> dict[str, torch.Tensor]:
    """The attention each token receives within its window, on the token grid of block `layer`'s
    stage [B, h, w]: the mean over the heads ("mean") and each head ("head i"); with `rollout`,
    rolled out through the stage's blocks up to `layer`. `images` are normalised, at the encoder's
    img_size."""
    blocks = blocks_of(encoder)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer {layer} does not exist: the encoder has {len(blocks)} blocks over "
                         f"{len(encoder.layers)} stages (0..{len(blocks) - 1}, or -1 for the last)")
    index = layer % len(blocks)
    stage = blocks[index][0]
    chosen = [i for i, (s, _) in enumerate(blocks) if s == stage and i <= index] if rollout else [index]
    weights: dict[int, torch.Tensor] = {}

    def record(i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        weights[i] = recompute_window_attention(module, args[0], mask)[0].float()

    handles = [blocks[i][1].attn.register_forward_pre_hook(partial(record, i), with_kwargs=True) for i in chosen]
    try:
        encoder.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    grid = blocks[index][1].input_resolution
    received = _received(weights[index], blocks[index][1], len(images))          # [B, H, h w]
    maps = {"mean": received.mean(dim=1)}
    if heads:
        maps.update({f"head {h}": received[:, h] for h in range(received.shape[1])})
    if rollout:
        maps["rollout"] = _rollout([(weights[i], blocks[i][1]) for i in chosen], len(images))
    return {name: values.reshape(-1, *grid) for name, values in maps.items()}


def _received(weights: torch.Tensor, block: nn.Module, batch: int) -> torch.Tensor:
    """Window weights [B nW, H, N, N] -> the attention each token receives, on the grid [B, H, h w]."""
    positions = window_positions(block).to(weights.device)                      # [nW, N]
    received = rearrange(weights.mean(dim=-2), "(b w) h n -> b h (w n)", b=batch)  # mean over the queries
    out = torch.empty_like(received)
    out[:, :, positions.flatten()] = received
    return out


def _full_matrix(weights: torch.Tensor, block: nn.Module, batch: int) -> torch.Tensor:
    """Window weights [B nW, H, N, N] -> one [B, h w, h w] matrix over the stage's grid (heads averaged;
    zero between tokens of different windows)."""
    positions = window_positions(block).to(weights.device)                      # [nW, N]
    tokens = positions.numel()
    per_window = rearrange(weights.mean(dim=1), "(b w) n m -> b w n m", b=batch)  # [B, nW, N, N]
    full = weights.new_zeros(batch, tokens, tokens)
    full[:, positions[:, :, None], positions[:, None, :]] = per_window
    return full


def _rollout(recorded: list[tuple[torch.Tensor, nn.Module]], batch: int) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020 §3) through a stage's blocks, then the mean over the
    output tokens: how much each token of the stage's input feeds the stage's outputs [B, h w]."""
    rolled = None
    for weights, block in recorded:
        matrix = _full_matrix(weights, block, batch)
        matrix = matrix + torch.eye(matrix.shape[-1], device=matrix.device)      # the residual path
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        rolled = matrix if rolled is None else matrix @ rolled
    return rolled.mean(dim=1)
