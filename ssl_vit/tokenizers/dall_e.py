"""OpenAI's DALL-E dVAE encoder (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", §2.1 and
appendix A.1), the tokenizer of BEiT v1 (Bao et al. 2022 §2.2): images of 112 px (BEiT's
`--second_input_size`) -> 14 x 14 codes out of 8192.

    pixels in [0, 1] -> map_pixels: (1 - 2 eps) x + eps, eps = 0.1     (the logit-Laplace range, §A.3)
      -> input: 7x7 convolution to n_hid
      -> group_1..group_4: n_blk_per_group residual blocks each, widths n_hid x 1, 2, 4, 8, a 2x2 max
         pool after each of the first three (stride 8)
         block: id_path (1x1 conv when the width changes) + (1 / n_layers^2) x res_path, res_path =
                ReLU, 3x3 to n_out / 4, ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 to n_out   (n_layers = 4 x n_blk)
      -> output: ReLU, 1x1 convolution to vocab_size logits [B, 8192, h, w]   -> argmax: the codes
         (BEiT's `get_codebook_indices`)

Written here from that description, with the parameter names of the `dall-e` package (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.b`, ...), so the weights that tools/convert_tokenizer.py takes
out of the published encoder.pkl load as they are. As the package, the trunk may run in reduced
precision (the package uses fp16 on GPUs) and the output convolution always in fp32.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.base import compact
from .base import Tokenizer, non_finite, save_tokenizer, state_mismatch
from .dall_e_pickle import read_module_pickle

LOGIT_LAPLACE_EPS = 0.1                   # dall_e/utils.py `logit_laplace_eps`
GROUPS = 4                                # the package's `group_count`


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the range of DALL-E's logit-Laplace distribution (appendix A.3)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class Conv(nn.Module):
    """A convolution with 'same' padding whose weights are named as the package's (`w`, `b`)."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel) / math.sqrt(n_in * kernel ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kernel - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv(n_in, hidden, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv(hidden, hidden, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv(hidden, hidden, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv(hidden, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoder(nn.Module):
    """The dVAE encoder: pixels mapped by `map_pixels` [B, C, H, W] -> logits [B, vocab_size, H/8, W/8]."""

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = GROUPS * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(GROUPS):
            out = n_hid * 2 ** g
            layers = [(f"block_{i + 1}", EncoderBlock(width if i == 0 else out, out, n_layers))
                      for i in range(n_blk_per_group)]
            if g < GROUPS - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            width = out
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(width, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.blocks[:-1](x)                                          # may run under autocast
        with torch.autocast(x.device.type, enabled=False):                   # the logits in fp32, as the package
            return self.blocks.output(trunk.float())

    def config(self) -> dict[str, int]:
        return dict(n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group, input_channels=self.input_channels,
                    vocab_size=self.vocab_size)


class DallETokenizer(Tokenizer):
    """DALL-E's encoder behind the tokenizer contract: map_pixels, logits, argmax."""
    kind = "dall_e"

    def __init__(self, encoder: DallEEncoder):
        super().__init__()
        self.encoder = encoder
        self.vocab_size, self.stride, self.in_chans = encoder.vocab_size, 2 ** (GROUPS - 1), encoder.input_channels

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(map_pixels(pixels.float())).argmax(dim=1)     # [B, h, w]

    def description(self) -> dict[str, Any]:
        return {**super().description(), "encoder": self.encoder.config(), "pixels": "map_pixels",
                "logit_laplace_eps": LOGIT_LAPLACE_EPS}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "DallETokenizer":
        return cls(DallEEncoder(**description["encoder"]))


# -------------------------------------------------------------------------------------------
# conversion of the published encoder.pkl


def convert_dall_e(source: Union[str, Path], target: Union[str, Path]) -> DallETokenizer:
    """Read DALL-E's encoder.pkl without running anything from it (dall_e_pickle.py), check that its
    weights are the encoder's, and write them as a tokenizer file. Returns the tokenizer."""
    module = read_module_pickle(source)
    if module.type_name != "dall_e.encoder.Encoder":
        raise ValueError(f"{source} holds a {module.type_name}, not DALL-E's encoder (dall_e.encoder.Encoder): give "
                         "encoder.pkl (decoder.pkl is the other half of the dVAE)")
    state = module.state_dict()
    attributes = module.attributes
    first = state.get("blocks.input.w")
    last = state.get("blocks.output.conv.w")
    if first is None or last is None or first.dim() != 4 or last.dim() != 4:
        raise ValueError(f"{source}: no blocks.input / blocks.output convolution weights in the pickled encoder")
    found = dict(n_hid=int(first.shape[0]), input_channels=int(first.shape[1]), vocab_size=int(last.shape[0]),
                 n_blk_per_group=len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}))
    for key, value in found.items():  # the pickled attributes, where present, must agree with the tensors
        if key in attributes and int(attributes[key]) != value:
            raise ValueError(f"{source}: the encoder says {key}={attributes[key]} but its weights have {value}")
    encoder = DallEEncoder(**found)
    mismatch = state_mismatch(state, encoder.state_dict(), "DALL-E's encoder")
    if mismatch:
        raise ValueError(f"{source}: not the DALL-E encoder's weights ({mismatch})")
    bad = non_finite(state)
    if bad:  # a tokenizer that gives meaningless codes is refused here too, not only when a run loads it
        raise ValueError(f"{source}: non-finite weights (NaN or inf) in {compact(bad)}")
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    tokenizer = DallETokenizer(encoder).freeze()
    save_tokenizer(tokenizer, target, extra={"source": Path(source).name, "converted_by": "tools/convert_tokenizer.py"})
    return tokenizer
