#!/usr/bin/env python
"""Fault soak: kill one training run again and again at random moments (SIGKILL or SIGTERM, to the
whole process group, while it trains, evaluates or writes a checkpoint), re-run the same command each
time, and check that the final weights are bit-identical to those of a run that was never interrupted.

    python tools/fault_soak.py --kills 20 --steps 40          # a tiny MAE on the embedded digits, ~10 min on 2 cores

Prints one line per interruption (signal, how long the run had been alive, the step it had logged,
how it ended), the verdict, and a final JSON line. Exit code 0 only when the weights are identical.
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
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "task.decoder_dim=32",
        "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=16", "optim.batch_size=32",
        "data.num_workers=1", "log.every=1", "eval.knn_every=8", "train.checkpoint_every=2",
        "train.keep_checkpoints=3"]


def command(out: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY,
            f"train.max_steps={steps}"]


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
    parser.add_argument("--kills", type=int, default=20, help="interruptions before the run may finish (default 20)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the run (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--workdir", default=None, help="folder for the two runs (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_soak_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a killed run's lines are not lost

    unbroken, broken = work / "unbroken", work / "broken"
    started = time.time()
    subprocess.run(command(unbroken, args.steps), check=True, env=env, capture_output=True)
    run_seconds = time.time() - started
    print(f"unbroken run: {args.steps} steps in {run_seconds:.0f} s")

    kills = []
    while True:
        process = subprocess.Popen(command(broken, args.steps), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if len(kills) < args.kills:
            delay = rng.uniform(1.5, max(3.0, 0.6 * run_seconds))  # start-up, steps, evaluations, checkpoints
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                step = last_step(broken)
                os.killpg(process.pid, sig)
                output, _ = process.communicate(timeout=300)
                ended = "checkpoint, exit 0" if process.returncode == 0 and "preempted" in output else \
                    f"exit {process.returncode}"
                kills.append({"signal": sig.name, "after_s": round(delay, 1), "step": step, "ended": ended})
                print(f"kill {len(kills):3d}: {sig.name:7s} after {delay:5.1f} s at step {step:3d}: {ended}", flush=True)
                if sig == signal.SIGTERM and process.returncode != 0 and not sigterm_may_kill(output):
                    print(output[-2000:])
                    return 1
                continue
        output, _ = process.communicate(timeout=1200)
        if process.returncode != 0:
            print(output[-3000:])
            return 1
        if f"done: {args.steps} steps" in output or "nothing to do" in output:
            break

    from safetensors.torch import load_file

    a, b = load_file(unbroken / "model.safetensors"), load_file(broken / "model.safetensors")
    identical = a.keys() == b.keys() and all((a[k] == b[k]).all().item() for k in a)
    steps = [json.loads(line)["step"] for line in (broken / "log.jsonl").read_text().splitlines()
             if "eval" not in json.loads(line)]
    logged_once = steps == sorted(set(steps))
    print(f"final weights: {'identical to the unbroken run' if identical else 'DIFFERENT from the unbroken run'}; "
          f"log.jsonl {'records each step once' if logged_once else 'repeats steps'}; {len(kills)} interruptions "
          f"({sum(k['signal'] == 'SIGKILL' for k in kills)} SIGKILL, {sum(k['signal'] == 'SIGTERM' for k in kills)} SIGTERM)")
    print(json.dumps({"benchmark": "fault_soak", "kills": len(kills), "steps": args.steps, "identical": identical,
                      "logged_once": logged_once, "interruptions": kills}))
    return 0 if identical and logged_once else 1


if __name__ == "__main__":
    sys.exit(main())
