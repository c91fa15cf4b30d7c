"""The training loop end to end: real subprocess runs of pretrain.py on the digits set."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import free_port, main_script
from ssl_vit import config, recipes
from ssl_vit.run.optim import Schedule
from ssl_vit.run import make_plan

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = str(ROOT / "pretrain.py")
# a small model and batch, so that every run takes seconds
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
        "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2",
        "data.batch_size=16", "optim.batch_size=32", "data.num_workers=1", "log.every=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def env_with(cache):
    return {**os.environ, "SSL_VIT_CACHE": cache, "OMP_NUM_THREADS": "1"}


def pretrain(out, cache, *overrides, launcher=None, timeout=300, check=True):
    command = [*(launcher or [sys.executable]), PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}",
               *TINY, *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=env_with(cache), timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_lines(out, evaluations=False):
    """The training lines of log.jsonl (or the evaluation lines: the k-NN monitor's)."""
    lines = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if ("eval" in line) == evaluations]


def test_plan_derives_accumulation_and_steps():
    cfg = recipes.load(["recipe=mae_base", "data.batch_size=64"])
    plan = make_plan(cfg, world_size=8, samples_per_epoch=1281167)
    assert (plan.accumulation, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (8, 312, 249600, 12480)
    assert plan.base_lr == pytest.approx(1.5e-4 * 4096 / 256)
    with pytest.raises(config.ConfigError, match="not a multiple of data.batch_size=48"):
        make_plan(recipes.load(["recipe=mae_base", "data.batch_size=48"]), world_size=8, samples_per_epoch=10 ** 6)


def test_schedule_is_linear_warmup_then_cosine():
    schedule = Schedule(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert schedule(0) == 0.0 and schedule(5) == pytest.approx(0.5) and schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)


def test_the_step_schedule_drops_at_its_milestones():
    schedule = Schedule(base_lr=1.0, min_lr=0.0, warmup_steps=10, total_steps=100, milestones=(50, 80), gamma=0.1)
    assert schedule(5) == pytest.approx(0.5) and schedule(10) == schedule(49) == 1.0
    assert schedule(50) == pytest.approx(0.1) and schedule(79) == pytest.approx(0.1) and schedule(80) == pytest.approx(0.01)
    cfg = recipes.load(["recipe=simmim_vit_base"])  # SimMIM's: / 10 at epoch 700 of 800
    plan = make_plan(cfg, world_size=16, samples_per_epoch=1281167)
    assert plan.milestones == (700 * plan.steps_per_epoch,)
    with pytest.raises(config.ConfigError, match="optim.schedule=step needs optim.lr_milestones"):
        recipes.load(["recipe=mae_base", "optim.schedule=step"])


SHORT_RUN = ["train.max_steps=6", "train.checkpoint_every=4", "log.images_every=3"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache):
    """A finished 6-step run (the tests of re-runs work on copies of it)."""
    out = tmp_path_factory.mktemp("short") / "run"
    return out, pretrain(out, cache, *SHORT_RUN)


def test_a_short_run_trains_logs_checkpoints_and_exports(short_run):
    out, result = short_run
    assert "done: 6 steps" in result.stdout
    for name in ("config.yaml", "plan.json", "log.jsonl", "backbone.safetensors", "backbone.json",
                 "model.safetensors", "model.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    lines = log_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert [line["samples"] for line in lines] == [32 * i for i in range(1, 7)]
    assert all(key in lines[0] for key in ("loss", "lr", "grad_norm", "img_s", "epoch"))
    # the k-NN monitor of mae_tiny_digits evaluates the final encoder, on the whole validation split
    (final,) = log_lines(out, evaluations=True)
    assert final["step"] == 6 and final["eval"]["num_samples"] == 360 and final["eval"]["protocol"] == "knn"
    assert json.loads((out / "metrics.json").read_text())["top1"] == final["eval"]["top1"]
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_s"} <= set(accumulator.Tags()["scalars"])
    assert "reconstructions" in accumulator.Tags()["images"]
    # the resolved config is a recipe again
    again = recipes.load([f"recipe={out / 'config.yaml'}"])
    assert again.model.embed_dim == 32 and again.train.max_steps == 6
    # the exported backbone is a timm model with the same features
    description = json.loads((out / "backbone.json").read_text())
    timm_model = eval(description["load_with_timm"], {"timm": timm}).eval()
    from ssl_vit import create_encoder, load_weights
    encoder = create_encoder("vit_tiny_patch16", **{k: v for k, v in description["encoder"].items() if k != "arch"})
    load_weights(encoder, out / "backbone.safetensors", strict=True, verbose=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(timm_model(images), encoder.eval()(images), atol=1e-5)
    # model.safetensors is the official MAE layout, decoder included
    model = load_file(out / "model.safetensors")
    assert "mask_token" in model and "decoder_pred.weight" in model and "blocks.0.attn.qkv.weight" in model


def _snapshot(folder):
    """Every file of a folder: {relative path: (bytes, modification time)}; but .lock, which says who
    runs in the folder now."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != ".lock"}


def test_rerunning_a_finished_run_leaves_it_as_it_is(tmp_path, cache, short_run):
    out = tmp_path / "run"
    shutil.copytree(short_run[0], out, copy_function=shutil.copy2)  # modification times kept
    before = _snapshot(out)
    result = pretrain(out, cache, *SHORT_RUN)
    assert "nothing to do" in result.stdout
    after = _snapshot(out)
    assert sorted(after) == sorted(before)  # no new file (not even a TensorBoard event file)
    changed = [name for name in before if after[name] != before[name]]
    assert not changed, f"rewritten by a run that had nothing to do: {changed}"


def test_a_run_stopped_after_its_last_checkpoint_writes_its_final_outputs_when_rerun(tmp_path, cache, short_run):
    """The periodic checkpoint can fall on the last step: a kill right after it left a run at its last
    step without its export and metrics.json. The rerun writes them (the same numbers), not "nothing to do"."""
    out = tmp_path / "run"
    shutil.copytree(short_run[0], out)
    metrics_before, weights_before = json.loads((out / "metrics.json").read_text()), _final_weights(out)
    (out / "metrics.json").unlink()
    (out / "model.safetensors").unlink()
    result = pretrain(out, cache, *SHORT_RUN)
    assert "model.safetensors, metrics.json were not written" in result.stdout and "nothing to do" not in result.stdout
    metrics_after = json.loads((out / "metrics.json").read_text())
    assert metrics_after["top1"] == metrics_before["top1"] and metrics_after["step"] == metrics_before["step"] == 6
    weights_after = _final_weights(out)
    assert weights_after.keys() == weights_before.keys()
    assert all(torch.equal(weights_after[k], weights_before[k]) for k in weights_before)


def _final_weights(out):
    return load_file(Path(out) / "model.safetensors")


def test_killed_run_resumes_exactly(tmp_path, cache):
    """SIGKILL after a checkpoint; the same command resumes and ends where an unbroken run ends,
    with the same weights (data position, augmentations, masks and optimizer all restored)."""
    steps = ["train.max_steps=9", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    unbroken = tmp_path / "unbroken"
    pretrain(unbroken, cache, *steps)
    broken = tmp_path / "broken"
    command = [sys.executable, PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={broken}", *TINY, *steps]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_with(cache))
    deadline = time.time() + 120
    while not (broken / "checkpoints" / "step_00000003").is_dir():
        assert time.time() < deadline and process.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in (broken / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "step_00000009" not in done
    result = pretrain(broken, cache, *steps)
    assert "resumed from" in result.stdout
    assert log_lines(broken)[-1]["step"] == 9
    a, b = _final_weights(unbroken), _final_weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signals_write_a_checkpoint_and_exit_0(tmp_path, cache, sig):
    out = tmp_path / "run"
    command = [sys.executable, PRETRAIN, "recipe=mae_tiny_digits", f"train.output_dir={out}", *TINY,
               "train.max_steps=100000", "train.checkpoint_every=100000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env_with(cache))
    deadline = time.time() + 120
    while not (out / "log.jsonl").is_file() or len(log_lines(out)) < 2:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert "preempted: checkpoint written at step" in stdout
    checkpoints = [p for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "train_state.json").read_text())
    assert state["step"] >= 2 and checkpoints[0].name == f"step_{state['step']:08d}"


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, cache):
    out = tmp_path / "run"
    result = pretrain(out, cache, "optim.blr=1e30", "optim.warmup_epochs=0", "train.max_nonfinite_steps=3",
                      "train.max_steps=40", check=False)
    assert result.returncode == 1
    assert "optimizer steps in a row had a non-finite loss or gradient" in result.stderr
    lines = log_lines(out)
    assert lines[-1]["nonfinite_total"] >= 3 and lines[-1]["skipped"] == 1
    assert (out / "checkpoints").is_dir()


DISTRIBUTED = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


def test_two_processes_train_with_the_same_global_batch_and_schedule(tmp_path, cache):
    single, double = tmp_path / "single", tmp_path / "double"
    pretrain(single, cache, "train.max_steps=4", "optim.warmup_epochs=0.3")
    result = pretrain(double, cache, "train.max_steps=4", "optim.warmup_epochs=0.3", "train.checkpoint_every=2",
                      "train.keep_checkpoints=3", launcher=[*DISTRIBUTED, free_port()])
    plan = json.loads((double / "plan.json").read_text())
    assert (plan["world_size"], plan["accumulation"], plan["global_batch"]) == (2, 1, 32)
    assert json.loads((single / "plan.json").read_text())["accumulation"] == 2
    assert [line["lr"] for line in log_lines(double)] == [line["lr"] for line in log_lines(single)]
    assert [line["samples"] for line in log_lines(double)] == [32, 64, 96, 128]
    assert result.stdout.count("done: 4 steps") == 1  # one process speaks
    # resume under 2 processes
    result = pretrain(double, cache, "train.max_steps=6", "optim.warmup_epochs=0.3",
                      launcher=[*DISTRIBUTED, free_port()])
    assert "resumed from" in result.stdout and log_lines(double)[-1]["step"] == 6
    rng_files = sorted(p.name for p in (double / "checkpoints" / "step_00000004").glob("random_states_*"))
    assert rng_files == ["random_states_0.pkl", "random_states_1.pkl"]


GRADIENTS = """
import os, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from ssl_vit.run import Trainer
cfg = recipes.load(["recipe=mae_tiny_digits", *{tiny!r}, "train.output_dir={out}"])
trainer = Trainer(cfg)
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
noise = torch.rand(32, 16, generator=g)
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
per = 32 // world // trainer.plan.accumulation
micro = [dict(images=images[i * per:(i + 1) * per], noise=noise[i * per:(i + 1) * per],
              labels=torch.zeros(per, dtype=torch.long))
         for i in range(rank * trainer.plan.accumulation, (rank + 1) * trainer.plan.accumulation)]
trainer.step.accumulate_gradients(micro)
if rank == 0:
    torch.save({{n: p.grad for n, p in trainer.task.named_parameters()}}, "{out}/grads.pt")
trainer.close()
"""


def test_accumulation_and_processes_give_the_same_gradients(tmp_path, cache):
    """1 process x 2 accumulation steps == 2 processes x 1 step, on the same 32 images and masks."""
    grads = {}
    for name, launcher in (("single", [sys.executable]), ("double", [*DISTRIBUTED, free_port()])):
        out = tmp_path / name
        out.mkdir()
        script = tmp_path / f"{name}.py"
        script.write_text(main_script(GRADIENTS.format(root=str(ROOT), tiny=TINY, out=out)))
        result = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env=env_with(cache),
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        grads[name] = torch.load(out / "grads.pt", weights_only=True)
    assert grads["single"].keys() == grads["double"].keys()
    for key, value in grads["single"].items():
        assert torch.allclose(value, grads["double"][key], atol=1e-6, rtol=1e-4), key


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_slurm_script_checkpoints_at_the_time_limit_and_requeues(tmp_path, cache):
    """tools/slurm_pretrain.sh with stand-ins for srun and scontrol, 2 CPU processes under
    `accelerate launch`: SLURM's warning (SIGUSR1 to the batch script) makes the run checkpoint and
    exit 0, and the script asks to requeue the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift  # --kill-on-bad-exit\nSLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\nif [ "$1" = show ]; then echo localhost; '
                                      f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    venv_bin = Path(sys.executable).parent
    env = {**env_with(cache), "PATH": f"{bin_dir}:{venv_bin}:{os.environ['PATH']}", "GPUS_PER_NODE": "2",
           "ACCELERATE_USE_CPU": "1", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "MAIN_PORT": free_port(),
           "OUTPUT_DIR": str(tmp_path / "run")}
    command = ["bash", str(ROOT / "tools" / "slurm_pretrain.sh"), "recipe=mae_tiny_digits", *TINY,
               "train.max_steps=100000"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    out = tmp_path / "run"
    deadline = time.time() + 180
    while not (out / "log.jsonl").is_file() or len(log_lines(out)) < 2:
        assert time.time() < deadline and process.poll() is None, process.stdout.read() if process.poll() else ""
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)  # --signal=B:USR1@180: to the batch script only
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output[-3000:]
    assert "asking the run to checkpoint" in output and "requeueing 4242" in output
    assert not (out / "STOP").exists()
    assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 4242"
    checkpoints = [p for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert len(checkpoints) == 1 and json.loads((checkpoints[0] / "train_state.json").read_text())["world_size"] == 2


FLAGS = """
import json, math, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from ssl_vit.run import Trainer
cfg = recipes.load(["recipe=mae_tiny_digits", *{tiny!r}, "train.output_dir={out}", *{flags!r}])
trainer = Trainer(cfg)
calls, dtypes = [0], set()
block = trainer.encoder.blocks[0]
forward = block.forward
def counted(*args, **kwargs):  # (checkpointing's recomputation skips forward hooks: count the calls)
    calls[0] += 1
    return forward(*args, **kwargs)
block.forward = counted
block.attn.qkv.register_forward_hook(lambda m, i, o: dtypes.add(str(o.dtype)))
g = torch.Generator().manual_seed(0)
micro = [dict(images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
              labels=torch.zeros(16, dtype=torch.long)) for _ in range(trainer.plan.accumulation)]
stats = trainer.train_step(micro)
print(json.dumps(dict(calls=calls[0], micro=len(micro), dtypes=sorted(dtypes), loss=float(stats["loss"]),
                      finite=math.isfinite(float(stats["loss"])) and math.isfinite(float(stats["grad_norm"])),
                      precision=trainer.accelerator.mixed_precision)))
"""


@pytest.mark.parametrize("flags, precision, dtype, forwards", [
    (["train.precision=bf16", "train.grad_checkpointing=true"], "bf16", "torch.bfloat16", 2),
    (["train.precision=no"], "no", "torch.float32", 1),
])
def test_bf16_and_gradient_checkpointing_take_effect(tmp_path, cache, flags, precision, dtype, forwards):
    """bf16: the blocks' matrix multiplies run in bf16 under autocast; gradient checkpointing: each
    block runs twice per micro-batch (forward, then again in the backward pass); the control runs
    fp32, once. The step's loss and gradient norm are finite (math.isfinite also catches inf)."""
    script = tmp_path / "flags.py"
    script.write_text(FLAGS.format(root=str(ROOT), tiny=TINY, out=tmp_path / "run", flags=flags))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env_with(cache),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["precision"] == precision and seen["dtypes"] == [dtype]
    assert seen["calls"] == forwards * seen["micro"] and seen["finite"]


SYNCS = """
import json, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from ssl_vit.run import Trainer
from ssl_vit.run.logbook import Window as _Window
cfg = recipes.load(["recipe={recipe}", *{tiny!r}, "train.output_dir={out}", *{extra!r}])
trainer = Trainer(cfg)
g = torch.Generator().manual_seed(0)
def micro():
    return [dict(images=torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g),
                 labels=torch.randint(0, 10, (16,), generator=g)) for _ in range(trainer.plan.accumulation)]
window = _Window()
window.add(trainer.train_step(micro()), 32)  # warm-up (lazy state, first kernels)
reads = []
names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
originals = {{n: getattr(torch.Tensor, n) for n in names}}
def counting(name):
    def read(self, *args, **kwargs):
        reads.append(name)
        return originals[name](self, *args, **kwargs)
    return read
for n in names:
    setattr(torch.Tensor, n, counting(n))
for _ in range(3):
    window.add(trainer.train_step(micro()), 32)
per_step = len(reads) / 3
for n in names:
    setattr(torch.Tensor, n, originals[n])
summary = window.summary()
print(json.dumps(dict(reads_per_step=per_step, what=sorted(set(reads)), loss=summary["loss"],
                      skip_on_device=trainer.step.on_device)))
"""


@pytest.mark.parametrize("recipe, extra, reads", [
    ("mae_tiny_digits", [], 0),                                     # fused AdamW: skips decided on the device
    ("finetune_digits", ["train.ema_decay=0.9"], 1),                # an EMA reads the skip flag, once a step
])
def test_a_training_step_does_not_wait_on_the_host(tmp_path, cache, recipe, extra, reads):
    """Counted by instrumenting every way a tensor is read back (item, float(), bool(), tolist...)
    during three optimizer steps of 2 micro-batches each; the means are read once, when logged."""
    tiny = TINY if recipe == "mae_tiny_digits" else TINY[:4] + ["data.batch_size=16", "optim.batch_size=32",
                                                                 "data.num_workers=1"]
    script = tmp_path / "syncs.py"
    script.write_text(SYNCS.format(root=str(ROOT), recipe=recipe, tiny=tiny, out=tmp_path / "run", extra=extra))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env_with(cache),
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["reads_per_step"] == reads, seen
    assert seen["skip_on_device"] == (reads == 0) and math.isfinite(seen["loss"])


def test_bf16_and_gradient_checkpointing_run_end_to_end(tmp_path, cache):
    out = tmp_path / "run"
    result = pretrain(out, cache, "train.max_steps=2", "train.precision=bf16", "train.grad_checkpointing=true")
    assert "done: 2 steps" in result.stdout
    assert all(math.isfinite(line["loss"]) for line in log_lines(out))


@pytest.mark.slow
def test_torch_compile(tmp_path, cache):
    out = tmp_path / "run"
    result = pretrain(out, cache, "train.max_steps=2", "train.compile=true", timeout=900)
    assert "done: 2 steps" in result.stdout
    assert not any(k.startswith("_orig_mod") for k in load_file(out / "model.safetensors"))


@pytest.mark.slow  # two fresh processes timing a step
def test_benchmark_mae_prints_a_table_and_a_json_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "mae", "--arch", "vit_tiny_patch16",
                             "--batch", "2", "--steps", "1", "--warmup", "0", "--variants", "eager"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| eager, no masking |" in result.stdout
    assert "| variant | s/step | images/s | GFLOP/image | GFLOP/s | of matmul peak | MFU | vs eager |" in result.stdout
    # a CPU has no data-sheet peak, so MFU is not made up
    assert "| n/a (no data-sheet peak) |" in result.stdout
    assert "products of fp32 tensors under bf16 autocast, as the step" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # the table's and the JSON's shape only: speed is the benchmark's business, not a unit test's
    for key in ("eager", "eager_unmasked"):
        assert {f"{key}_img_s", f"{key}_step_s", f"{key}_flops_per_image", f"{key}_fraction_of_peak"} <= set(figures)
    assert figures["eager_flops_per_image"] < figures["eager_unmasked_flops_per_image"]  # counted, not timed
    assert figures["matmul_peak_flops"] > 0 and isinstance(figures["native_bf16"], bool)


@pytest.mark.slow  # three fresh processes timing full-size steps (ViT-B MAE, ViT-S MAE, ViT-S DINO with 12 views)
def test_benchmark_dino_times_its_step_with_every_view_beside_maes():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "dino", "--device", "cpu",
                             "--batch", "1", "--steps", "1", "--warmup", "0", "--precision", "no"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    dino = "dino_vit-s16_2_x_224_+_10_x_96_px"
    assert figures[f"{dino}_encoder_tokens"] == 197  # the largest view: 14 x 14 patches + the class token
    # 2 global + 10 local views through the student, 2 through the teacher: far more work per image
    # than MAE's 25% of the patches on the same ViT-S (counted, not timed)
    assert figures[f"{dino}_flops_per_image"] > 2 * figures["mae_vit-s16_flops_per_image"]
    assert "| DINO, ViT-S/16, 2 x 224 + 10 x 96 px (dino_vit_small) | 197 |" in result.stdout
