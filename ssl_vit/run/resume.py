"""Where a run starts: from the checkpoint `resume=` asks for (once run/folder.py's check_resume said
it is this recipe's, and run/checkpoints.py verified it), or from scratch. Nothing of two runs is
mixed: starting over moves an old run aside, going back to an older checkpoint moves the newer ones
aside, and the log keeps each step once. And, for a run already at its last step, which of its final
outputs a stop left unwritten."""
from __future__ import annotations

import json
from typing import Callable

from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf

from ..config import ConfigError
from .folder import check_resume, run_files, set_aside
from .logbook import Logbook
from .parts import RunParts
from .state import starts_over

FINAL_OUTPUTS = ("model.json", "model.safetensors", "backbone.json", "backbone.safetensors")


def resume(parts: RunParts, logbook: Logbook) -> bool:
    """Restore model, optimizer, RNG, EMA and state from the checkpoint to resume from; whether there was one."""
    cfg, output_dir = parts.cfg, parts.output_dir
    path = on_main_process(parts.accelerator, lambda: check_resume(cfg, OmegaConf.to_container(cfg, resolve=True)))
    if parts.accelerator.is_main_process:
        moved = None
        if starts_over(cfg.resume):
            moved = set_aside(output_dir, run_files(output_dir), "resume=false: a new run started in this folder")
        elif path is not None and parts.checkpoints.newer_than(path):
            newer = [str(p.relative_to(output_dir)) for p in parts.checkpoints.newer_than(path)]
            moved = set_aside(output_dir, newer, f"resume={cfg.resume}: the run went back to {path.name}")
        if moved is not None:
            parts.print(f"set aside in {moved}: what this run would otherwise have mixed with its own")
    parts.accelerator.wait_for_everyone()
    if path is None:
        return False
    parts.state, note = parts.checkpoints.load(path, ema=parts.ema)
    parts.print(f"resumed from {path} at step {parts.state.step}{note}")
    logbook.keep_until(parts.state.step)
    return True


def on_main_process(accelerator, decide: Callable):
    """`decide()` on the main process (it reads files: verifying a checkpoint reads every byte), its
    answer, or its ConfigError, on every rank."""
    answer, error = None, None
    if accelerator.is_main_process:
        try:
            answer = decide()
        except ConfigError as problem:
            error = str(problem)
    if accelerator.num_processes > 1:
        answer, error = broadcast_object_list([answer, error])
    if error is not None:
        raise ConfigError(error)
    return answer


def outputs_not_of_this_step(parts: RunParts) -> list[str]:
    """The final outputs that are missing, or that record another step than the run's (an earlier end
    of the run, with another train.max_steps): what rank 0 sees, on every rank."""
    def look() -> list[str]:
        expected = list(FINAL_OUTPUTS) + (["metrics.json"] if parts.protocol is not None else [])
        wrong = []
        for name in expected:
            path = parts.output_dir / name
            if name.endswith(".json"):
                try:
                    step = json.loads(path.read_text()).get("step")
                except (OSError, ValueError):
                    step = None
                if step != parts.state.step:
                    wrong.append(name)
            elif not path.is_file():
                wrong.append(name)
        return wrong

    return on_main_process(parts.accelerator, look)
