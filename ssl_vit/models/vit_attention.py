"""Where a ViT looks: its attention weights, recomputed, the class token's maps and attention rollout.

timm's `Attention` runs fused scaled-dot-product attention, which never materialises the weights.
`AttentionRecorder` hooks the attention modules of the chosen blocks, reads their input and
recomputes the weights from the module's own `qkv`, `q_norm`, `k_norm` and `scale`, exactly as its
unfused path does; the hooks only read, so the model's outputs are unchanged.

    tokens entering block l's attention        [B, N, D]    (N = prefix tokens P + patches L)
      -> qkv, split heads, q_norm / k_norm     q, k, v [B, H, N, d]
      -> softmax(q * scale @ k^T)              weights [B, H, N, N]
    class_token_attention(weights)             [B, H, L]    what the class token reads, per head
    attention_rollout([weights of each layer]) [B, L]       attention traced through every layer
                                                            (Abnar & Zuidema 2020)
    attention_maps(encoder, images)            {"mean": [B, h, w], "head i": ..., "rollout": ...}
                                                            (what the ViT family draws)

Another attention module is recorded by passing its own `recompute(module, x, **forward_kwargs)`
(the beit family's adds BEiT's q/v biases and relative position bias, beit.py).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

ATTENTION_PARTS = ("qkv", "q_norm", "k_norm", "scale", "num_heads")


def recompute_attention(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [B, H, N, N] and values [B, H, N, d] that a timm `Attention` module computes for
    its input x [B, N, D]: the same operations in the same order as its unfused path (no mask,
    dropout off), so `weights @ values` is what it feeds to `proj` (before its optional `norm`)."""
    missing = [name for name in ATTENTION_PARTS if not hasattr(attn, name)]
    if missing:
        raise TypeError(f"cannot recompute the attention of a {type(attn).__name__}: it has no "
                        f"{', '.join(missing)} (timm's Attention has them)")
    qkv = attn.qkv(x)                                                            # [B, N, 3 * H * d]
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)           # [B, H, N, N]
    return weights, v


Recompute = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class AttentionRecorder:
    """While open, each forward of `encoder` stores the attention weights of the chosen blocks
    (default: all) in `weights`: {block index: float32 [B, H, N, N]}. `recompute(module, x,
    **kwargs)` gives the weights of one attention module from its input and the keyword arguments
    of its forward (default: timm's `Attention`).

    >>> with AttentionRecorder(encoder) as recorder:
    ...     encoder.forward_features(images)
    >>> rollout = attention_rollout(recorder.stacked(), encoder.num_prefix_tokens)
    """

    def __init__(self, encoder: nn.Module, layers: Optional[Sequence[int]] = None,
                 recompute: Recompute = recompute_attention):
        self.blocks = encoder.blocks
        self.recompute = recompute
        depth = len(self.blocks)
        layers = range(depth) if layers is None else layers
        for layer in layers:
            if not -depth <= layer < depth:
                raise ValueError(f"layer {layer} does not exist: the encoder has {depth} blocks "
                                 f"(0..{depth - 1}, or -1 for the last)")
        self.layers = sorted({layer % depth for layer in layers})
        self.weights: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "AttentionRecorder":
        self.weights.clear()
        for layer in self.layers:
            hook = partial(self._record, layer)
            self._handles.append(self.blocks[layer].attn.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise NotImplementedError("recording masked or causal attention is not supported")
        extra = {k: v for k, v in kwargs.items() if k not in ("attn_mask", "is_causal")}
        with torch.no_grad():
            weights, _ = self.recompute(module, args[0], **extra)
        self.weights[layer] = weights.float()

    def stacked(self) -> torch.Tensor:
        """The recorded weights, layer after layer: [layers, B, H, N, N]."""
        if not self.weights:
            raise RuntimeError("no attention recorded: run the encoder inside `with AttentionRecorder(...)`")
        return torch.stack([self.weights[layer] for layer in sorted(self.weights)])


def class_token_attention(weights: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """How much the class token (token 0) attends to each patch: [B, H, N, N] -> [B, H, L]."""
    return weights[:, :, 0, num_prefix_tokens:]


def attention_rollout(weights: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", §3):
    per layer, average the heads, add the identity for the residual connection and renormalise the
    rows (0.5 W_att + 0.5 I); multiply the layers' matrices from the first to the last. Returns the
    class token's row over the patches: [layers, B, H, N, N] -> [B, L]."""
    heads_mean = weights.float().mean(dim=2)                                     # [layers, B, N, N]
    identity = torch.eye(heads_mean.shape[-1], device=heads_mean.device)
    rollout = identity.expand_as(heads_mean[0])
    for layer in heads_mean:
        layer = layer + identity                                                 # the residual path
        layer = layer / layer.sum(dim=-1, keepdim=True)
        rollout = layer @ rollout                                                # tokens of layer l -> inputs
    return rollout[:, 0, num_prefix_tokens:]


@torch.no_grad()
def attention_maps(encoder, images: torch.Tensor, *, layer: int = -1, heads: bool = True,
                   rollout: bool = False, recompute: Recompute = recompute_attention) -> dict[str, torch.Tensor]:
    """Where the class token looks, on the patch grid [B, h, w]: in block `layer`, the mean over the
    heads ("mean") and each head ("head i"); with `rollout`, attention rolled out through all the
    blocks (Abnar & Zuidema 2020). `images` are normalised, at the encoder's img_size; `recompute`
    as for `AttentionRecorder`."""
    if encoder.cls_token is None:
        raise ValueError("attention maps show what the class token attends to, and this encoder has none "
                         "(model.class_token=false)")
    prefix, grid = encoder.num_prefix_tokens, encoder.grid_size
    with AttentionRecorder(encoder, layers=None if rollout else [layer], recompute=recompute) as recorder:
        encoder.forward_features(images)
    per_head = class_token_attention(recorder.weights[layer % len(encoder.blocks)], prefix)  # [B, H, L]
    maps = {"mean": per_head.mean(dim=1)}
    if heads:
        maps.update({f"head {h}": per_head[:, h] for h in range(per_head.shape[1])})
    if rollout:
        maps["rollout"] = attention_rollout(recorder.stacked(), prefix)
    return {name: values.reshape(-1, *grid) for name, values in maps.items()}
