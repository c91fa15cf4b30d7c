"""argparse types the command-line tools share (plain Python: tools/make_shards.py imports no torch).
argparse prefixes their messages with the option ("argument --top-k: must be >= 1, got -1")."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A whole number >= 1: argparse's own int() lets 0 and negative numbers through (--top-k -1 crashed
    torch's topk, --max-side -1 shrank every image to 1x1 pixels without a word)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
