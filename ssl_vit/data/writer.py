"""Writing webdataset shards from an image collection (used by tools/make_shards.py and the digits set).

    ImageFolder tree | CSV/TSV of path,label | in-memory images
      -> list of (source, label), shuffled (seeded) so that every shard holds every class
      -> parallel workers: read bytes, check they decode, downscale only if --max-side asks,
         bring images of more than 8 bits per sample to 8 bits
      -> tar shards PREFIX-000000.tar ... ({key}.jpg|png|..., {key}.cls), each written to a
         temporary name and renamed when complete
      -> PREFIX.json: shard names, per-shard counts, class names, total, skipped files

Images are stored as they are (no re-encoding), so writing is I/O-bound and lossless; the exceptions
are a downscale (--max-side) and images of more than 8 bits per sample (16-bit grey PNG/TIFF/PGM,
32-bit integer or float TIFF), stored as 8-bit PNG scaled by their bit depth (see `to_8bit`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import tarfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from PIL import Image

from .bit_depth import more_than_8_bits, to_8bit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
INDEX_FORMAT = "ssl_vit-shards"
# PIL's format names -> the extension stored in the shard (which picks the decoder when reading)
EXTENSION_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tiff",
                       "GIF": "gif", "MPO": "jpg"}


class ShardWriteError(ValueError):
    """Input that cannot be turned into shards; the message says what to do."""


@dataclass
class Item:
    source: Union[str, bytes]   # a file path, or encoded image bytes
    label: int
    name: str                   # for keys and error messages


# -------------------------------------------------------------------------------------------
# inputs


def items_from_image_folder(root: Union[str, Path]) -> tuple[list[Item], list[str]]:
    """torchvision's ImageFolder convention: sorted class sub-folders -> label ids 0..C-1."""
    root = Path(root)
    if not root.is_dir():
        raise ShardWriteError(f"{root} is not a directory (expected class sub-folders of images, or a .csv/.tsv)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ShardWriteError(f"{root} has no class sub-folders: expected {root}/<class>/<image>.jpg")
    items = []
    for label, name in enumerate(classes):
        for dirpath, _, files in os.walk(root / name, followlinks=True):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    path = Path(dirpath) / file
                    items.append(Item(str(path), label, str(path.relative_to(root))))
    return items, classes


def items_from_csv(path: Union[str, Path]) -> tuple[list[Item], list[str]]:
    """Rows of `path,label` (comma or tab separated, optional header). Labels are integers or
    class names (sorted names -> ids); relative paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ShardWriteError(f"{path} is not a UTF-8 text file (byte {e.start}: {e.reason}): give a .csv/.tsv of "
                              "path,label rows, or a folder of class sub-folders") from None
    first_line = next(iter(text.splitlines()), "")  # an empty file has none: no rows, "no images found"
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first_line else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    for number, row in enumerate(rows, 1):
        if len(row) < 2:
            raise ShardWriteError(f"{path}: row {number} {row!r} needs two columns: path,label")
    labels = [r[1].strip() for r in rows]
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        ids = [int(label) for label in labels]
        if min(ids, default=0) < 0:
            raise ShardWriteError(f"{path}: labels must be >= 0, found {min(ids)}")
        classes = [str(i) for i in range(max(ids, default=-1) + 1)]
    else:
        classes = sorted(set(labels))
        ids = [classes.index(label) for label in labels]
    items = []
    for row, label in zip(rows, ids):
        image = Path(row[0].strip())
        image = image if image.is_absolute() else path.parent / image
        items.append(Item(str(image), label, row[0].strip()))
    return items, classes


# -------------------------------------------------------------------------------------------
# per-image work (in worker processes)


def _sanitise(name: str) -> str:
    # webdataset splits key and extension at the first dot of the file name: no dots in keys
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).with_suffix("").as_posix())[-80:]


def prepare(item: Item, max_side: Optional[int]) -> tuple[str, bytes, Optional[str]]:
    """(extension, bytes, None) for a readable image, or ("", b"", error) for one to skip."""
    try:
        data = item.source if isinstance(item.source, bytes) else Path(item.source).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            extension = EXTENSION_OF_FORMAT.get(image.format)
            if extension is None:
                return "", b"", f"unsupported image format {image.format}"
            size = _downscaled_size(image.size, max_side)
            if size and extension == "jpg":
                image.draft("RGB", size)  # DCT-domain reduction first; never below the target size
            elif not size:
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))  # cheap full check
            image.load()  # decodes: catches truncated and corrupt files
            if size or more_than_8_bits(image.mode):
                return _reencode(image, extension, size)
        return extension, data, None
    except Exception as e:  # any unreadable file is skipped and reported, never fatal
        return "", b"", f"{type(e).__name__}: {e}"


def _downscaled_size(size: tuple[int, int], max_side: Optional[int]) -> Optional[tuple[int, int]]:
    """The size --max-side asks for, or None when the image is small enough already."""
    if not max_side or max(size) <= max_side:
        return None
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _reencode(image: Image.Image, extension: str, size: Optional[tuple[int, int]]) -> tuple[str, bytes, None]:
    """The image at 8 bits per sample, resized to `size` if given: a JPEG stays JPEG, anything else
    becomes PNG (lossless, and every loader reads it)."""
    try:
        image = to_8bit(image)
    except ValueError as error:  # loud: clipping or guessing another range would store a wrong image
        raise ShardWriteError(str(error)) from None
    image = image.convert("RGB" if image.mode not in ("L", "RGB", "RGBA") else image.mode)
    if size:
        image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    if extension == "jpg" and image.mode != "RGBA":
        image.save(out, "JPEG", quality=95)
        return "jpg", out.getvalue(), None
    image.save(out, "PNG")
    return "png", out.getvalue(), None


def _prepare_chunk(args: tuple[list[Item], Optional[int]]) -> list[tuple[str, bytes, Optional[str]]]:
    items, max_side = args
    return [prepare(item, max_side) for item in items]


# -------------------------------------------------------------------------------------------
# writing


def existing_outputs(prefix: Union[str, Path]) -> list[Path]:
    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + r"-\d{6}\.tar(\.tmp)?$")
    found = [p for p in prefix.parent.glob(prefix.name + "-*") if pattern.match(p.name)]
    index = prefix.with_name(prefix.name + ".json")
    return sorted(found + ([index] if index.exists() else []))


def write_shards(items: Sequence[Item], classes: Sequence[str], prefix: Union[str, Path], *,
                 max_count: int = 1000, max_side: Optional[int] = None, shuffle: bool = True, seed: int = 0,
                 workers: int = 1, overwrite: bool = False, progress: bool = True,
                 source: str = "") -> dict:
    """Write `items` into PREFIX-000000.tar, ... and PREFIX.json; returns the index."""
    prefix = Path(prefix)
    _check_output(prefix)
    if not items:
        raise ShardWriteError(f"no images found in {source or 'the input'}: nothing to write "
                              f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    if max_count <= 0:
        raise ShardWriteError(f"--max-count must be positive, got {max_count}")
    old = existing_outputs(prefix)
    if old and not overwrite:
        raise ShardWriteError(f"{prefix}: {len(old)} output file(s) exist already (e.g. {old[0]}); "
                              "pass --overwrite to replace them, or choose another output prefix")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for path in old:
            path.unlink()
        writer = _ShardFile(prefix, 0)  # here, so that an output that cannot be written stops before any reading
    except OSError as e:
        raise _cannot_write(e, prefix) from e

    order = list(range(len(items)))
    if shuffle:  # spread classes over all shards, so that a few shards already see every class
        random.Random(seed).shuffle(order)
    chunk = 64
    chunks = [([items[i] for i in order[s:s + chunk]], max_side) for s in range(0, len(order), chunk)]

    shards, counts, skipped = [], [], []
    written = 0
    bar = _progress(len(items), progress, f"writing {prefix.name}")
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = _ordered_map(pool, _prepare_chunk, chunks, ahead=4 * workers)
        for (chunk_items, _), prepared in zip(chunks, results):
            for item, (extension, data, error) in zip(chunk_items, prepared):
                bar.update(1)
                if error:
                    skipped.append((item.name, error))
                    continue
                if writer.count == max_count:
                    shards.append(writer.close()), counts.append(max_count)
                    writer = _ShardFile(prefix, len(shards))
                key = f"{written:09d}_{_sanitise(item.name)}"
                writer.add(key, extension, data, item.label)
                written += 1
        if writer.count:
            counts.append(writer.count)
            shards.append(writer.close())
        else:
            writer.discard()
    except OSError as e:  # from writing: the workers report unreadable images as skipped, never raise
        writer.discard()
        raise _cannot_write(e, prefix) from e
    except BaseException:
        writer.discard()
        raise
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    if not written:
        raise ShardWriteError(f"none of the {len(items)} images could be read (first error: {skipped[0][1]})")

    index = {
        "format": INDEX_FORMAT, "version": 1, "source": source, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "num_samples": written, "num_classes": len(classes), "classes": list(classes),
        "shards": shards, "counts": counts,
        "pattern": f"{prefix.name}-{{000000..{len(shards) - 1:06d}}}.tar",
        "skipped": [{"file": name, "error": error} for name, error in skipped],
    }
    index_path = prefix.with_name(prefix.name + ".json")
    tmp = index_path.with_name(index_path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, index_path)  # the index appears last: its presence means the shards are complete
    except OSError as e:
        raise _cannot_write(e, prefix) from e
    return index


def _check_output(prefix: Path) -> None:
    """Refuse, before any image is read, an output prefix that names no file or whose folder cannot exist."""
    if prefix.name in ("", ".", ".."):
        raise ShardWriteError(f"output prefix {str(prefix)!r} names no file: give a folder and a name, "
                              "e.g. shards/train (writes shards/train-000000.tar ... and shards/train.json)")
    if prefix.is_dir():
        # the shards would land beside the folder as FOLDER-000000.tar, not in it
        raise ShardWriteError(f"output prefix {prefix} is a folder; the output names files, so give a name in it, "
                              f"e.g. {prefix / 'train'} (writes {prefix / 'train'}-000000.tar ...)")
    blocker = next((p for p in (prefix.parent, *prefix.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ShardWriteError(f"cannot make the output folder {prefix.parent}: {blocker} is a file, not a folder; "
                              "choose an output prefix in a folder (missing folders are created)")


def _cannot_write(error: OSError, prefix: Path) -> ShardWriteError:
    return ShardWriteError(f"cannot write {error.filename or prefix}: {error.strerror or error}; choose an output "
                           "prefix in a folder you can write to, on a disk with space")


class _ShardFile:
    """One tar shard, written under a temporary name and renamed when closed."""

    def __init__(self, prefix: Path, number: int):
        self.path = prefix.with_name(f"{prefix.name}-{number:06d}.tar")
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w")
        self.count = 0

    def add(self, key: str, extension: str, data: bytes, label: int) -> None:
        for name, payload in ((f"{key}.{extension}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> str:
        self.tar.close()
        os.replace(self.tmp, self.path)
        return self.path.name

    def discard(self) -> None:
        try:
            self.tar.close()
        except OSError:  # the write that failed (a full disk) fails again here; its error is being raised
            pass
        self.tmp.unlink(missing_ok=True)


def _progress(total: int, enabled: bool, description: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit="img", dynamic_ncols=True)


def _ordered_map(pool: Optional[ProcessPoolExecutor], fn, jobs: list, ahead: int) -> Iterator:
    """map() that keeps at most `ahead` jobs in flight, so results never pile up in memory."""
    if pool is None:
        yield from map(fn, jobs)
        return
    pending = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
