"""The named sizes of the Swin family (the table swin.py's family and swin_weights.py's fitting read)."""
from __future__ import annotations

from typing import Any

# Liu et al. 2021 §3.3: Swin-T / S / B / L are C = 96 / 96 / 128 / 192 wide with {2, 2, 6, 2} or
# {2, 2, 18, 2} blocks per stage, heads of d = 32 channels, windows of M = 7 at 224 px. Windows of 12
# at 384 px (the paper's 384 fine-tuning, table 1) and of 6 at 192 px (SimMIM's pre-training of
# Swin-B, Xie et al. 2022 §4.1; microsoft/SimMIM configs *_img192_window6_*).
SIZES = {
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    "large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48]),
}
WINDOWS = {7: 224, 6: 192, 12: 384}  # window -> the image size it goes with
ARCHS: dict[str, dict[str, Any]] = {
    f"swin_{size}_patch4_window{window}": dict(patch_size=4, window_size=window, img_size=image, mlp_ratio=4.0,
                                                **shape)
    for size, shape in SIZES.items() for window, image in WINDOWS.items()}
