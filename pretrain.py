"""Pre-train or train a model from a recipe: `accelerate launch pretrain.py recipe=NAME [key=value ...]`.

A thin entry point; the work is in ssl_vit (cli/commands.py, run/). See the README and docs/ for recipes and options.
"""
import sys

from ssl_vit.cli.commands import pretrain

if __name__ == "__main__":
    sys.exit(pretrain(sys.argv[1:]))
