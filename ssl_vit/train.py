"""The one training loop every task runs in (arrives with the MAE issue)."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import config
from .config import ConfigError


@config.exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = config.load(list(sys.argv[1:] if argv is None else argv))
    if cfg.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    config.check_data(cfg)
    raise ConfigError("training is not implemented yet: only print_config=true works in this version")
