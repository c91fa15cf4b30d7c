"""A discrete VAE that ssl_vit trains, to tokenize images for BEiT where no tokenizer exists (and offline).

Vector-quantised (VQ-VAE, van den Oord et al. 2017, "Neural Discrete Representation Learning"), not
DALL-E's gumbel-softmax relaxation: its training needs no temperature or KL-weight schedule (DALL-E
anneals both over the first updates, appendix A.2), so every step is the same function of the weights,
which keeps a resumed run exact and DDP's gradient average the whole story.

    images [N, C, H, W] (normalised)
      -> encoder (model.arch=dvae, ssl_vit/tokenizers/vq.py)   z [N, d, h, w], l2-normalised
      -> quantise: the nearest l2-normalised code              z_q = e_k, k [N, h, w] (the tokens)
         (ViT-VQGAN, Yu et al. 2022 §3.2), straight-through    z + (z_q - z).detach()   (VQ-VAE §3.1)
      -> decoder: 3x3 conv, residual blocks, transposed 4x4 convolutions (VQ-VAE §4.1)   [N, C, H, W]
      -> loss: MSE reconstruction + ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2          (VQ-VAE eq. 3)
               + entropy_weight (E[H(q)] - H(E[q])), q = softmax(cos(z, e) / entropy_temperature):
               every assignment confident, all codes used on average (the entropy penalty of MAGVIT-v2,
               Yu et al. 2024 §3.1, here on a learned codebook). Without it the digits run used 182 of
               512 codes on the training images (perplexity 34); with it, all 512 (perplexity 370; README).

Logged beside the loss: the reconstruction error and the codebook's use in the batch (perplexity of
the code histogram, codes used): a collapsed codebook would make BEiT's targets meaningless.

Besides the usual exports, a run writes `tokenizer.safetensors` (+ .json) into its output folder:
the encoder and codebook with the run's pixel normalisation, which `task.tokenizer.path` of a BEiT
run reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, TaskConfig
from ..models import build_encoder
from ..tokenizers import save_tokenizer
from ..models.dvae import DVAEEncoder, ResBlock
from ..tokenizers.vq import VQTokenizer
from .base import ModelExport, Task, TaskOutput, images_of, register_task
from .pictures import tile_grid

TOKENIZER_FILE = "tokenizer.safetensors"


@dataclass
class DVAEConfig(TaskConfig):
    name: str = "dvae"
    commitment_cost: float = 0.25         # VQ-VAE eq. 3: beta, "robust to values from 0.1 to 2.0" (§4.1)
    entropy_weight: float = 0.1           # weight of the entropy penalty (MAGVIT-v2 §3.1); 0: plain VQ-VAE
    entropy_temperature: float = 0.05     # of the soft assignment softmax(cosine / T) the penalty is computed on


@dataclass(kw_only=True)
class DVAEOutput(TaskOutput):
    reconstruction: torch.Tensor        # [N, C, H, W], normalised pixels
    codes: torch.Tensor                 # [N, h, w], the tokens


class Decoder(nn.Module):
    """VQ-VAE's decoder, mirroring the encoder: 3x3 conv from the codes, residual blocks, then one
    transposed 4x4 convolution of stride 2 per downsampling of the encoder (ReLU between)."""

    def __init__(self, code_dim: int, hidden_dim: int, num_res_blocks: int, num_upsamples: int, out_chans: int):
        super().__init__()
        self.stem = nn.Conv2d(code_dim, hidden_dim, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(hidden_dim) for _ in range(num_res_blocks)])
        layers: list[nn.Module] = []
        for i in range(num_upsamples):
            last = i == num_upsamples - 1
            layers += [nn.ReLU(), nn.ConvTranspose2d(hidden_dim, out_chans if last else hidden_dim, 4, stride=2,
                                                     padding=1)]
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.blocks(self.stem(z)))


@register_task
class DVAE(Task):
    """discrete VAE (vector-quantised, van den Oord et al. 2017) trained to tokenize images for BEiT."""
    name = "dvae"
    Config = DVAEConfig
    evaluation = "none"                   # a tokenizer: its codebook use and reconstructions are logged

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if not isinstance(build_encoder_meta(cfg), DVAEEncoder):
            raise ConfigError(f"task.name=dvae trains the dvae encoder: set model.arch=dvae (not {cfg.model.arch})")
        task = cfg.task
        if task.commitment_cost < 0 or task.entropy_weight < 0 or task.entropy_temperature <= 0:
            raise ConfigError(f"task.commitment_cost={task.commitment_cost} and task.entropy_weight="
                              f"{task.entropy_weight} must be >= 0 and task.entropy_temperature="
                              f"{task.entropy_temperature} > 0")

    @classmethod
    def build(cls, cfg, num_classes: int = 0) -> "DVAE":
        task = cfg.task
        return cls(build_encoder(cfg.model, num_classes=0), commitment_cost=task.commitment_cost,
                   entropy_weight=task.entropy_weight, entropy_temperature=task.entropy_temperature,
                   mean=list(cfg.data.mean), std=list(cfg.data.std))

    def __init__(self, encoder: DVAEEncoder, *, commitment_cost: float = 0.25, entropy_weight: float = 0.1,
                 entropy_temperature: float = 0.05, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.decoder = Decoder(config["code_dim"], config["hidden_dim"], config["num_res_blocks"],
                               config["num_downsamples"], config["in_chans"])
        self.commitment_cost, self.entropy_weight = commitment_cost, entropy_weight
        self.entropy_temperature = entropy_temperature
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    # ---------------------------------------------------------------------------------------

    def forward_encoder(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)                        # [N, d, h, w], unit vectors

    def quantize(self, z: torch.Tensor):
        """The nearest code of each feature, straight-through. Returns z_q (for the decoder, with z's
        gradient), the codes [N, h, w], the codebook and commitment terms and the soft assignment."""
        similarity = self.encoder.similarity(z.float())                     # [N, h, w, V]
        codes = similarity.argmax(dim=-1)                                   # [N, h, w]
        z = z.float().permute(0, 2, 3, 1)                                   # [N, h, w, d]
        chosen = self.encoder.normalized_codebook()[codes]                  # [N, h, w, d]
        codebook_loss = F.mse_loss(chosen, z.detach())
        commitment_loss = F.mse_loss(z, chosen.detach())
        z_q = (z + (chosen - z).detach()).permute(0, 3, 1, 2)               # [N, d, h, w]
        soft = (similarity / self.entropy_temperature).softmax(dim=-1).flatten(0, 2)  # [N*h*w, V]
        return z_q, codes, codebook_loss, commitment_loss, soft

    def entropy_penalty(self, soft: torch.Tensor) -> torch.Tensor:
        """E[H(q)] - H(E[q]) over the batch's positions: low when each assignment is confident and the
        codes are used evenly."""
        each = -(soft * torch.log(soft + 1e-10)).sum(dim=-1).mean()
        average = soft.mean(dim=0)
        return each + (average * torch.log(average + 1e-10)).sum()

    def forward_decoder(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)                                            # [N, C, H, W]

    def forward(self, batch: Union[dict, torch.Tensor]) -> DVAEOutput:
        images = images_of(batch)
        z = self.forward_encoder(images)
        z_q, codes, codebook_loss, commitment_loss, soft = self.quantize(z)
        reconstruction = self.forward_decoder(z_q.to(z.dtype))
        reconstruction_loss = F.mse_loss(reconstruction.float(), images.float())
        loss = reconstruction_loss + codebook_loss + self.commitment_cost * commitment_loss
        if self.entropy_weight:
            loss = loss + self.entropy_weight * self.entropy_penalty(soft)
        metrics = {"reconstruction_loss": reconstruction_loss.detach(), **codebook_usage(codes, self.encoder.vocab_size)}
        return DVAEOutput(loss=loss, reconstruction=reconstruction, codes=codes, metrics=metrics)

    # ---------------------------------------------------------------------------------------
    # what the rest of ssl_vit asks of a task

    def tokenizer(self) -> VQTokenizer:
        """The trained encoder as a tokenizer (it shares this task's encoder)."""
        return VQTokenizer(self.encoder, self.mean, self.std)

    def fsdp_units(self) -> list[nn.Module]:
        return super().fsdp_units() + list(self.decoder.blocks)

    def export_state(self, evaluation: Optional[dict] = None) -> ModelExport:
        """model.safetensors: the encoder (timm-style top-level keys, codebook included) and `decoder.*`;
        and tokenizer.safetensors (+ .json) beside it: the trained encoder as a tokenizer for BEiT."""
        export = super().export_state(evaluation)
        export.files[TOKENIZER_FILE] = lambda path: save_tokenizer(self.tokenizer(), path,
                                                                   extra={"trained_by": "ssl_vit task.name=dvae"})
        return export

    def picture_split(self) -> str:
        return "train"

    def pictures(self, images: torch.Tensor, denormalize) -> dict[str, torch.Tensor]:
        reconstruction = self.forward(images).reconstruction
        return {"reconstructions": tile_grid([denormalize(images.float()), denormalize(reconstruction.float())])}


def codebook_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """The batch's code histogram as the perplexity exp(H) of its frequencies (vocab_size when all
    codes are used equally, 1 when one code takes all) and the number of codes used; on the device."""
    flat = codes.flatten()
    counts = torch.zeros(vocab_size, device=codes.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    p = counts / flat.numel()
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"perplexity": perplexity, "codes_used": (counts > 0).sum().float()}


def build_encoder_meta(cfg) -> nn.Module:
    with torch.device("meta"):
        return build_encoder(cfg.model, num_classes=0)


def codebook_usage_of(tokenizer, batches, device: Optional[torch.device] = None) -> dict[str, float]:
    """Perplexity and codes used over whole batches of pixels in [0, 1] (the README's numbers)."""
    counts = torch.zeros(tokenizer.vocab_size)
    for pixels in batches:
        codes = tokenizer(pixels.to(device) if device is not None else pixels).flatten().cpu()
        counts += torch.bincount(codes, minlength=tokenizer.vocab_size).float()
    p = counts / counts.sum()
    return {"perplexity": float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())),
            "codes_used": int((counts > 0).sum()), "positions": int(counts.sum())}
