#!/usr/bin/env python
"""Fault soak: kill one training run again and again (SIGKILL or SIGTERM, to the whole process group),
re-run the same command each time, and check that the final weights are bit-identical to those of a
run that was never interrupted. Three kinds of interruption, in this order:

    --error-exits N   an error in a step (tests/faulty_tasks.py raises in a forward call), killed at a
                      random moment of its way out (closing the loader workers, the traceback, exit):
                      it must end within a minute either way, never hang
    --kills N         at random moments: while it starts, trains, evaluates or writes a checkpoint
                      (skipped once the run has reached its last step)
    --final-kills N   after the last step is logged: during the final checkpoint, evaluation, exports
                      and metrics.json, which the re-run must then write

    python tools/fault_soak.py --kills 20 --error-exits 4 --final-kills 4 --steps 40   # a tiny MAE on the digits, ~10 min on 2 cores
    python tools/fault_soak.py --method dino --kills 8 --error-exits 2 --final-kills 2 --steps 16   # a tiny DINO

The runs are MAE or DINO (--method) through tests/faulty_tasks.py (a plugin: identical to the method
unless its environment asks for a fault). Prints one line per interruption (kind, signal, how long the run had been alive, the
step it had logged, how it ended), the verdict, and a final JSON line. Exit code 0 only when the
weights are identical, each step is logged once and no run hung.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=16", "optim.batch_size=32",
       "data.num_workers=1", "log.every=1", "eval.knn_every=8", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
METHODS = {  # --method: the recipe and its tiny settings
    "mae": ("mae_tiny_digits", ["model.patch_size=8", "task.decoder_dim=32", "task.decoder_depth=1",
                                "task.decoder_heads=2"]),
    # DINO: an EMA teacher, its center and the multi-crop views must come back exactly too
    "dino": ("dino_tiny_digits", ["task.out_dim=64", "task.hidden_dim=32", "task.bottleneck_dim=16",
                                  "task.local_crops_number=2"]),
}


PLUGIN = ROOT / "tests" / "faulty_tasks.py"


def failing(method: str) -> str:
    return f"faulty_{method}: forward call"  # what the plugin prints as it raises


def command(out: Path, steps: int, method: str = "mae") -> list[str]:
    recipe, tiny = METHODS[method]
    return [sys.executable, str(ROOT / "pretrain.py"), f"recipe={recipe}", f"imports=[{PLUGIN}]",
            f"task.name=faulty_{method}", f"train.output_dir={out}", *RUN, *tiny, f"train.max_steps={steps}"]


def last_step(out: Path) -> int:
    log = out / "log.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.is_file() else []
    return max(steps, default=0)


def sigterm_may_kill(output: str) -> bool:
    """SIGTERM must end a run with a checkpoint and exit code 0, but for two moments where nothing can
    be lost: before the command's first line had run (Python was still importing: no output yet) and
    after its work was done ("done:" or "nothing to do" printed; Python restores the default handlers
    while it shuts down)."""
    return not output.strip() or "done: " in output or "nothing to do" in output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="kills at random moments (default 20)")
    parser.add_argument("--error-exits", type=int, default=4, help="errors, killed on their way out (default 4)")
    parser.add_argument("--final-kills", type=int, default=4, help="kills after the last step (default 4)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the run (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--workdir", default=None, help="folder for the two runs (default: a temporary one)")
    parser.add_argument("--method", default="mae", choices=list(METHODS), help="the run's method (default mae)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_soak_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a killed run's lines are not lost

    unbroken, broken = work / "unbroken", work / "broken"
    started = time.time()
    subprocess.run(command(unbroken, args.steps, args.method), check=True, env=env, capture_output=True)
    run_seconds = time.time() - started
    print(f"unbroken run: {args.steps} steps in {run_seconds:.0f} s")

    # errors first: they stop the run within a few steps, so random kills still find it unfinished
    plan = ["error"] * args.error_exits + ["random"] * args.kills + ["final"] * args.final_kills
    kills = []
    for kind in plan:
        if last_step(broken) >= args.steps and kind != "final":
            continue  # the run got to its end already: only the final outputs are left to interrupt
        faults = {"FAULTY_FAIL_AT": str(rng.randint(1, 8))} if kind == "error" else {}
        process = subprocess.Popen(command(broken, args.steps, args.method), env={**env, **faults}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        step = last_step(broken)
        moment = {"random": lambda: _after(process, rng.uniform(1.5, max(3.0, 0.6 * run_seconds))),
                  "error": lambda: _after_line(process, failing(args.method), rng.uniform(0.0, 0.5)),
                  "final": lambda: _in_final_phase(process, broken, args.steps, rng.uniform(0.0, 3.0))}[kind]
        lines = moment()
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        alive = process.poll() is None
        if alive:
            step = last_step(broken)
            os.killpg(process.pid, sig)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            print(f"{kind} interruption: the run did not exit within 60 s of {sig.name if alive else 'its error'}")
            return 1
        output = lines + output
        ended = ("checkpoint, exit 0" if process.returncode == 0 and "preempted" in output else
                 f"exit {process.returncode}" + ("" if alive else f" before the {sig.name}"))
        kills.append({"kind": kind, "signal": sig.name if alive else None, "step": step, "ended": ended})
        print(f"{kind:6s} {len(kills):3d}: {sig.name if alive else '-':7s} at step {step:3d}: {ended}", flush=True)
        if kind == "error" and process.returncode not in (1, -signal.SIGKILL, -signal.SIGTERM, 0):
            print(output[-2000:])
            return 1
        if alive and sig == signal.SIGTERM and kind != "error" and process.returncode != 0 and \
                not sigterm_may_kill(output):
            print(output[-2000:])
            return 1
    process = subprocess.run(command(broken, args.steps, args.method), env=env, capture_output=True, text=True, timeout=1200)
    if process.returncode != 0 or not (f"done: {args.steps} steps" in process.stdout or
                                       "nothing to do" in process.stdout):
        print(process.stdout[-3000:] + process.stderr[-3000:])
        return 1

    from safetensors.torch import load_file

    a, b = load_file(unbroken / "model.safetensors"), load_file(broken / "model.safetensors")
    identical = a.keys() == b.keys() and all((a[k] == b[k]).all().item() for k in a)
    steps = [json.loads(line)["step"] for line in (broken / "log.jsonl").read_text().splitlines()
             if "eval" not in json.loads(line)]
    logged_once = steps == sorted(set(steps))
    kinds = ", ".join(f"{sum(k['kind'] == kind for k in kills)} {kind}" for kind in ("error", "random", "final"))
    print(f"final weights: {'identical to the unbroken run' if identical else 'DIFFERENT from the unbroken run'}; "
          f"log.jsonl {'records each step once' if logged_once else 'repeats steps'}; {len(kills)} interruptions "
          f"({kinds}; {sum(k['signal'] == 'SIGKILL' for k in kills)} SIGKILL, "
          f"{sum(k['signal'] == 'SIGTERM' for k in kills)} SIGTERM)")
    print(json.dumps({"benchmark": "fault_soak", "kills": len(kills), "steps": args.steps, "identical": identical,
                      "logged_once": logged_once, "interruptions": kills}))
    return 0 if identical and logged_once else 1


def _after(process, seconds: float) -> str:
    """Wait `seconds` (or for the run's end)."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass
    return ""


def _after_line(process, text: str, seconds: float) -> str:
    """Read the run's output until a line holds `text` (or the output ends), then wait `seconds`.
    Returns what was read."""
    read = []
    for line in process.stdout:
        read.append(line)
        if text in line:
            break
    time.sleep(seconds)
    return "".join(read)


def _in_final_phase(process, out: Path, step: int, seconds: float) -> str:
    """Wait until the run writes its final outputs (its last step logged; or, for a re-run of a run
    stopped after it, its "writing its final outputs"), then `seconds`. Returns what was read."""
    if last_step(out) >= step:
        return _after_line(process, "writing its final outputs", seconds)
    while process.poll() is None and last_step(out) < step:
        time.sleep(0.02)
    return _after(process, seconds)


if __name__ == "__main__":
    sys.exit(main())
