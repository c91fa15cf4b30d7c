"""Fixtures shared by the end-to-end tests, which run the commands as users do (subprocesses)."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# nothing may reach a hub: timm / huggingface_hub fail instead of downloading, here and in subprocesses
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
# a tiny ViT (32 wide, 2 blocks, 8x8 patches) and MAE decoder: seconds per run on a CPU
TINY_VIT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "data.num_workers=1"]
TINY_MAE = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=32",
            "optim.batch_size=32"]


def free_port():
    """A TCP port nobody listens on now, for a two-process run's rendezvous: fixed ports collide
    when two test sessions (or a test and a user's run) share a machine, and the processes of one
    run then wait for partners that never come."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def main_script(code: str) -> str:
    """A test's Python script written as users must write theirs for multi-process runs: its work under
    `if __name__ == "__main__":`. The data-loader workers of a multi-process run start from a fork
    server, which imports the main script once; unguarded, the script would run again in there."""
    return 'if __name__ == "__main__":\n' + textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


def check_backbone_export_loads_in_timm(encoder, folder: Path, timm_class: str) -> None:
    """An encoder with a mask token, exported as a backbone: the JSON's load_with_timm command builds
    timm's `timm_class` from the file (strict, so no mask token in it), which computes the encoder's
    pooled features; and the JSON's encoder settings rebuild ours, which loads the file strictly."""
    import json

    import timm
    import torch

    from ssl_vit import create_encoder, export_backbone, load_weights

    export_backbone(encoder, folder / "backbone.safetensors")
    description = json.loads((folder / "backbone.json").read_text())
    theirs = eval(description["load_with_timm"], {"timm": timm}).eval()  # pretrained=True from the file: strict
    assert type(theirs).__name__ == timm_class and "mask_token" not in theirs.state_dict()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
        assert (theirs(images) - expected).abs().max().item() < 1e-5
    again = create_encoder(**description["encoder"])
    load_weights(again, folder / "backbone.safetensors", strict=True, verbose=False)


def run_command(command, env, expect=0, timeout=600):
    """Run a command line (a list, as users type it) and check its exit code; returns the result."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of a command: its own digits cache, one thread per process (2 cores here)."""
    return {**os.environ, "SSL_VIT_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_mae_run(tmp_path_factory, env):
    """A briefly pre-trained tiny MAE, as users get from pretrain.py: backbone.safetensors (the
    encoder) and model.safetensors (with the decoder), reconstructions logged to TensorBoard."""
    out = tmp_path_factory.mktemp("mae")
    run_command([sys.executable, str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits", f"train.output_dir={out}",
                 "train.max_steps=3", "log.images_every=1", *TINY_MAE], env)
    return out


# The same steps on 1 process and on 2 (DDP or FSDP): a script that builds the run's parts, makes each
# step's global batch with `make_batch` (code: `g` a seeded generator, giving `samples`: a list of
# per-sample dicts of tensors or of lists of view tensors), gives each rank its micro-batches, and
# writes the all-reduced losses; then the exports.
STEPS_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from ssl_vit import recipes
from ssl_vit.run import Trainer
cfg = recipes.load(["recipe={recipe}", *{tiny!r}, "train.output_dir={out}", *{extra!r}])
trainer = Trainer(cfg)
g = torch.Generator().manual_seed(0)
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
def part(value, i, per):
    return [v[i * per:(i + 1) * per] for v in value] if isinstance(value, list) else value[i * per:(i + 1) * per]
losses = []
for step in range(3):  # the same global batch per step, split over ranks and micro-batches
{make_batch}
    total = len(batch["labels"])
    per = total // world // trainer.plan.accumulation
    first = rank * trainer.plan.accumulation
    micro = [{{key: part(value, i, per) for key, value in batch.items()}}
             for i in range(first, first + trainer.plan.accumulation)]
    loss = trainer.train_step(micro)["loss"].detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    losses.append(float(loss))
trainer.state.step = 3
trainer.export()
block = dict(trainer.task.named_parameters())["encoder.blocks.0.attn.qkv.weight"]
if rank == 0:
    json.dump(dict(losses=losses, sharded=trainer.parallel.sharded, dtensor=type(block).__name__),
              open("{out}/steps.json", "w"))
trainer.close()
"""


def run_steps(tmp_path: Path, env: dict, name: str, launcher: list, recipe: str, tiny: list, make_batch: str,
              extra: list = ()):
    """STEPS_SCRIPT under `launcher` ([python] or torchrun): (its output folder, steps.json)."""
    import json
    import subprocess

    out = tmp_path / name
    out.mkdir()
    script = tmp_path / f"{name}.py"
    body = STEPS_SCRIPT.format(root=str(ROOT), recipe=recipe, tiny=list(tiny), out=out, extra=list(extra),
                               make_batch=textwrap.indent(textwrap.dedent(make_batch).strip("\n"), "    "))
    script.write_text(main_script(body))
    result = subprocess.run([*launcher, str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "steps.json").read_text())
