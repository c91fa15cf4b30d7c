"""Per-sample transforms (in the loader's workers) and per-batch normalisation (on the device).

Workers decode and augment and return uint8 [3, H, W] tensors: a quarter of the bytes of float32
through the worker queues, and no normalisation arithmetic on the CPU. The device then turns a
uint8 batch into a normalised float batch (and applies random erasing, which works on normalised
values), as timm's prefetch loader does.

    train_transform = rrc      RandomResizedCrop(scale) + flip; MAE pre-training (scale 0.2-1, He et
                               al. 2022 A.1) and linear probing (0.08-1, A.3): PIL decodes,
                               torch resizes the crop
                    = randaug  timm's create_transform with RandAugment (fine-tuning, DeiT)
                    = eval     resize to img_size / crop_pct, centre crop (also for cached features)
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from .bit_depth import to_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
TRAIN_TRANSFORMS = ("rrc", "randaug", "eval")


try:  # libjpeg-turbo through torchvision: 0.91 ms vs PIL's 1.13 ms for a 500x375 JPEG (tools/benchmark.py data)
    from torchvision.io import ImageReadMode, decode_jpeg

    # deprecated in torchvision 0.29 in favour of TorchCodec, still the fastest decoder installed;
    # PIL takes over if it goes away or fails on a file (CMYK, progressive oddities)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_jpeg = None


def decode_pil(data: bytes) -> Image.Image:
    return to_rgb(Image.open(io.BytesIO(data)))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(to_rgb(image))


def decode_uint8(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 [3, H, W] at its own size."""
    return pil_to_uint8(decode_pil(data))


def _torchvision_jpeg(data: bytes) -> Optional[torch.Tensor]:
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


class Transform:
    """What the loaders ask of a transform: a sample's encoded bytes -> its view (a uint8 image
    [C, H, W], or a dict of such views of one crop, each stacked into the batch under its key: BEiT's
    model and tokenizer views, or a list of views of any sizes, batched view by view into a list under
    "images": DINO's multi-crop, [global 1, global 2, local 1, ...], every sample the same number and
    sizes). In two steps, so that repeated augmentation decodes an image once for
    its k views: `decode(bytes)` (once per sample; by default nothing: the bytes themselves), then
    `augment(decoded)` (once per view, from the view's own RNG seed). A plain function of the bytes is
    wrapped as one (`as_transform`)."""

    def decode(self, data: bytes) -> Any:
        return data

    def augment(self, source: Any) -> Union[torch.Tensor, dict]:
        raise NotImplementedError

    def __call__(self, data: bytes) -> Union[torch.Tensor, dict]:
        return self.augment(self.decode(data))


class FunctionTransform(Transform):
    """A function of the bytes as a Transform (nothing decoded apart)."""

    def __init__(self, function: Callable[[bytes], Any]):
        self.function = function

    def augment(self, source: bytes) -> Union[torch.Tensor, dict]:
        return self.function(source)


def as_transform(transform: Union[Transform, Callable[[bytes], Any]]) -> Transform:
    return transform if isinstance(transform, Transform) else FunctionTransform(transform)


class RandomResizedCropFlip(Transform):
    """torchvision's RandomResizedCrop (same parameter draws) + horizontal flip, bicubic.

    A JPEG whose crop is at least twice the output is decoded by PIL at 1/2, 1/4 or 1/8 scale in
    the DCT domain (cheaper, and still more pixels than the output needs) and its crop box resized
    by PIL. Otherwise JPEGs decode with libjpeg-turbo through torchvision, other formats with PIL,
    and torch resizes the crop (antialiased): 0.25 ms against PIL's 1.1 ms for a 500x375 image on
    this machine."""

    def __init__(self, size: Sequence[int], scale: Sequence[float], hflip: float):
        self.size, self.scale, self.hflip = list(size), tuple(scale), hflip
        self.ratio = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, as MAE and DeiT use

    def augment(self, data: bytes) -> torch.Tensor:
        """From the bytes themselves: a JPEG is decoded here, at the scale its crop needs."""
        image = Image.open(io.BytesIO(data))
        full_width, full_height = image.size
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        pixels = None
        if image.format == "JPEG":
            out_height, out_width = self.size
            reduce = next((r for r in (8, 4, 2) if height >= r * out_height and width >= r * out_width), 1)
            if reduce > 1:
                image.draft(None, (math.ceil(full_width / reduce), math.ceil(full_height / reduce)))
                sx, sy = image.size[0] / full_width, image.size[1] / full_height
                # the crop box in the reduced image has fractional corners: PIL resizes such a box
                # exactly (rounding it would shift the crop by up to reduce/2 source pixels)
                box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
                small = image.convert("RGB").resize((out_width, out_height), Image.BICUBIC, box=box)
                return self._flip(TF.pil_to_tensor(small))
            if decode_jpeg is not None:
                pixels = _torchvision_jpeg(data)
        if pixels is None:
            pixels = TF.pil_to_tensor(to_rgb(image))
        return self._flip(TF.resized_crop(pixels, top, left, height, width, self.size,
                                          interpolation=InterpolationMode.BICUBIC, antialias=True))

    def _flip(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            return pixels.flip(-1)
        return pixels


class PILTransform(Transform):
    """A PIL-based transform (timm's) that ends in a uint8 tensor; the image is decoded once for its
    views (timm's transforms return new images)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def decode(self, data: bytes) -> Image.Image:
        return decode_pil(data)

    def augment(self, image: Image.Image) -> torch.Tensor:
        image = self.transform(image)
        return image if isinstance(image, torch.Tensor) else pil_to_uint8(image)


def build_transform(data_cfg, img_size: Sequence[int], training: bool) -> Transform:
    """The worker-side transform of a split: encoded bytes -> uint8 [3, H, W]."""
    from timm.data import create_transform

    size = list(img_size)
    name = data_cfg.train_transform if training else "eval"
    if name == "rrc":
        return RandomResizedCropFlip(size, data_cfg.crop_scale, data_cfg.hflip)
    if name == "randaug":
        return PILTransform(_posterize_safe(create_transform(
            size, is_training=True, scale=tuple(data_cfg.crop_scale), hflip=data_cfg.hflip,
            auto_augment=data_cfg.auto_augment, interpolation="bicubic", re_prob=0.0,  # erasing: on the device
            use_prefetcher=True)))
    if name == "eval":
        # timm's eval transform: resize the short side to img_size / crop_pct, centre crop (bicubic)
        return PILTransform(create_transform(size, is_training=False, crop_pct=data_cfg.crop_pct,
                                             interpolation="bicubic", use_prefetcher=True))
    raise ValueError(f"data.train_transform={name!r}: use one of {', '.join(TRAIN_TRANSFORMS)}")


def _posterize_keeping_zero_bits(img, bits_to_keep, **kwargs):
    """timm's RandAugment asks for 0 bits at magnitude 10 ("inc1" posterize); Pillow >= 10 refuses
    (ValueError: bits must be between 1 and 8) where older Pillow returned a black image. Keep the
    old result rather than drop the sample."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from timm.data.auto_augment import posterize

    return posterize(img, bits_to_keep, **kwargs)


def _posterize_safe(transform):
    from timm.data.auto_augment import RandAugment, posterize

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = _posterize_keeping_zero_bits
    return transform


class DeviceNormalize(nn.Module):
    """uint8 [B, C, H, W] on the device -> (x / 255 - mean) / std in float32, then random erasing
    (timm's, per-image, on normalised values) when training with `random_erasing` > 0."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], random_erasing: float = 0.0,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1), persistent=False)
        self.random_erasing = None
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            # DeiT / MAE fine-tuning: probability 0.25, per-pixel random values, one box (timm defaults)
            self.random_erasing = RandomErasing(probability=random_erasing, mode="pixel", max_count=1,
                                                device=str(device or "cpu"))

    def forward(self, images: Union[torch.Tensor, list], training: bool = False) -> Union[torch.Tensor, list]:
        if isinstance(images, list):  # the views of a multi-crop batch, each normalised alike
            return [self(view, training) for view in images]
        x = images.float() * self.scale - self.shift
        if training and self.random_erasing is not None:
            self.random_erasing.device = x.device
            x = self.random_erasing(x)
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] floats, for pictures."""
        return ((x + self.shift) / (self.scale * 255.0)).clamp(0, 1)


