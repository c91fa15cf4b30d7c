"""MAE against an independent transcription of the reference code (facebookresearch/mae, models_mae.py)."""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from ssl_vit import create_encoder, load_weights
from ssl_vit.tasks import MAE

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 2, 4
DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 2, 4


def reference_sincos(dim, grid):
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), emb], axis=0)).float().unsqueeze(0)


class ReferenceMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT, written out plainly (square images, 3 channels)."""

    def __init__(self, norm_pix_loss=True, mask_ratio=0.75):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(IMG, PATCH, 3, DIM)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(reference_sincos(DIM, IMG // PATCH), requires_grad=False)
        self.blocks = nn.ModuleList([Block(DIM, HEADS, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(DEPTH)])
        self.norm = norm(DIM)
        self.decoder_embed = nn.Linear(DIM, DEC_DIM)
        self.mask_token = nn.Parameter(torch.randn(1, 1, DEC_DIM) * 0.02)
        self.decoder_pos_embed = nn.Parameter(reference_sincos(DEC_DIM, IMG // PATCH), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(DEC_DIM, DEC_HEADS, 4.0, qkv_bias=True, norm_layer=norm)
                                             for _ in range(DEC_DEPTH)])
        self.decoder_norm = norm(DEC_DIM)
        self.decoder_pred = nn.Linear(DEC_DIM, PATCH ** 2 * 3)
        self.norm_pix_loss, self.mask_ratio, self.n = norm_pix_loss, mask_ratio, n
        for p in self.parameters():  # random, non-trivial values everywhere (biases and norms too)
            if p.requires_grad:
                nn.init.normal_(p, std=0.05)

    def patchify(self, imgs):
        p, h = PATCH, IMG // PATCH
        x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * h, p ** 2 * 3)

    def random_masking(self, x, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward(self, imgs, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
        return loss, pred, mask


def ours(norm_pix_loss=True, mask_ratio=0.75):
    encoder = create_encoder("vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                             num_heads=HEADS, pos_embed="sincos")
    return MAE(encoder, decoder_dim=DEC_DIM, decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS,
               mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("with_decoder", [True, False])
def test_official_checkpoint_gives_the_reference_loss(tmp_path, norm_pix_loss, with_decoder):
    torch.manual_seed(0)
    reference = ReferenceMAE(norm_pix_loss=norm_pix_loss).eval()
    state = reference.state_dict()
    if not with_decoder:  # the released mae_pretrain_vit_*.pth hold the encoder only
        state = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": state}, tmp_path / "mae.pth")
    model = ours(norm_pix_loss=norm_pix_loss).eval()
    report = load_weights(model, tmp_path / "mae.pth", strict=with_decoder, verbose=False)
    if not with_decoder:
        assert all(k.startswith(("decoder_", "mask_token")) for k in report.missing)
        model.load_state_dict({k: v for k, v in reference.state_dict().items()
                               if k.startswith(("decoder_", "mask_token"))}, strict=False)
    images = torch.randn(3, 3, IMG, IMG)
    noise = torch.rand(3, (IMG // PATCH) ** 2)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = reference(images, noise)
        out = model(images, noise=noise)
    assert torch.equal(out.mask, ref_mask)
    assert torch.allclose(out.pred, ref_pred, atol=1e-5)
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_masking_keeps_the_lowest_noise_patches_per_sample():
    model = ours(mask_ratio=0.75)
    noise = torch.rand(5, 16)
    ids_keep, ids_restore, mask = model.random_masking(5, torch.device("cpu"), noise)
    assert ids_keep.shape == (5, 4) and mask.shape == (5, 16)
    for b in range(5):
        expected = set(torch.topk(noise[b], 4, largest=False).indices.tolist())
        assert set(ids_keep[b].tolist()) == expected
        assert mask[b].sum() == 12 and set(torch.nonzero(mask[b] == 0).flatten().tolist()) == expected
    # a given noise is a given mask; no noise draws a fresh one
    assert torch.equal(model.random_masking(5, torch.device("cpu"), noise)[2], mask)
    assert not torch.equal(model.random_masking(5, torch.device("cpu"))[2], mask)


def test_loss_and_norm_pix_by_hand():
    torch.manual_seed(1)
    model = ours(norm_pix_loss=True).eval()
    images, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, 16)
    with torch.no_grad():
        out = model(images, noise=noise)
    total, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patch = images[b, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH]  # [C, p, q]
                pixels = patch.permute(1, 2, 0).reshape(-1).double()                         # (p, q, c) order
                target = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6).sqrt()
                index = i * 4 + j
                if out.mask[b, index] == 1:
                    total += ((out.pred[b, index].double() - target) ** 2).mean().item()
                    count += 1
    assert count == 2 * 12
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_patchify_round_trip_and_non_square_images():
    encoder = create_encoder("vit_tiny_patch16", img_size=[16, 32], patch_size=8, embed_dim=DIM, depth=1,
                             num_heads=HEADS, pos_embed="sincos")
    model = MAE(encoder, decoder_dim=DEC_DIM, decoder_depth=1, decoder_heads=DEC_HEADS)
    images = torch.randn(2, 3, 16, 32)
    assert torch.equal(model.unpatchify(model.patchify(images)), images)
    out = model(images)
    assert out.pred.shape == (2, 8, 8 * 8 * 3) and out.mask.sum(1).tolist() == [6.0, 6.0]


def test_encoder_sees_only_the_visible_patches():
    model = ours()
    seen = {}
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.update(tokens=i[0].shape[1]))
    model(torch.randn(2, 3, IMG, IMG))
    assert seen["tokens"] == 1 + 4  # class token + 25% of 16 patches


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = ours()
    weight = model.decoder_blocks[0].mlp.fc1.weight
    bound = (6 / (weight.shape[0] + weight.shape[1])) ** 0.5  # xavier-uniform
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert torch.all(model.decoder_blocks[0].mlp.fc1.bias == 0)
    assert torch.all(model.encoder.blocks[0].norm1.weight == 1)
    patch = model.encoder.patch_embed.proj.weight
    flat_bound = (6 / (patch.shape[0] + patch[0].numel())) ** 0.5  # xavier as a linear
    assert patch.abs().max() <= flat_bound
    assert 0.01 < model.mask_token.std() < 0.04 and 0.01 < model.encoder.cls_token.std() < 0.04


def test_reconstruction_pastes_the_visible_patches_back():
    model = ours(norm_pix_loss=True)
    images = torch.randn(2, 3, IMG, IMG)
    pictures = model.reconstruct(images, torch.rand(2, 16))
    visible = pictures["mask"] == 0
    assert torch.equal(pictures["pasted"][visible], images[visible])
    assert torch.equal(pictures["masked"][~visible], torch.zeros_like(images)[~visible])
