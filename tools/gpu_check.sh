#!/usr/bin/env bash
# GPU readiness in one script (about 10 minutes on one H100): the tests marked `gpu` (bf16 autocast,
# fused AdamW's on-device skip, flash attention, torch.compile, FSDP on one device, a training step
# that never synchronises with the host), then MAE pre-training steps of ViT-B/16 and ViT-L/16 at
# the paper's per-GPU batch (64: 4096 over 64 GPUs, He et al. 2022 table 8), printing images/s and
# MFU against the GPU's data-sheet bf16 peak; then DINO's step (ViT-S/16, 2 x 224 + 10 x 96 px views, a
# teacher forward and its EMA update) at its per-GPU batch (64: main_dino.py) beside MAE's.
#
#   bash tools/gpu_check.sh                 # from the repository root, in the environment ssl_vit runs in
#   STEPS=20 bash tools/gpu_check.sh        # more timed steps per benchmark (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-10}
python - <<'PY'
import torch
assert torch.cuda.is_available(), "tools/gpu_check.sh needs a CUDA GPU: torch sees none"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
echo "== tests marked gpu"
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
for arch in vit_base_patch16 vit_large_patch16; do
  echo "== MAE step benchmark: $arch, batch 64 per GPU, bf16"
  python tools/benchmark.py mae --device cuda --arch "$arch" --batch 64 --precision bf16 \
      --steps "$steps" --warmup 3 --variants eager
done
echo "== DINO step benchmark: ViT-S/16, 2 + 10 crops, batch 64 per GPU, bf16, beside MAE"
python tools/benchmark.py dino --device cuda --batch 64 --precision bf16 --steps "$steps" --warmup 3
