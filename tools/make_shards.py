#!/usr/bin/env python
"""Write webdataset tar shards (and a JSON index) from an image collection.

    python tools/make_shards.py /data/imagenet/train shards/in1k-train --max-count 1000 --workers 8
    python tools/make_shards.py /data/imagenet/val   shards/in1k-val --shuffle false
    python tools/make_shards.py labels.csv           shards/mine          # rows of path,label
    python tools/make_shards.py --digits shards/digits                    # the embedded digits set

Output: OUTPUT-000000.tar, OUTPUT-000001.tar, ... (each sample: KEY.jpg|png|... as stored, KEY.cls;
images of more than 8 bits per sample, such as 16-bit PNGs, become 8-bit PNGs scaled by their bit depth)
and OUTPUT.json (shard list, per-shard counts, class names, total, skipped files). Point a recipe at
either: data.train='OUTPUT-{000000..000009}.tar' or data.train=OUTPUT.json.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl_vit.cli.arguments import parse_bool, positive_int  # noqa: E402  (after the path: a checkout without install)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="an ImageFolder tree (class sub-folders) or a .csv/.tsv of path,label")
    parser.add_argument("output", help="output prefix, e.g. shards/in1k-train")
    parser.add_argument("--digits", action="store_true", help="write the embedded digits set (train and val splits)")
    parser.add_argument("--max-count", type=positive_int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--max-side", type=positive_int, default=None,
                        help="downscale (and re-encode) images whose longer side exceeds this; default: store as is")
    parser.add_argument("--shuffle", type=parse_bool, default=True,
                        help="shuffle the sample order across shards (default true; false keeps the input order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes reading and checking images (default: min(8, cores))")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards with this prefix")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ssl_vit.data.writer import ShardWriteError, items_from_csv, items_from_image_folder, write_shards

    try:
        if args.digits:
            if args.input:
                parser.error("--digits takes only the output prefix")
            from ssl_vit.data.digits import write_digits

            indexes = write_digits(args.output, overwrite=args.overwrite, progress=not args.quiet)
            for split, index in indexes.items():
                print(f"{split}: {index['num_samples']} images in {len(index['shards'])} shard(s): "
                      f"{Path(args.output).parent / index['pattern']}  (index {args.output}-{split}.json)")
            return 0
        if not args.input:
            parser.error("give an input folder or .csv/.tsv (or --digits)")
        source = Path(args.input)
        if not source.exists():
            raise ShardWriteError(f"input {source} does not exist")
        if source.is_file() and source.suffix.lower() in (".csv", ".tsv", ".txt"):
            items, classes = items_from_csv(source)
        else:
            items, classes = items_from_image_folder(source)
        index = write_shards(items, classes, args.output, max_count=args.max_count, max_side=args.max_side,
                             shuffle=args.shuffle, seed=args.seed, workers=args.workers,
                             overwrite=args.overwrite, progress=not args.quiet, source=str(source))
    except ShardWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    print(f"wrote {index['num_samples']} images of {index['num_classes']} classes into {len(index['shards'])} "
          f"shard(s): {output.parent / index['pattern']}  (index {output}.json)")
    if index["skipped"]:
        print(f"skipped {len(index['skipped'])} unreadable file(s); the first ones:", file=sys.stderr)
        for entry in index["skipped"][:5]:
            print(f"  {entry['file']}: {entry['error']}", file=sys.stderr)
        print(f"  (all listed under 'skipped' in {output}.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
