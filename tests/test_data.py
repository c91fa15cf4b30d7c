"""Shards: writing (make_shards), resolving, streaming under several ranks, transforms, digits."""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from conftest import free_port, main_script
from ssl_vit import recipes
from ssl_vit.config import ConfigError
from ssl_vit.data import DeviceNormalize, build_eval_loader, build_train_loader, shard_source
from ssl_vit.data.digits import digits_index
from ssl_vit.data.sources import resolve
from ssl_vit.data.stream import ShardStream, make_loader
from ssl_vit.data.transforms import Transform, build_transform, decode_uint8

ROOT = Path(__file__).resolve().parent.parent
MAKE_SHARDS = ROOT / "tools" / "make_shards.py"


def make_image_folder(root: Path, per_class=(7, 5, 3), size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    for c, n in enumerate(per_class):
        folder = root / f"class_{chr(97 + c)}"
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img.{i}.{'jpg' if i % 2 else 'png'}")
    return root


def make_shards(*args, cwd=None):
    return subprocess.run([sys.executable, str(MAKE_SHARDS), *map(str, args), "--quiet"], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_make_shards_from_an_image_folder(tmp_path):
    images = make_image_folder(tmp_path / "images")
    result = make_shards(images, tmp_path / "out" / "toy", "--max-count", 4, "--workers", 2)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert index["num_samples"] == 15 and index["classes"] == ["class_a", "class_b", "class_c"]
    assert index["counts"] == [4, 4, 4, 3] and index["pattern"] == "toy-{000000..000003}.tar"
    members = {}
    for name in index["shards"]:
        members.update(read_tar(tmp_path / "out" / name))
    labels = {k.rsplit(".", 1)[0]: int(v) for k, v in members.items() if k.endswith(".cls")}
    assert sorted(labels.values()) == [0] * 7 + [1] * 5 + [2] * 3
    # stored as they were: the bytes of every source file appear unchanged
    originals = sorted(p.read_bytes() for p in images.rglob("*.*"))
    assert sorted(v for k, v in members.items() if not k.endswith(".cls")) == originals
    assert all("." not in k.rsplit(".", 1)[0] for k in members)  # keys have no dots (webdataset)


def test_make_shards_keeps_order_without_shuffle_and_from_csv(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=(3, 3))
    files = sorted(images.rglob("*.*"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{'cat' if 'class_a' in str(p) else 'dog'}\n"
                                            for p in files))
    assert make_shards(csv, tmp_path / "csv", "--shuffle", "false").returncode == 0
    index = json.loads((tmp_path / "csv.json").read_text())
    assert index["classes"] == ["cat", "dog"]
    members = read_tar(tmp_path / "csv-000000.tar")
    stored = [v for k, v in sorted(members.items()) if not k.endswith(".cls")]
    assert stored == [p.read_bytes() for p in files]


def test_make_shards_skips_corrupt_images_and_refuses_to_overwrite(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=(3, 2))
    (images / "class_a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (images / "class_b" / "img.1.jpg").read_bytes()
    (images / "class_b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    result = make_shards(images, tmp_path / "toy")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable file(s)" in result.stderr and "broken.jpg" in result.stderr
    index = json.loads((tmp_path / "toy.json").read_text())
    assert index["num_samples"] == 5 and {e["file"] for e in index["skipped"]} == {
        "class_a/broken.jpg", "class_b/truncated.jpg"}
    before = (tmp_path / "toy-000000.tar").read_bytes()
    again = make_shards(images, tmp_path / "toy")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (tmp_path / "toy-000000.tar").read_bytes() == before
    assert make_shards(images, tmp_path / "toy", "--overwrite").returncode == 0


def test_make_shards_errors_and_downscaling(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    result = make_shards(tmp_path / "empty", tmp_path / "x")
    assert result.returncode == 2 and "no images found" in result.stderr
    assert "does not exist" in make_shards(tmp_path / "nope", tmp_path / "x").stderr
    images = make_image_folder(tmp_path / "images", per_class=(2,), size=(120, 60))
    assert make_shards(images, tmp_path / "small", "--max-side", 48).returncode == 0
    for name, data in read_tar(tmp_path / "small-000000.tar").items():
        if not name.endswith(".cls"):
            assert max(Image.open(io.BytesIO(data)).size) == 48


def test_make_shards_help_and_digits(tmp_path):
    help_text = make_shards("--help").stdout
    assert "--max-count" in help_text and "--digits" in help_text
    result = make_shards("--digits", tmp_path / "digits")
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "digits-train.json").read_text())
    val = json.loads((tmp_path / "digits-val.json").read_text())
    assert (train["num_samples"], val["num_samples"], train["num_classes"]) == (1437, 360, 10)


def test_digits_cache_is_written_once(tmp_path):
    index = digits_index("val", root=tmp_path)
    mtime = index.stat().st_mtime_ns
    assert digits_index("val", root=tmp_path) == index and index.stat().st_mtime_ns == mtime
    members = read_tar(index.parent / "digits-val-000000.tar")
    image = Image.open(io.BytesIO(next(v for k, v in members.items() if k.endswith(".png"))))
    assert image.size == (8, 8) and image.mode == "L"
    from sklearn.datasets import load_digits
    labels = [int(v) for k, v in members.items() if k.endswith(".cls")]
    assert len(labels) == 360  # a stratified 20% of 1797: every class within one image of its share
    assert np.all(np.abs(np.bincount(labels) - np.bincount(load_digits().target) * 0.2) <= 1)


# -------------------------------------------------------------------------------------------
# resolving shard specs


def test_patterns_that_match_nothing_point_to_make_shards(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train='.*nothing-\{000..009\}.tar' matches no files.*make_shards.py"):
        resolve(str(tmp_path / "nothing-{000..009}.tar"))
    (tmp_path / "a-000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="1 of 2 shards do not exist"):
        resolve(str(tmp_path / "a-{000..001}.tar"))
    with pytest.raises(ConfigError, match="no such index"):
        resolve(str(tmp_path / "missing.json"))
    pipe = resolve("pipe:cat /remote/x-{0..2}.tar")
    assert pipe.urls == [f"pipe:cat /remote/x-{i}.tar" for i in range(3)] and pipe.num_samples is None


def _toy_shards(tmp_path, counts=(9, 3, 6, 2), size=12):
    """Deliberately uneven shards of small PNGs; labels = global sample number."""
    from ssl_vit.data.writer import Item, write_shards
    items, n = [], 0
    rng = np.random.default_rng(1)
    for _ in range(sum(counts)):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(png, "PNG")
        items.append(Item(png.getvalue(), n, f"s{n}"))
        n += 1
    # one shard per requested count, in order
    urls, start = [], 0
    for i, c in enumerate(counts):
        write_shards(items[start:start + c], [str(k) for k in range(n)], tmp_path / f"part{i}", max_count=1000,
                     shuffle=False, progress=False)
        (tmp_path / f"part{i}-000000.tar").rename(tmp_path / f"toy-{i:03d}.tar")
        (tmp_path / f"part{i}.json").unlink()
        urls.append(str(tmp_path / f"toy-{i:03d}.tar"))
        start += c
    return urls, list(counts)


def test_a_sibling_index_gives_the_counts(tmp_path):
    images = make_image_folder(tmp_path / "images")
    assert make_shards(images, tmp_path / "toy", "--max-count", 4).returncode == 0
    source = resolve(str(tmp_path / "toy-{000000..000003}.tar"))
    assert source.counts == [4, 4, 4, 3] and source.num_samples == 15
    assert resolve([str(tmp_path / "toy-000000.tar"), str(tmp_path / "toy-000003.tar")]).num_samples == 7


# -------------------------------------------------------------------------------------------
# streaming


def _identity_transform(data):
    return decode_uint8(data)


def _epoch_keys(urls, counts, *, rank, world, workers, batches, epoch=0, skip=0, batch_size=2, seed=0):
    stream = ShardStream(urls, _identity_transform, batch_size=batch_size, training=True, seed=seed, rank=rank,
                         world_size=world, shuffle_buffer=4, batches_per_epoch=batches, counts=counts)
    stream.epoch, stream.skip_batches = epoch, skip
    return [b for b in make_loader(stream, workers)]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches_and_no_sample_twice(tmp_path, workers):
    urls, counts = _toy_shards(tmp_path)  # 20 samples in shards of 9, 3, 6, 2
    batches = 4  # per rank: 2 ranks x 4 batches x 2 = 16 of the 20 samples per epoch
    seen = []
    for rank in range(2):
        out = _epoch_keys(urls, counts, rank=rank, world=2, workers=workers, batches=batches)
        assert len(out) == batches and all(len(b["labels"]) == 2 for b in out)
        seen += [k for b in out for k in b["keys"]]
    assert len(seen) == len(set(seen)) == 16
    # the next epoch visits the data in another order
    next_epoch = _epoch_keys(urls, counts, rank=0, world=2, workers=workers, batches=batches, epoch=1)
    assert [k for b in next_epoch for k in b["keys"]] != [k for k in seen[:8]]


def test_resuming_inside_an_epoch_gives_the_same_batches(tmp_path):
    urls, counts = _toy_shards(tmp_path, counts=(8, 8, 8, 8))
    full = _epoch_keys(urls, counts, rank=1, world=2, workers=2, batches=6)
    resumed = _epoch_keys(urls, counts, rank=1, world=2, workers=2, batches=6, skip=3)
    assert len(resumed) == 3
    for a, b in zip(full[3:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])


def test_more_batches_than_data_wraps_around_without_hanging(tmp_path):
    urls, counts = _toy_shards(tmp_path, counts=(3, 2))
    out = _epoch_keys(urls, counts, rank=0, world=1, workers=2, batches=7)
    assert len(out) == 7


def test_evaluation_reads_every_sample_exactly_once_over_ranks(tmp_path):
    urls, counts = _toy_shards(tmp_path)
    for world, workers in ((1, 0), (2, 2), (3, 1), (8, 2)):  # fewer shards than slots too
        seen = []
        for rank in range(world):
            stream = ShardStream(urls, _identity_transform, batch_size=3, training=False, rank=rank,
                                 world_size=world, counts=counts)
            seen += [int(label) for b in make_loader(stream, workers) for label in b["labels"]]
        assert sorted(seen) == list(range(20)), (world, workers)


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(tmp_path, capfd):
    urls, counts = _toy_shards(tmp_path, counts=(6, 6))
    # a corrupt image inside the first shard
    members = read_tar(urls[0])
    first_png = sorted(k for k in members if k.endswith(".png"))[0]
    members[first_png] = b"garbage"
    with tarfile.open(urls[0], "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # the second shard cut in the middle of a member
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2 + 100])
    stream = ShardStream(urls, _identity_transform, batch_size=1, training=False, counts=counts)
    labels = [int(b["labels"][0]) for b in make_loader(stream, 0)]
    assert 0 not in labels and set(labels) <= set(range(12)) and len(labels) >= 6
    assert "skipped a broken sample or shard" in capfd.readouterr().err
    # training keeps going, pass after pass
    train = ShardStream(urls, _identity_transform, batch_size=2, training=True, batches_per_epoch=12, counts=counts)
    assert len(list(make_loader(train, 0))) == 12


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_with_no_readable_sample_stops_with_an_error(tmp_path, workers):
    from ssl_vit.config import ConfigError
    from ssl_vit.data.loaders import checked

    bad = tmp_path / "bad-000.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    stream = ShardStream([str(bad)], _identity_transform, batch_size=2, training=True, batches_per_epoch=2)
    with pytest.raises(ConfigError, match=r"no readable samples in 1 shard\(s\), e.g. .*bad-000.tar"):
        list(checked(make_loader(stream, workers)))  # from a worker too: one line, not its traceback


# -------------------------------------------------------------------------------------------
# transforms and the recipe-level builders


def _cfg(*overrides):
    return recipes.load(["recipe=mae_tiny_digits", *overrides])


def test_worker_transforms_return_uint8_at_the_recipe_size():
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(png, "PNG")
    cfg = _cfg("model.img_size=[24,32]", "data.train_transform=randaug", "data.auto_augment=rand-m9-mstd0.5-inc1")
    for transform in (build_transform(_cfg("model.img_size=[24,32]").data, [24, 32], training=True),
                      build_transform(cfg.data, [24, 32], training=True),
                      build_transform(cfg.data, [24, 32], training=False)):
        out = transform(png.getvalue())
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 32)


def test_device_normalisation_equals_torchvision_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    reference = torch.stack([T.Normalize(mean, std)(img.float() / 255) for img in images])
    normalize = DeviceNormalize(mean, std)
    assert torch.allclose(normalize(images), reference, atol=1e-5)
    assert torch.allclose(normalize.denormalize(normalize(images)), images.float() / 255, atol=1e-5)
    erasing = DeviceNormalize(mean, std, random_erasing=1.0)
    torch.manual_seed(0)
    assert not torch.allclose(erasing(images, training=True), reference, atol=1e-3)
    assert torch.allclose(erasing(images, training=False), reference, atol=1e-5)


def test_recipe_loaders_on_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path))
    cfg = _cfg("data.num_workers=0", "data.batch_size=100")
    assert shard_source(cfg, "train").num_samples == 1437
    train = build_train_loader(cfg, batches_per_epoch=3)
    batches = list(train.epoch(0))
    assert len(batches) == 3 and batches[0]["images"].shape == (100, 3, 32, 32)
    val_labels = torch.cat([b["labels"] for b in build_eval_loader(cfg)])
    assert len(val_labels) == 360 and set(val_labels.tolist()) == set(range(10))


def test_recipe_without_data_is_explained():
    cfg = recipes.load(["recipe=mae_base"])
    with pytest.raises(ConfigError, match="data.train is required"):
        shard_source(cfg, "train")


def test_two_processes_split_the_data_exactly(tmp_path):
    """A real 2-process run (torchrun): uneven shards, equal training batches, exact evaluation."""
    urls, counts = _toy_shards(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(main_script(f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from ssl_vit.data.stream import ShardStream, make_loader
from ssl_vit.data.transforms import decode_uint8
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
urls, counts = {urls!r}, {counts!r}
train = ShardStream(urls, decode_uint8, batch_size=2, training=True, rank=rank, world_size=world,
                    batches_per_epoch=4, counts=counts, shuffle_buffer=3)
val = ShardStream(urls, decode_uint8, batch_size=3, training=False, rank=rank, world_size=world, counts=counts)
out = dict(train=[k for b in make_loader(train, 2) for k in b["keys"]],
           val=[int(x) for b in make_loader(val, 2) for x in b["labels"]])
json.dump(out, open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
"""))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", free_port(), str(script)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["train"]) for r in ranks] == [8, 8]
    assert len(set(ranks[0]["train"]) | set(ranks[1]["train"])) == 16
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(20))


LOADER_STARTS = """
import sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from ssl_vit.data.stream import ShardStream, make_loader
from ssl_vit.data.transforms import decode_uint8
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
stream = ShardStream({urls!r}, decode_uint8, batch_size=3, training=False, rank=rank, world_size=world,
                     counts={counts!r})
for start in range({starts}):
    features = torch.randn(20000)
    gathered = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(gathered, features)  # the process group's threads are still at work when the workers start
    assert sum(len(batch["labels"]) for batch in make_loader(stream, 2)) > 0
    if rank == 0 and start % 50 == 0:
        print("loader starts:", start, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow  # about 30 s
def test_loader_workers_start_safely_beside_a_process_group(tmp_path):
    """Each rank starts a fresh loader's 2 workers right after a collective, 200 times. Forked from the
    rank (which has the process group's threads), a worker could hang for ever inside fork(): 6 of 10
    such runs hung. From the fork server that multi-process runs use (data/worker_start.py), none of 6."""
    urls, counts = _toy_shards(tmp_path)
    script = tmp_path / "starts.py"
    script.write_text(main_script(LOADER_STARTS.format(root=str(ROOT), urls=urls, counts=counts, starts=200)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               str(script)]
    launched = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = launched.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        launched.terminate()  # torchrun then ends its ranks (each in a session of its own), hung or not
        out, err = launched.communicate(timeout=120)
        pytest.fail(f"a rank hung while starting its loader workers (after 240 s): {out[-300:]}")
    assert launched.returncode == 0, err[-2000:]


def test_crop_decoded_at_reduced_scale_matches_the_full_decode():
    """The DCT-scaled decode (JPEG crops at least twice the output) gives nearly the same pixels."""
    from ssl_vit.data.transforms import RandomResizedCropFlip
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((800, 600), Image.BICUBIC)
    jpeg, png = io.BytesIO(), io.BytesIO()
    big.save(jpeg, "JPEG", quality=95), big.save(png, "PNG")
    crop = RandomResizedCropFlip([64, 64], scale=(0.9, 1.0), hflip=0.0)
    torch.manual_seed(3)
    fast = crop(jpeg.getvalue())   # crop >= 4x the output: decoded at 1/4 scale
    torch.manual_seed(3)
    full = crop(png.getvalue())    # same crop parameters, full-resolution PNG
    assert fast.shape == full.shape == (3, 64, 64)
    assert (fast.float() - full.float()).abs().mean() < 4.0


def test_benchmark_data_prints_a_table_and_a_json_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "data", "--num-images", "24",
                             "--batch", "4", "--batches", "6", "--repeats", "1", "--workers", "1", "--img-size", "64",
                             "--keep", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| ratio |" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["shards_img_s"] > 0 and figures["imagefolder_img_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["shards_img_s"] / figures["imagefolder_img_s"], rel=1e-3)
    assert figures["decode_pil_ms"] > 0


# -------------------------------------------------------------------------------------------
# repeated augmentation (DeiT)


class _RandomCrop(Transform):
    """A random transform (the loaders' protocol: data/transforms.py Transform) that counts how often it decodes."""
    decoded = 0

    @classmethod
    def decode(cls, data):
        cls.decoded += 1
        return decode_uint8(data)

    def augment(self, image):
        top = int(torch.randint(0, 4, ()).item())
        return image[:, top:top + 8, :8].clone()


def test_repeated_augmentation_spreads_the_views_of_each_sample(tmp_path):
    urls, counts = _toy_shards(tmp_path, counts=(8, 8, 8, 8))

    def epoch(rank, skip=0, batches=6):
        _RandomCrop.decoded = 0
        stream = ShardStream(urls, _RandomCrop(), batch_size=4, training=True, rank=rank, world_size=2,
                             shuffle_buffer=4, batches_per_epoch=batches, counts=counts, repeated_aug=3)
        stream.skip_batches = skip
        return list(stream)  # in-process: the decode counter is visible

    out = epoch(rank=0)
    assert len(out) == 6 and _RandomCrop.decoded == 8  # 2 groups of 4 samples, each decoded once, 3 views
    for group in (out[0:3], out[3:6]):
        assert group[0]["keys"] == group[1]["keys"] == group[2]["keys"]  # view j of every sample in batch j
        assert len(set(group[0]["keys"])) == 4  # never twice in one batch
        assert not all(torch.equal(group[0]["images"], g["images"]) for g in group[1:])  # different crops
    other = epoch(rank=1)
    assert not set(out[0]["keys"]) & set(k for b in other for k in b["keys"])  # ranks stay disjoint
    # resuming inside a group gives the same views
    resumed = epoch(rank=0, skip=4)
    assert len(resumed) == 2
    for a, b in zip(out[4:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])


def test_recipe_repeated_augmentation_on_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_VIT_CACHE", str(tmp_path))
    cfg = recipes.load(["recipe=finetune_digits", "data.repeated_aug=2", "data.batch_size=16", "data.num_workers=0",
         "data.train_transform=randaug", "data.auto_augment=rand-m9-mstd0.5-inc1"])
    data = build_train_loader(cfg, batches_per_epoch=4)
    batches = list(data.epoch(0))
    assert len(batches) == 4 and batches[0]["keys"] == batches[1]["keys"] != batches[2]["keys"]
    assert not torch.equal(batches[0]["images"], batches[1]["images"])


def test_a_transform_of_several_views_fills_several_batch_keys(tmp_path):
    """A task's own transform (BEiT: a model view and a tokenizer view of one crop) returns a dict;
    each key becomes a stacked batch entry."""
    from ssl_vit.data.writer import Item, write_shards

    items = []
    for i in range(6):
        png = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (40 * i,) * 3).save(png)
        items.append(Item(str(png), i % 2, f"s{i}"))
    index = write_shards(items, ["a", "b"], tmp_path / "views", shuffle=False, progress=False)

    def two_views(data):
        image = decode_uint8(data)
        return {"images": image, "small": image[:, ::2, ::2]}

    urls = [str(tmp_path / name) for name in index["shards"]]
    stream = ShardStream(urls, two_views, batch_size=3, training=False, counts=index["counts"])
    batches = list(make_loader(stream, 0))
    assert [b["images"].shape for b in batches] == [(3, 3, 8, 8)] * 2
    assert [b["small"].shape for b in batches] == [(3, 3, 4, 4)] * 2
    assert torch.equal(batches[0]["small"], batches[0]["images"][:, :, ::2, ::2])
