"""Pre-train or train a model from a recipe: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

A thin entry point; the work is in ssl_vit (commands.py, train.py). See the README for recipes and options.
"""
import sys

from ssl_vit.commands import pretrain

if __name__ == "__main__":
    sys.exit(pretrain(sys.argv[1:]))
