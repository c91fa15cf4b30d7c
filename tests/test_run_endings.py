"""Every way a run ends — an error, a mistake, a stop request, a second Ctrl-C, a checkpoint that cannot
be written — ends the process and its loader workers promptly, with the exit code that says which it
was, and loses nothing it could keep (issue 20). The runs misbehave through tests/faulty_tasks.py,
a plugin whose forward fails, slows down or gives NaN where the test asks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY_VIT, free_port

PLUGIN = ROOT / "tests" / "faulty_tasks.py"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TINY = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=16",
        "optim.batch_size=32", "log.every=1", "eval.knn_every=0"]


def faulty(out, *extra):
    """pretrain.py arguments: the tiny MAE of tests/faulty_tasks.py on the digits."""
    return ["pretrain.py", "recipe=mae_tiny_digits", f"imports=[{PLUGIN}]", "task.name=faulty_mae",
            f"train.output_dir={out}", *TINY, *extra]


def start(args, env, launcher=None, **faults):
    """Start a run in its own session (so that every process it makes can be found afterwards)."""
    command = {None: [sys.executable], "accelerate": [ACCELERATE, "launch", "--num_processes", "1", "--num_machines",
                                                      "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
               "two": [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]}[launcher]
    environment = {**env, **{f"FAULTY_{k.upper()}": str(v) for k, v in faults.items()}}
    if launcher == "two":
        environment["ACCELERATE_USE_CPU"] = "1"
    return subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=environment, start_new_session=True)


def finish(process, seconds):
    """Wait for the run's exit; fail (killing the whole session) if it does not exit in time."""
    try:
        stdout, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the run did not exit within {seconds} s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return stdout, stderr


def leftovers(process) -> list[str]:
    """Processes of the run's session still alive a moment after it exited (its loader workers, a
    fork server, a rank)."""
    deadline = time.time() + 3.0
    while True:
        alive = []
        for other in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if os.getsid(other.info["pid"]) == process.pid and other.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(other.info["cmdline"] or [])[:120])
            except (ProcessLookupError, PermissionError):
                continue
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def log_steps(out):
    lines = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "eval" not in line]


def wait_for_step(out, process, step, seconds=180):
    deadline = time.time() + seconds
    while not ((Path(out) / "log.jsonl").is_file() and log_steps(out) and log_steps(out)[-1] >= step):
        assert time.time() < deadline and process.poll() is None, "the run did not get going"
        time.sleep(0.05)


def checkpoints(out):
    folder = Path(out) / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


# -------------------------------------------------------------------------------------------
# 1. errors end the run and its workers (the workers ignore SIGTERM; the process used to wait for
#    them for ever in multiprocessing's exit handler)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_in_a_step_ends_the_process_and_its_workers(tmp_path, env, workers):
    process = start(faulty(tmp_path / "run", f"data.num_workers={workers}", "train.max_steps=50"), env, fail_at=3)
    stdout, stderr = finish(process, 90)
    assert process.returncode == 1 and "forward call 3 fails" in stderr  # a defect: its traceback, exit 1
    assert not leftovers(process)


def test_a_keyboard_interrupt_ends_the_run_at_once_in_one_line(tmp_path, env):
    """A second Ctrl-C raises KeyboardInterrupt wherever the trainer is, here in a step with the workers
    busy: one line, the shell's code for SIGINT, no worker left."""
    process = start(faulty(tmp_path / "run", "train.max_steps=50", "data.num_workers=2"), env,
                    fail_at=3, fail_with="interrupt")
    stdout, stderr = finish(process, 90)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped at once (a second Ctrl-C)" in stderr
    assert not leftovers(process)


def test_two_ctrl_c_in_a_row_end_the_run_promptly(tmp_path, env):
    process = start(faulty(tmp_path / "run", "train.max_steps=50", "data.num_workers=2"), env,
                    slow_from=5, slow_seconds=60)
    wait_for_step(tmp_path / "run", process, 2)
    for _ in range(2):
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.05)
    stdout, stderr = finish(process, 60)
    assert process.returncode in (0, 130) and "Traceback" not in stderr, stderr[-3000:]
    assert not leftovers(process)


def test_workers_die_with_a_trainer_killed_outright(tmp_path, env):
    """SIGKILL to the trainer alone (out of memory, a launcher's grace window over): its workers, which
    ignore SIGTERM, end with it (PR_SET_PDEATHSIG), at once rather than when torch's watchdog looks."""
    process = start(faulty(tmp_path / "run", "train.max_steps=50", "data.num_workers=2"), env,
                    slow_from=5, slow_seconds=60)
    wait_for_step(tmp_path / "run", process, 2)
    workers = [child.pid for child in psutil.Process(process.pid).children()]
    assert len(workers) == 2
    process.kill()
    process.communicate(timeout=30)
    deadline = time.time() + 2.0
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        assert time.time() < deadline, "a worker outlived its trainer"
        time.sleep(0.05)


def test_a_checkpoint_the_disk_refuses_ends_the_run_in_one_line(tmp_path, env):
    """`ulimit -f` (a file-size limit) stands in for a full disk: the write fails, the unfinished copy is
    removed, the run stops with one line and exit 2, its workers gone."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-c", "from ssl_vit.data.digits import digits_index as d; d('train'); d('val')"],
                   env=env, check=True, cwd=ROOT)  # the digits cache is written without the limit
    args = " ".join(f"'{a}'" for a in faulty(out, "train.max_steps=50", "train.checkpoint_every=2"))
    process = subprocess.Popen(["bash", "-c", f"ulimit -f 64; exec '{sys.executable}' {args}"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr = finish(process, 90)
    assert process.returncode == 2 and stderr.strip().splitlines()[-1].startswith("error: could not write checkpoint"), \
        stderr[-3000:]
    assert "File too large" in stderr and not list((out / "checkpoints").glob(".*.tmp"))
    assert not leftovers(process)


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(tmp_path, env):
    out = tmp_path / "run"
    (out / "checkpoints").parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: sysfs, where nobody may make a folder, stands in
        (out / "checkpoints").symlink_to("/sys/kernel")
    else:
        (out / "checkpoints").mkdir()
        (out / "checkpoints").chmod(0o500)
    process = start(faulty(out, "train.max_steps=5"), env)
    stdout, stderr = finish(process, 60)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "train.output_dir" in stderr.strip().splitlines()[-1] and not log_steps_or_none(out)


def log_steps_or_none(out):
    return log_steps(out) if (Path(out) / "log.jsonl").is_file() else None


# -------------------------------------------------------------------------------------------
# 2. a stop is honoured within the launchers' grace windows (accelerate launch with one process:
#    5 s, torchrun: 30 s), whatever a step takes; and nothing of the abandoned step remains


def test_a_slow_step_is_abandoned_and_the_resumed_run_equals_an_unbroken_one(tmp_path, env):
    """A step of 60 s and SIGTERM to `accelerate launch` during it: the launcher SIGKILLs its run 5 s later,
    so the trainer abandons the step and checkpoints the one before. The re-run (no longer slow) ends
    with the weights of a run that was never stopped: the abandoned step's RNG draws left no trace. The
    first run said resume=false: the message says how to resume rather than to re-run it."""
    out, reference = tmp_path / "run", tmp_path / "reference"
    process = start(faulty(out, "train.max_steps=6", "resume=false"), env, "accelerate", slow_from=7, slow_seconds=60)
    wait_for_step(out, process, 3)
    time.sleep(1.0)  # into step 4's first forward (2 micro-batches a step)
    sent = time.time()
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a cluster's scheduler would
    stdout, stderr = finish(process, 30)
    assert time.time() - sent < 5, "the trainer outlived the launcher's grace window"
    assert "preempted: checkpoint written at step 3" in stdout and "resume=auto" in stdout, stdout + stderr[-2000:]
    assert checkpoints(out) == ["step_00000003"] and not leftovers(process)
    resumed = start(faulty(out, "train.max_steps=6"), env)
    assert "resumed from" in finish(resumed, 120)[0] and resumed.returncode == 0
    unbroken = start(faulty(reference, "train.max_steps=6"), env)
    finish(unbroken, 120)
    mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all((mine[k] == theirs[k]).all() for k in theirs)


@pytest.mark.slow  # two processes, ~50 s
def test_several_processes_leave_a_slow_step_together_at_a_micro_batch(tmp_path, env):
    """Two ranks, 2 micro-batches of 20 s a step: SIGTERM to the launcher during a step's first
    micro-batch. The ranks agree before the second one and checkpoint the step before, within
    torchrun's 30 s (agreeing only after the step, 40 s, the SIGKILL came first)."""
    out = tmp_path / "run"
    process = start(faulty(out, "train.max_steps=40", "data.batch_size=8"), env, "two",
                    slow_from=5, slow_seconds=20)  # forward calls 1-4: steps 1 and 2
    wait_for_step(out, process, 2, seconds=240)
    time.sleep(2.0)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = finish(process, 90)
    assert time.time() - sent < 30 and "preempted: checkpoint written at step 2" in stdout, stdout + stderr[-3000:]
    assert checkpoints(out) == ["step_00000002"]
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not leftovers(process)


def test_a_stop_during_the_final_evaluation_leaves_it_to_the_rerun(tmp_path, env):
    """The final k-NN evaluation is slow and SIGTERM comes during it: the checkpoint of the last step is
    written first, the evaluation is left at its next batch, the run exits 0, and the re-run writes
    the evaluation, exports and metrics.json."""
    out = tmp_path / "run"
    process = start(faulty(out, "train.max_steps=2", "data.num_workers=1", "eval.knn_every=1000"), env,
                    slow_eval=1)  # 90 batches of 1 s: the stop is taken between two
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step_00000002").is_dir():
        assert time.time() < deadline and process.poll() is None, "the run did not reach its end"
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = finish(process, 30)
    assert process.returncode == 0 and "preempted during the final evaluation" in stdout, stdout + stderr[-2000:]
    assert not (out / "metrics.json").exists() and not leftovers(process)
    rerun = start(faulty(out, "train.max_steps=2", "data.num_workers=1", "eval.knn_every=1000"), env)
    stdout, _ = finish(rerun, 120)
    assert "writing its final outputs" in stdout and json.loads((out / "metrics.json").read_text())["step"] == 2


def test_outputs_of_an_earlier_end_are_rewritten_at_this_one(tmp_path, env, tiny_mae_run):
    """A run extended (train.max_steps 3 -> 4) and stopped between its checkpoint and its exports keeps
    the step-3 exports: the re-run notices they are not of step 4 (their JSON says so) and rewrites them."""
    import shutil

    from conftest import TINY_MAE

    out = tmp_path / "run"
    shutil.copytree(tiny_mae_run, out)  # a finished 3-step run
    step_3 = json.loads((out / "backbone.json").read_text())
    extended = [sys.executable, "pretrain.py", "recipe=mae_tiny_digits", f"train.output_dir={out}",
                "log.images_every=1", *TINY_MAE, "train.max_steps=4"]
    finish(subprocess.Popen(extended, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 120)
    (out / "backbone.json").write_text(json.dumps(step_3))  # as if the stop came before this export
    stdout, _ = finish(subprocess.Popen(extended, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), 120)
    assert "backbone.json was not written at this step" in stdout
    assert json.loads((out / "backbone.json").read_text())["step"] == 4


# -------------------------------------------------------------------------------------------
# 3. a run that trained nothing does not end as done


def test_a_run_whose_every_step_was_skipped_fails_and_exports_nothing(tmp_path, env):
    out = tmp_path / "run"
    process = start(faulty(out, "train.max_steps=3", "data.num_workers=0"), env, nan=1)
    stdout, stderr = finish(process, 120)
    assert process.returncode == 1 and "every one of the 3 optimizer steps was skipped" in stderr, stdout + stderr
    assert "done:" not in stdout and not (out / "backbone.safetensors").exists()


# -------------------------------------------------------------------------------------------
# 4. an error on a rank other than 0 is said by that rank; the launcher's table ends with it


@pytest.mark.slow  # two processes, ~30 s
def test_a_mistake_on_rank_1_is_its_own_line_and_the_launchers_root_cause(tmp_path, env):
    process = start(faulty(tmp_path / "run", "train.max_steps=50"), env, "two", fail_at=3, fail_rank=1,
                    fail_with="mistake")
    stdout, stderr = finish(process, 240)
    assert process.returncode != 0
    # (rank 0's progress bar may share a line with rank 1's message: the ranks write to one terminal)
    mine = [line[line.index(word):] for line in stderr.splitlines() for word in ("error: [", "stopping: [") if word in line]
    assert "error: [rank 1] shard-000001.tar: sample 3 cannot be used" in "\n".join(mine), stderr[-3000:]
    assert all(line.startswith(("error: [rank 1]", "stopping: [rank 0]")) for line in mine), mine
    assert "[rank0]: Traceback" not in stderr  # rank 0 met the loss in a collective: one line, no traceback
    assert "traceback : error: [rank 1] shard-000001.tar" in stderr  # torchrun's root cause shows our line
    assert not leftovers(process)
