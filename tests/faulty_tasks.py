"""A plugin for the tests of how runs end (loaded with `imports=[tests/faulty_tasks.py]`): MAE
(`faulty_mae`) and DINO (`faulty_dino`) whose forward misbehaves when the environment asks, so that a test can put an error, a slow step or a
non-finite loss exactly where it wants it. The environment, not the recipe, says so: a run and its
resumption then have the same recipe, and the resumed one can behave.

    FAULTY_FAIL_AT=N          the N-th forward call (counted in this process) raises ...
    FAULTY_FAIL_WITH=crash    ... a RuntimeError (a defect: traceback, exit 1)
                     mistake  ... a ConfigError (a user's mistake: one line, exit 2)
                     interrupt ... a KeyboardInterrupt (what a second Ctrl-C raises wherever the run is)
    FAULTY_FAIL_RANK=R        only on rank R (default: every rank)
    FAULTY_SLOW_FROM=N        from the N-th forward call on, each forward first waits FAULTY_SLOW_SECONDS
                              (in small sleeps: Python code runs in between, as in a real forward)
    FAULTY_SLOW_EVAL=S        the k-NN monitor's features wait S seconds per batch
    FAULTY_NAN=1              every loss is NaN

Not a test file (no test_ prefix): pytest does not collect it.
"""
import os
import time
from dataclasses import dataclass

import torch

from ssl_vit.config import ConfigError
from ssl_vit.tasks import register_task
from ssl_vit.tasks.dino import DINO, DINOConfig
from ssl_vit.tasks.mae import MAE, MAEConfig


@dataclass
class FaultyConfig(MAEConfig):
    name: str = "faulty_mae"


@dataclass
class FaultyDINOConfig(DINOConfig):
    name: str = "faulty_dino"


def _wait(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)


class Faulty:
    """The faults, before the task's own forward (put it first among the bases)."""
    calls = 0

    def forward(self, batch, *args, **kwargs):
        Faulty.calls += 1
        env = os.environ
        on_this_rank = env.get("FAULTY_FAIL_RANK") in (None, env.get("RANK", "0"))
        if on_this_rank and Faulty.calls == int(env.get("FAULTY_FAIL_AT", "0")):
            kind = env.get("FAULTY_FAIL_WITH", "crash")
            if kind == "mistake":
                raise ConfigError(f"shard-000001.tar: sample {Faulty.calls} cannot be used (a stand-in for a bad "
                                  "shard read by this rank only)")
            if kind == "interrupt":
                raise KeyboardInterrupt
            print(f"{self.name}: forward call {Faulty.calls} fails, as asked", flush=True)  # the soak's cue
            raise RuntimeError(f"{self.name}: forward call {Faulty.calls} fails, as asked")
        slow_from = int(env.get("FAULTY_SLOW_FROM", "0"))
        if slow_from and Faulty.calls >= slow_from:
            _wait(float(env.get("FAULTY_SLOW_SECONDS", "60")))
        output = super().forward(batch, *args, **kwargs)
        if env.get("FAULTY_NAN"):
            output.loss = output.loss * float("nan")
        return output

    def features(self, images: torch.Tensor) -> torch.Tensor:
        _wait(float(os.environ.get("FAULTY_SLOW_EVAL", "0")))
        return super().features(images)


@register_task
class FaultyMAE(Faulty, MAE):
    """MAE with the faults its environment asks for."""
    name = "faulty_mae"
    Config = FaultyConfig


@register_task
class FaultyDINO(Faulty, DINO):
    """DINO with the faults its environment asks for."""
    name = "faulty_dino"
    Config = FaultyDINOConfig
