"""Nothing lost under the signals, restarts and bad files clusters really send: every way of asking a
run to stop ends in a checkpoint and exit 0, two runs never share a folder, a damaged checkpoint is
passed over, a full disk is named, and bad input stops in one line before anything is lost."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_VIT, free_port
from conftest import run_command as run
from ssl_vit.config import ConfigError

PRETRAIN = [sys.executable, str(ROOT / "pretrain.py")]
TINY_MAE = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=16",
            "optim.batch_size=32", "log.every=1"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def mae(out, *extra):
    return [*PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY_MAE, *extra]


def log_steps(out):
    lines = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "eval" not in line]


def wait_for_steps(out, process, count=2, seconds=180):
    deadline = time.time() + seconds
    while not (Path(out) / "log.jsonl").is_file() or len(log_steps(out)) < count:
        assert time.time() < deadline and process.poll() is None, "the run did not get going"
        time.sleep(0.05)


def checkpoints(out):
    folder = Path(out) / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def lock_is_free(out) -> bool:
    from ssl_vit.run.folder import FolderLock

    lock = FolderLock(Path(out))
    free = lock.acquire() is None
    lock.release()
    return free


# -------------------------------------------------------------------------------------------
# 1. the signals clusters and users send


# `timeout` sends the SIGTERM that `group` sends, from another parent: with the slow runs
@pytest.mark.parametrize("how", [pytest.param("timeout", marks=pytest.mark.slow), "group", "ctrl-c"])
def test_signals_to_the_process_group_end_in_a_checkpoint(tmp_path, env, how):
    """`timeout` and `kill -TERM -PGID` reach the loader workers too, Ctrl-C the whole foreground group:
    the workers ignore them and the trainer checkpoints (timeout's own exit code is 124 unless
    --preserve-status asks for the run's)."""
    out = tmp_path / "run"
    command = mae(out, "train.max_steps=100000", "train.checkpoint_every=100000", "data.num_workers=1")
    if how == "timeout":
        command = ["timeout", "--preserve-status", "-s", "TERM", "20", *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, cwd=ROOT)
    if how != "timeout":
        wait_for_steps(out, process)
        os.killpg(process.pid, signal.SIGTERM if how == "group" else signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "preempted: checkpoint written at step" in stdout and "killed by signal" not in stderr
    (saved,) = checkpoints(out)
    assert json.loads((out / "checkpoints" / saved / "train_state.json").read_text())["step"] == log_steps(out)[-1]


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_sigterm_to_a_one_process_accelerate_launch_reaches_the_trainer(tmp_path, env):
    """`accelerate launch` with one process dies of SIGTERM without passing it on: the trainer, told
    by Linux that its launcher died, checkpoints and exits; a re-run waits for nothing stale."""
    out = tmp_path / "run"
    command = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *mae(out, "train.max_steps=100000", "train.checkpoint_every=100000")[1:]]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    wait_for_steps(out, launcher)
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)
    deadline = time.time() + 120
    while not (checkpoints(out) and lock_is_free(out)):  # the orphaned trainer finishes and lets go
        assert time.time() < deadline, "the trainer went on without its launcher"
        time.sleep(0.1)
    (saved,) = checkpoints(out)
    steps = log_steps(out)
    time.sleep(1.0)
    assert log_steps(out) == steps  # nothing trains on
    result = run(mae(out, "train.max_steps=" + str(steps[-1] + 1)), env)
    assert "resumed from" in result.stdout and log_steps(out)[-1] == steps[-1] + 1


def test_sigterm_to_a_two_process_launch_checkpoints_on_every_rank(tmp_path, env):
    out = tmp_path / "run"
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
               *mae(out, "train.max_steps=100000", "train.checkpoint_every=100000")[1:]]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**env, "ACCELERATE_USE_CPU": "1"}, cwd=ROOT)
    wait_for_steps(out, launcher, seconds=240)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=240)
    (saved,) = checkpoints(out)
    assert sorted(p.name for p in (out / "checkpoints" / saved).glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert "preempted: checkpoint written at step" in stdout
    assert "exitcode  : -15" not in stderr and "Traceback" not in stdout  # the ranks ended cleanly


def test_two_runs_never_write_into_one_folder(tmp_path, env):
    out = tmp_path / "run"
    first = subprocess.Popen(mae(out, "train.max_steps=100000"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    wait_for_steps(out, first, count=1)
    second = run(mae(out, "train.max_steps=3"), env, expect=2)
    assert f"another run is writing into {out} (pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock_is_free(out)  # a crashed run leaves nothing stuck (its workers do not hold the lock)


# -------------------------------------------------------------------------------------------
# 3-5. evaluation data checked at start, damaged checkpoints passed over, a full disk named


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    from ssl_vit.data.digits import write_digits

    prefix = tmp_path_factory.mktemp("shards") / "digits"
    write_digits(prefix)
    return prefix


def test_the_knn_monitor_without_validation_data_stops_before_training(tmp_path, env, digits_shards):
    result = run(mae(tmp_path / "run", "data.name=shards", f"data.train={digits_shards}-train.json",
                     "eval.knn_every=5"), env, expect=2)
    assert "data.val is required" in result.stderr and not (tmp_path / "run" / "log.jsonl").exists()


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, env):
    """A tiny run's checkpoints of steps 1, 2 and 3 (the tests damage copies of them)."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    run(mae(out, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5", "data.num_workers=0"),
        env)
    return out


@pytest.mark.parametrize("damage", ["truncate model.safetensors",
                                    pytest.param("remove random_states_0.pkl", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_is_passed_over(three_checkpoints, tmp_path, env, damage):
    steps = ["train.checkpoint_every=1", "train.keep_checkpoints=5", "data.num_workers=0"]
    unbroken = tmp_path / "unbroken"
    run(mae(unbroken, "train.max_steps=4", *steps), env)
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)  # the same run, stopped at step 3
    newest = out / "checkpoints" / "step_00000003"
    action, name = damage.split()
    if action == "truncate":
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    else:
        (newest / name).unlink()
    refused = run(mae(out, "train.max_steps=4", *steps, f"resume={newest}"), env, expect=2)
    assert name in refused.stderr and "Traceback" not in refused.stderr
    result = run(mae(out, "train.max_steps=4", *steps), env)
    assert f"not resuming from {newest}" in result.stderr and "step_00000002 at step 2" in result.stdout
    a, b = load_file(unbroken / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same weights as a run that never broke


def _zero(path, start, length):
    """Overwrite `length` bytes from `start` with zeros, in place: the size stays, the bytes change."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * min(length, path.stat().st_size - start))


@pytest.mark.parametrize("damage, message", [
    ("zero model.safetensors", "model.safetensors does not have the bytes that were written"),
    ("zero optimizer.bin", "optimizer.bin does not have the bytes that were written"),
    ("zero random_states_0.pkl", "random_states_0.pkl does not have the bytes that were written"),
    ("remove manifest.json", "no manifest.json, so its files cannot be verified"),
    ("old-manifest random_states_0.pkl", "random_states_0.pkl does not load"),
    ("old-manifest model.safetensors", "model.safetensors does not load"),
])
def test_damage_that_keeps_a_files_size_is_seen(three_checkpoints, tmp_path, damage, message):
    """64 KB zeroed inside a file (a bad sector, a botched copy) keeps its size: the sha256 in the
    manifest tells. A checkpoint written before checksums (sizes only) is read to be verified instead:
    an RNG state that does not load is damage (Accelerate would have resumed without it, silently)."""
    from ssl_vit.run.checkpoints import damaged

    checkpoint = tmp_path / "step_00000003"
    shutil.copytree(three_checkpoints / "checkpoints" / "step_00000003", checkpoint)
    assert damaged(checkpoint) is None
    action, name = damage.split()
    if action == "remove":
        (checkpoint / name).unlink()
    else:
        if action == "old-manifest":  # the manifest as written before checksums: sizes only
            manifest = json.loads((checkpoint / "manifest.json").read_text())
            (checkpoint / "manifest.json").write_text(json.dumps({k: v["size"] for k, v in manifest.items()}))
            assert damaged(checkpoint) is None  # read whole, it loads
        _zero(checkpoint / name, min(64, (checkpoint / name).stat().st_size // 4), 64 * 1024)
    assert message in damaged(checkpoint)


def test_the_checkpoint_benchmark_writes_and_verifies_a_recipes_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "checkpoint", "--recipe",
                             "mae_tiny_digits", "--repeats", "1", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| recipe | checkpoint | files | write (with sha256) | verify (sha256 of every file) |" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["bytes"] > 0 and figures["verify_s"] > 0  # what it costs is the benchmark's business


def test_every_checkpoint_damaged_stops_the_run_and_keeps_everything(three_checkpoints, tmp_path, env):
    """Starting over would overwrite the exports and let keep_checkpoints delete the new checkpoints in
    favour of the damaged ones: the run stops, says so and names the way out."""
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for checkpoint in (out / "checkpoints").iterdir():
        _zero(checkpoint / "model.safetensors", 100, 1000)
    exports = {name: (out / name).read_bytes() for name in ("model.safetensors", "backbone.safetensors")}
    result = run(mae(out, "train.max_steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                     "data.num_workers=0"), env, expect=2)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every checkpoint in") and "resume=false" in last and "Traceback" not in result.stderr
    assert all((out / name).read_bytes() == data for name, data in exports.items())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3)]


def test_a_full_disk_is_named_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    from ssl_vit.run.checkpoints import Checkpoints
    from ssl_vit.run.state import TrainState

    class Accelerator:  # saves half a file, then fails the way torch does on a full disk
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374")

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 4096))
    saved = Checkpoints(Accelerator(), tmp_path / "checkpoints", keep=2)
    with pytest.raises(ConfigError, match=r"could not write checkpoint step_00000007 in .*: the disk is full \(0 MB free\)"):
        saved.save(TrainState(step=7))
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the unfinished copy is gone


def test_an_unfinished_checkpoint_left_by_a_crash_is_removed_at_start(tmp_path, env):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step_00000005.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".step_00000005.tmp" / "model.safetensors").write_bytes(b"x" * 10000)
    result = run(mae(out, "train.max_steps=1"), env)
    assert "removed .step_00000005.tmp" in result.stdout
    assert not (out / "checkpoints" / ".step_00000005.tmp").exists()


# -------------------------------------------------------------------------------------------
# 6-8. bad files and values: one line, before anything is lost; no hang


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_shard_of_undecodable_images_stops_naming_it(tmp_path, env):
    members = {}
    for i in range(40):  # a sample's files follow each other in a tar
        members.update({f"s{i:03d}.png": b"not a png", f"s{i:03d}.cls": b"0"})
    shard = _tar(tmp_path / "broken-000000.tar", members)
    start = time.time()
    result = run(mae(tmp_path / "run", "data.name=shards", f"data.train={shard}", "data.samples_per_epoch=64",
                     "eval.knn_every=0"), env, expect=2, timeout=120)
    assert "none of the 40 samples read from 1 shard(s), e.g. " in result.stderr and str(shard) in result.stderr
    assert "Traceback" not in result.stderr and time.time() - start < 90


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files people pass as init=: a convnet's, one under a prefix, one of another head count,
    empty, random bytes, a malicious pickle."""
    import timm

    from ssl_vit import create_encoder, export_backbone

    folder = tmp_path_factory.mktemp("files")
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), folder / "resnet18.pth")
    vit = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"backbone." + k: v for k, v in vit.state_dict().items()}, folder / "prefixed.pth")
    eight = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=8)
    export_backbone(eight, folder / "eight_heads.safetensors")
    (folder / "eight_heads.json").unlink()  # the JSON lost: the file's own metadata still says 8 heads
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "random.safetensors").write_bytes(os.urandom(4096))
    (folder / "random.pth").write_bytes(os.urandom(4096))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'PWNED'}",))

    import pickle
    (folder / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    return folder


INIT_FILES = [
    ("resnet18.pth", "gave 0 of the encoder's"),
    ("eight_heads.safetensors", "was trained with num_heads=8, the model is built with num_heads=2"),
    ("empty.safetensors", "is empty (0 bytes)"),
    ("random.safetensors", "is not a readable safetensors file"),
    ("random.pth", "is not a PyTorch checkpoint: it is neither a PyTorch archive, a pickle nor safetensors"),
    ("evil.pth", "refused to load"),
]


@pytest.mark.parametrize("name, message", INIT_FILES)
def test_init_files_that_cannot_be_used_are_refused_saying_why(files, name, message):
    from ssl_vit import create_encoder, load_weights
    from ssl_vit.weights import CheckpointError

    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(CheckpointError) as error:
        load_weights(encoder, files / name, verbose=False, min_encoder_fraction=0.5)
    assert message in str(error.value) and not (files / "PWNED").exists()


@pytest.mark.parametrize("name, message", [INIT_FILES[0], INIT_FILES[-1]])
def test_a_run_given_such_a_file_stops_in_one_line(files, tmp_path, env, name, message):
    result = run(mae(tmp_path / "run", f"init={files / name}"), env, expect=2)
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not (files / "PWNED").exists()
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained


def test_a_prefixed_state_dict_loads_and_says_so(files):
    from ssl_vit import create_encoder, load_weights

    encoder = create_encoder("vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    report = load_weights(encoder, files / "prefixed.pth", strict=True, verbose=False)
    assert len(report.loaded) == len(encoder.state_dict()) and any("'backbone.'" in n for n in report.notes)


@pytest.mark.parametrize("args, message", [
    (["train.max_steps=0"], "train.max_steps=0 must be positive"),
    (["train.max_steps=-3"], "train.max_steps=-3 must be positive"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    (["optim.blr=1e400"], "optim.blr=inf is not a finite number"),
    (["optim.blr=nan"], "optim.blr=nan is not a finite number"),
    (["model.img_size=33"], "model.img_size=33 is not a multiple of the 8-pixel patches"),
    (["train.output_dir=${oops}"], "train.output_dir"),
    # values that made every step's loss NaN (then "done", exit 0) or divided by zero (issue 20)
    (["task.mask_ratio=0"], "task.mask_ratio=0.0 must be in (0, 1)"),
    (["task.mask_ratio=0.99"], "task.mask_ratio=0.99 of the encoder's 16 patches keeps none"),
    (["data.std=[0,0,0]"], "every std positive"),
    (["data.mean=[nan,0,0]"], "the means must be finite"),
    (["model.patch_size=0"], "model.patch_size=0 must be positive"),
    (["model.depth=0"], "model.depth=0 must be positive"),
    (["model.num_heads=-2"], "model.num_heads=-2 must be positive"),
    (["model.in_chans=0"], "model.in_chans=0 must be positive"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 must be in [0, 1)"),
])
def test_bad_values_are_refused(args, message):
    from ssl_vit import recipes

    with pytest.raises(ConfigError) as error:
        recipes.load(["recipe=mae_tiny_digits", *TINY_MAE, *args])
    assert message in str(error.value)


@pytest.mark.parametrize("recipe, override", [
    ("simmim_swin_digits", "model.window_size=0"), ("simmim_swin_digits", "model.depths=[2,0]"),
    ("beit_digits", "model.patch_size=0"), ("beit_digits", "model.mlp_ratio=0.0"), ("simmim_digits", "model.embed_dim=0")])
def test_every_familys_sizes_must_be_positive(recipe, override):
    from ssl_vit import recipes

    with pytest.raises(ConfigError, match=rf"{re.escape(override.replace(',', ', '))} must be positive"):
        recipes.load([f"recipe={recipe}", override])


def test_a_bad_value_stops_a_run_in_one_line(tmp_path, env):
    result = run([*PRETRAIN, "recipe=mae_tiny_digits", *TINY_MAE, f"train.output_dir={tmp_path / 'run'}",
                  "optim.blr=nan"], env, expect=2)
    assert "optim.blr=nan is not a finite number" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_output_folder_that_cannot_be_written_stops_before_training(tmp_path, env):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    result = run(mae(blocked / "run"), env, expect=2)
    assert f"cannot write into {blocked}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if not os.access(folder, os.W_OK):  # (root writes anywhere: then only the case above applies)
            result = run(mae(folder / "run"), env, expect=2)
            assert f"cannot write into {folder}" in result.stderr
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("content", ["empty tar", "zero bytes", "random bytes"])
def test_unreadable_tars_stop_the_stream_saying_so(tmp_path, content):
    from ssl_vit.data.loaders import checked
    from ssl_vit.data.stream import ShardStream, make_loader

    shard = tmp_path / "bad-000000.tar"
    if content == "empty tar":
        _tar(shard, {})
    else:
        shard.write_bytes(b"" if content == "zero bytes" else os.urandom(10000))
    stream = ShardStream([str(shard)], lambda data: data, batch_size=2, training=True, batches_per_epoch=2)
    with pytest.raises(ConfigError, match=r"no readable samples in 1 shard\(s\)"):
        list(checked(make_loader(stream, 0)))


def test_an_unreadable_tar_stops_a_run_in_one_line(tmp_path, env):
    shard = tmp_path / "bad-000000.tar"
    shard.write_bytes(os.urandom(10000))
    result = run(mae(tmp_path / "run", "data.name=shards", f"data.train={shard}", "data.samples_per_epoch=64",
                     "eval.knn_every=0"), env, expect=2, timeout=120)
    assert "no readable samples in 1 shard(s)" in result.stderr and "Traceback" not in result.stderr


def test_unlabelled_shards_for_a_classifier_stop_in_one_line(tmp_path, env):
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    shard = _tar(tmp_path / "plain-000000.tar", {f"s{i:03d}.png": png.getvalue() for i in range(40)})
    result = run([*PRETRAIN, "recipe=finetune_digits", *TINY_VIT, f"train.output_dir={tmp_path / 'run'}",
                  "data.name=shards", f"data.train={shard}", f"data.val={shard}", "data.samples_per_epoch=64",
                  "model.num_classes=3"], env, expect=2, timeout=120)
    assert "has no class label (.cls), and this run needs labels" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_two_process_batch_error_is_one_line_with_a_command_that_works(tmp_path, env):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits", f"train.output_dir={tmp_path / 'run'}"]
    result = run(command, env, expect=1)
    line = ("error: optim.batch_size=128 (global) is not a multiple of data.batch_size=128 (per device) x 2 "
            "process(es): add data.batch_size=64 (a divisor of 64, the global batch's share of each process)")
    ours = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert ours == [line]
    # torchrun's table of failed ranks, printed last, ends with the same line (the error file each rank gets)
    root_cause = result.stderr[result.stderr.rindex("Root Cause"):]
    assert f"traceback : {line}" in root_cause and "To enable traceback" not in root_cause


# -------------------------------------------------------------------------------------------
# the soak: random kills, the same weights


def test_the_soak_accepts_a_sigterm_death_only_where_nothing_can_be_lost():
    """The soak failed CI once on a SIGTERM that came while Python shut down after "nothing to do"."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_soak", ROOT / "tools" / "fault_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.sigterm_may_kill("")  # still importing: no handler yet, nothing started
    assert soak.sigterm_may_kill("resumed from x at step 24\nnothing to do: the run in x is at step 24 of 24\n")
    assert soak.sigterm_may_kill("step 24 ...\ndone: 24 steps, 768 samples; outputs in x\n")
    assert not soak.sigterm_may_kill("task mae on a vit_tiny_patch16 encoder\nstep 3: loss 1.2\n")  # training


@pytest.mark.slow
def test_random_kills_end_with_the_weights_of_an_unbroken_run(tmp_path, env):
    result = run([sys.executable, str(ROOT / "tools" / "fault_soak.py"), "--kills", "8", "--error-exits", "3",
                  "--final-kills", "3", "--steps", "24", "--workdir", str(tmp_path)], env, timeout=3000)
    assert "final weights: identical to the unbroken run" in result.stdout
    assert "(3 error, " in result.stdout and " random, 3 final;" in result.stdout


@pytest.mark.slow
def test_random_kills_of_a_dino_run_end_with_its_unbroken_student_teacher_and_center(tmp_path, env):
    """DINO's EMA teacher, its center and its multi-crop views under the soak: the same weights."""
    result = run([sys.executable, str(ROOT / "tools" / "fault_soak.py"), "--method", "dino", "--kills", "5",
                  "--error-exits", "2", "--final-kills", "2", "--steps", "12", "--workdir", str(tmp_path)], env,
                 timeout=3000)
    assert "final weights: identical to the unbroken run" in result.stdout
    assert "(2 error, " in result.stdout and " 2 final;" in result.stdout
