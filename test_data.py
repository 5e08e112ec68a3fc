"""Tests for data.py: the synthetic set, image decoding, skipping, errors and the prepared path."""

import json
import pickle
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, make_dataset

HERE = Path(__file__).resolve().parent


# --- synthetic ----------------------------------------------------------------------------------

def test_synthetic_items_are_deterministic_and_leave_global_rngs_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a, b = make_dataset("synthetic", None, 32), make_dataset("synthetic", None, 32)
    x, y = a[123]
    assert torch.equal(x, b[123][0]) and y == b[123][1] == 3
    assert not torch.equal(x, a[133][0])  # same class, another image
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert -1 <= x.min() < -0.5 and 0 < x.max() <= 1  # dark background, bright objects
    assert len(a) == 50_000 and a.n_classes == 10
    assert len(make_dataset("synthetic", None, 8, length=10)) == 10


@pytest.mark.parametrize("size", [1, 7, 32, 45, 100, 128])
def test_synthetic_any_size_and_exact_mirror_symmetry(size):
    d = make_dataset("synthetic", None, size)
    for i in range(40):
        x, _ = d[i]
        assert x.shape == (3, size, size)
        # The two objects are mirror images: the long-range structure attention should learn.
        assert torch.equal(x, x.flip(2))


def test_synthetic_classes_differ_in_colour_and_shape():
    d = make_dataset("synthetic", None, 16)

    def brightest(x):  # (3, S, S) -> (3,) colour of the brightest pixel: the object's colour
        flat = x.flatten(1)
        return flat[:, flat.sum(0).argmax()]

    colours = torch.stack([brightest(d[i][0]) for i in range(400)])
    labels = torch.tensor([d[i][1] for i in range(400)])
    means = torch.stack([colours[:200][labels[:200] == c].mean(0) for c in range(10)])
    predicted = torch.cdist(colours[200:], means).argmin(1)
    assert (predicted == labels[200:]).float().mean() >= 0.97

    u = np.linspace(-1.5, 1.5, 96, dtype=np.float32)
    dx, dy = np.broadcast_arrays(u[None, :], u[:, None])
    masks = [shape(np.abs(dx), np.abs(dy), dy) < 1 for shape in data.SHAPES]
    for i in range(10):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            # No two shapes overlap more than a disc and its bounding square (pi / 4 = 0.785).
            assert iou < 0.8, (i, j, iou)


# --- image files --------------------------------------------------------------------------------

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


def test_folder_decodes_every_mode_and_reports_skipped_files(tmp_path):
    expected = save_odd_images(tmp_path / "flat")
    assert Image.open(tmp_path / "flat" / "deep.png").mode == "I;16"
    d = make_dataset("folder", tmp_path / "flat", 16)
    assert d.n_classes == 0 and len(d) == 7  # the six good images and corrupt.png
    assert d.summary == "skipped 1 non-image file (notes.txt)"
    names = [Path(path).name for path in d.files]
    with pytest.warns(UserWarning, match="corrupt.png"):
        items = dict(zip(names, (d[i] for i in range(len(d)))))
    # A bad file gives the next readable one in sorted order instead: corrupt.png -> deep.png.
    assert torch.equal(items.pop("corrupt.png")[0], items["deep.png"][0])
    for name, (x, y) in items.items():
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
        want = torch.tensor(expected[name], dtype=torch.float32) / 127.5 - 1
        # JPEG colour conversion is a few levels off; everything else is exact up to rounding.
        tol = 0.06 if name.endswith(".jpg") else 1 / 127.5
        assert (x - want[:, None, None]).abs().max() <= tol, name
    assert [(Path(p).name, reason) for p, reason in d.skipped] == [
        ("notes.txt", "non-image file"), ("corrupt.png", "unreadable image")]
    assert d.summary == "skipped 1 non-image file (notes.txt), 1 unreadable image (corrupt.png)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not warned about again
        d[names.index("corrupt.png")]


def test_centre_crop_and_flip(tmp_path):
    # 60x40: a red and a blue band of 10 columns outside the central 40x40 green square.
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10, 0], a[:, 10:50, 1], a[:, 50:, 2] = 255, 255, 255
    a[:, 10:30, 2] = 255  # left half of the square cyan, so a flip is visible
    Image.fromarray(a).save(tmp_path / "wide.png")
    x, _ = make_dataset("folder", tmp_path, 8)[0]
    assert x[0].max() == -1  # no red from outside the crop, not even at the edges
    assert torch.all(x[1] == 1)
    assert torch.all(x[2, :, 0] == 1) and torch.all(x[2, :, -1] == -1)
    flipping = make_dataset("folder", tmp_path, 8, flip=True)
    torch.manual_seed(0)
    seen = {bool(torch.equal(flipping[0][0], x.flip(2))) for _ in range(20)}
    assert seen == {True, False}


def test_class_tree_gives_labels_and_imagenet_needs_one(tmp_path):
    for rel in ["cat/a.png", "dog/b.png", "dog/sub/c.png", ".hidden/d.png", "loose.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / rel)
    for source in ("folder", "imagenet"):
        d = make_dataset(source, tmp_path, 8)
        assert d.classes == ["cat", "dog"] and d.n_classes == 2
        assert [d[i][1] for i in range(len(d))] == [0, 1, 1]
        assert d.summary == "skipped 1 image outside class folders (loose.png)"
    flat = tmp_path / "dog" / "sub"
    assert make_dataset("folder", flat, 8).n_classes == 0
    with pytest.raises(DataError, match="no class subfolders"):
        make_dataset("imagenet", flat, 8)
    (tmp_path / "top" / "train").mkdir(parents=True)
    (tmp_path / "dog").rename(tmp_path / "top" / "train" / "n02084071")
    with pytest.raises(DataError, match="pass .*train"):
        make_dataset("imagenet", tmp_path / "top", 8)


def test_bad_data_gives_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    cases = [
        (("folder", tmp_path / "empty", 32), "no images found"),
        (("folder", tmp_path / "texts", 32), r"no images found .*1 non-image file \(a.txt\)"),
        (("imagenet", tmp_path / "missing", 32), "does not exist"),
        (("folder", tmp_path / "texts" / "a.txt", 32), "not a directory"),
        (("folder", None, 32), "needs a data root"),
        (("webdataset", None, 32), "unknown data source 'webdataset'"),
        (("synthetic", None, 0), "positive integer"),
        (("folder", tmp_path / "texts", 32, False, 5), "only applies to synthetic"),
        (("synthetic", None, 32, False, 0), "length must be positive"),
        (("prepared", tmp_path / "empty", 32), "no prepared data"),
    ]
    for args, message in cases:
        with pytest.raises(DataError, match=message) as info:
            make_dataset(*args)
        assert "\n" not in str(info.value)


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    d = make_dataset("folder", tmp_path, 8)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 images"):
        d[0]


def test_cifar10_wraps_torchvision_and_explains_offline(tmp_path, monkeypatch):
    import torchvision

    class FakeCifar:
        def __init__(self, root, train, download):
            self.data = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
            self.targets = [3, 1, 4, 1]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    d = make_dataset("cifar10", tmp_path, 32)
    x, y = d[2]
    assert y == 4 and d.n_classes == 10 and len(d) == 4
    assert torch.equal(x, torch.from_numpy(FakeCifar(0, 0, 0).data[2]).permute(2, 0, 1) / 127.5 - 1)
    assert make_dataset("cifar10", tmp_path, 64)[0][0].shape == (3, 64, 64)

    def offline(root, train, download):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as info:
        make_dataset("cifar10", tmp_path, 32)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


# --- prepared -----------------------------------------------------------------------------------

def test_prepare_matches_the_direct_dataset(tmp_path):
    save_odd_images(tmp_path / "cls" / "a")
    Image.new("RGB", (50, 20), (1, 2, 3)).save(tmp_path / "cls" / "b.png")
    (tmp_path / "cls" / "b").mkdir()
    Image.new("RGB", (50, 20), (1, 2, 3)).save(tmp_path / "cls" / "b" / "c.png")
    log = tmp_path / "log.txt"
    for source, root, length in [("folder", tmp_path / "cls", None), ("synthetic", None, 37)]:
        out = tmp_path / f"prepared-{source}"
        with warnings.catch_warnings(), open(log, "w") as f:
            warnings.simplefilter("ignore")
            prepare_dataset = data.prepare(source, root, 12, out, workers=0, length=length,
                                           batch_size=5, log=f)
        assert f"{len(prepare_dataset)}/{len(prepare_dataset)}" in log.read_text()
        assert sorted(p.name for p in out.iterdir()) == ["images.npy", "labels.npy", "meta.json"]
        direct = make_dataset(source, root, 12, length=length)
        prepared = make_dataset("prepared", out, 12)
        assert len(prepared) == len(direct) and prepared.n_classes == direct.n_classes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(direct)):
                (x, y), (xp, yp) = direct[i], prepared[i]
                assert y == yp and (x - xp).abs().max() <= 1 / 127.5
        meta = json.loads((out / "meta.json").read_text())
        assert meta["count"] == len(direct) and meta["size"] == 12
    assert meta["n_classes"] == 10
    folder_meta = json.loads((tmp_path / "prepared-folder" / "meta.json").read_text())
    assert folder_meta["n_classes"] == 2
    assert "1 unreadable image (corrupt.png)" in folder_meta["skipped"]

    with pytest.raises(DataError, match="is 12x12, not 16x16; prepare it again with --size 16"):
        make_dataset("prepared", out, 16)
    # A worker process gets the file name, not a copy of the whole array.
    assert len(pickle.dumps(prepared)) < 3000 and np.array_equal(
        pickle.loads(pickle.dumps(prepared)).pixels(5)[0], prepared.pixels(5)[0])
    (out / "images.npy").unlink()
    with pytest.raises(DataError, match="incomplete"):
        make_dataset("prepared", out, 12)


def test_prepare_command_line(tmp_path):
    save_odd_images(tmp_path / "images")
    command = [sys.executable, str(HERE / "data.py"), "prepare", "--data", "folder",
               "--data-root", str(tmp_path / "images"), "--size", "8", "--workers", "2"]
    done = subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The unreadable file was found inside a worker process, and still reported here.
    assert "skipped 1 non-image file (notes.txt), 1 unreadable image (corrupt.png)" in done.stderr
    assert "prepare 7/7" in done.stderr
    assert len(make_dataset("prepared", tmp_path / "out", 8)) == 7

    command[command.index("--data-root") + 1] = str(tmp_path / "nowhere")
    bad = subprocess.run(command + ["--out", str(tmp_path / "out2")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"error: data root {tmp_path / 'nowhere'} "
                                                "does not exist"]
