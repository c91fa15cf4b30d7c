"""A run's state between steps: what a checkpoint holds beyond model, optimizer and RNG (TrainState),
and what a step changes before its update, so that an abandoned step leaves no trace (StepStart)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch


@dataclass
class TrainState:
    """What a checkpoint needs beyond model, optimizer and RNG (which Accelerate saves); JSON."""
    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    world_size: int = 1
    best: dict = field(default_factory=dict)     # the best evaluation so far (classification): metrics + step
    history: list = field(default_factory=list)  # resumes: [{"step":, "world_size":}]
    init_sha256: Optional[str] = None            # the file the run started from, to notice it changed
    evaluation_due: bool = False                 # a stop abandoned the evaluation of this step: redone on resume


def starts_over(resume: str) -> bool:
    return str(resume).lower() in ("false", "no", "off", "none")


class StepStart:
    """What a step changes before its update, recorded at its start so that an abandoned step leaves
    no trace: the RNG states (the ones Accelerate's save_state saves: Python's, NumPy's, torch's CPU
    and CUDA generators; a step draws masks and crops from them), the module's buffers (BatchNorm
    statistics, updated by the forward) and Accelerate's count of micro-batches (its `step`, saved in
    the checkpoint: it decides at which micro-batch gradients are synchronised and the optimizer
    steps, so one abandoned micro-batch would shift every later step's accumulation by one).
    Parameters and optimizer states change only in the update, which is never abandoned. Costs one
    small copy of each per step."""

    def __init__(self, module, accelerator=None):
        parameters = {id(p) for p in module.parameters()}
        self.buffers = [t for t in module.state_dict(keep_vars=True).values() if id(t) not in parameters]
        self.accelerator = accelerator

    def capture(self) -> tuple:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        counter = None
        if self.accelerator is not None:
            counter = (self.accelerator.step, self.accelerator.gradient_state.sync_gradients)
        return (random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda,
                [b.detach().clone() for b in self.buffers], counter)

    def restore(self, saved: tuple) -> None:
        python, numpy_state, cpu, cuda, buffers, counter = saved
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        with torch.no_grad():
            for buffer, value in zip(self.buffers, buffers):
                buffer.copy_(value)
        if counter is not None:
            self.accelerator.step = counter[0]
            self.accelerator.gradient_state._set_sync_gradients(counter[1])
