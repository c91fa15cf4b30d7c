"""The GPU paths: bf16 autocast, fused AdamW skipping on the device, flash attention, torch.compile,
FSDP on one device, and a training step that never waits on the host. Marked `gpu`: they run where
a CUDA device exists (tools/gpu_check.sh runs them) and are skipped elsewhere."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_VIT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY_MAE = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=16",
            "optim.batch_size=32", "log.every=1"]


def _tiny_mae(device="cuda"):
    from ssl_vit import recipes
    from ssl_vit.tasks import build

    cfg = recipes.load(["recipe=mae_tiny_digits", *TINY_MAE])
    torch.manual_seed(0)
    return build(cfg).to(device)


def test_bf16_autocast_runs_the_blocks_in_bf16_with_a_finite_loss():
    mae = _tiny_mae()
    seen = set()
    mae.encoder.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = mae(torch.randn(4, 3, 32, 32, device="cuda")).loss
    loss.backward()
    assert seen == {torch.bfloat16} and math.isfinite(loss.item())


def test_fused_adamw_skips_a_non_finite_step_on_the_device():
    parameter = torch.nn.Parameter(torch.randn(8, 8, device="cuda"))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
    parameter.grad = torch.randn(8, 8, device="cuda")
    optimizer.step()
    before = parameter.detach().clone()
    parameter.grad = torch.full((8, 8), float("nan"), device="cuda")
    optimizer.found_inf = torch.ones((), device="cuda")
    optimizer.step()
    assert torch.equal(before, parameter.detach()) and optimizer.state[parameter]["step"].item() == 1


def test_flash_attention_gives_the_math_kernels_features():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ssl_vit import create_encoder

    encoder = create_encoder("vit_small_patch16", img_size=224).cuda().eval()
    images = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = encoder.forward_features(images).float()
        with sdpa_kernel(SDPBackend.MATH):
            math_kernel = encoder.forward_features(images).float()
    assert (flash - math_kernel).abs().max().item() < 5e-2  # bf16 rounding, two kernels


def test_torch_compile_gives_the_eager_loss():
    mae = _tiny_mae()
    images, noise = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, 16, device="cuda")
    eager = mae(images, noise=noise).loss.item()
    compiled = torch.compile(mae)(images, noise=noise).loss.item()
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_fsdp_on_one_device_trains_and_exports(tmp_path, env):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits", *TINY_MAE,
                             f"train.output_dir={out}", "train.max_steps=2", "train.sharding=fsdp",
                             "train.precision=bf16"], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp: 3 blocks" in result.stdout and (out / "model.safetensors").is_file()


SYNCS = """
import json, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from ssl_vit.run import Trainer
cfg = recipes.load(["recipe=mae_tiny_digits", *{tiny!r}, "train.output_dir={out}", "train.precision=bf16"])
trainer = Trainer(cfg)
g = torch.Generator().manual_seed(0)
micro = [dict(images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
              labels=torch.zeros(16, dtype=torch.long)) for _ in range(trainer.plan.accumulation)]
trainer.train_step(micro)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises from here on
trainer.train_step(micro)
torch.cuda.set_sync_debug_mode("default")
print(json.dumps(dict(ok=True, skip_on_device=trainer.step.on_device)))
"""


def test_a_training_step_never_synchronises_with_the_host(tmp_path, env):
    script = tmp_path / "syncs.py"
    script.write_text(SYNCS.format(root=str(ROOT), tiny=TINY_MAE, out=tmp_path / "run"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ok": True, "skip_on_device": True}
