"""Sharded training (train.sharding=fsdp, torch's FSDP2) on CPU processes, as the DDP path is tested:
the same losses and weights as one process, exact resume, full exports, frozen teachers left whole."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_VIT, free_port, main_script, run_steps
from conftest import run_command as run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
TINY_MAE = [*TINY_VIT, "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "data.batch_size=16",
            "optim.batch_size=32", "log.every=1", "optim.warmup_epochs=0.1"]

MAE_BATCH = """
images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
batch = dict(images=images, noise=torch.rand(32, 16, generator=g), labels=torch.zeros(32, dtype=torch.long))
"""


def _steps(tmp_path, env, name, launcher, extra):
    return run_steps(tmp_path, env, name, launcher, "mae_tiny_digits", TINY_MAE, MAE_BATCH, extra)


def test_two_sharded_processes_give_the_losses_and_weights_of_one(tmp_path, env):
    """1 process x 2 accumulation steps (DDP path) and 2 processes x 1 step with FSDP2, on the same
    images and masks: the same loss at every step and the same final weights (to fp32 rounding:
    the sum of the gradients runs in another order), and exports with the same keys."""
    one, single = _steps(tmp_path, env, "one", [sys.executable], [])
    two, sharded = _steps(tmp_path, env, "two", [*TORCHRUN, free_port()], ["train.sharding=fsdp"])
    assert not single["sharded"] and sharded["sharded"] and sharded["dtensor"] == "DTensor"
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for name in ("model.safetensors", "backbone.safetensors"):
        a, b = load_file(one / name), load_file(two / name)  # the FSDP export: whole, from rank 0
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].shape == b[key].shape and torch.allclose(a[key], b[key], atol=2e-6, rtol=1e-4), key
    description = json.loads((two / "backbone.json").read_text())
    assert description["encoder"] == json.loads((one / "backbone.json").read_text())["encoder"]


@pytest.mark.slow  # 2 sharded processes, three runs; test_two_sharded_processes_... stays in the quick suite
def test_a_sharded_run_resumes_exactly(tmp_path, env):
    """Distributed checkpoints on 2 processes: stopped after step 2 and resumed, the final weights
    are bit-identical to an unbroken run's."""
    base = [str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits", *TINY_MAE, "train.sharding=fsdp",
            "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    run([*TORCHRUN, free_port(), *base, f"train.output_dir={tmp_path / 'unbroken'}", "train.max_steps=4"], env)
    run([*TORCHRUN, free_port(), *base, f"train.output_dir={tmp_path / 'broken'}", "train.max_steps=2"], env)
    result = run([*TORCHRUN, free_port(), *base, f"train.output_dir={tmp_path / 'broken'}", "train.max_steps=4"], env)
    assert "resumed from" in result.stdout and "fsdp: 3 blocks" in result.stdout
    saved = tmp_path / "broken" / "checkpoints" / "step_00000002"
    assert (saved / ".metadata").is_file() and sorted(p.name for p in saved.glob("*.distcp")) == ["__0_0.distcp",
                                                                                                 "__1_0.distcp"]
    a, b = load_file(tmp_path / "unbroken" / "model.safetensors"), load_file(tmp_path / "broken" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TEACHER = """
import json, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from ssl_vit.weights import export_model
from ssl_vit.models import build_encoder
from ssl_vit.tasks import Classify
from ssl_vit.run import Trainer
teacher = "{out}/teacher.safetensors"
cfg = recipes.load(["recipe=supervised_resnet_digits", "model.num_classes=10"])
export_model(Classify(build_encoder(cfg.model, num_classes=10)), teacher)
cfg = recipes.load(["recipe=deit_tiny_distilled_digits", *{tiny!r}, "train.output_dir={out}/run", "data.batch_size=32",
                   "train.sharding=fsdp", f"task.teacher.weights={{teacher}}", "train.max_steps=1"])
trainer = Trainer(cfg)
trainer.run()
kinds = {{name: type(p).__name__ for name, p in trainer.task.named_parameters()}}
teacher_kinds = {{type(p).__name__ for p in trainer.task.teacher.parameters()}}
if trainer.accelerator.is_main_process:
    json.dump(dict(student=sorted(set(kinds.values())), teacher=sorted(teacher_kinds),
                   frozen=all(not p.requires_grad for p in trainer.task.teacher.parameters())),
              open("{out}/kinds.json", "w"))
trainer.close()
"""


def test_a_teacher_stays_whole_and_frozen_under_sharding(tmp_path, env):
    script = tmp_path / "teacher.py"
    script.write_text(main_script(TEACHER.format(root=str(ROOT), tiny=TINY_VIT, out=tmp_path)))
    run([*TORCHRUN, free_port(), str(script)], env)
    kinds = json.loads((tmp_path / "kinds.json").read_text())
    assert kinds == {"student": ["DTensor"], "teacher": ["Parameter"], "frozen": True}
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_memory_table_is_counted_from_the_model(tmp_path):
    """tools/benchmark.py memory: parameters, gradients and AdamW state from the recipe's model (16
    bytes a parameter whole, 1/N of it sharded), activations from the tensors saved for backward."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "memory", "--recipe", "mae_giant",
                             "--gpus", "8", "64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| strategy | GPUs | parameters | gradients | AdamW state |" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    from ssl_vit import recipes
    from ssl_vit.tasks import build

    with torch.device("meta"):
        task = build(recipes.load(["recipe=mae_giant"]))
    assert figures["mae_giant_trainable_parameters"] == sum(p.numel() for p in task.parameters() if p.requires_grad)
    assert figures["mae_giant_fsdp_64_total_gib"] < figures["mae_giant_fsdp_8_total_gib"] < figures["mae_giant_ddp_8_total_gib"]
    assert 0 < figures["mae_giant_activations_per_image_checkpointed_gib"] < figures["mae_giant_activations_per_image_gib"]


def test_accelerates_own_fsdp_launch_is_refused_with_the_way_that_works(tmp_path, env):
    result = run([sys.executable, str(ROOT / "pretrain.py"), "recipe=mae_tiny_digits",
                  f"train.output_dir={tmp_path}"], {**env, "ACCELERATE_USE_FSDP": "true"}, expect=2)
    assert "pass train.sharding=fsdp" in result.stderr
