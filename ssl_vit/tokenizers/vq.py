"""ssl_vit's own visual tokenizer: the trained encoder of the discrete VAE (models/dvae.py, trained by
tasks/dvae.py) behind the tokenizer contract, with the pixel normalisation its run trained with."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..models.dvae import DVAEEncoder, DVAEEncoderConfig
from .base import Tokenizer


def random_tokenizer_config(in_chans: int = 3) -> dict[str, Any]:
    """task.tokenizer.path=random: the encoder at its defaults."""
    defaults = DVAEEncoderConfig()
    return dict(arch="dvae", img_size=[224, 224], in_chans=in_chans, num_classes=0, hidden_dim=defaults.hidden_dim,
                num_downsamples=defaults.num_downsamples, num_res_blocks=defaults.num_res_blocks,
                code_dim=defaults.code_dim, vocab_size=defaults.vocab_size)


class VQTokenizer(Tokenizer):
    """The dvae encoder as a tokenizer: pixels in [0, 1] normalised with its training run's mean and
    std, then the nearest code of each feature, in fp32."""
    kind = "vq"

    def __init__(self, encoder: DVAEEncoder, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.encoder = encoder
        self.vocab_size, self.stride, self.in_chans = encoder.vocab_size, encoder.stride, encoder.config["in_chans"]
        self.mean_values, self.std_values = [float(v) for v in mean], [float(v) for v in std]
        self.register_buffer("mean", torch.tensor(self.mean_values).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.std_values).view(1, -1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pixels.device.type, enabled=False):
            return self.encoder.codes((pixels.float() - self.mean) / self.std)

    def description(self) -> dict[str, Any]:
        encoder = {**self.encoder.config, "num_classes": 0}
        return {**super().description(), "encoder": encoder, "mean": self.mean_values, "std": self.std_values}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "VQTokenizer":
        return cls(DVAEEncoder(**description["encoder"]), description["mean"], description["std"])

    @classmethod
    def random(cls, config: dict[str, Any], seed: int) -> "VQTokenizer":
        with torch.random.fork_rng(devices=[]):  # its own numbers: the run's RNG is left as it was
            torch.manual_seed(seed)
            encoder = DVAEEncoder(**config)
        return cls(encoder, [0.5] * config["in_chans"], [0.5] * config["in_chans"]).freeze()
