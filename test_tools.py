"""The tests of the tools: evaluate.py's Inception network, statistics files, pictures and command
line; measures.py's command; benchmark.py and experiments.py; the imports; the teaching kit."""


import ast
import concurrent.futures
import dataclasses
import difflib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree
import numpy as np
import pytest
import torch
from PIL import Image
import benchmark
import evaluate as ev
import experiments
import measures
import test_sagan
import train
from conftest import HERE, TINY, fill, make_checkpoint, random_spd, run_cli
from data import make_dataset
import runs
from runs import UserError
from sagan import ModelConfig


# ---------------------------------------------------------------------------------------------
# evaluate.py: the Inception network, statistics files, pictures, the command line
# ---------------------------------------------------------------------------------------------


def test_weights_load_strictly_with_and_without_num_batches_tracked(fid_state, fid_net, tmp_path):
    assert torch.equal(fid_net.Mixed_7c.branch_pool.conv.weight, fid_state["Mixed_7c.branch_pool.conv.weight"])
    assert not fid_net.training
    with_nbt = dict(fid_state)
    for k in [k for k in fid_state if k.endswith("running_var")]:
        with_nbt[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(with_nbt, tmp_path / "nbt.pth")
    net = ev.load_inception(str(tmp_path / "nbt.pth"))
    assert torch.equal(net.fc.weight, fid_state["fc.weight"])


def test_weights_with_wrong_keys_or_shapes_are_refused_with_the_first_mismatches(fid_state, tmp_path):
    bad = dict(fid_state)
    bad["Mixed_5b.branch1x1.conv.weigth"] = bad.pop("Mixed_5b.branch1x1.conv.weight")
    bad["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        ev.load_inception(str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "3 mismatches" in msg and "missing Mixed_5b.branch1x1.conv.weight" in msg
    assert "unexpected Mixed_5b.branch1x1.conv.weigth" in msg
    assert "fc.weight is (1000, 2048), expected (1008, 2048)" in msg
    (tmp_path / "junk.pth").write_text("not a torch file")
    with pytest.raises(UserError, match="cannot read the Inception weights"):
        ev.load_inception(str(tmp_path / "junk.pth"))


def test_offline_without_weights_says_where_to_put_them(monkeypatch):
    calls = []

    def offline(url, **kwargs):
        calls.append(kwargs)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        ev.load_inception()
    assert calls[0]["check_hash"] and calls[0]["weights_only"]  # the hash in the file name is checked
    msg = str(e.value)
    assert "\n" not in msg and ev.FID_WEIGHTS_URL in msg and "--inception-weights" in msg
    assert os.path.join("checkpoints", "pt_inception-2015-12-05-6726825d.pth") in msg


def test_inception_outputs_shapes_logits_and_batch_size_independence(fid_net):
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pool, logits = ev.inception_outputs(fid_net, [images], 3, "cpu", progress=False)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == torch.float32
    assert torch.allclose(logits, pool @ fid_net.fc.weight.T)  # no bias
    assert pool.std() > 0.01  # the random weights give non-trivial features
    pool2, logits2 = ev.inception_outputs(fid_net, [images[:1], images[1:]], 3, "cpu", progress=False)
    assert (pool2 - pool).abs().max() < 1e-6 and (logits2 - logits).abs().max() < 1e-5


def test_stats_files_round_trip_and_bad_files_give_clear_errors(tmp_path):
    mu, sigma = np.random.rand(2048), random_spd(2048, 0, rank=4)
    np.savez(tmp_path / "ok.npz", mu=mu, sigma=sigma)
    mu2, sigma2 = ev.load_stats(str(tmp_path / "ok.npz"))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    np.savez(tmp_path / "keys.npz", m=mu, s=sigma)
    np.savez(tmp_path / "dim.npz", mu=mu[:64], sigma=sigma[:64, :64])
    np.save(tmp_path / "one.npy", mu)
    for name, match in [("keys.npz", "need arrays mu and sigma, found m, s"), ("dim.npz", r"mu \(64,\)"),
                        ("one.npy", "need arrays mu and sigma"), ("missing.npz", "cannot read")]:
        with pytest.raises(UserError, match=match):
            ev.load_stats(str(tmp_path / name))


def test_load_generator_picks_ema_weights_when_present(ckpt):
    G, cfg = ev.load_generator(ckpt)
    assert cfg.size == 32 and not G.training and G.attention_layers[0].gamma.item() == 0.5
    G_raw, _ = ev.load_generator(ckpt, ema=False)
    assert G_raw.attention_layers[0].gamma.item() == 0.0


def test_pictures_without_a_name_go_to_the_run_folder_and_named_ones_where_named():
    for flag, name in (("--attention", "fig5.png"), ("--grid", "grid.png")):
        key = flag[2:]
        assert getattr(ev.parse(["--ckpt", "runs/a/ckpt.pt", flag]), key) == os.path.join("runs/a", name)
        assert getattr(ev.parse(["--ckpt", "runs/a/ckpt.pt", flag, name]), key) == name
        assert getattr(ev.parse(["--ckpt", "runs/a/ckpt.pt"]), key) == ""


def test_attention_figure_and_raw_maps(ckpt, tmp_path):
    out = tmp_path / "fig" / "attn.png"
    out.parent.mkdir()
    assert ev.main(["--ckpt", ckpt, "--attention", str(out), "--k", "2", "--points", "1,2;30,31"]) == 0
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 256  # a row per image, 3 panels of 256 px per row
    raw = np.load(tmp_path / "fig" / "attn.npz")
    beta, maps = raw["beta"], raw["maps"]
    assert beta.shape == (2, 16 * 16, 8 * 8)  # queries on G's 16x16 map, keys pooled to 8x8
    np.testing.assert_allclose(beta.sum(-1), 1.0, atol=1e-5)
    assert maps.shape == (2, 2, 8, 8) and raw["images"].shape == (2, 3, 32, 32)
    np.testing.assert_allclose(maps.sum((2, 3)), 1.0, atol=1e-5)
    # Pixel (x, y) = (30, 31) of the 32x32 image is query (15, 15) of the 16x16 map, index 255;
    # pixel (1, 2) is query (0, 1), index 16.
    assert np.array_equal(maps[:, 1].reshape(2, -1), beta[:, 255])
    assert np.array_equal(maps[:, 0].reshape(2, -1), beta[:, 16])


def test_grid_has_a_row_per_class(ckpt, tmp_path):
    assert ev.main(["--ckpt", ckpt, "--grid", str(tmp_path / "grid.png"), "--classes", "0,2", "--k", "3"]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)  # save_image pads 2 px


def test_volume_views_are_slices_and_a_projection():
    x = torch.rand(2, 3, 16, 16, 16)  # (B, C, D, H, W)
    v = ev.volume_views(x)
    assert v.shape == (2, 3, 16, 4 * 16 + 3)  # three slices and the projection, a 1 px gap each
    for i, depth in enumerate((4, 8, 12)):  # ev.SLICES of 16
        assert torch.equal(v[..., i * 17:i * 17 + 16], x[:, :, depth])
        assert (v[..., i * 17 + 16] == 1.0).all()
    assert torch.equal(v[..., 51:], x.amax(dim=2))  # maximum intensity along z
    images = x[:, :, 0]
    assert ev.volume_views(images) is images


def test_volume_attention_figure_and_grid(ckpt3d, tmp_path):
    out = tmp_path / "attn3d.png"
    assert ev.main(["--ckpt", ckpt3d, "--attention", str(out), "--k", "2", "--points", "15,0,15;0,2,4"]) == 0
    raw = np.load(tmp_path / "attn3d.npz")
    beta, maps = raw["beta"], raw["maps"]
    assert beta.shape == (2, 8 ** 3, 4 ** 3) and raw["images"].shape == (2, 3, 16, 16, 16)
    assert maps.shape == (2, 2, 4, 4, 4)  # per point, its row of beta on the pooled 4^3 key grid
    # Voxel (x, y, z) = (15, 0, 15) is query (7, 0, 7) of the 8^3 map, index (7 * 8 + 0) * 8 + 7 =
    # 455; voxel (0, 2, 4) is query (0, 1, 2), index (2 * 8 + 1) * 8 + 0 = 136.
    assert np.array_equal(maps[:, 0].reshape(2, -1), beta[:, 455])
    assert np.array_equal(maps[:, 1].reshape(2, -1), beta[:, 136])
    with Image.open(out) as im:
        f = 96 // 16  # zoom; a row per volume: its views, then one per point, 4 px apart
        assert im.size == (3 * (f * 67 + 4) + 4, 2 * (f * 16 + 4) + 4)
        # The dots: on the slice nearest to the voxel (z 15: the slice at 12, panel 2; z 4: the
        # slice at 4, panel 0) and on the projection (panel 3), in the point's colour.
        pixel = lambda panel, x, y: im.getpixel((4 + (panel * 17 + x) * f + f // 2, 4 + y * f + f // 2))
        assert pixel(2, 15, 0) == pixel(3, 15, 0) == (255, 0, 255)
        assert pixel(0, 0, 2) == pixel(3, 0, 2) == (0, 255, 255)
    assert ev.main(["--ckpt", ckpt3d, "--grid", str(tmp_path / "grid.png"), "--classes", "0,2", "--k", "3"]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (3 * 67 + 4 * 2, 2 * 16 + 3 * 2)


@pytest.mark.slow
def test_metrics_end_to_end_cli_and_api_agree(ckpt, fid_weights, tmp_path, capsys):
    # 4 images and 2 IS splits keep this fast; the published protocol is 50k images and 10 splits.
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "real.npy", images)
    ref = str(tmp_path / "ref.npz")
    assert ev.main(["--make-ref-stats", ref, "--images", str(tmp_path / "real.npy"), "--inception-weights", fid_weights,
                    "--batch-size", "3"]) == 0
    assert "warning: 4 images for 2048-d features" in capsys.readouterr().err
    # The same images as PNG files: the same statistics, so FID 0.
    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "pngs" / f"{i}.png")
    out = str(tmp_path / "folder.json")
    assert ev.main(["--images", str(tmp_path / "pngs"), "--ref-stats", ref, "--inception-weights", fid_weights,
                    "--splits", "2", "--out", out]) == 0
    folder = json.load(open(out))
    assert abs(folder["FID"]) < 1e-6 and folder["n"] == 4 and folder["IS"] >= 1.0
    out = str(tmp_path / "metrics.json")
    assert ev.main(["--ckpt", ckpt, "--n", "4", "--ref-stats", ref, "--inception-weights", fid_weights,
                    "--batch-size", "3", "--splits", "2", "--out", out]) == 0
    cli = json.load(open(out))
    assert cli["weights"] == "G_ema" and cli["step"] == 7 and cli["FID"] > 0 and "IS" in capsys.readouterr().out
    # train.py's entry point gives the same numbers and leaves G in training mode.
    G, _ = ev.load_generator(ckpt)
    with pytest.warns(UserWarning, match="singular"):
        api = ev.compute_metrics(G.train(), ev.load_inception(fid_weights), 4, ref, batch_size=3, splits=2,
                                 progress=False)
    assert G.training and api == {k: cli[k] for k in ("IS", "IS_std", "FID")}


@pytest.mark.slow
def test_reference_statistics_of_a_data_source(fid_weights, tmp_path, capsys):
    out = tmp_path / "stats" / "synthetic.npz"
    out.parent.mkdir()
    argv = ["--make-ref-stats", str(out), "--data", "synthetic", "--size", "32", "--n", "3",
            "--inception-weights", fid_weights]
    assert ev.main(argv) == 0
    mu, sigma = ev.load_stats(str(out))
    assert np.isfinite(sigma).all() and np.allclose(sigma, sigma.T) and mu.min() >= 0  # pool3 follows a ReLU
    assert "3/3" in capsys.readouterr().err  # progress


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty").mkdir()
    np.save(d / "float.npy", np.zeros((4, 8, 8, 3), np.float32))
    np.save(d / "ten.npy", np.zeros((10, 8, 8, 3), np.uint8))
    np.savez(d / "nokeys.npz", m=np.zeros(2048))
    np.savez(d / "dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    (d / "junk.pt").write_text("junk")
    make_checkpoint(d / "noattn.pt", attn=())
    np.savez(d / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    (d / "bomb").mkdir()  # a PNG header claiming 20000 x 20000 pixels: Pillow refuses to decode it
    (d / "bomb" / "big.png").write_bytes(png_header(20000, 20000))
    make_checkpoint(d / "volumes.pt", attn=(8,), size=16, dims=3)
    return d


def png_header(width, height):
    """The first chunks of a PNG: its signature and an IHDR chunk (8-bit grey)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("args, message", [
    ([], "give one source of images"),
    (["--ckpt", "{d}/missing.pt"], "does not exist"),
    (["--ckpt", "{d}/junk.pt"], "not a readable sagan checkpoint"),
    (["--ckpt", "{ckpt}", "--ref-stats", "{d}/missing.npz"], "cannot read the statistics file"),
    (["--ckpt", "{ckpt}", "--ref-stats", "{d}/nokeys.npz"], "need arrays mu and sigma"),
    (["--ckpt", "{ckpt}", "--ref-stats", "{d}/dim.npz"], "should be (2048,)"),
    (["--ckpt", "{ckpt}", "--n", "0"], "--n must be at least 1"),
    (["--ckpt", "{ckpt}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--ckpt", "{ckpt}", "--n", "5"], "needs at least --splits 10 images, got 5"),
    (["--ckpt", "{ckpt}", "--device", "tpu"], "--device tpu"),
    (["--ckpt", "{ckpt}", "--inception-weights", "{d}/missing.pth"], "cannot read the Inception weights"),
    (["--ckpt", "{ckpt}", "--inception-weights", "{d}/junk.pt"], "cannot read the Inception weights"),
    (["--ckpt", "{ckpt}", "--images", "{d}/empty"], "give one source of images"),
    (["--ckpt", "{ckpt}", "--attention", "{d}/a.png", "--points", "1,2;3"], "pairs x,y"),
    (["--ckpt", "{ckpt}", "--attention", "{d}/a.png", "--points", "32,1"], "integers from 0 to 31"),
    (["--ckpt", "{ckpt}", "--grid", "{d}/g.png", "--classes", "3"], "integers from 0 to 2"),
    (["--ckpt", "{ckpt}", "--grid", "{d}/g.png", "--classes", "a,b"], "--classes"),
    (["--ckpt", "{d}/noattn.pt", "--attention", "{d}/a.png"], "no attention layer"),
    (["--ckpt", "{d}/volumes.pt", "--attention", "{d}/a.png", "--points", "1,2"], "triples x,y,z of integers from 0 to 15"),
    (["--ckpt", "{d}/volumes.pt"], "IS and FID are defined for images"),
    (["--data", "synthetic3d", "--size", "16", "--make-ref-stats", "{d}/s.npz"], "synthetic3d holds volumes"),
    (["--images", "{d}/empty"], "no images"),
    (["--images", "{d}/missing.npy"], "cannot read"),
    (["--images", "{d}/float.npy"], "must hold uint8 images"),
    (["--images", "{d}/ten.npy", "--splits", "20"], "needs at least --splits 20 images, got 10"),
    (["--images", "{d}/empty", "--grid", "{d}/g.png"], "give --ckpt"),
    (["--data", "mnist", "--make-ref-stats", "{d}/s.npz"], "not a folder, a .npy file or a data source"),
    (["--data", "imagenet", "--make-ref-stats", "{d}/s.npz"], "data root"),
    (["--ckpt", "{ckpt}", "--grid", "{d}/grid"], "name the picture with an image extension"),
    (["--ckpt", "{ckpt}", "--attention", "{d}/fig5.pgx"], "name the picture with an image extension"),
    (["--ckpt", "{ckpt}", "--ref-stats", "{d}/nan.npz"], "NaN or infinite"),
    (["--n", "x"], "argument --n: invalid int value"),
    (["--ckpt", "{ckpt}", "--out", "{d}/missing/metrics.json"], "its folder does not exist"),
    (["--images", "{d}/bomb", "--splits", "1", "--inception-weights", "{w}"], "cannot read image"),
])
def test_user_errors_print_one_line_and_exit_2(args, message, bad_inputs, ckpt, fid_weights, capsys):
    argv = [a.format(d=bad_inputs, ckpt=ckpt, w=fid_weights) for a in args]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--ckpt", str(tmp_path / "no.pt")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1



# ---------------------------------------------------------------------------------------------
# measures.py's command
# ---------------------------------------------------------------------------------------------


class FixedGenerator(torch.nn.Module):
    """Returns the given volumes whatever z and y are."""

    def __init__(self, volumes):
        super().__init__()
        self.volumes, self.cfg = volumes, ModelConfig(size=16, dims=3, ch=8, n_classes=10)

    def forward(self, z, y):
        return self.volumes[:len(z)]


def test_mirror_error_on_closed_forms(ckpt3d, capsys):
    d = make_dataset("synthetic3d", None, 16)
    assert measures.mirror_error(FixedGenerator(torch.stack([d[i][0] for i in range(4)])), 4, batch_size=3) == 0.0
    halves = torch.full((4, 3, 16, 16, 16), -1.0)
    halves[..., 8:] = 1.0  # black left, white right: every voxel differs from its mirror by 1
    assert measures.mirror_error(FixedGenerator(halves), 4) == 1.0
    # A ramp over x, column j at j / 15 (exact bytes, 17 j): mean |2j - 15| / 15 = 128 / 240.
    ramp = (torch.arange(16.0) / 15 * 2 - 1).expand(4, 3, 16, 16, 16)
    assert measures.mirror_error(FixedGenerator(ramp), 4) == pytest.approx(128 / 240, abs=1e-12)
    assert measures.main(["--ckpt", ckpt3d, "--mirror", "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mirror error 0.") and "over the mirror plane of 3 samples" in out, out


def test_measures_command_measures_a_synthetic_checkpoint_offline(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ckpt.pt"
    make_checkpoint(path, n_classes=10)
    ckpt = torch.load(path, weights_only=True)
    ckpt["train"] = {"data": "synthetic"}
    torch.save(ckpt, path)
    out = tmp_path / "m.json"
    assert measures.main(["--ckpt", str(path), "--n", "80", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "synthetic-data measurements of 80 samples (G_ema, step 7)" in text, text
    result = json.loads(out.read_text())
    assert 0 < result["mirror_error"] < 1 and 0 <= result["shape_fidelity"] <= 1 and result["reach"] > 0, result
    G = ev.load_generator(str(path))[0]
    assert result["fid_probe"] == measures.synthetic_metrics(G, 80)["fid_probe"]  # the API gives the same
    assert measures.main(["--ckpt", str(path), "--n", "5"]) == 2
    assert "--n must be at least 10" in capsys.readouterr().err
    # evaluate.py, asked for nothing it can compute offline, names this command.
    assert ev.main(["--ckpt", str(path)]) == 2
    assert f"python measures.py --ckpt {path} measures it exactly" in capsys.readouterr().err
    # Probes of another seed (trained briefly here): other features, the seed said and recorded.
    monkeypatch.setattr(measures, "PROBE_STEPS", 20)
    monkeypatch.setattr(measures, "_probes", {})
    assert measures.main(["--ckpt", str(path), "--n", "80", "--probe-seed", "1", "--out", str(out)]) == 0
    assert "the probes of seed 1 on held-out real images" in capsys.readouterr().out
    other = json.loads(out.read_text())
    assert other["probe_seed"] == 1 and result["probe_seed"] == 0
    assert other["fid_probe"] == measures.synthetic_metrics(G, 80, probe_seed=1)["fid_probe"] != result["fid_probe"]



# ---------------------------------------------------------------------------------------------
# benchmark.py and experiments.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_smoke_prints_the_table():
    # Random data: the ImageNet preset needs no --data-root here.
    code, out, err = run_cli("benchmark.py", "--data", "imagenet", "--size", "32", "--ch", "8", "--batch-size", "4",
                             "--iters", "1", "--variants", "default,fp32,explicit_attn,channels_last", "--profile")
    assert code == 0, err
    for word in ("ms/iter", "images/s", "peak MB", "TFLOP/s", "default", "fp32", "explicit_attn", "channels_last"):
        assert word in out, word
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0] in [*benchmark.VARIANTS, "default"]]
    assert len(rows) == 4 and all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)  # images/s, TFLOP/s
    # --profile: the operators of one iteration, by self time; convolutions among the top.
    profile = out[out.index("where the time goes"):].splitlines()[2:]
    shares = [float(line.split()[-2].rstrip("%")) for line in profile]
    assert len(profile) == 12 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    assert any("conv" in line for line in profile[:5]), profile


def test_benchmark_attention_on_volumes_and_the_explicit_path_that_cannot_fit(monkeypatch, capsys):
    assert benchmark.main(["--attention", "2,16,8,8,8", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "(B, C, D, H, W) = (2, 16, 8, 8, 8), N = 512 positions, M = 64 keys" in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["fused", "explicit"]
    monkeypatch.setattr(benchmark, "available_memory", lambda device: benchmark.EXPLICIT_COPIES * 2 * 512 * 64 * 4)
    assert benchmark.main(["--attention", "2,16,8,8,8", "--iters", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].split()[0] == "fused" and len(lines) == 2
    assert lines[1].startswith(f"explicit  does not fit: its score matrix B x N x M x 4 bytes = {2 * 512 * 64 * 4 / 2**30:.3g} GiB")
    assert benchmark.main(["--attention", "1,2,3"]) == 2
    assert "B,C,H,W or B,C,D,H,W" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_reports_a_variant_out_of_gpu_memory_and_goes_on(monkeypatch, capsys):
    """One variant runs out of (GPU) memory: it is named in the table, skipped in later rounds,
    and the other variants are timed and their FLOPs counted as usual."""
    real, calls = benchmark.time_variant, []

    def time_variant(cfg, device, spec, *args, **kwargs):
        calls.append(spec)
        if spec == benchmark.VARIANTS["explicit_attn"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB")
        return real(cfg, device, spec, *args, **kwargs)

    monkeypatch.setattr(benchmark, "time_variant", time_variant)
    cfg, _ = train.parse_config(["--size", "32", "--ch", "8", "--batch-size", "4", "--iters", "1", "--rounds", "2"],
                                benchmark.BenchConfig)
    rows = benchmark.benchmark(cfg, ["explicit_attn", "fp32"])
    assert calls.count(benchmark.VARIANTS["explicit_attn"]) == 1 and calls.count(benchmark.VARIANTS["fp32"]) == 2
    assert rows[0] == {"variant": "explicit_attn", "out_of_memory": True}
    assert rows[1]["variant"] == "fp32" and rows[1]["images_per_s"] > 0 and rows[1]["tflops"] > 0
    assert "explicit_attn  out of memory" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_times_inception_and_the_frechet_distance(capsys):
    # Random weights (speed does not depend on them), one warm-up batch, one timed batch.
    assert benchmark.main(["--metrics", "--size", "32", "--batch-size", "2", "--iters", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rate = float(out.split("Inception features: ")[1].split()[0])
    seconds = float(out.split("frechet_distance at d = 2048: ")[1].split()[0])
    assert rate > 0 and seconds > 0 and "batch 2" in out and "32x32" in out


def test_experiments_train_at_the_papers_rates_or_the_default_runs_in_their_own_folders(tmp_path, capsys):
    paper = experiments.parse(["table1", "--out", str(tmp_path)])
    command = experiments.train_command(paper, "none", 0)
    assert command[command.index("--lr-g") + 1] == "1e-4" and command[command.index("--lr-d") + 1] == "4e-4"
    assert experiments.main(["table1", "--rates", "x8"]) == 2 and "invalid choice: 'x8'" in capsys.readouterr().err
    default = experiments.parse(["table1", "--rates", "default", "--out", str(tmp_path)])
    assert "--lr-g" not in experiments.train_command(default, "none", 0)  # train.py's preset, 8x
    for cfg in (paper, default):  # at either rates the paper's G, z at its input alone, for 1,200 steps
        trained, _ = train.parse_config(experiments.train_command(cfg, "none", 0)[2:])
        assert not trained.model.z_blocks and trained.steps == 1200 and train.parse_config([])[0].model.z_blocks
    os.makedirs(experiments.run_folder(paper, "none", 0))
    with open(os.path.join(experiments.run_folder(paper, "none", 0), "experiment.json"), "w") as f:
        json.dump(dict(wall_s=1.0, steps=None, step=1200, eval_every=200, eval_n=500, threads=1, rates="paper"), f)
    assert experiments.finished(paper, "none", 0)["wall_s"] == 1.0
    with pytest.raises(UserError, match="trained at the paper's learning rates, not at the default run's"):
        experiments.finished(default, "none", 0)


def test_curves_draw_each_measure_where_its_value_lies(tmp_path, capsys):
    """`experiments.py curves`: a row per run, a panel per measure; a measure held at half its axis
    draws its line halfway up its panel, in every panel. A run without measurements is one line."""
    run = tmp_path / "run"
    run.mkdir()
    measured = {key: top / 2 for key, _, top in experiments.CURVES}
    with open(run / "log.jsonl", "w") as f:
        f.write(json.dumps({"step": 50, "loss_g": 1.0}) + "\n")  # a training line, not a measurement
        for step in (100, 200, 300):
            f.write(json.dumps({"step": step, **measured}) + "\n")
    picture = tmp_path / "curves.png"
    assert experiments.main(["curves", "--runs", f"{run},{run}", "--picture", str(picture)]) == 0
    image = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)
    width = image.shape[1] // len(experiments.CURVES)
    assert image.shape[1] == width * len(experiments.CURVES)
    for panel in range(len(experiments.CURVES)):
        rows = np.nonzero(red[:, panel * width:(panel + 1) * width].any(1))[0]
        halves = [rows[rows < image.shape[0] // 2], rows[rows >= image.shape[0] // 2]]  # the two runs
        for r, top in zip(halves, (20 + 14, 20 + 150 + 14)):
            assert len(r) and abs(r.mean() - (top + (150 - 14 - 22) / 2)) <= 2, (panel, r)
    log = (run / "log.jsonl").read_bytes()
    assert experiments.main(["curves", "--runs", str(run), "--picture", str(run / "log.jsonl")]) == 2
    assert "also an input" in capsys.readouterr().err and (run / "log.jsonl").read_bytes() == log
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text(json.dumps({"step": 50, "loss_g": 1.0}) + "\n")
    assert experiments.main(["curves", "--runs", str(tmp_path / "empty")]) == 2
    assert "holds no synthetic measurements" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_command_trains_measures_and_reuses_its_runs(tmp_path, capsys):
    out = tmp_path / "ex"
    args = ["figure5", "--seeds", "1", "--steps", "4", "--eval-every", "2", "--eval-n", "20", "--out", str(out)]
    assert experiments.main(args) == 0
    text = capsys.readouterr().out
    log = [json.loads(line) for line in open(out / "attn16" / "seed0" / "log.jsonl")]
    measured = [r for r in log if "fid_probe" in r]
    assert [r["step"] for r in measured] == [2, 4] and all(r["reach"] > 0 for r in measured), log
    assert "| 4 | " in text and (out / "figure5.md").read_text() in text
    config = json.load(open(out / "attn16" / "seed0" / "config.json"))["train"]
    assert (config["lr_g"], config["lr_d"]) == (1e-4, 4e-4)  # the paper's rates, not the default run's
    before = (out / "attn16" / "seed0.txt").read_text()
    assert experiments.main(args + ["--jobs", "2"]) == 0  # finished runs are reused, not trained again
    assert (out / "attn16" / "seed0.txt").read_text() == before
    # Their core-hours count the threads each run had (all the CPU's, one job), not this call's share.
    assert f"their threads ({os.cpu_count()} each)" in capsys.readouterr().out
    # More steps: the run is resumed from its checkpoint, not started again.
    assert experiments.main([*args[:4], "6", *args[5:]]) == 0
    log = [json.loads(line) for line in open(out / "attn16" / "seed0" / "log.jsonl")]
    assert [r["step"] for r in log if "fid_probe" in r] == [2, 4, 6], log
    assert '"resume": "' + str(out / "attn16" / "seed0" / "ckpt.pt") in (out / "attn16" / "seed0.txt").read_text()[len(before):]
    # A finished run measured at other settings, or without its record, is named, not trained again.
    capsys.readouterr()
    (out / "attn16" / "seed0" / "experiment.json").unlink()
    for extra in ([], ["--eval-n", "10"]):
        assert experiments.main([*args[:4], "6", *args[5:], *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "has finished (step 6, --eval-every 2, --eval-n 20)" in err, err
    assert experiments.main(["table2"]) == 2 and "invalid choice: 'table2'" in capsys.readouterr().err



@pytest.mark.slow
def test_ctrl_c_stops_the_experiments_trainings_each_with_its_checkpoint(tmp_path):
    """A Ctrl-C at the terminal signals the whole foreground process group. experiments.py passes
    one SIGTERM to each training, which saves and stops; a training that also got the SIGINT itself
    would take the two as "stop at once" and save nothing. One line, exit 130, no training left."""
    out = tmp_path / "ex"
    # As from a terminal: SIGINT at its default (a shell's background job would start with it ignored).
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "experiments.py"), "figure5", "--seeds", "1", "--steps",
                             "100000", "--eval-every", "100000", "--eval-n", "20", "--out", str(out)], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log, lock, t = out / "attn16" / "seed0.txt", out / "attn16" / "seed0" / ".lock", time.time()
    try:
        while not (log.exists() and "config:" in log.read_text()):  # the training has begun its loop
            assert proc.poll() is None and time.time() - t < 120, proc.communicate()
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        _, err = proc.communicate(timeout=120)
    finally:  # if it did not stop, leave no training behind (its pid is in its run folder's lock)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            pid = re.search(r"pid (\d+)", lock.read_text()) if lock.exists() else None
            if pid:
                os.kill(int(pid.group(1)), signal.SIGKILL)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: the trainings under way saved a checkpoint; the same command resumes them"], err
    assert "stopped by signal 15" in log.read_text() and "checkpoint saved" in log.read_text(), log.read_text()
    assert runs.load_checkpoint(str(out / "attn16" / "seed0" / "ckpt.pt"))["step"] >= 1


# ---------------------------------------------------------------------------------------------
# The project's shape: imports run one way
# ---------------------------------------------------------------------------------------------


def test_imports_run_one_way():
    """Each module imports only those above it in the README's file table, all at its top level,
    so that no two import each other, counting imports inside functions; sagan.py and runs.py
    import nothing of the project."""
    table = [m for m in re.findall(r"^\| `(\w+)\.py` \|", Path(HERE, "README.md").read_text(), re.M)
             if not m.startswith("test_")]
    modules = {p.stem for p in Path(HERE).glob("*.py") if not p.stem.startswith("test_") and p.stem != "conftest"}
    assert set(table) == modules, "every module has its row in the README's file table, and only those"
    for i, name in enumerate(table):
        tree = ast.parse(Path(HERE, name + ".py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported = {node.module.split(".")[0]}
            else:
                continue
            project = imported & modules
            allowed = set() if name in ("sagan", "runs") else set(table[:i])
            assert project <= allowed, f"{name}.py imports {project - allowed}"
            assert not project or node in tree.body, f"{name}.py imports {project} inside a function"


# ---------------------------------------------------------------------------------------------
# The teaching kit (course/): the student copy, its blanks, and the exercise checks in it
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kit(monkeypatch):
    """course/exercises.py and course/make_copy.py, imported as the command imports them."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "course"))
    import exercises
    import make_copy
    return SimpleNamespace(EXERCISES=exercises.EXERCISES, BY_NAME=exercises.BY_NAME, make_copy=make_copy)


def exercise_markers(test, kit):
    """The exercises whose check the test (named as pytest names it, "test_x[param]") belongs to:
    every check is in test_sagan.py."""
    marks = getattr(getattr(test_sagan, test.split("[")[0], None), "pytestmark", [])
    return {m.name for m in marks} & set(kit.BY_NAME)


# One call per blanked function that runs into its blank (and runs through with the reference code);
# the GAN's on the stand-in networks, which the test puts in place.
REACH_BLANK = {
    "attention_map": lambda m: m.attention_map(torch.randn(1, 2, 4), torch.randn(1, 2, 4)),
    "new_gamma": lambda m: m.new_gamma(),
    "SelfAttention.forward": lambda m: m.SelfAttention(16)(torch.randn(1, 16, 4, 4)),
    "ConditionalBatchNorm.forward": lambda m: m.ConditionalBatchNorm(4, 3, m.LAYER_TYPES[2])(torch.randn(2, 4, 2, 2), torch.tensor([0, 2])),
    "Discriminator.forward": lambda m: m.Discriminator(m.ModelConfig(size=32, ch=8, n_classes=3, attn=()))(
        torch.randn(1, 3, 32, 32), torch.tensor([2])),
    "d_hinge_loss": lambda m: m.d_hinge_loss(torch.zeros(2), torch.zeros(2)),
    "g_hinge_loss": lambda m: m.g_hinge_loss(torch.zeros(2)),
    "GAN.d_step": lambda m: m.GAN(tiny_config(), torch.device("cpu")).d_step(
        iter([(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))])),
    "GAN.g_step": lambda m: m.GAN(tiny_config(), torch.device("cpu")).g_step(2),
    "frechet_distance": lambda m: m.frechet_distance(np.zeros(3), np.eye(3), np.ones(3), 2 * np.eye(3)),
    "inception_score": lambda m: m.inception_score(torch.randn(20, 10)),
}


def tiny_config():
    cfg, _ = train.parse_config(TINY)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_classes=3))


@pytest.mark.course
def test_every_exercise_has_a_registered_check_and_its_blanks_fit_the_code(kit):
    ini = Path(HERE, "pytest.ini").read_text()
    tests = [name for name in vars(test_sagan) if name.startswith("test_")]
    assert [len(e.blanks) for e in kit.EXERCISES] == [1] * (len(kit.EXERCISES) - 1) + [0], \
        "one blank per exercise, and so one check per blank; the last exercise runs the others"
    for e in kit.EXERCISES:
        assert f"\n    {e.name}: exercise check" in ini, f"register the marker {e.name} in pytest.ini"
        assert any(e.name in exercise_markers(t, kit) for t in tests), f"exercise {e.name} has no check"
        assert set(e.needs) <= set(kit.BY_NAME) - {e.name}, e.needs
        for b in e.blanks:  # a LookupError says which blank a change of the code has left behind
            source = Path(HERE, b.file).read_text()
            kit.make_copy.blank_span(source, ast.parse(source), b)


@pytest.mark.course
def test_every_blank_raises_its_one_line_message(kit, monkeypatch):
    """Each blank alone, in its file loaded as a module of its own: the call that runs through the
    reference code stops at the blank with exactly its message, which says what to write and
    the command that checks it."""
    blanks = [(e, b) for e in kit.EXERCISES for b in e.blanks]
    assert {b.function for _, b in blanks} == set(REACH_BLANK)
    monkeypatch.setattr(train, "Generator", test_sagan.StandInG)
    monkeypatch.setattr(train, "Discriminator", test_sagan.StandInD)
    for e, b in blanks:
        REACH_BLANK[b.function](sys.modules[Path(b.file).stem])  # the reference runs through
        module = type(sys)(f"blanked_{Path(b.file).stem}")
        monkeypatch.setitem(sys.modules, module.__name__, module)  # for its dataclasses
        source = kit.make_copy.blank_source(Path(HERE, b.file).read_text(), [(e, b)], b.file)
        exec(compile(source, b.file, "exec"), module.__dict__)
        if hasattr(module, "GAN"):  # train.py's copy: the stand-ins, as above
            module.Generator, module.Discriminator = test_sagan.StandInG, test_sagan.StandInD
        with pytest.raises(NotImplementedError) as raised:
            REACH_BLANK[b.function](module)
        message = str(raised.value)
        assert message == kit.make_copy.blank_message(e, b) and "\n" not in message
        assert message.startswith(f"exercise {e.name}: ")
        assert message.endswith(f"; check: {kit.make_copy.check_command(e.name)}")


@pytest.mark.course
def test_student_copy_is_the_project_with_only_the_blanks_changed(kit, tmp_path):
    """Every file of a copy that holds no blank is the project's, byte for byte, but conftest.py,
    which is the project's with the kit's hooks after it; a blanked file differs only by each
    blank's lines replaced by its one raise line. So a copy without blanks passes the whole suite,
    as this suite passes here on the same files: the hooks only leave out the kit's own tests
    (which need course/) and turn failures caused by a blank into skips, and it has none. (The
    slow test below runs the suite in copies with blanks.)"""
    mc = kit.make_copy
    top = {p.name for p in Path(HERE).glob("*.py")} | {"README.md", "RESULTS.md", "LICENSE", "pytest.ini",
                                                       "requirements.txt"}
    assert top <= set(mc.PROJECT_FILES), f"make_copy.PROJECT_FILES lacks {top - set(mc.PROJECT_FILES)}"
    hooks = Path(HERE, "course", "student_conftest.py").read_bytes()

    def project(name):  # what the copy's file is when it holds no blank
        return Path(HERE, name).read_bytes() + (mc.KIT_HOOKS.encode() + hooks if name == "conftest.py" else b"")
    assert mc.make_copy(str(tmp_path / "none"), [kit.BY_NAME["train_figure5"]]) == 0
    for name in mc.PROJECT_FILES:
        assert Path(tmp_path, "none", name).read_bytes() == project(name), name
    assert mc.make_copy(str(tmp_path / "all"), list(kit.EXERCISES)) == sum(len(e.blanks) for e in kit.EXERCISES)
    assert sorted(os.listdir(tmp_path / "all")) == sorted({f.split("/")[0] for f in mc.PROJECT_FILES} |
                                                          {"ASSIGNMENT.md"})  # no course/
    for name in mc.PROJECT_FILES:
        original, copied = project(name), Path(tmp_path, "all", name).read_bytes()
        raises = sorted(f"raise NotImplementedError({mc.blank_message(e, b)!r})"
                        for e in kit.EXERCISES for b in e.blanks if b.file == name)
        if not raises:
            assert copied == original, name
            continue
        a, b = original.decode().splitlines(), copied.decode().splitlines()
        changes = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
        assert all(tag == "replace" and j2 == j1 + 1 for tag, _, _, j1, j2 in changes), (name, changes)
        assert sorted(b[j1].strip() for _, _, _, j1, _ in changes) == raises, name
    sheet = Path(tmp_path, "all", "ASSIGNMENT.md").read_text()
    for e in kit.EXERCISES:
        assert mc.check_command(e.name) in sheet and all(q in sheet for q in e.questions)
    assert "<!--" not in sheet

    def code(line):  # a line's expression, without `return`, its target or its comment; short ones do not count
        text = re.sub(r"^(return |[\w.\[\], ]+ = )", "", line.split("  #")[0].strip())
        return "" if text.startswith("#") or len(text) < 10 else text
    for e in kit.EXERCISES:  # no answer shows elsewhere: no code line of a blank is in any file of the copy
        for b in e.blanks:
            source = Path(HERE, b.file).read_text()
            first, last, _ = mc.blank_span(source, ast.parse(source), b)
            answer = {code(line) for line in source.splitlines()[first - 1:last]} - {""}
            for path in Path(tmp_path, "all").rglob("*"):
                if path.is_file() and path.suffix in (".py", ".md", ".ini"):
                    shown = answer & {code(line) for line in path.read_text().splitlines()}
                    assert not shown, f"{path.name} shows the answer of exercise {e.name}: {shown}"


@pytest.mark.course
def test_make_copy_command_line(kit, tmp_path, capsys):
    mc = kit.make_copy
    assert mc.main(["--out", str(tmp_path / "a"), "--exercises", "d_hinge_loss,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown exercise 'nope'; choose from attention_map, ") and err.count("\n") == 1
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("")
    assert mc.main(["--out", str(tmp_path / "used")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'used'} exists and is not an empty folder\n"
    assert mc.main([]) == 2 and capsys.readouterr().err.startswith("error: --out DIR is required")
    assert not (tmp_path / "a").exists()
    assert mc.main(["--out", str(tmp_path / "one"), "--exercises", "d_hinge_loss,g_hinge_loss"]) == 0
    assert "2 blanks in 2 exercises (d_hinge_loss, g_hinge_loss)" in capsys.readouterr().out
    sheet, sagan_py = (tmp_path / "one" / "ASSIGNMENT.md").read_text(), (tmp_path / "one" / "sagan.py").read_text()
    assert "-m d_hinge_loss" in sheet and "-m d_step" not in sheet and "exercise g_hinge_loss: " in sagan_py
    assert "exercise attention_map" not in sagan_py


@pytest.mark.course
def test_a_student_copy_is_written_whole_or_not_at_all(kit, small_disk, capsys):
    """On a real full disk the copy fails in one line and leaves nothing behind, so that once the
    disk has room the same command works."""
    fill(small_disk)
    out = small_disk / "student"
    assert kit.make_copy.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and os.listdir(small_disk) == ["filler"]
    (small_disk / "filler").unlink()
    assert kit.make_copy.main(["--out", str(out), "--exercises", "d_hinge_loss"]) == 0
    assert sorted(os.listdir(small_disk)) == ["student"] and (out / "ASSIGNMENT.md").exists()


def run_copy_suite(copy, *args):
    """pytest in a student copy: {test name: (outcome, text)} from its JUnit report, outcome
    "passed", "failed" (a failure or an error) or "skipped"."""
    report = copy / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args],
                   cwd=copy, capture_output=True, timeout=600)
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                text = f"{child.get('message', '')}\n{child.text or ''}"
        results[case.get("name")] = (outcome, text)
    return results


@pytest.mark.slow
@pytest.mark.course
def test_student_copies_fail_only_on_the_checks_of_their_blanks(kit, tmp_path):
    """The kit's promise, in CI, on copies made by the command: (1) with every blank, the whole
    suite fails only on the exercises' checks, each at its own blank and naming it; every other
    test passes, or is skipped naming the exercise whose blank it reached. (2) With one exercise
    alone blanked, among all the exercise checks exactly that exercise's fail, the checks that
    build on it wait for it, and the others pass. With the reference put back, a copy is the
    project (see above), where every check passes. The suites run two at a time, on two cores.
    The copy with every blank runs the checks and the fast tests; the slow end-to-end runs that
    are not checks are left out there, to keep the suite short: they go through the same
    conftest.py hook, which the fast tests that reach a blank already exercise."""
    exercises = [e for e in kit.EXERCISES if e.blanks]
    code, out, err = run_cli(os.path.join("course", "make_copy.py"), "--out", tmp_path / "all")
    assert code == 0, err
    for e in exercises:
        kit.make_copy.make_copy(str(tmp_path / e.name), [e])
    checks = " or ".join(kit.BY_NAME)
    runs = [("all", ["-m", f"not slow or {checks}"])] + \
        [(e.name, ["test_sagan.py", "-m", checks]) for e in exercises]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip([name for name, _ in runs],
                           pool.map(lambda run: run_copy_suite(tmp_path / run[0], *run[1]), runs)))
    wrong = []
    assert len(results["all"]) > 140
    for test, (outcome, text) in results["all"].items():
        blanked = {e for e in exercise_markers(test, kit) if kit.BY_NAME[e].blanks}
        if blanked:
            ok = outcome == "failed" and any(f"NotImplementedError: exercise {e}: " in text for e in blanked)
        else:
            ok = outcome == "passed" or outcome == "skipped" and (re.search(r"needs exercise \w+(\n|$)", text) is not None
                                                                 or "a student copy: the blanks in" in text)
        if not ok:
            wrong.append(f"every blank, {test}: {outcome} {text[:300]}")
    assert results["all"]["test_a_short_run_trains_and_draws_figure_5"][0] == "skipped"
    for e in exercises:
        for test, (outcome, text) in results[e.name].items():
            own = exercise_markers(test, kit)
            if e.name in own:
                ok = outcome == "failed" and f"NotImplementedError: exercise {e.name}: " in text
            elif any(e.name in kit.BY_NAME[o].needs for o in own):
                ok = outcome == "skipped" and f"needs exercise {e.name}" in text
            else:
                ok = outcome == "passed"
            if not ok:
                wrong.append(f"{e.name} blank, {test}: {outcome} {text[:300]}")
    assert not wrong, "\n".join(wrong)



# ---------------------------------------------------------------------------------------------
# The README: its reading order names true line ranges, and its Python examples run
# ---------------------------------------------------------------------------------------------

def definitions(path):
    """{name: (first line, last line)} of a file's classes, functions, methods ("Class.method") and
    top-level assignments, a definition's first line that of its first decorator."""
    spans = {}

    def walk(nodes, prefix=""):
        for n in nodes:
            if isinstance(n, ast.Assign) and not prefix and isinstance(n.targets[0], ast.Name):
                spans[n.targets[0].id] = (n.lineno, n.end_lineno)
            elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                spans[prefix + n.name] = (min([n.lineno] + [d.lineno for d in n.decorator_list]), n.end_lineno)
                if isinstance(n, ast.ClassDef):
                    walk(n.body, prefix + n.name + ".")
    walk(ast.parse(Path(HERE, path).read_text()).body)
    return spans


def test_the_readme_reading_order_names_true_line_ranges():
    blanked = [p.name for p in Path(HERE).glob("*.py") if not p.name.startswith(("test_", "conftest"))
               and re.search(r"raise NotImplementedError\(['\"]exercise \w+: ", p.read_text())]
    if blanked:
        pytest.skip(f"a student copy: the blanks in {', '.join(blanked)} move the lines the README names")
    readme = Path(HERE, "README.md").read_text()
    section = readme[readme.index("## How to read the code"):readme.index("## Paper to code")]
    rows = re.findall(r"^\| ((?:`[\w.]+`(?:, )?)+) \| ((?:`\w+\.py:\d+-\d+`(?:, )?)+) \|", section, re.M)
    assert len(rows) >= 10, "the reading order is a table: names, then where they are"
    for names, places in rows:
        names, places = re.findall(r"`([\w.]+)`", names), re.findall(r"`(\w+\.py):(\d+)-(\d+)`", places)
        assert len(names) == len(places), (names, places)
        for name, (path, first, last) in zip(names, places):
            span = definitions(path).get(name)
            assert span == (int(first), int(last)), f"README: {name} is at {path}:{span[0]}-{span[1]}" if span else name


def test_the_readme_python_examples_run(tmp_path):
    """Every python block of the README runs, offline, from a folder that holds the default run's
    checkpoint, as a user would run it after the quick start."""
    blocks = re.findall(r"```python\n(.*?)```", Path(HERE, "README.md").read_text(), re.S)
    assert blocks
    (tmp_path / "runs" / "sagan").mkdir(parents=True)
    make_checkpoint(tmp_path / "runs" / "sagan" / "ckpt.pt", n_classes=10)
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": HERE})
        assert done.returncode == 0, (block, done.stderr)
