"""Pre-train or train a model from a recipe: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

A thin entry point; the work is in ssl_vit.train. See the README for recipes and options.
"""
import sys

from ssl_vit.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
