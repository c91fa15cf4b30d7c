"""The evaluation commands end to end: tools/knn.py, tools/linear_probe.py, tools/finetune.py;
tools/predict.py on inputs it must refuse."""
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from conftest import ROOT, free_port, main_script
from conftest import run_command as run
from ssl_vit import recipes, create_encoder, export_model, load_weights
from ssl_vit.cli.predict import predict

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]


@pytest.fixture(scope="module")
def backbone(tiny_mae_run):
    return tiny_mae_run / "backbone.safetensors"


def tool(name):
    return [sys.executable, str(ROOT / "tools" / f"{name}.py")]


def metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def test_knn_is_the_same_on_one_and_two_processes(tmp_path, env, backbone):
    one = run([*tool("knn"), f"init={backbone}", "data.name=digits", f"train.output_dir={tmp_path / 'one'}"], env)
    assert "final: k-NN (k=20, T=0.07) top-1" in one.stdout
    two = run([*TORCHRUN, free_port(), str(ROOT / "tools" / "knn.py"), f"init={backbone}", "data.name=digits",
               f"train.output_dir={tmp_path / 'two'}"], env)
    assert two.stdout.count("k-NN") == 1
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert a["num_samples"] == b["num_samples"] == 360 and a["num_train_samples"] == b["num_train_samples"] == 1437
    assert a["top1"] == pytest.approx(b["top1"]) and a["top5"] == pytest.approx(b["top5"])
    assert a["protocol"] == "knn" and a["provenance"]["model"]["embed_dim"] == 32  # adopted from the export's JSON
    assert any((tmp_path / "one" / "tensorboard").iterdir())
    assert "data.crop_pct" in one.stdout  # the backbone's input settings too (digits: mean 0.5, whole image)
    config_used = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert config_used["provenance"]["input"] == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}


def test_linear_probe_with_cached_features(tmp_path, env, backbone):
    out = tmp_path / "probe"
    result = run([*tool("linear_probe"), "recipe=linprobe_digits", f"init={backbone}", f"train.output_dir={out}",
                  "optim.epochs=3", "optim.warmup_epochs=1", "task.lr_scales=[1,100]"], env)
    assert "cached the train features of 1437 samples" in result.stdout
    m = metrics(out)
    assert m["num_samples"] == 360 and m["best_lr_scale"] in (1, 100) and len(m["heads"]) == 2
    assert m["top1"] == max(h["top1"] for h in m["heads"])
    # the frozen encoder is unchanged; the best head exports folded into a timm classifier
    assert recipes.load([f"recipe={out / 'config.yaml'}"]).model.embed_dim == 32
    exported = json.loads((out / "model.json").read_text())
    timm_model = eval(exported["load_with_timm"], {"timm": timm}).eval()
    original = create_encoder("vit_tiny_patch16", **{k: v for k, v in exported["encoder"].items()
                                                     if k not in ("arch", "num_classes")})
    load_weights(original, backbone, strict=True, verbose=False)
    backbone_after = create_encoder("vit_tiny_patch16", **{k: v for k, v in exported["encoder"].items()
                                                           if k not in ("arch", "num_classes")})
    load_weights(backbone_after, out / "backbone.safetensors", strict=True, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), backbone_after.state_dict().values()))
    assert exported["encoder"]["num_classes"] == 10 and timm_model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_linear_probe_of_a_random_encoder_with_augmentation(tmp_path, env):
    """init=random is the baseline; data.train_transform=rrc runs the encoder at every step."""
    out = tmp_path / "probe"
    result = run([*tool("linear_probe"), "recipe=linprobe_digits", "init=random", f"train.output_dir={out}",
                  "train.max_steps=3", "data.train_transform=rrc", "data.batch_size=64", "optim.batch_size=128"], env)
    m = metrics(out)
    assert m["num_samples"] == 360 and m["provenance"]["init"] == "random" and 0 <= m["top1"] <= 100
    assert "cached the train features" not in result.stdout and "runs at every step" in result.stdout


PROBE_PATHS = """
import json, sys, torch
sys.path.insert(0, {root!r})
from ssl_vit import config, recipes
from itertools import islice
from ssl_vit.run import Trainer
cfg = recipes.load(["recipe=linprobe_digits", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                   "model.patch_size=8", "data.num_workers=0", "data.train_transform={transform}",
                   "train.output_dir={out}"])
trainer = Trainer(cfg)
calls = [0]
trainer.encoder.blocks[0].register_forward_hook(lambda m, i, o: calls.__setitem__(0, calls[0] + 1))
micro = list(islice(trainer.data.epoch(0), trainer.plan.accumulation))
trainer.train_step(micro)
print(json.dumps(dict(data=type(trainer.data).__name__, keys=sorted(micro[0]), encoder_calls=calls[0])))
"""


@pytest.mark.parametrize("transform, data, key, runs_encoder", [
    ("rrc", "TrainData", "images", True), ("eval", "FeatureData", "features", False)])
def test_linear_probe_caches_features_only_without_augmentation(tmp_path, env, transform, data, key, runs_encoder):
    """Augmented: shards through the loader, the frozen encoder runs in every step; not augmented:
    the step trains the heads on cached features, the encoder does not run."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE_PATHS.format(root=str(ROOT), transform=transform, out=tmp_path / "run"))
    seen = json.loads(run([sys.executable, str(script)], env).stdout.strip().splitlines()[-1])
    assert seen["data"] == data and key in seen["keys"] and (seen["encoder_calls"] > 0) == runs_encoder


def test_finetune_evaluates_keeps_the_best_and_exports_for_timm(tmp_path, env, backbone):
    out = tmp_path / "ft"
    result = run([*tool("finetune"), "recipe=finetune_digits", f"init={backbone}", f"train.output_dir={out}",
                  "optim.epochs=2", "optim.warmup_epochs=1", "eval.every_epochs=1", "train.ema_decay=0.9",
                  "data.train_fraction=0.1", "train.checkpoint_every=2"], env)
    assert result.stdout.count("validation samples") >= 2  # every epoch, and the end
    m = metrics(out)
    assert m["num_samples"] == 360 and {"top1", "top5", "ema_top1", "best"} <= set(m)
    assert m["best"]["top1"] >= m["top1"]  # the best over every evaluation, the final one included
    assert (out / "model_best.safetensors").is_file()
    assert any((p / "ema.safetensors").is_file() for p in (out / "checkpoints").iterdir())
    description = json.loads((out / "model.json").read_text())
    timm_model = eval(description["load_with_timm"], {"timm": timm}).eval()
    ours = create_encoder("vit_tiny_patch16", **{k: v for k, v in description["encoder"].items() if k != "arch"}).eval()
    load_weights(ours, out / "model.safetensors", strict=True, verbose=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(timm_model(images), ours(images), atol=1e-5)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("eval" in line for line in lines)


def test_knn_of_a_random_encoder_on_the_digits_builds_the_digits_encoder(tmp_path, env):
    """Without a recipe, `knn.py init=random data.name=digits` built a ViT-B/16 at 224 px (over 10 minutes
    on 2 cores): it takes recipes/knn_digits.yaml, says so, and how to choose another architecture."""
    result = run([*tool("knn"), "init=random", "data.name=digits", f"train.output_dir={tmp_path}"], env)
    assert "randomly initialised vit_tiny_patch16 encoder (embed_dim 128, depth 4" in result.stdout
    assert "recipe knn_digits; another architecture: like=" in result.stdout
    assert metrics(tmp_path)["top1"] == pytest.approx(55.0)  # the README's random row (seed 0)


def test_evaluation_commands_need_an_init(tmp_path, env, monkeypatch, capsys):
    # the command line once (exit code 2, one line, no traceback) ...
    result = run([*tool("finetune"), "recipe=finetune_digits", f"train.output_dir={tmp_path}"], env, expect=2)
    assert "init=random" in result.stderr and "Traceback" not in result.stderr
    # ... then every command in this process (the signal handlers of a run stay out of pytest's)
    from ssl_vit.cli import commands

    monkeypatch.setattr(commands, "catch_stop_signals_early", lambda: None)
    for command, args, message in (
            (commands.finetune, ["recipe=finetune_digits"], "init=random"),
            (commands.linear_probe, ["recipe=linprobe_digits"], "init=random"),
            (commands.knn, ["recipe=knn"], "init=random"),
            (commands.finetune, ["recipe=mae_tiny_digits", "init=random"], "task.name")):
        with pytest.raises(SystemExit) as stop:
            command([*args, f"train.output_dir={tmp_path}"])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error


VALIDATION = """
import json, sys, torch
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from ssl_vit import config, recipes, load_weights
from ssl_vit.data import DeviceNormalize
from ssl_vit.eval import TopKAccuracy
from ssl_vit.tasks import build
cfg = recipes.load(["recipe=finetune_digits", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                   "model.patch_size=8", "data.batch_size=50"])
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
task = build(cfg, 10).to(accelerator.device)
normalize = DeviceNormalize(cfg.data.mean, cfg.data.std)
result = TopKAccuracy(cfg, task, accelerator, normalize, 10).measure()
if accelerator.is_main_process:
    json.dump(result, open({out!r}, "w"))
from ssl_vit.run import close_processes
close_processes(accelerator)
"""


@pytest.mark.slow  # 10-25 s: in `pytest -m slow` (and CI), to keep the quick suite near 9 minutes
def test_validation_accuracy_is_the_same_on_one_and_two_processes(tmp_path, env):
    results = {}
    for name, launcher in (("one", [sys.executable]), ("two", [*TORCHRUN, free_port()])):
        script = tmp_path / f"{name}.py"
        script.write_text(main_script(VALIDATION.format(root=str(ROOT), out=str(tmp_path / f"{name}.json"))))
        run([*launcher, str(script)], env)
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["one"]["num_samples"] == results["two"]["num_samples"] == 360
    assert results["one"]["top1"] == pytest.approx(results["two"]["top1"])
    assert results["one"]["top5"] == pytest.approx(results["two"]["top5"])


# -------------------------------------------------------------------------------------------
# tools/predict.py on inputs it must refuse: one line, exit code 2 (issue 20's hostile-input walk)


@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory):
    """An untrained 3-class export: refusing inputs needs a classifier, not a trained one (no run)."""
    model = create_encoder("vit_tiny_patch16", embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32,
                           num_classes=3)
    return export_model(model, tmp_path_factory.mktemp("classifier") / "model.safetensors",
                        extra={"classes": ["cat", "dog", "fish"]})


def one_error_line(error: str) -> str:
    lines = error.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in error, error
    return lines[0]


def huge_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit black PNG of side x side pixels in a few kB: too large for Pillow to open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compressobj(9)  # row by row: the 50 MB of raw rows never exist at once
    pixels = b"".join(rows.compress(bytes(1 + (side + 7) // 8)) for _ in range(side)) + rows.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def test_predict_refuses_an_image_too_large_for_pillow(tmp_path, env, random_classifier):
    image = huge_png(tmp_path / "huge.png")
    result = run([*tool("predict"), str(random_classifier), str(image)], env, expect=2)
    line = one_error_line(result.stderr)
    # the file, its size (20000 x 20000 pixels), Pillow's limit, and the way out
    assert str(image) in line and "400000000 pixels" in line and str(2 * Image.MAX_IMAGE_PIXELS) in line
    assert "Downscale it" in line


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("content", [
    b"not an image at all",
    png_of(Image.new("RGB", (64, 64), "red"))[:60],  # truncated inside its pixels
    b"P6\n32u 32\n255\n" + bytes(32 * 32 * 3),  # a broken PPM header: Pillow raises ValueError
], ids=["text", "truncated", "broken-header"])
def test_predict_refuses_a_file_that_is_no_readable_image(tmp_path, random_classifier, capsys, content):
    (tmp_path / "bad.img").write_bytes(content)
    assert predict([str(random_classifier), str(tmp_path / "bad.img")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "bad.img is not an image that PIL can read" in line


@pytest.mark.parametrize("top_k", ["0", "-1", "two"])
def test_predict_refuses_a_top_k_below_one(tmp_path, random_classifier, capsys, top_k):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as stop:  # argparse: its usage, then one error line
        predict([str(random_classifier), str(tmp_path / "x.png"), "--top-k", top_k])
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]
    assert stop.value.code == 2 and "argument --top-k: " in last and ">= 1" in last, error
    assert "Traceback" not in error


def test_predict_shows_every_class_when_top_k_exceeds_them(tmp_path, random_classifier, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert predict([str(random_classifier), str(tmp_path / "x.png"), "--top-k", "10", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert sorted(t["class"] for t in top) == ["cat", "dog", "fish"]
    assert sum(t["probability"] for t in top) == pytest.approx(1, abs=1e-5)
