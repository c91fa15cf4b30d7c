"""Visual tokenizers: DALL-E's encoder converted from a pickle without running it (and pickles that try to
run something refused), tokenizer files, the vector-quantised dVAE's tokens, losses and codebook use."""
import io
import json
import math
import os
import pickle
import subprocess
import sys
import types
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT
from ssl_vit.weights import CheckpointError, read_checkpoint
from ssl_vit.config import ConfigError
from ssl_vit.tasks import DVAE
from ssl_vit.tasks.dvae import codebook_usage
from ssl_vit.tokenizers import load_tokenizer, random_tokenizer, read_description, save_tokenizer
from ssl_vit.tokenizers.dall_e import LOGIT_LAPLACE_EPS, convert_dall_e
from ssl_vit.tokenizers.dall_e_pickle import RefusedPickle
from ssl_vit.models.dvae import DVAEEncoder
from ssl_vit.tokenizers.vq import VQTokenizer

N_HID, VOCAB = 16, 64  # the package's validators ask for n_hid >= 64 and vocab >= 512; the layout is the same


# -------------------------------------------------------------------------------------------
# the `dall-e` package's classes, written out in the test under its module names (the package itself
# installs but does not import here: it needs `attrs`, which it does not declare). Same attributes,
# parameter names and module tree as dall_e/encoder.py and dall_e/utils.py, so torch.save pickles them
# exactly as it pickles the package's Encoder (the same GLOBALs: dall_e.encoder.Encoder, ...).


def dall_e_modules():
    package, encoder_module, utils_module = (types.ModuleType(name) for name in
                                             ("dall_e", "dall_e.encoder", "dall_e.utils"))

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
            self.device, self.requires_grad = device, requires_grad
            self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw ** 2)))
            self.b = nn.Parameter(torch.randn(n_out) * 0.1)  # the package starts at 0; non-zero tests more

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.n_layers, self.device, self.requires_grad = n_in, n_out, n_layers, device, requires_grad
            self.n_hid = n_out // 4
            self.post_gain = 1 / n_layers ** 2
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
                ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        group_count = 4

        def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
            super().__init__()
            self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = (n_hid, n_blk_per_group,
                                                                                      input_channels, vocab_size)
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers = self.group_count * n_blk_per_group

            def group(n_in, n_out, pool):
                blocks = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                          for i in range(n_blk_per_group)]
                return nn.Sequential(OrderedDict(blocks + ([("pool", nn.MaxPool2d(kernel_size=2))] if pool else [])))

            self.blocks = nn.Sequential(OrderedDict([
                ("input", Conv2d(input_channels, n_hid, 7)),
                ("group_1", group(n_hid, n_hid, True)), ("group_2", group(n_hid, 2 * n_hid, True)),
                ("group_3", group(2 * n_hid, 4 * n_hid, True)), ("group_4", group(4 * n_hid, 8 * n_hid, False)),
                ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                      ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))])))]))

        def forward(self, x):
            return self.blocks(x)

    for cls, module in ((Conv2d, utils_module), (EncoderBlock, encoder_module), (Encoder, encoder_module)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    package.encoder, package.utils = encoder_module, utils_module
    return {"dall_e": package, "dall_e.encoder": encoder_module, "dall_e.utils": utils_module}


@pytest.fixture
def dall_e_pickles(tmp_path, monkeypatch):
    """encoder.pkl as the package's torch.save writes it, in the zip format and the legacy one; the
    reference module (to compare with) and the `dall_e` modules are gone from sys.modules afterwards."""
    modules = dall_e_modules()
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        torch.manual_seed(0)
        encoder = modules["dall_e.encoder"].Encoder(n_hid=N_HID, n_blk_per_group=1, vocab_size=VOCAB)
        torch.save(encoder, tmp_path / "encoder.pkl")
        with warnings.catch_warnings():  # (torch cannot find the source of classes defined in a function)
            warnings.simplefilter("ignore")
            torch.save(encoder, tmp_path / "encoder_legacy.pkl", _use_new_zipfile_serialization=False)
    assert "dall_e" not in sys.modules  # the converter can never have imported it
    return encoder.eval(), tmp_path


@pytest.mark.parametrize("name", ["encoder.pkl", "encoder_legacy.pkl"])
def test_dall_e_encoder_converts_without_running_the_pickle_and_gives_its_codes(dall_e_pickles, name):
    reference, folder = dall_e_pickles
    tokenizer = convert_dall_e(folder / name, folder / "dall_e.safetensors")
    assert "dall_e" not in sys.modules
    loaded = load_tokenizer(folder / "dall_e.safetensors")
    assert (loaded.vocab_size, loaded.stride, loaded.in_chans) == (VOCAB, 8, 3)
    described = json.loads((folder / "dall_e.json").read_text())["tokenizer"]
    assert described["encoder"] == dict(n_hid=N_HID, n_blk_per_group=1, input_channels=3, vocab_size=VOCAB)
    # the same weights under the package's names
    assert set(loaded.encoder.state_dict()) == set(reference.state_dict())
    assert all(torch.equal(loaded.encoder.state_dict()[k], v) for k, v in reference.state_dict().items())
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits = reference((1 - 2 * LOGIT_LAPLACE_EPS) * pixels + LOGIT_LAPLACE_EPS)   # map_pixels by hand
    assert logits.shape == (3, VOCAB, 4, 4)
    assert torch.allclose(loaded.encoder((1 - 2 * LOGIT_LAPLACE_EPS) * pixels + LOGIT_LAPLACE_EPS), logits, atol=1e-6)
    assert torch.equal(loaded(pixels), logits.argmax(dim=1)) and torch.equal(tokenizer(pixels), loaded(pixels))



PACKAGE_ENCODER = """
import sys, torch
from dall_e.encoder import Encoder                     # the dall-e package itself (pip install dall-e attrs)
torch.manual_seed(0)
encoder = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, device=torch.device("cpu"), requires_grad=False)
with torch.no_grad():
    for name, p in encoder.named_parameters():
        if name.endswith(".b"):
            p.normal_(std=0.1)                         # the package starts biases at 0; non-zero tests more
folder = sys.argv[1]
torch.save(encoder, folder + "/encoder.pkl")           # as OpenAI's published encoder.pkl was written
pixels = torch.rand(2, 3, 32, 32)
with torch.no_grad():
    codes = encoder(0.8 * pixels + 0.1).argmax(dim=1)  # map_pixels (eps 0.1), the package's forward
torch.save({"pixels": pixels, "codes": codes}, folder + "/reference.pt")
"""


def test_the_dall_e_packages_own_pickled_encoder_converts_to_its_codes(tmp_path, env):
    """The real package's Encoder (random weights), pickled in a subprocess: converted here without the
    package ever being imported in this process, it gives the package's own codes."""
    import importlib.util

    if importlib.util.find_spec("dall_e") is None or importlib.util.find_spec("attr") is None:
        pytest.skip("the dall-e package (and attrs, which it imports) are not installed: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-c", PACKAGE_ENCODER, str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    tokenizer = convert_dall_e(tmp_path / "encoder.pkl", tmp_path / "dall_e.safetensors")
    assert "dall_e" not in sys.modules
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    loaded = load_tokenizer(tmp_path / "dall_e.safetensors")
    # input conv, 4 blocks of 4 convs, an id_path conv where the width changes (groups 2-4), output conv
    assert (loaded.vocab_size, loaded.stride, len(loaded.encoder.state_dict())) == (512, 8, 2 + 4 * 8 + 3 * 2 + 2)
    assert torch.equal(loaded(reference["pixels"]), reference["codes"]) and torch.equal(tokenizer(reference["pixels"]),
                                                                                        reference["codes"])

def test_the_usual_loader_refuses_the_same_pickle(dall_e_pickles):
    _, folder = dall_e_pickles
    with pytest.raises(CheckpointError, match=r"refused to load .*dall_e.encoder.Encoder"):
        read_checkpoint(folder / "encoder.pkl")


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_a_command_is_refused_and_nothing_runs(tmp_path, env):
    marker = tmp_path / "ran"
    with (tmp_path / "evil.pkl").open("wb") as f:
        pickle.dump(RunsACommand(marker), f, protocol=2)
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_tokenizer.py"), str(tmp_path / "evil.pkl"),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2 and "refused to load posix.system" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_a_module_pickle_carrying_something_else_is_refused(dall_e_pickles, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    modules = dall_e_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    encoder = modules["dall_e.encoder"].Encoder(n_hid=N_HID, n_blk_per_group=1, vocab_size=VOCAB)
    encoder.payload = RunsACommand(marker)          # hidden in the module's attributes
    torch.save(encoder, tmp_path / "trojan.pkl")
    encoder.payload = eval                          # a callable to be reduced by name
    torch.save(encoder, tmp_path / "eval.pkl")
    for name, message in (("trojan.pkl", "posix.system"), ("eval.pkl", "__builtin__.eval")):
        with pytest.raises(RefusedPickle, match=f"refused to load {message}"):
            convert_dall_e(tmp_path / name, tmp_path / "out.safetensors")
    assert not marker.exists()
    # a module that is not DALL-E's encoder, and a file of plain tensors
    torch.save(modules["dall_e.utils"].Conv2d(3, 4, 1), tmp_path / "conv.pkl")
    with pytest.raises(ValueError, match="holds a dall_e.utils.Conv2d, not DALL-E's encoder"):
        convert_dall_e(tmp_path / "conv.pkl", tmp_path / "out.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "dict.pkl")
    with pytest.raises(RefusedPickle, match="holds a dict, not a pickled module"):
        convert_dall_e(tmp_path / "dict.pkl", tmp_path / "out.safetensors")


def test_tokenizer_files_say_what_they_are_and_how_to_get_one(tmp_path, dall_e_pickles):
    _, folder = dall_e_pickles
    with pytest.raises(ConfigError, match=r"not a safetensors tokenizer file .*tools/convert_tokenizer.py"):
        read_description(folder / "encoder.pkl")
    with pytest.raises(ConfigError, match="no such file"):
        read_description(tmp_path / "missing.safetensors")
    from ssl_vit import create_encoder, export_backbone

    export_backbone(create_encoder("dvae", img_size=16, hidden_dim=8, num_downsamples=1, code_dim=4, vocab_size=8),
                    tmp_path / "backbone.safetensors")
    with pytest.raises(ConfigError, match=r"is an ssl_vit backbone export, not a tokenizer; .*recipe=dvae_digits"):
        read_description(tmp_path / "backbone.safetensors")


# -------------------------------------------------------------------------------------------
# the vector-quantised dVAE


def tiny_dvae(**kwargs):
    torch.manual_seed(0)
    encoder = DVAEEncoder(img_size=16, hidden_dim=16, num_downsamples=1, num_res_blocks=1, code_dim=4, vocab_size=32)
    return DVAE(encoder, **kwargs)


def test_tokens_are_the_nearest_normalised_code_and_files_round_trip(tmp_path):
    model = tiny_dvae(mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4])
    tokenizer = model.tokenizer()
    pixels = torch.rand(2, 3, 16, 16)
    normalised = (pixels - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    z = model.encoder.forward_features(normalised).permute(0, 2, 3, 1)                      # [2, 8, 8, 4]
    codebook = model.encoder.codebook / model.encoder.codebook.norm(dim=1, keepdim=True)
    distances = ((z.unsqueeze(-2) - codebook) ** 2).sum(-1)                                 # [2, 8, 8, 32]
    assert torch.equal(tokenizer(pixels), distances.argmin(dim=-1))
    save_tokenizer(tokenizer, tmp_path / "tokenizer.safetensors")
    again = load_tokenizer(tmp_path / "tokenizer.safetensors")
    assert isinstance(again, VQTokenizer) and torch.equal(again(pixels), tokenizer(pixels))
    assert not any(p.requires_grad for p in again.parameters()) and not again.train().training


def test_the_loss_is_vq_vaes_with_the_entropy_penalty():
    model = tiny_dvae(commitment_cost=0.25, entropy_weight=0.1, entropy_temperature=0.05)
    images = torch.randn(2, 3, 16, 16)
    out = model(images)
    # by hand, from the same encoder and decoder
    z = model.encoder.forward_features(images).permute(0, 2, 3, 1)                           # [2, 8, 8, 4]
    codebook = F.normalize(model.encoder.codebook, dim=1)
    similarity = z @ codebook.T
    chosen = codebook[similarity.argmax(-1)]
    reconstruction = model.decoder(chosen.permute(0, 3, 1, 2))
    soft = (similarity / 0.05).softmax(-1).reshape(-1, 32)
    mean = soft.mean(0)
    penalty = -(soft * soft.log()).sum(-1).mean() + (mean * mean.log()).sum()
    expected = ((reconstruction - images) ** 2).mean() + 1.25 * ((chosen - z) ** 2).mean() + 0.1 * penalty
    assert torch.allclose(out.loss, expected, atol=1e-5) and torch.allclose(out.reconstruction, reconstruction, atol=1e-6)
    assert torch.equal(out.codes, similarity.argmax(-1))
    # straight-through: the reconstruction's gradient reaches the encoder; the codebook learns from its own term
    out.loss.backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0 and model.encoder.codebook.grad.abs().sum() > 0


def test_codebook_usage_is_the_perplexity_of_the_code_histogram():
    uniform = codebook_usage(torch.arange(64).view(1, 8, 8), 64)
    assert math.isclose(float(uniform["perplexity"]), 64, rel_tol=1e-5) and float(uniform["codes_used"]) == 64
    collapsed = codebook_usage(torch.full((2, 8, 8), 3), 64)
    assert math.isclose(float(collapsed["perplexity"]), 1.0) and float(collapsed["codes_used"]) == 1
    half = codebook_usage(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 64)                    # 4 codes, evenly
    assert math.isclose(float(half["perplexity"]), 4.0, rel_tol=1e-5)


def test_the_random_tokenizer_comes_from_its_seed_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second, other = random_tokenizer(0), random_tokenizer(0), random_tokenizer(1)
    assert torch.equal(torch.get_rng_state(), before)                    # the run's RNG is untouched
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.encoder.codebook, other.encoder.codebook)
    assert (first.vocab_size, first.stride) == (8192, 4)


# -------------------------------------------------------------------------------------------
# hostile pickles: tensors laid out to ask for more memory than the file holds (issue 20)


class CraftedStorage:
    """A storage as a pickle names it: its key, the number of elements it declares, the bytes written."""

    def __init__(self, key, numel, data):
        self.key, self.numel, self.data = key, numel, data


class CraftedTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class CraftingPickler(pickle.Pickler):
    """Pickles a module as torch.save does (the same GLOBALs and persistent ids), every tensor in a
    storage of its own, except those `layouts` (name -> (offset, size, stride, declared numel, values))
    lays out by hand: what a hostile file can hold and torch would never write. With `share_one_storage`,
    every other tensor is the whole of one storage."""

    def __init__(self, file, module, layouts, share_one_storage=False):
        super().__init__(file, protocol=2)
        tensors = module.state_dict(keep_vars=True)
        self.layouts = {id(tensors[name]): layout for name, layout in layouts.items()}
        self.storages = {}
        self.shared = self.storage(2048, torch.zeros(2048)) if share_one_storage else None

    def storage(self, numel, values):
        key = str(len(self.storages))
        self.storages[key] = CraftedStorage(key, numel, values.float().contiguous().numpy().tobytes())
        return self.storages[key]

    def persistent_id(self, obj):
        if isinstance(obj, CraftedStorage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, CraftedTensor):
            return torch._utils._rebuild_tensor_v2, (obj.storage, obj.offset, obj.size, obj.stride, False,
                                                     OrderedDict())
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        if id(obj) in self.layouts:
            offset, size, stride, numel, values = self.layouts[id(obj)]
            tensor = CraftedTensor(self.storage(numel, values), offset, size, stride)
        elif self.shared is not None:   # the same numbers read again and again
            tensor = CraftedTensor(self.shared, 0, (self.shared.numel,), (1,))
        else:
            tensor = CraftedTensor(self.storage(obj.numel(), obj.detach().flatten()), 0, tuple(obj.shape),
                                   tuple(torch.empty(obj.shape).stride()))
        return torch._utils._rebuild_parameter, (tensor, False, OrderedDict())


def write_crafted_pickle(path, layouts=(), *, legacy=False, share_one_storage=False):
    """A tiny DALL-E encoder pickled as torch.save writes it (zip or legacy format), with the tensors
    named in `layouts` laid out as given (or every tensor a view of one storage)."""
    modules = dall_e_modules()
    sys.modules.update(modules)     # (pickle finds a class by its module's name)
    try:
        encoder = modules["dall_e.encoder"].Encoder(n_hid=N_HID, n_blk_per_group=1, vocab_size=VOCAB)
        buffer = io.BytesIO()
        pickler = CraftingPickler(buffer, encoder, dict(layouts), share_one_storage)
        pickler.dump(encoder)
    finally:
        for name in modules:
            del sys.modules[name]
    if not legacy:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", buffer.getvalue())
            archive.writestr("archive/byteorder", "little")
            for key, storage in pickler.storages.items():
                archive.writestr(f"archive/data/{key}", storage.data)
        return path
    with open(path, "wb") as f:  # torch/serialization.py's _legacy_save: magic, version, info, object, keys, data
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(buffer.getvalue())
        pickle.dump(sorted(pickler.storages), f, protocol=2)
        for key in sorted(pickler.storages):
            storage = pickler.storages[key]
            f.write(storage.numel.to_bytes(8, "little") + storage.data)
    return path


TERA = 2 ** 40  # elements: 4 TB of float32
HOSTILE_LAYOUTS = {   # blocks.input.b (16 numbers) laid out to ask for what the file does not hold
    "zero stride": ({"blocks.input.b": (0, (TERA,), (0,), 1, torch.zeros(1))}, r"blocks.input.b: .*stride 0 repeats"),
    "overlapping": ({"blocks.input.b": (0, (4, 4), (1, 1), 16, torch.zeros(16))}, r"overlap"),
    "beyond its storage": ({"blocks.input.b": (10, (16,), (1,), 16, torch.zeros(16))}, r"beyond its storage"),
    "a storage larger than the file": ({"blocks.input.b": (0, (16,), (1,), TERA, torch.zeros(16))},
                                       r"storage \d+ declares 1099511627776 numbers"),
    "a storage larger than its bytes": ({"blocks.input.b": (0, (16,), (1,), 32, torch.zeros(16))},
                                        r"storage \d+ (declares 32 numbers|holds \d+ numbers, the pickle says)"),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("case", list(HOSTILE_LAYOUTS))
def test_tensors_laid_out_beyond_what_the_file_holds_are_refused_before_any_copy(tmp_path, case, legacy):
    layouts, message = HOSTILE_LAYOUTS[case]
    path = write_crafted_pickle(tmp_path / "encoder.pkl", layouts, legacy=legacy)
    assert path.stat().st_size < 1_000_000     # the tiny encoder: what it asks for more is in the layout alone
    with pytest.raises(RefusedPickle, match=message):
        convert_dall_e(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_sharing_one_storage_may_not_take_more_than_the_file_holds(tmp_path, legacy):
    path = write_crafted_pickle(tmp_path / "encoder.pkl", legacy=legacy, share_one_storage=True)
    with pytest.raises(RefusedPickle, match=r"tensors would take \d+ bytes, more than the \d+ of the file"):
        convert_dall_e(path, tmp_path / "out.safetensors")


@pytest.mark.parametrize("size, stride, values, message", [
    ((4, 4), (4, 1), torch.zeros(16), r"reshaped: blocks.input.b 4x4 \(DALL-E's encoder has 16\)"),
    ((16,), (1,), torch.full((16,), float("nan")), r"non-finite weights \(NaN or inf\) in blocks.input.b"),
])
def test_a_pickled_encoder_with_other_shapes_or_non_finite_weights_is_refused(tmp_path, size, stride, values,
                                                                               message):
    """Well laid out, but not the encoder's tensors: a ValueError (one line from the tool), not a
    traceback from load_state_dict, and no tokenizer file of NaN codes."""
    path = write_crafted_pickle(tmp_path / "encoder.pkl", {"blocks.input.b": (0, size, stride, 16, values)})
    with pytest.raises(ValueError, match=message):
        convert_dall_e(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_pickle_is_refused_in_one_line(tmp_path, legacy):
    path = write_crafted_pickle(tmp_path / "encoder.pkl", legacy=legacy)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(RefusedPickle, match="encoder.pkl"):
        convert_dall_e(path, tmp_path / "out.safetensors")


def test_the_tool_refuses_a_pickle_asking_for_terabytes_in_one_line(tmp_path, env):
    """The file of the hostile-input walk: a parameter of 2^40 elements with stride 0 over one number
    (both formats go through the same check, above). Refused from the numbers alone, before torch is
    asked for any memory: the 4 TB copy used to end in a traceback from the allocator."""
    path = write_crafted_pickle(tmp_path / "encoder.pkl", HOSTILE_LAYOUTS["zero stride"][0])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_tokenizer.py"), str(path),
                             str(tmp_path / "out.safetensors")], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: refused {path}: "), result.stderr
    assert "blocks.input.b" in result.stderr and "stride 0" in result.stderr


# -------------------------------------------------------------------------------------------
# tokenizer files that are not what they say (issue 20)


def tiny_vq_tokenizer():
    torch.manual_seed(0)
    encoder = DVAEEncoder(img_size=8, hidden_dim=8, num_downsamples=1, num_res_blocks=1, code_dim=4, vocab_size=16)
    return VQTokenizer(encoder, [0.5] * 3, [0.5] * 3)


def write_tokenizer(path, edit_tensors=None, edit_description=None, metadata=None):
    """A tiny vq tokenizer file, its tensors and description edited as given."""
    from safetensors.torch import save_file

    tokenizer = tiny_vq_tokenizer()
    tensors = {k: v.contiguous() for k, v in tokenizer.encoder.state_dict().items()}
    description = tokenizer.description()
    (edit_tensors or (lambda t: None))(tensors)
    (edit_description or (lambda d: None))(description)
    save_file(tensors, str(path), metadata={"format": "ssl_vit", "kind": "tokenizer",
                                            "tokenizer": json.dumps(description), **(metadata or {})})
    return path


def test_a_tokenizer_file_with_other_tensors_says_which_in_one_line(tmp_path):
    def edit(tensors):
        del tensors["proj.bias"]
        tensors["codebook"] = torch.randn(32, 4)     # another vocabulary than the description's 16 codes
        tensors["extra.weight"] = torch.zeros(2)

    path = write_tokenizer(tmp_path / "tokenizer.safetensors", edit)
    with pytest.raises(CheckpointError) as error:
        load_tokenizer(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "missing: proj.bias" in message and "unexpected: extra.weight" in message
    assert "reshaped: codebook 32x4 (the description's vq tokenizer has 16x4)" in message


def test_tokenizer_metadata_that_is_not_json_is_a_config_error(tmp_path):
    path = write_tokenizer(tmp_path / "tokenizer.safetensors", metadata={"tokenizer": "{'type': 'vq'"})
    for read in (read_description, load_tokenizer):
        with pytest.raises(ConfigError, match=rf"{path}: its 'tokenizer' metadata is not JSON .*line 1"):
            read(path)
    path = write_tokenizer(tmp_path / "tokenizer.safetensors", edit_description=lambda d: d.pop("stride"))
    with pytest.raises(ConfigError, match=rf"{path}: its description has no stride"):
        read_description(path)
    path = write_tokenizer(tmp_path / "tokenizer.safetensors", edit_description=lambda d: d.pop("encoder"))
    with pytest.raises(ConfigError, match=rf"{path}: its description does not build a vq tokenizer \(KeyError"):
        load_tokenizer(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "ssl_vit"})   # ours, but of no kind
    with pytest.raises(ConfigError, match=rf"{path} is an ssl_vit unnamed export, not a tokenizer"):
        read_description(path)


def test_a_tokenizer_with_non_finite_weights_is_refused_naming_them(tmp_path):
    def edit(tensors):
        tensors["codebook"][3, 1] = float("nan")
        tensors["proj.weight"][0, 0] = float("inf")

    path = write_tokenizer(tmp_path / "tokenizer.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"{path}: non-finite weights \(NaN or inf\) in codebook, "
                                              r"proj.weight"):
        load_tokenizer(path)


def test_a_tokenizer_whose_recorded_stride_is_not_its_layers_is_refused_before_a_run_starts(tmp_path):
    """The description says a code per 4x4 pixels, the convolutions give one per 2x2: BEiT would crop
    its tokenizer view for stride 4 and fail at the first step. The run's build refuses it."""
    from ssl_vit import recipes
    from ssl_vit.tasks import build

    path = write_tokenizer(tmp_path / "tokenizer.safetensors", edit_description=lambda d: d.update(stride=4))
    message = rf"{path} records stride 4 .*, but its layers give stride 2: a 4x4 image gives 2x2 codes"
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(path)
    other = write_tokenizer(tmp_path / "vocab.safetensors", edit_description=lambda d: d.update(vocab_size=99))
    with pytest.raises(CheckpointError, match=rf"{other} records vocab_size 99, but its layers give 16"):
        load_tokenizer(other)
    cfg = recipes.load(["recipe=beit_digits", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                       "model.patch_size=8", "task.num_mask_patches=6", "task.min_mask_patches_per_block=2",
                       f"task.tokenizer.path={path}"])
    with pytest.raises(CheckpointError, match=message):
        build(cfg)
