"""Images of more than 8 bits per sample (16-bit PNG and TIFF, 32-bit and float TIFF, 16-bit PGM),
read faithfully: scaled to 8 bits by their bit depth. Pillow's own convert("L") / convert("RGB")
clips such samples at 255 instead, which turns a 16-bit image near-white (a mean of 254.6 for an
image whose true mean is 127.7). The shard writer stores them converted; the loaders and predict.py
convert what other tools wrote. PIL and NumPy only: tools/make_shards.py does not import torch.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB, high bit depths scaled (`to_8bit`) rather than clipped."""
    return to_8bit(image).convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """An image of more than 8 bits per sample as 8-bit grey ("L"), scaled by its bit depth (65535 ->
    255); any other image as it is. Pillow already reduces 16-bit RGB(A) PNGs to
    8-bit RGB(A) on reading; 16-bit grey stays "I;16" (PNG, TIFF), "I;16B" (big-endian TIFF) or "I"
    (PGM, scaled to 65535 by Pillow; PNG before Pillow 10; 32-bit TIFF), and float TIFFs are "F"."""
    if not more_than_8_bits(image.mode):
        return image
    # tobytes() and the mode's byte order: numpy's view of an "I;16B" image swaps its bytes
    samples = np.frombuffer(image.tobytes(), dtype=_SAMPLE_TYPE[image.mode]).reshape(image.height, image.width)
    top = _white(image)
    low, high = (samples.min(), samples.max()) if samples.size else (0, 0)
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= top):
        # loud: clipping or guessing another range would give a wrong image without a word
        raise ValueError(f"mode {image.mode} image with values in [{low:g}, {high:g}], outside the [0, {top:g}] "
                         "its bit depth holds: convert it to 8 bits yourself")
    scaled = np.round(samples.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled)


# the numpy type of one sample in the bytes of each mode of more than 8 bits ("I" and "F" are native)
_SAMPLE_TYPE = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "=i4", "F": "=f4"}


def more_than_8_bits(mode: str) -> bool:
    return mode in _SAMPLE_TYPE


def _white(image: Image.Image) -> float:
    """The sample value of white: the largest its bit depth holds."""
    if image.mode == "F":
        return 1.0  # float images hold [0, 1] by convention (scikit-image, OpenCV, torchvision)
    if image.format == "TIFF":  # tags 258 and 339: BitsPerSample and SampleFormat (2: signed)
        bits, signed = image.tag_v2.get(258, (16,))[0], image.tag_v2.get(339, (1,))[0] == 2
        return 2.0 ** (bits - signed) - 1
    # "I;16*", and "I" from a PGM (Pillow scales its maxval to 65535) or a 16-bit PNG (Pillow < 10)
    return 65535.0
