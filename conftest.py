"""What the test files share: the CPU-only fixture, tiny run configurations, checkpoints and
Inception weights made here (nothing is downloaded), and small helpers."""


import dataclasses
import os
import subprocess
import sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
import evaluate as ev
from sagan import Generator, ModelConfig


HERE = os.path.dirname(os.path.abspath(__file__))


# The GPU code paths are tested where a GPU is present (`pytest -k cuda` runs just those).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def cpu_unless_cuda_is_the_parameter(request, monkeypatch):
    """Every test runs on the CPU, where runs are bit-exact, even on a machine with a GPU: "auto"
    devices resolve to the CPU here and in the scripts the tests start. Only tests whose device
    parameter is "cuda" see the GPU."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def save_odd_images(folder):
    """One image per awkward mode, each a flat colour we can check, plus a corrupt file and a
    non-image. Returns the expected RGB colour (0..255) per good file name."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 30), 77).save(folder / "gray.png")
    rgba = Image.new("RGBA", (30, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 30, 40))
    rgba.save(folder / "rgba.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "clear.png")  # composited on white
    palette = Image.new("P", (25, 25), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(np.full((24, 36), 32768, np.uint16)).save(folder / "deep.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "notes.txt").write_text("hello")
    return {"gray.png": (77, 77, 77), "rgba.png": (0, 0, 255), "clear.png": (255, 255, 255),
            "palette.png": (10, 200, 30), "cmyk.jpg": (255, 0, 0), "deep.png": (128, 128, 128)}


TINY = ["--size", "32", "--ch", "8", "--batch-size", "8", "--log-every", "5", "--sample-every", "5",
        "--ckpt-every", "100"]


def run_cli(script, *args, timeout=120):
    """Run one of the project's scripts as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=HERE)
    return p.returncode, p.stdout, p.stderr


def assert_same_state(a, b, path="ckpt"):
    """Recursively: tensors bit-identical, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


# The 3-D counterpart of TINY: 16^3 volumes, the smallest 3-D model.
TINY3D = ["--dims", "3", "--ch", "8", "--batch-size", "4", "--log-every", "2", "--sample-every", "2",
          "--ckpt-every", "100"]


def random_inception_state(seed=0):
    """Random weights in the FID Inception layout that keep activations O(1) through the net."""
    torch.manual_seed(seed)
    net = ev.FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def fid_state():
    return random_inception_state()


@pytest.fixture(scope="module")
def fid_weights(fid_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(fid_state, path)
    return str(path)


@pytest.fixture(scope="module")
def fid_net(fid_weights):
    return ev.load_inception(fid_weights)


def make_checkpoint(path, attn=(16,), n_classes=3, size=32, dims=2):
    """A checkpoint in train.py's format (train.GAN.state), with different G and G_ema weights."""
    cfg = ModelConfig(size=size, dims=dims, ch=8, z_dim=16, n_classes=n_classes, attn=attn)
    torch.manual_seed(1)
    G, G_ema = Generator(cfg), Generator(cfg)
    for layer in G_ema.attention_layers:
        layer.gamma.data.fill_(0.5)
    torch.save({"format": "sagan-checkpoint", "version": 1, "step": 7, "model": dataclasses.asdict(cfg),
                "train": {}, "G": G.state_dict(), "D": {}, "G_ema": G_ema.state_dict(), "opt_G": {},
                "opt_D": {}, "rng": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "ckpt.pt")


@pytest.fixture(scope="module")
def ckpt3d(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run3d") / "ckpt.pt", attn=(8,), size=16, dims=3)


def random_spd(d, seed, rank=None):
    g = np.random.RandomState(seed)
    a = g.randn(d, rank or d)
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def snapshot(folder):
    """Every file under folder and its bytes (links as links)."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(Path(folder).rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MB filesystem (tmpfs; mounting needs root, as CI has)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def fill(folder):
    """Fill the filesystem of folder to the last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    for chunk in (b"\0" * 65536, b"\0"):
        try:
            while os.write(fd, chunk):
                pass
        except OSError:
            pass
    os.close(fd)
