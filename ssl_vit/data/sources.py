"""Where a split's shards are: brace patterns, lists, `pipe:` commands, or a make_shards index.

    data.train = 'shards/in1k-train-{000000..001281}.tar'     brace pattern (webdataset's expand_urls)
               = 'a-{0..3}.tar::b-{0..3}.tar'                 several patterns
               = [a.tar, b.tar]                               a YAML list
               = 'pipe:aws s3 cp s3://bucket/x-{0..9}.tar -'  any command that writes a tar to stdout
               = shards/in1k-train.json                       the index written by make_shards.py

The index also gives per-shard sample counts, which fix the length of an epoch; for other
sources the counts are looked up in an index lying next to local shards, or must be given as
data.samples_per_epoch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from webdataset.shardlists import expand_urls

from ..config import MAKE_SHARDS_HINT, ConfigError
from .writer import IMAGE_EXTENSIONS, INDEX_FORMAT


@dataclass
class ShardSource:
    spec: str                               # what the user wrote, for messages
    urls: list[str]
    counts: Optional[list[int]] = None      # samples per shard, when known
    classes: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> Optional[int]:
        return sum(self.counts) if self.counts is not None else None


def resolve(spec: Union[str, Sequence[str]], what: str = "data.train") -> ShardSource:
    """Expand a shard spec into URLs; local files must exist (the error says how to make them)."""
    if isinstance(spec, str) and Path(spec).is_dir():
        images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(spec).rglob("*") if p.is_file())
        kind = "a folder of images" if images else "a folder, not shards"
        raise ConfigError(f"{what}={spec} is {kind}: training reads webdataset shards. Make them once with "
                          f"`python tools/make_shards.py {spec} shards/{Path(spec).name or 'data'}` and pass "
                          f"{what}=shards/{Path(spec).name or 'data'}.json")
    if isinstance(spec, str) and spec.endswith(".json"):
        return read_index(Path(spec), what)
    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls = [url for s in specs for url in expand_urls(s)]
    shown = spec if isinstance(spec, str) else ", ".join(specs)
    if not urls:
        raise ConfigError(f"{what}={shown!r} names no shards; {MAKE_SHARDS_HINT}")
    local = [u for u in urls if _is_local(u)]
    missing = [u for u in local if not Path(_local_path(u)).is_file()]
    if missing and len(missing) == len(urls):
        raise ConfigError(f"{what}={shown!r} matches no files (e.g. {missing[0]} does not exist); {MAKE_SHARDS_HINT}")
    if missing:
        raise ConfigError(f"{what}={shown!r}: {len(missing)} of {len(urls)} shards do not exist "
                          f"(first: {missing[0]}); fix the pattern's range or remake the shards")
    source = ShardSource(spec=str(shown), urls=urls)
    if len(local) == len(urls):
        _counts_from_sibling_index(source)
    return source


def read_index(path: Path, what: str = "data.train") -> ShardSource:
    if not path.is_file():
        raise ConfigError(f"{what}={str(path)!r}: no such index file; {MAKE_SHARDS_HINT}")
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{path} is not a shard index written by tools/make_shards.py")
    urls = [str(path.parent / name) for name in index["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{path} lists {len(missing)} shard(s) that do not exist (first: {missing[0]})")
    return ShardSource(spec=str(path), urls=urls, counts=list(index["counts"]), classes=list(index["classes"]))


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and not re.match(r"^[a-z][a-z0-9+.-]*://", url) or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _counts_from_sibling_index(source: ShardSource) -> None:
    """Local shards written by make_shards.py have an index beside them that knows their sizes."""
    folders = {Path(_local_path(u)).resolve().parent for u in source.urls}
    wanted = {Path(_local_path(u)).resolve() for u in source.urls}
    for folder in folders:
        for index_path in folder.glob("*.json"):
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
                continue
            sizes = {(index_path.parent / n).resolve(): c for n, c in zip(index["shards"], index["counts"])}
            if wanted <= set(sizes):
                source.counts = [sizes[Path(_local_path(u)).resolve()] for u in source.urls]
                source.classes = list(index["classes"])
                return
