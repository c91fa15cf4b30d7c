"""make_shards on inputs users give it (issue 20's hostile-input walk): images of more than 8 bits per
sample, outputs that cannot be written, empty or binary lists, nonsense numbers. A mistake is one
`error:` line and exit code 2, never a traceback."""
import io
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vit.data.transforms import decode_uint8
from ssl_vit.data.writer import Item, write_shards

ROOT = Path(__file__).resolve().parent.parent
MAKE_SHARDS = ROOT / "tools" / "make_shards.py"


def make_shards(*args):
    return subprocess.run([sys.executable, str(MAKE_SHARDS), *map(str, args), "--quiet"], capture_output=True,
                          text=True, timeout=120)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A PNG whose rows all hold `row`, written by hand: Pillow writes no 16-bit RGB PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress((b"\0" + row) * height)  # filter byte 0 (none) before each row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# -------------------------------------------------------------------------------------------
# more than 8 bits per sample: scaled by the bit depth (65535 -> 255), never clipped at 255

RAMP = np.linspace(0, 1, 64 * 48).reshape(48, 64)  # every level of the range, dark to light


def _encode(image: Image.Image, format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format)
    return out.getvalue()


def grey16_png():
    samples = np.round(RAMP * 65535).astype(np.uint16)
    return _encode(Image.fromarray(samples), "PNG"), samples / 257  # Pillow opens it as "I;16"


def grey16_big_endian_tiff():
    samples = np.round(RAMP * 65535).astype(">u2")
    return _encode(Image.frombytes("I;16B", (64, 48), samples.tobytes()), "TIFF"), samples / 257


def grey16_pgm():
    samples = np.round(RAMP * 65535).astype(np.uint16)  # Pillow opens a 16-bit PGM as "I"
    return b"P5\n64 48\n65535\n" + samples.astype(">u2").tobytes(), samples / 257


def grey32_tiff():
    samples = np.round(RAMP * (2 ** 31 - 1)).astype(np.int32)  # "I", 32 bits, signed: white is 2**31 - 1
    return _encode(Image.fromarray(samples), "TIFF"), samples / (2 ** 31 - 1) * 255


def float_tiff():
    samples = RAMP.astype(np.float32)  # "F", values in [0, 1]
    return _encode(Image.fromarray(samples), "TIFF"), samples * 255


def rgb16_png():
    # Pillow reduces 16-bit RGB to 8-bit "RGB" itself: kept here so that a change there is caught
    row = np.zeros((64, 3), ">u2")
    row[:, 0], row[:, 1], row[:, 2] = np.round(np.linspace(0, 65535, 64)), 30000, 65535
    return png_bytes(64, 48, 16, 2, row.tobytes()), np.broadcast_to(row / 257, (48, 64, 3))


HIGH_BIT_DEPTH = {"grey16.png": grey16_png, "grey16_big_endian.tiff": grey16_big_endian_tiff,
                  "grey16.pgm": grey16_pgm, "grey32.tiff": grey32_tiff, "float.tiff": float_tiff,
                  "rgb16.png": rgb16_png}


@pytest.mark.parametrize("max_side", [None, 32], ids=["stored", "downscaled"])
def test_images_of_more_than_8_bits_keep_their_brightness(tmp_path, max_side):
    items, expected = [], {}
    for name, make in HIGH_BIT_DEPTH.items():
        data, samples_8bit = make()
        items.append(Item(data, 0, name))
        expected[Path(name).stem] = float(np.mean(samples_8bit))  # a 16-bit ramp: about 127.5, not near 255
    index = write_shards(items, ["a"], tmp_path / "deep", max_side=max_side, shuffle=False, progress=False)
    assert index["num_samples"] == len(items) and not index["skipped"]
    with tarfile.open(tmp_path / index["shards"][0]) as tar:
        images = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".cls")}
    for member, data in images.items():
        name = next(stem for stem in expected if member.split(".")[0].endswith(stem))
        pixels = decode_uint8(data).float()  # as the loaders decode it
        assert abs(pixels.mean().item() - expected[name]) < 1, (member, pixels.mean().item(), expected[name])
        if max_side:
            assert max(pixels.shape[1:]) == max_side


def test_the_tool_stores_a_16_bit_png_at_its_true_brightness(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    data, samples_8bit = grey16_png()
    (tmp_path / "images" / "a" / "ramp.png").write_bytes(data)
    result = make_shards(tmp_path / "images", tmp_path / "deep")
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / "deep-000000.tar") as tar:
        png = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png"))
    assert abs(decode_uint8(png).float().mean().item() - samples_8bit.mean()) < 1  # was 254.5 for 127.5


@pytest.mark.parametrize("name", list(HIGH_BIT_DEPTH))
def test_the_loaders_read_such_images_from_shards_other_tools_wrote(name):
    """Shards not made by make_shards.py may hold them as they are: the training and evaluation
    transforms (and predict.py) decode them by their bit depth too."""
    import torch

    from ssl_vit.data.transforms import RandomResizedCropFlip

    data, samples_8bit = HIGH_BIT_DEPTH[name]()
    assert abs(decode_uint8(data).float().mean().item() - float(np.mean(samples_8bit))) < 1
    torch.manual_seed(0)
    crop = RandomResizedCropFlip([16, 16], scale=(1.0, 1.0), hflip=0.0)(data).float()  # the whole image
    assert abs(crop.mean().item() - float(np.mean(samples_8bit))) < 3  # bicubic over a ramp: close, not exact


def test_a_float_image_outside_0_1_is_skipped_with_its_range(tmp_path):
    # no bit depth says what 3.5 means: storing it clipped (white) would be a silent wrong image
    data = _encode(Image.fromarray((RAMP * 3.5).astype(np.float32)), "TIFF")
    index = write_shards([Item(data, 0, "bright.tiff"), Item(grey16_png()[0], 0, "ok.png")], ["a"],
                         tmp_path / "float", progress=False)
    assert index["num_samples"] == 1
    [skipped] = index["skipped"]
    assert skipped["file"] == "bright.tiff" and "[0, 3.5]" in skipped["error"] and "[0, 1]" in skipped["error"]


# -------------------------------------------------------------------------------------------
# outputs and inputs that cannot be used: one line, exit code 2


def one_error_line(result, *expected: str) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "one.png")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    return tmp_path / "images"


@pytest.mark.parametrize("output, expected", [
    ("a_file/x", ["a_file is a file, not a folder"]),
    ("a_file/sub/x", ["a_file is a file, not a folder"]),
    ("a_folder", ["is a folder", "a_folder/train"]),  # else a_folder-000000.tar lands beside it
    ("", ["names no file", "shards/train"]),
])
def test_an_output_that_cannot_be_a_prefix_is_one_line(images, output, expected):
    prefix = str(images.parent / output) if output else ""
    one_error_line(make_shards(images, prefix), *expected)
    assert not list(images.parent.glob("*.tar*"))


def test_an_output_folder_without_write_permission_is_one_line(images):
    # /sys refuses new files to everybody, root included (a chmod'ed folder does not stop root)
    one_error_line(make_shards(images, "/sys/ssl_vit_shards"), "cannot write", "/sys", "folder you can write to")


@pytest.mark.parametrize("content, expected", [(b"", "no images found"),
                                               (b"\xff\xfe\x00\x01 binary", "not a UTF-8 text file")])
def test_an_empty_or_binary_list_is_one_line(tmp_path, content, expected):
    (tmp_path / "list.csv").write_bytes(content)
    one_error_line(make_shards(tmp_path / "list.csv", tmp_path / "out"), expected, "list.csv")


@pytest.mark.parametrize("option", ["--max-side", "--max-count", "--workers"])
def test_counts_below_one_are_refused_by_the_parser(images, option):
    result = make_shards(images, images.parent / "out", option, "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {option}: must be >= 1, got -1" in result.stderr.strip().splitlines()[-1]
    assert not list(images.parent.glob("out*"))  # --max-side -1 wrote 1x1-pixel images
