#!/usr/bin/env python
"""Turn OpenAI's DALL-E dVAE encoder (encoder.pkl, the tokenizer of BEiT v1) into a safetensors tokenizer.

    python tools/convert_tokenizer.py encoder.pkl dall_e_encoder.safetensors     # https://cdn.openai.com/dall-e/encoder.pkl
    python pretrain.py recipe=beit_base task.tokenizer.path=dall_e_encoder.safetensors data.train=...

encoder.pkl is a pickle of a whole module: loading it the usual way runs code from the file. This tool
reads it with an unpickler that answers only the classes and tensor-rebuild functions such a file
needs, each with an inert stand-in of its own (ssl_vit/tokenizers/dall_e_pickle.py), and refuses
anything else, naming it; nothing from the file is imported or run. Writes OUT (the encoder's weights
under the dall-e package's names) and OUT with .json (what it is: 8192 codes, stride 8, map_pixels).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="DALL-E's encoder.pkl (torch.save of dall_e.encoder.Encoder)")
    parser.add_argument("out", help="the tokenizer file to write (.safetensors)")
    args = parser.parse_args(argv)
    from ssl_vit.tokenizers.dall_e import convert_dall_e
    from ssl_vit.tokenizers.dall_e_pickle import RefusedPickle

    source, out = Path(args.source), Path(args.out)
    if not source.is_file():
        print(f"error: {source}: no such file (DALL-E's encoder: https://cdn.openai.com/dall-e/encoder.pkl)",
              file=sys.stderr)
        return 2
    if out.suffix != ".safetensors":
        print(f"error: {out}: give a .safetensors name for the tokenizer", file=sys.stderr)
        return 2
    try:
        tokenizer = convert_dall_e(source, out)
    except RefusedPickle as e:
        reason = str(e).removeprefix(f"{source}: ")  # (the reader's messages name the file too)
        print(f"error: refused {source}: {reason}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}: {tokenizer.describe()}; use it with "
          f"task.tokenizer.path={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
