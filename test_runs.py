"""The tests of the runs: training end to end, resume, DDP, the data files a run reads, mistakes
on the command line, and real faults (kills, signals, divergence, full disks, damaged files).
Most start train.py and are marked slow: `pytest -m "not slow"` leaves them out."""


import dataclasses
import json
import os
import pickle
import random as pyrandom
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
import data
import evaluate as ev
import measures
import runs
import train
from conftest import (DEVICES, HERE, TINY, TINY3D, assert_same_state, fill, make_checkpoint, run_cli, save_odd_images,
                      snapshot)
from data import make_dataset
from runs import UserError
from sagan import Discriminator, ModelConfig


# ---------------------------------------------------------------------------------------------
# Training runs end to end: the run folder, presets, volumes, resume, DDP, precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_folder_contents(tmp_path):
    assert train.main(TINY + ["--steps", "5", "--out", tmp_path]) == 0
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "config.json", "log.jsonl", "samples"]
    assert os.listdir(tmp_path / "samples") == ["step_0000005.png"]
    record = json.loads(open(tmp_path / "log.jsonl").readline())
    for key in ("step", "loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake", "gamma_g", "gamma_d", "images_per_s"):
        assert key in record, key
    assert len(record["gamma_g"]) == len(record["gamma_d"]) == 1
    config = json.load(open(tmp_path / "config.json"))
    assert config["train"]["lr_g"] == 8e-4 and config["train"]["lr_d"] == 3.2e-3  # TTUR, the default run's rates
    assert config["train"]["beta1"] == 0.0 and config["train"]["beta2"] == 0.9


@pytest.mark.slow
def test_volume_training_steps_are_finite_and_samples_show_slices(tmp_path):
    assert train.main(TINY3D + ["--steps", "2", "--eval-every", "2", "--eval-n", "10", "--out", tmp_path]) == 0
    config = json.load(open(tmp_path / "config.json"))
    assert config["train"]["data"] == "synthetic3d" and config["model"]["dims"] == 3
    record, measured = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(np.isfinite(record[k]) for k in ("loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake"))
    assert len(record["gamma_g"]) == len(record["gamma_d"]) == 1
    assert measured["step"] == 2 and 0 <= measured["shape_fidelity"] <= 1 and measured["mirror_error"] > 0, measured
    with Image.open(tmp_path / "samples" / "step_0000002.png") as im:
        assert im.size == (8 * 67 + 9 * 2, 10 * 16 + 11 * 2)  # a row per class, 8 volumes of 4 views


def test_dims_3_selects_the_volumes_and_the_default_3d_run():
    cfg, given = train.parse_config(["--dims", "3"])
    assert given == {"dims"} and cfg.data == "synthetic3d"
    assert (cfg.model.dims, cfg.model.size, cfg.model.attn) == (3, 16, (8,))
    assert (cfg.model.ch, cfg.batch_size, cfg.steps) == (8, 32, 1200)  # the preset of the default 3-D run
    assert (cfg.lr_g, cfg.lr_d) == (8e-4, 3.2e-3)
    assert train.parse_config(["--data", "synthetic3d"])[0] == cfg
    cfg, _ = train.parse_config(["--dims", "3", "--size", "32", "--ch", "16"])
    assert (cfg.model.size, cfg.model.ch, cfg.model.attn) == (32, 16, (16,))  # flags win
    assert train.parse_config([])[0].data == "synthetic"


def test_imagenet_preset_is_the_papers():
    cfg, _ = train.parse_config(["--data", "imagenet", "--data-root", "/x"])
    train.check_config(cfg)
    assert (cfg.model.size, cfg.model.ch, cfg.batch_size, cfg.steps, cfg.model.attn) == (128, 64, 256, 1_000_000, (64,))
    assert (cfg.lr_g, cfg.lr_d, cfg.beta1, cfg.beta2, cfg.d_steps) == (1e-4, 4e-4, 0.0, 0.9, 1)
    cfg, _ = train.parse_config(["--data", "imagenet", "--batch-size", "128", "--attn", "none"])
    assert cfg.batch_size == 128 and cfg.model.attn == ()  # flags win over the preset


@pytest.mark.slow
def test_the_last_line_says_where_the_run_is_and_what_to_run_next(tmp_path, capsys):
    for attn, figure in (("16", True), ("none", False)):
        out = tmp_path / attn
        assert train.main(TINY + ["--steps", "1", "--attn", attn, "--out", out]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        ckpt = out / "ckpt.pt"
        assert last.startswith(f"done: step 1 in {ckpt}, sample grids in {out / 'samples'}") and \
            last.endswith(f"; measured: python measures.py --ckpt {ckpt}"), last
        assert (f"; Figure 5: python evaluate.py --ckpt {ckpt} --attention" in last) == figure, last


def test_a_folder_of_small_images_trains_a_small_model_at_the_papers_rates():
    small, _ = train.parse_config(["--data", "folder", "--data-root", "/x", "--size", "32"])
    assert (small.model.ch, small.batch_size, small.steps, small.lr_g, small.lr_d) == (16, 64, 1500, 1e-4, 4e-4)
    large, _ = train.parse_config(["--data", "folder", "--data-root", "/x"])
    assert (large.model.size, large.model.ch, large.batch_size, large.steps) == (64, 64, 64, 100_000)
    given, _ = train.parse_config(["--data", "folder", "--size", "32", "--ch", "32", "--steps", "10"])
    assert (given.model.ch, given.batch_size, given.steps) == (32, 64, 10)  # flags win over it


@pytest.mark.slow
@pytest.mark.parametrize("tiny,steps", [(TINY, 10), (TINY3D, 4)], ids=["images", "volumes"])
def test_resume_is_bit_identical_to_a_straight_run(tmp_path, tiny, steps):
    """Half the steps, resume, the other half == all of them straight: G, D, EMA, optimizers, SN
    vectors and all RNGs, with flips on (their randomness must resume too) and the EMA switching
    on mid-run; for images and for volumes. The first half begins with --overwrite, which the
    resume must not take over from the checkpoint (it would refuse to resume)."""
    common = tiny + ["--ema", "--ema-start", "3", "--flip"]
    assert train.main(common + ["--steps", steps, "--out", tmp_path / "straight"]) == 0
    assert train.main(common + ["--steps", steps // 2, "--out", tmp_path / "split", "--overwrite"]) == 0
    assert train.main(["--resume", "--out", tmp_path / "split", "--steps", steps]) == 0
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "rng", "model"):
        assert_same_state(a[key], b[key], key)
    # The log of the resumed run continues the first one: one line at each half.
    log = [json.loads(l) for l in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in log] == [steps // 2, steps]
    assert log[1]["loss_d_real"] == [json.loads(l) for l in open(tmp_path / "straight" / "log.jsonl")][1]["loss_d_real"]


@pytest.mark.slow
def test_ema_generator_is_normalised_exactly_where_it_is_used(tmp_path):
    """G_ema's weights are an average of G's, fast-moving here (EMA from step 0, decay 0.99,
    learning rates 2e-3, 60 steps): a power iteration per update would leave its largest
    singular values measurably off 1. Saved (and so sampled and measured), every normalised
    weight of G_ema has largest singular value 1 to 1e-5; with G's own vectors u, v, what the
    EMA once copied, the same averaged weights would come out larger than 1."""
    assert train.main(["--size", "32", "--ch", "8", "--batch-size", "8", "--steps", "60", "--ema", "--ema-start",
                       "0", "--ema-decay", "0.99", "--lr-g", "2e-3", "--lr-d", "2e-3", "--out", tmp_path]) == 0

    def sigmas(G):
        with torch.no_grad():
            return [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in G.modules()
                    if torch.nn.utils.parametrize.is_parametrized(m, "weight")]
    G_ema, _ = ev.load_generator(str(tmp_path / "ckpt.pt"))
    assert len(sigmas(G_ema)) == 15 and max(abs(s - 1) for s in sigmas(G_ema)) < 1e-5
    G_vectors = {k: v for k, v in runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["G"].items() if k.endswith(("._u", "._v"))}
    G_ema.load_state_dict({**G_ema.state_dict(), **G_vectors})
    assert max(sigmas(G_ema)) > 1.001


class PlainG(torch.nn.Module):
    """A generator without batch norm or spectral norm, (z, y) -> (B, 3, 32, 32): its images and
    gradients do not depend on how a batch is split, so the update rules can be checked exactly."""

    attention_layers = []

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.linear, self.embed = torch.nn.Linear(cfg.z_dim, 3 * 32 * 32), torch.nn.Embedding(cfg.n_classes, 3 * 32 * 32)

    def forward(self, z, y):
        return torch.tanh(self.linear(z) + self.embed(y)).view(-1, 3, 32, 32)


def split_batch_gan(accum, plain_g=True, batch=16, world=1, **model):
    """A GAN of the tiny config with global batch 16, its G PlainG or the real one, and a fixed
    batch: real images and labels, and the z and labels of the fake ones."""
    cfg, _ = train.parse_config(TINY + ["--batch-size", str(batch), "--accum", str(accum)])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_classes=5, **model))
    torch.manual_seed(0)
    generator = train.Generator
    train.Generator = PlainG if plain_g else generator
    try:
        gan = train.GAN(cfg, torch.device("cpu"), world)
    finally:
        train.Generator = generator
    gen = torch.Generator().manual_seed(1)
    fixed = dict(x=torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1, y=torch.randint(0, 5, (batch,), generator=gen),
                 z=torch.randn(batch, cfg.model.z_dim, generator=gen), y_fake=torch.randint(0, 5, (batch,), generator=gen))
    return gan, fixed


def feed(gan, fixed, cuts, steps=("D", "G")):
    """Makes `gan` draw its real batches and the latents of its fake ones from `fixed`, a
    micro-batch per slice of `cuts`, in each of `steps` (the D step draws real and fake, the G
    step fake). Returns the real batches."""
    latents = iter([(fixed["z"][c], fixed["y_fake"][c]) for c in cuts] * len(steps))
    gan.latents = lambda count: next(latents)
    return iter([(fixed["x"][c], fixed["y"][c]) for c in cuts])


WHOLE, HALVES = [slice(0, 16)], [slice(0, 8), slice(8, 16)]


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def same(a, b, tol=1e-5):
    """Tensors equal up to float32 round-off: each pair within tol of its norm."""
    return all((p - q).norm() <= tol * p.norm().clamp(min=1e-12) for p, q in zip(a, b))


def test_accumulation_gives_the_gradients_of_the_whole_batch():
    """--accum 2 is the same batch in two halves: D has no batch norm, so its gradient, its step
    and its spectral norm (one power iteration per D step) equal those of the whole batch, and so
    does the gradient of a generator without batch norm. A step that ignores the accumulation
    (no division by it, one micro-batch only) fails here."""
    whole, fixed = split_batch_gan(accum=1)
    halves, _ = split_batch_gan(accum=2)
    whole.iteration(feed(whole, fixed, WHOLE))
    halves.iteration(feed(halves, fixed, HALVES))
    for net in ("D", "G"):
        a, b = getattr(whole, net), getattr(halves, net)
        assert same(grads(a), grads(b)), net
        assert same(a.parameters(), b.parameters()), net
    assert same(whole.D.buffers(), halves.D.buffers())


def test_accumulation_in_a_generator_with_batch_norm_averages_the_half_batch_gradients():
    """G's batch norm normalises each micro-batch by its own statistics, so G's gradient under
    accumulation cannot be that of the whole batch: it is the mean of the gradients of the two
    halves, each a batch of its own (G without spectral norm here, whose power iterations run per
    forward: difference 7)."""
    first, fixed = split_batch_gan(accum=1, plain_g=False, g_sn=False)
    second, _ = split_batch_gan(accum=1, plain_g=False, g_sn=False)
    halves, _ = split_batch_gan(accum=2, plain_g=False, g_sn=False)
    for gan, cuts in ((first, HALVES[:1]), (second, HALVES[1:]), (halves, HALVES)):
        feed(gan, fixed, cuts, steps=("G",))
        gan.g_step(8)
    mean = [(p + q) / 2 for p, q in zip(grads(first.G), grads(second.G))]
    assert same(mean, grads(halves.G))
    assert not same(grads(first.G), grads(halves.G), tol=1e-2)


@pytest.mark.parametrize("accum", [1, 2])
def test_power_iterations_per_step_are_those_of_difference_7(accum):
    """One iteration: D's spectral norm iterates once (one D step, real and fake in one batch, only
    the first micro-batch in training mode), G's once per training-mode forward: 2 x --accum."""
    gan, fixed = split_batch_gan(accum=accum, plain_g=False)
    counts = {"G": 0, "D": 0}
    for name in counts:
        for m in getattr(gan, name).modules():
            if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                normalise = m.parametrizations.weight[0]
                power = normalise._power_method

                def counted(*args, power=power, name=name, first=m is getattr(gan, name).linear):
                    counts[name] += first  # one module of each network counts for all
                    return power(*args)
                normalise._power_method = counted
    gan.iteration(feed(gan, fixed, WHOLE if accum == 1 else HALVES))
    assert counts == {"G": 2 * accum, "D": 1}


def ddp_process(rank, folder):
    """One of two gloo processes: half of the global batch each, gradients and weights to files."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        gan, fixed = split_batch_gan(accum=1, world=2)
        mine = [slice(8 * rank, 8 * rank + 8)]
        gan.iteration(feed(gan, fixed, mine))
        torch.save({"G": grads(gan.G), "D": grads(gan.D)}, f"{folder}/grads{rank}.pt")
        for _ in range(2):
            gan.iteration(feed(gan, fixed, mine))
        torch.save({"G": gan.G.state_dict(), "D": gan.D.state_dict()}, f"{folder}/state{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_processes_step_with_the_gradient_of_the_whole_batch(tmp_path):
    """Two gloo processes, each with half of the batch: after one step every parameter's gradient
    equals that of the whole batch in one process, and after three steps the processes hold the
    same weights. A step that goes around the DDP wrapper, which averages the gradients over the
    processes, fails here."""
    torch.multiprocessing.spawn(ddp_process, args=(str(tmp_path),), nprocs=2)
    whole, fixed = split_batch_gan(accum=1)
    whole.iteration(feed(whole, fixed, WHOLE))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert same(grads(whole.G), got["G"]) and same(grads(whole.D), got["D"]), rank
    states = [torch.load(tmp_path / f"state{rank}.pt") for rank in (0, 1)]
    for net in ("G", "D"):
        assert all(torch.equal(states[0][net][k], states[1][net][k]) for k in states[0][net]), net


@pytest.mark.slow
def test_ddp_with_two_gloo_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *TINY, "--steps", "3", "--device", "cpu", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr  # whole: torchrun's summary at the end does not say what failed
    assert p.stdout.count("step 3/3") == 1  # only rank 0 logs
    ckpt = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 3
    from sagan import Generator, ModelConfig
    G = Generator(ModelConfig(**ckpt["model"]))
    G.load_state_dict(ckpt["G"])


@pytest.mark.parametrize("device", DEVICES)
def test_spectral_norm_runs_outside_bf16_autocast(device):
    """sn_in_fp32 computes every normalised weight before autocast starts, once per forward, so
    on CUDA (where autocast would run the power iteration's matrix-vector products in bf16)
    sigma stays fp32. A hook on each spectral-norm parametrization records whether autocast
    was on when it ran."""
    torch.manual_seed(0)
    D = Discriminator(ModelConfig(size=32, ch=8, n_classes=10, attn=(16,))).to(device)
    calls = []
    for m in D.modules():
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight[0].register_forward_pre_hook(
                lambda mod, args: calls.append(torch.is_autocast_enabled(device)))
    x, y = torch.randn(2, 3, 32, 32, device=device), torch.tensor([1, 2], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        D(x, y)
    assert calls and all(calls)  # without it: inside autocast
    calls.clear()
    with train.sn_in_fp32(D), torch.autocast(device, dtype=torch.bfloat16):
        D(x, y)
    assert len(calls) == 16 and not any(calls)  # each of D's 16 weights once, before autocast


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_steps_are_finite(tmp_path, device):
    assert train.main(TINY + ["--steps", "3", "--precision", "bf16", "--device", device, "--out", tmp_path]) == 0
    log = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert all(np.isfinite(log[-1][k]) for k in ("loss_d_real", "loss_d_fake", "loss_g"))


@pytest.mark.slow
def test_eval_every_logs_is_and_fid_during_training(fid_weights, tmp_path):
    mu, sigma = np.zeros(2048), np.eye(2048)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    assert train.main(TINY + ["--steps", "2", "--eval-every", "2", "--eval-n", "10", "--out", tmp_path / "run",
                              "--inception-weights", fid_weights, "--ref-stats", tmp_path / "stats.npz"]) == 0
    lines = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    metrics = [l for l in lines if "IS" in l]
    assert len(metrics) == 1 and metrics[0]["step"] == 2
    assert metrics[0]["IS"] >= 1.0 and metrics[0]["FID"] > 0


@pytest.mark.slow
def test_eval_every_without_inception_weights_warns_once_and_trains(tmp_path, capsys):
    assert train.main(TINY + ["--steps", "4", "--eval-every", "2", "--eval-n", "10", "--out", tmp_path,
                              "--inception-weights", tmp_path / "missing.pth"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: no IS/FID during training") == 1
    assert not [l for l in open(tmp_path / "log.jsonl") if '"IS"' in l]



# ---------------------------------------------------------------------------------------------
# Data files: every image mode, class folders, CIFAR-10, prepared arrays
# ---------------------------------------------------------------------------------------------


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
    with pytest.raises(UserError, match="no class subfolders"):
        make_dataset("imagenet", flat, 8)
    (tmp_path / "top" / "train").mkdir(parents=True)
    (tmp_path / "dog").rename(tmp_path / "top" / "train" / "n02084071")
    with pytest.raises(UserError, match="pass .*train"):
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
        with pytest.raises(UserError, match=message) as info:
            make_dataset(*args)
        assert "\n" not in str(info.value)


def test_all_images_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    d = make_dataset("folder", tmp_path, 8)
    with pytest.warns(UserWarning), pytest.raises(UserError, match="none of the 1 images"):
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
    with pytest.raises(UserError, match="cifar-10-python.tar.gz") as info:
        make_dataset("cifar10", tmp_path, 32)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


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
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["images.npy", "labels.npy", "meta.json"]
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

    with pytest.raises(UserError, match="is 12x12, not 16x16; prepare it again with --size 16"):
        make_dataset("prepared", out, 16)
    # A worker process gets the file name, not a copy of the whole array.
    assert len(pickle.dumps(prepared)) < 3000 and np.array_equal(
        pickle.loads(pickle.dumps(prepared)).pixels(5)[0], prepared.pixels(5)[0])
    (out / "images.npy").unlink()
    with pytest.raises(UserError, match="incomplete"):
        make_dataset("prepared", out, 12)


@pytest.mark.slow
def test_prepare_command_line(tmp_path):
    save_odd_images(tmp_path / "images")
    command = [sys.executable, os.path.join(HERE, "data.py"), "prepare", "--data", "folder",
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
    typo = subprocess.run(command[:-4] + ["--size", "8x", "--out", str(tmp_path / "out3")], capture_output=True,
                          text=True, timeout=120)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == ["error: argument --size: invalid int value: '8x' (see --help)"]


@pytest.mark.slow
def test_folder_of_odd_images_trains_and_reports_skipped_files(tmp_path, capsys):
    """Grayscale, RGBA, palette, CMYK and 16-bit images train; a corrupt file and a text file
    are skipped, named and counted in the summary, and nothing crashes mid-epoch."""
    save_odd_images(tmp_path / "images")
    # Two loader processes: the unreadable file is found inside a worker, and still reported.
    code = train.main(["--data", "folder", "--data-root", tmp_path / "images", "--size", "32", "--ch", "8",
                       "--batch-size", "2", "--steps", "5", "--log-every", "5", "--workers", "2",
                       "--out", tmp_path / "run"])
    assert code == 0
    out = capsys.readouterr().out
    assert '"n_classes": 0' in out  # a flat folder: unconditional
    assert "skipped 1 non-image file (notes.txt), 1 unreadable image (corrupt.png)" in out
    assert runs.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 5



# ---------------------------------------------------------------------------------------------
# Mistakes on train.py's command line: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_imagenet_root_is_one_clear_line(tmp_path):
    code, out, err = run_cli("train.py", "--data", "imagenet", "--data-root", "/nonexistent", "--out", tmp_path / "run")
    assert code != 0
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert err.startswith("error:") and "/nonexistent" in err


@pytest.fixture(scope="module")
def bad_train_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_train")
    (d / "empty").mkdir()
    (d / "junk.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    torch.save({"format": "sagan-checkpoint", "version": 99}, d / "v99.pt")
    assert train.main(TINY + ["--steps", "1", "--device", "cpu", "--out", d / "run"]) == 0  # before the autouse CPU fixture
    whole = (d / "run" / "ckpt.pt").read_bytes()
    (d / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    return d


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--data", "mnist"], "unknown data source 'mnist'"),
    (["--data", "imagenet"], "needs --data-root"),
    (["--data", "folder", "--data-root", "{d}/missing"], "does not exist"),
    (["--data", "folder", "--data-root", "{d}/empty"], "no images found"),
    (["--data", "prepared", "--data-root", "{d}/empty"], "no prepared data"),
    (["--size", "48"], "size 48 is not supported"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr-g", "0"], "--lr-g must be positive"),
    (["--lr-d=-1e-4"], "--lr-d must be positive"),
    (["--beta2", "1.5"], "must lie in [0, 1)"),
    (["--batch-size", "10", "--accum", "3"], "must divide"),
    (["--attn", "8,x"], "--attn takes integers such as 64 or 32,64, or none"),
    (["--attn", "32"], "attention resolution 32 is not a feature-map size"),
    (["--device", "tpu"], "--device tpu is not supported"),
    (["--seed", "-1"], "--seed must lie in [0, 4294967294]"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--seed", "4294967296"], "--seed must lie in [0, 4294967294]"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--resume", "{d}/missing.pt"], "does not exist"),
    (["--resume", "{d}/junk.pt"], "not a readable sagan checkpoint"),
    (["--resume", "{d}/truncated.pt"], "not a readable sagan checkpoint"),
    (["--resume", "{d}/foreign.pt"], "is not a sagan checkpoint"),
    (["--resume", "{d}/v99.pt"], "format version 99"),
    (["--eval-every", "5", "--ref-stats", "{d}/junk.pt"], "cannot read the statistics file"),
    (["--eval-every", "5", "--eval-n", "5"], "--eval-n must be at least 10"),
    (["--dims", "4"], "dims 4 is not supported"),
    (["--dims", "3", "--size", "64"], "size 64 is not supported at dims 3"),
    (["--dims", "3", "--data", "cifar10"], "cifar10 data is 2-D and the model 3-D"),
    (["--data", "synthetic3d", "--dims", "2", "--size", "32"], "synthetic3d data is 3-D and the model 2-D"),
    (["--dims", "3", "--eval-every", "5", "--ref-stats", "{d}/junk.pt"], "IS and FID are defined for images, not volumes"),
])
def test_train_user_errors_print_one_line_and_exit_2(args, message, bad_train_inputs, tmp_path, capsys):
    argv = [a.format(d=bad_train_inputs) for a in args] + ["--out", tmp_path / "out"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_unwritable_output_folder_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train.main(TINY + ["--steps", "1", "--out", tmp_path / "file" / "run"]) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_another_model_names_the_conflict(tmp_path, capsys):
    assert train.main(TINY + ["--steps", "1", "--out", tmp_path]) == 0
    assert train.main(["--resume", "--out", tmp_path, "--ch", "16", "--attn", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ch (checkpoint: 8, now: 16)" in err and "attn" in err



# ---------------------------------------------------------------------------------------------
# Faults, for real: kills, signals, divergence, full disks, damaged and hostile files
# ---------------------------------------------------------------------------------------------


def start_training(out, *extra):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)


def wait_for_new(path, proc, timeout=90):
    """Wait until `proc` has written `path` (a new file, or a newer one)."""
    t, before = time.time(), os.path.getmtime(path) if os.path.exists(path) else 0
    while not os.path.exists(path) or os.path.getmtime(path) == before:
        assert proc.poll() is None, proc.communicate()[1]  # a string, which pytest shows whole
        assert time.time() - t < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    """A checkpoint every step, so most kills land during or next to a write."""
    rng = pyrandom.Random(0)
    ckpt, steps_seen = tmp_path / "ckpt.pt", []
    for attempt in range(4):
        extra = ["--steps", "1000", "--ckpt-every", "1"] + (["--resume"] if attempt else [])
        proc = start_training(tmp_path, *extra)
        wait_for_new(ckpt, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()  # SIGKILL: no handler runs, no cleanup
        proc.communicate()
        steps_seen.append(runs.load_checkpoint(str(ckpt))["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]  # resumed, went on
    assert train.main(TINY + ["--resume", "--out", tmp_path, "--steps", steps_seen[-1] + 2]) == 0
    assert runs.load_checkpoint(str(ckpt))["step"] == steps_seen[-1] + 2
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # stale temp files cleaned


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    proc = start_training(tmp_path, "--steps", "100000", "--log-every", "1")
    while "step 2/" not in proc.stdout.readline():
        assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "checkpoint saved" in out and "Traceback" not in err
    step = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert 2 <= step < 100000 and f"at step {step}" in out


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_process_at_one_step_and_saves(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *TINY, "--steps", "100000", "--log-every", "1", "--device", "cpu",
           "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while "step 2/" not in proc.stdout.readline():
        assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both processes
    out, err = proc.communicate(timeout=120)
    step = runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert step >= 2 and f"stopped by signal 15 at step {step}" in out
    # torchrun itself reports the signal with a traceback of its own; no process of ours crashed.
    assert f'File "{os.path.join(HERE, "train.py")}"' not in err


def test_a_second_signal_stops_at_once_and_frees_the_folder(tmp_path, monkeypatch, capsys):
    assert train.main(TINY + ["--steps", "2", "--ckpt-every", "2", "--out", tmp_path]) == 0
    good = (tmp_path / "ckpt.pt").read_bytes()
    real_iteration = train.GAN.iteration

    def stuck(self, batches):  # as if blocked in a read: only a signal gets it out
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        return real_iteration(self, batches)
    monkeypatch.setattr(train.GAN, "iteration", stuck)
    start = time.time()
    assert train.main(["--resume", "--out", tmp_path, "--steps", "10"]) == 130
    assert time.time() - start < 30 and "second signal" in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    monkeypatch.setattr(train.GAN, "iteration", real_iteration)
    assert train.main(["--resume", "--out", tmp_path, "--steps", "3"]) == 0  # the folder is free again


@pytest.mark.slow
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A full disk during a write: the old checkpoint stays, a warning says so, training goes on."""
    assert train.main(TINY + ["--steps", "2", "--ckpt-every", "2", "--out", tmp_path]) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code = train.main(["--resume", "--out", tmp_path, "--steps", "5", "--ckpt-every", "1"])
    assert code == 2  # the final checkpoint could not be written: not a silent success
    err = capsys.readouterr().err
    assert "No space left on device" in err and "intact" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loss", "weight"])
def test_divergence_stops_with_the_step_and_the_quantity(tmp_path, monkeypatch, capsys, where):
    assert train.main(TINY + ["--steps", "3", "--ckpt-every", "3", "--out", tmp_path]) == 0
    good = (tmp_path / "ckpt.pt").read_bytes()
    real_iteration = train.GAN.iteration

    def poisoned(self, batches):
        stats = real_iteration(self, batches)
        if where == "loss":
            return torch.cat([stats[:2], torch.tensor([float("nan")]), stats[3:]])
        with torch.no_grad():
            self.G.conv_out.parametrizations.weight.original.fill_(float("inf"))
        return stats
    monkeypatch.setattr(train.GAN, "iteration", poisoned)
    code = train.main(["--resume", "--out", tmp_path, "--steps", "6", "--ckpt-every", "1"])
    assert code == 3
    err = capsys.readouterr().err
    expected = "loss_g is nan at step 4" if where == "loss" else "G.conv_out.parametrizations.weight.original"
    assert expected in err and "last good checkpoint" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """torch.load(weights_only=True) never runs a pickle's code; a test that would notice if it did."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "sagan-checkpoint", "version": 1, "G": Exploit()}, f)
    with pytest.raises(UserError, match="unsafe"):
        runs.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()


@pytest.mark.slow
def test_a_fresh_run_never_destroys_the_run_in_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--steps", "4", "--log-every", "1", "--ckpt-every", "4", "--out", out]) == 0
    before = snapshot(out)
    # The most common thing a user does: the same command again, or a shorter one.
    assert train.main(TINY + ["--steps", "3", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run (its checkpoint is at step 4)" in err
    assert "--resume" in err and "--overwrite" in err
    # A mistake found late (a statistics file that is not there) touches nothing either.
    assert train.main(["--resume", "--out", out, "--steps", "6", "--eval-every", "2",
                       "--ref-stats", tmp_path / "missing.npz"]) == 2
    assert "cannot read the statistics file" in capsys.readouterr().err
    assert train.main(["--resume", "--overwrite", "--out", out]) == 2
    assert snapshot(out) == before
    # --overwrite starts afresh: the old checkpoint, log and samples go.
    assert train.main(TINY + ["--steps", "2", "--log-every", "1", "--overwrite", "--out", out]) == 0
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2]
    assert runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    assert os.listdir(out / "samples") == ["step_0000002.png"]


@pytest.mark.slow
def test_every_check_runs_before_the_folder_changes_and_overwrite_keeps_the_old_run(tmp_path, capsys):
    """Mistakes that can only be found by building the run (data with fewer images than a batch,
    images that cannot be read, a checkpoint whose state does not fit) leave the run in the folder
    as it was, --overwrite included. An --overwrite killed (SIGKILL) before its first checkpoint
    leaves the old run whole in OUT/previous/, which a fresh run will not pass over."""
    out = tmp_path / "run"
    assert train.main(TINY + ["--steps", "2", "--log-every", "1", "--out", out]) == 0
    before = snapshot(out)
    few, junk = tmp_path / "few", tmp_path / "junk"
    save_odd_images(few)  # seven images, fewer than a batch of 8
    junk.mkdir()
    for i in range(10):
        (junk / f"{i}.png").write_bytes(b"not a png")
    damaged = tmp_path / "damaged.pt"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["G"] = {k: v[..., :1] if v.dim() > 1 else v for k, v in ckpt["G"].items()}  # the wrong shapes
    torch.save(ckpt, damaged)
    for args, message in [(["--data", "folder", "--data-root", few], "fewer than one batch of 8"),
                          (["--data", "folder", "--data-root", junk], "none of the 10 images"),
                          (["--resume", damaged, "--out", tmp_path / "other", "--steps", "3"], "its state does not fit the model")]:
        argv = (TINY if args[0] != "--resume" else []) + args + (["--overwrite", "--out", out] if args[0] != "--resume" else [])
        assert train.main(argv) == 2
        assert message in capsys.readouterr().err
        assert snapshot(out) == before
    assert not (tmp_path / "other").exists()
    proc = start_training(out, "--overwrite", "--steps", "100000", "--log-every", "1", "--ckpt-every", "100000")
    while "step 1/" not in proc.stdout.readline():
        assert proc.poll() is None, proc.communicate()[1]
    proc.kill()
    proc.communicate()
    assert {k: v for k, v in snapshot(out / "previous").items()} == \
        {k: v for k, v in before.items() if k.split("/")[0] in ("ckpt.pt", "log.jsonl", "config.json", "samples")}
    assert train.main(TINY + ["--steps", "2", "--out", out]) == 2
    assert "moved aside by an --overwrite that did not reach its first checkpoint" in capsys.readouterr().err
    assert train.main(TINY + ["--steps", "2", "--overwrite", "--out", out]) == 0  # its first checkpoint
    assert not (out / "previous").exists() and runs.load_checkpoint(str(out / "ckpt.pt"))["step"] == 2


@pytest.mark.slow
def test_no_output_lands_on_an_input_or_on_another_runs_files(tmp_path, capsys):
    """Resuming another run's checkpoint into a folder that holds a run of its own, evaluate.py's and
    measures.py's JSON onto the checkpoint they read or onto another run's files, a run or prepared
    arrays inside the data folder they read: each is refused, and nothing changes."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert train.main(TINY + ["--steps", "1", "--out", run]) == 0
    before = snapshot(b)
    assert train.main(["--resume", a / "ckpt.pt", "--out", b, "--steps", "2"]) == 2
    assert f"{b} holds a run of its own" in capsys.readouterr().err and snapshot(b) == before
    for main, extra in ((ev.main, ["--inception-weights", a / "ckpt.pt"]), (measures.main, [])):
        assert main(["--ckpt", str(b / "ckpt.pt"), "--out", str(b / "ckpt.pt"), *map(str, extra)]) == 2
        assert "is also an input of this command" in capsys.readouterr().err
    assert ev.main(["--ckpt", str(b / "ckpt.pt"), "--out", str(a / "log.jsonl")]) == 2
    assert f"is a file of the run in {a}" in capsys.readouterr().err
    assert snapshot(b) == before
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "cat" / "a.png")
    assert train.main(TINY + ["--data", "folder", "--data-root", images, "--out", images / "run"]) == 2
    assert "is also an input of this command" in capsys.readouterr().err
    assert data.main(["prepare", "--data", "folder", "--data-root", str(images), "--size", "32", "--out", str(images)]) == 2
    assert "is also an input of this command" in capsys.readouterr().err
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*")) == ["cat", "cat/a.png"]


@pytest.mark.slow
def test_an_input_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys):
    """Real FIFOs named like a checkpoint, a log, prepared labels, statistics and an image: opening
    one would block forever; each is one line, at once."""
    run = tmp_path / "run"
    assert train.main(TINY + ["--steps", "1", "--out", run]) == 0
    data.prepare("synthetic", None, 32, tmp_path / "prep", workers=0, length=12, log=open(os.devnull, "w"))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    fifos = {"ckpt": tmp_path / "fifo.pt", "stats": tmp_path / "stats.npz", "image": tmp_path / "images" / "b.png"}
    for path in fifos.values():
        os.mkfifo(path)
    (run / "log.jsonl").unlink()
    os.mkfifo(run / "log.jsonl")
    (tmp_path / "prep" / "labels.npy").unlink()
    os.mkfifo(tmp_path / "prep" / "labels.npy")
    cases = [(train.main, ["--resume", fifos["ckpt"], "--out", tmp_path / "x"], "the checkpoint"),
             (train.main, ["--resume", "--out", run, "--steps", "2"], "the log"),
             (train.main, TINY + ["--data", "prepared", "--data-root", tmp_path / "prep", "--out", tmp_path / "y"],
              "prepared labels"),
             (ev.main, ["--images", tmp_path / "images", "--ref-stats", fifos["stats"]], "the statistics file"),
             (measures.main, ["--ckpt", fifos["ckpt"]], "the checkpoint")]
    for main, args, what in cases:
        start = time.time()
        assert main([str(a) for a in args]) == 2 and time.time() - start < 30
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and f"{what} " in err and "not a regular file" in err, err
    count, batches = ev.real_images(str(tmp_path / "images"), 10, 5)  # the FIFO image is left out, with a warning
    assert count == 1 and next(batches).shape == (1, 3, 8, 8)


@pytest.mark.slow
def test_every_failure_a_user_can_cause_is_one_line(tmp_path, capsys, monkeypatch):
    """Deeply nested JSON in a log line and in a prepared meta.json, statistics that are a damaged
    zip or an absurd array, a size too large for memory, seeds out of range, malformed torchrun
    variables, a file name the terminal cannot print, a leftover RANK: each an error line, exit 2."""
    run = tmp_path / "run"
    assert train.main(TINY + ["--steps", "1", "--out", run]) == 0
    with open(run / "log.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    assert train.main(["--resume", "--out", run, "--steps", "2"]) == 0
    assert "dropped 1 damaged line of 2" in capsys.readouterr().err
    data.prepare("synthetic", None, 8, tmp_path / "prep", workers=0, length=12, log=open(os.devnull, "w"))
    (tmp_path / "prep" / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    damaged = bytearray((tmp_path / "stats.npz").read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = b"\xff" * 64
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    absurd = tmp_path / "absurd.npy"
    absurd.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999,), }" +
                       b" " * 40 + b"\n")
    cases = [(train.main, TINY + ["--data", "prepared", "--data-root", tmp_path / "prep", "--out", tmp_path / "a"],
              "not readable JSON"),
             (ev.main, ["--images", tmp_path / "prep" / "images.npy", "--ref-stats", tmp_path / "damaged.npz"],
              "cannot read the statistics file"),
             (ev.main, ["--images", absurd], "cannot read"),
             (train.main, TINY + ["--ch", "10000000", "--steps", "1", "--out", tmp_path / "b"], "not enough memory"),
             (ev.main, ["--ckpt", run / "ckpt.pt", "--grid", "--seed", "-1"], "--seed must lie in"),
             (measures.main, ["--ckpt", run / "ckpt.pt", "--seed", str(2**40)], "--seed must lie in")]
    for main, args, message in cases:
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    for env, message in [({"WORLD_SIZE": "two"}, "must be integers"), ({"RANK": "1"}, "RANK 1 is not a process of")]:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert train.main(TINY + ["--steps", "1", "--out", tmp_path / "c"]) == 2
            assert message in capsys.readouterr().err and not (tmp_path / "c").exists()
    odd = tmp_path / "bad\udcffname"
    code = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--ckpt", os.fsencode(odd)],
                          capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii:strict"}).returncode
    assert code == 2


@pytest.mark.slow
def test_samples_that_are_not_finite_are_an_error_in_every_measurement_and_picture(tmp_path, capsys):
    """NaN samples would turn into black pictures and a perfect mirror error of 0: no measurement
    or picture takes them. NaN weights are refused when the checkpoint is read; finite weights can still draw NaN (here a
    negative running variance), which the samples' own check catches."""
    path = make_checkpoint(tmp_path / "ckpt.pt", n_classes=10)
    ckpt = torch.load(path, weights_only=True)
    ckpt["train"] = {"data": "synthetic"}
    for key, value, message in (("conv_out.parametrizations.weight.original", float("nan"), "weights that are not finite"),
                                ("blocks.0.bn1.bn.running_var", -1.0, "samples hold NaN or infinite values")):
        broken = dict(ckpt, G_ema={k: v.clone().fill_(value) if k.endswith(key) else v for k, v in ckpt["G_ema"].items()})
        torch.save(broken, path)
        for main, args in ((measures.main, ["--mirror", "--n", "10"]), (measures.main, ["--n", "20"]),
                           (ev.main, ["--grid"]), (ev.main, ["--attention"])):
            assert main(["--ckpt", path, *args]) == 2
            assert message in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "fig5.png").exists()


@pytest.mark.slow
def test_hostile_checkpoints_are_refused_before_the_folder_changes(tmp_path, capsys):
    """Crafted checkpoints given to --resume: a step of the wrong type or below 0, a model field
    of the wrong type or unknown to this code, an optimizer state of the wrong shape (fused Adam would read and write out of
    bounds), weights that are NaN or -inf. Each is one line, and the new folder is never made."""
    base = tmp_path / "base"
    assert train.main(TINY + ["--steps", "2", "--out", base]) == 0
    capsys.readouterr()
    ckpt = torch.load(base / "ckpt.pt", weights_only=True)
    state = next(iter(ckpt["opt_G"]["state"].values()))
    crafted = {"step 2.5": ("step", 2.5), "step -5": ("step", -5), "ch '8'": ("model", {**ckpt["model"], "ch": "8"}),
               "foo": ("model", {**ckpt["model"], "foo": 1}),
               "opt_G": ("opt_G", {**ckpt["opt_G"], "state": {**ckpt["opt_G"]["state"], 0: {**state, "exp_avg": torch.zeros(7)}}}),
               "nan": ("G", {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["G"].items()}),
               "-inf": ("G", {**ckpt["G"], "blocks.0.bn1.bias.weight": ckpt["G"]["blocks.0.bn1.bias.weight"].fill_(float("-inf"))})}
    messages = {"step 2.5": "its step is not what train.py writes", "step -5": "its step is not what train.py writes",
                "ch '8'": "--ch must be int", "foo": "the model differs in foo (checkpoint: 1, now: none)",
                "opt_G": "opt_G holds a state of another shape",
                "nan": "holds weights that are not finite", "-inf": "holds weights that are not finite"}
    for name, (key, value) in crafted.items():
        path = tmp_path / f"{name}.pt"
        torch.save({**ckpt, key: value}, path)
        out = tmp_path / f"out {name}"
        assert train.main(["--resume", path, "--out", out, "--steps", "4"]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and messages[name] in err and not out.exists(), (name, err)


@pytest.mark.slow
def test_a_run_folder_is_its_own(tmp_path, capsys):
    """A run killed before its first checkpoint (its log and config, no ckpt.pt) is a run, which a
    fresh run does not overwrite; a run folder whose log or samples/ is a link into another run,
    or whose lock is a hard link to another file, is refused, and the other files stay whole."""
    a, b = tmp_path / "a", tmp_path / "b"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--steps", "100000", "--log-every", "1",
                             "--ckpt-every", "100000", "--out", str(a)], stdout=subprocess.PIPE, text=True, cwd=HERE)
    while "step 2/" not in proc.stdout.readline():
        assert proc.poll() is None
    proc.kill()  # SIGKILL, before any checkpoint
    proc.communicate()
    before = snapshot(a)
    assert train.main(TINY + ["--steps", "2", "--out", a]) == 2
    assert "holds a run that has no checkpoint yet" in capsys.readouterr().err and snapshot(a) == before
    assert train.main(TINY + ["--steps", "2", "--out", b]) == 0
    for name in ("log.jsonl", "samples"):
        target = b / name
        moved = tmp_path / f"{name}.b"
        target.rename(moved)
        os.symlink(a / name, target)
        assert train.main(["--resume", "--out", b, "--steps", "3"]) == 2
        assert f"{target} is a symbolic link" in capsys.readouterr().err and snapshot(a) == before
        target.unlink()
        moved.rename(target)
    (b / ".lock").unlink()
    os.link(a / "config.json", b / ".lock")
    assert train.main(["--resume", "--out", b, "--steps", "3"]) == 2
    assert "it is a hard link to another file" in capsys.readouterr().err and snapshot(a) == before


@pytest.mark.slow
def test_unreadable_data_read_by_loader_workers_is_one_line(tmp_path, capsys):
    """A folder of images none of which decodes, read by two DataLoader workers: the worker's
    error arrives wrapped in its traceback, and is still one line."""
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(b"\x89PNG garbage")
    code, out, err = run_cli("train.py", "--data", "folder", "--data-root", tmp_path / "data", "--size", "32", "--ch", "8",
                             "--batch-size", "4", "--steps", "1", "--workers", "2", "--out", tmp_path / "run")
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2 and errors == [f"error: none of the 8 images under {tmp_path / 'data'} can be read"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_second_process_in_a_run_folder_is_refused_and_the_first_goes_on(tmp_path, capsys):
    proc = start_training(tmp_path, "--steps", "100000", "--log-every", "1", "--ckpt-every", "2")
    try:
        while "step 3/" not in proc.stdout.readline():
            assert proc.poll() is None, proc.communicate()[1]  # a string, which pytest shows whole
        for extra in (["--resume"], ["--overwrite"]):
            assert train.main(TINY + extra + ["--out", tmp_path]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is in use by a training run (pid {proc.pid})" in err, err
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    steps = [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")]
    assert steps == list(range(1, steps[-1] + 1))  # every step once, in order
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == steps[-1]
    assert train.main(TINY + ["--resume", "--out", tmp_path, "--steps", steps[-1] + 1]) == 0  # the lock is gone


def test_stale_temporary_files_are_removed_only_when_their_owner_is_gone(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        names = [f"ckpt.pt.tmp{dead.pid}", f"ckpt.pt.tmp{alive.pid}", f".staging{dead.pid}", "notes.tmp", "ckpt.pt"]
        for name in names:
            (tmp_path / name).write_text("x")
        runs.remove_stale(tmp_path)
        assert sorted(os.listdir(tmp_path)) == sorted(names[1:2] + names[3:])
    finally:
        alive.kill()
        alive.wait()


def test_full_disk_through_dev_full_is_one_warning_per_kind_and_training_goes_on(tmp_path, capsys):
    """/dev/full answers every write with a genuine ENOSPC: the sample grid, the checkpoint and
    config.json go through it via links to their temporary names, and each is written by the real
    code (the log's failures are the real full disk's, below). A log that is itself such a device
    is an input that is not a regular file: refused in one line, the run untouched."""
    assert train.main(TINY + ["--steps", "5", "--ckpt-every", "5", "--out", tmp_path]) == 0
    capsys.readouterr()
    pid = os.getpid()
    for name in (f"ckpt.pt.tmp{pid}", f"config.json.tmp{pid}", f"samples/step_0000006.png.tmp{pid}"):
        os.symlink("/dev/full", tmp_path / name)
    assert train.main(["--resume", "--out", tmp_path, "--steps", "8", "--ckpt-every", "1", "--log-every", "1",
                       "--sample-every", "6"]) == 0
    err = capsys.readouterr().err
    for what in ("config.json", "sample grid"):
        assert err.count(f"could not write the {what} in") == 1, err
    assert err.count("could not write the checkpoint at step 6 (No space left on device); the previous one") == 1
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8  # the next saves worked
    assert not [p for p in tmp_path.rglob("*.tmp*") if not p.is_symlink()]
    before = snapshot(tmp_path)
    (tmp_path / "log.jsonl").unlink()
    os.mknod(tmp_path / "log.jsonl", stat.S_IFCHR | 0o666, os.makedev(1, 7))  # /dev/full itself, not a link to it
    assert train.main(["--resume", "--out", tmp_path, "--steps", "9"]) == 2
    assert capsys.readouterr().err == f"error: the log {tmp_path / 'log.jsonl'} is not a regular file\n"
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8 and \
        {k: v for k, v in snapshot(tmp_path).items() if k != "log.jsonl"} == \
        {k: v for k, v in before.items() if k != "log.jsonl"}


@pytest.mark.slow
def test_a_really_full_disk_keeps_every_previous_file_whole(small_disk, capsys):
    """On a full filesystem torch.save fails inside its zip writer (a RuntimeError, not an
    OSError), appends stop half-way and memory maps cannot grow: the checkpoint, the log, the
    statistics and the prepared data stay as they were, each failure is one line, and a final
    checkpoint that cannot be written is exit 2."""
    run, prep = small_disk / "run", small_disk / "prep"
    assert train.main(TINY + ["--steps", "3", "--log-every", "1", "--ckpt-every", "3", "--out", run]) == 0
    data.prepare("synthetic", None, 8, prep, workers=0, length=20, log=open(os.devnull, "w"))
    np.savez(small_disk / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with open(run / "log.jsonl", "a") as f:  # a valid line that ends the log on a page boundary,
        size = f.tell() + len('{"step": 3, "pad": ""}\n')  # so that the next line needs a new page
        f.write(json.dumps({"step": 3, "pad": "x" * (-size % 4096)}) + "\n")
    before = snapshot(small_disk)
    fill(small_disk)
    capsys.readouterr()
    assert train.main(["--resume", "--out", run, "--steps", "6", "--log-every", "1", "--ckpt-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint at step 4" in err and "the final checkpoint could not be written" in err
    assert err.count("could not write the checkpoint") == 1  # steps 4, 5 and 6 failed: one warning
    assert err.count("could not write the log") == 1 and "Traceback" not in err
    with pytest.raises(UserError, match="cannot write the prepared data .* the previous preparation there is intact"):
        data.prepare("synthetic", None, 8, prep, workers=0, length=50, log=open(os.devnull, "w"))
    with pytest.raises(OSError):
        runs.atomic_write(small_disk / "stats.npz", lambda f: np.savez(f, mu=np.ones(3000), sigma=np.eye(300)))
    (small_disk / "filler").unlink()
    after = snapshot(small_disk)
    assert {k: v for k, v in after.items() if k != "run/.lock"} == {k: v for k, v in before.items() if k != "run/.lock"}
    assert len(make_dataset("prepared", prep, 8)) == 20
    assert runs.load_checkpoint(str(run / "ckpt.pt"))["step"] == 3


@pytest.mark.slow
def test_damaged_log_lines_are_dropped_with_one_warning(tmp_path, capsys):
    assert train.main(TINY + ["--steps", "4", "--log-every", "1", "--ckpt-every", "4", "--out", tmp_path]) == 0
    with open(tmp_path / "log.jsonl", "ab") as f:  # what full disks, crashes and accidents leave
        f.write(b'{"step": 5, "loss_d_re\n\xff\xfe\x00garbage\n[1, 2]\n{"step": "6"}\n"text"\n')
    capsys.readouterr()
    assert train.main(["--resume", "--out", tmp_path, "--steps", "6"]) == 0
    assert "dropped 5 damaged lines of 9" in capsys.readouterr().err
    assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_with_missing_or_wrong_parts_is_one_line(tmp_path, ckpt):
    whole = torch.load(ckpt, weights_only=True)
    torch.save({k: v for k, v in whole.items() if k not in ("D", "opt_G")}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="damaged sagan checkpoint: it lacks D, opt_G"):
        runs.load_checkpoint(str(tmp_path / "partial.pt"))
    torch.save({**whole, "model": {**whole["model"], "ch": 16}}, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="its G_ema does not fit its model configuration"):
        ev.load_generator(str(tmp_path / "mismatch.pt"))
    torch.save({k: v for k, v in whole.items() if k != "G"}, tmp_path / "no_g.pt")
    with pytest.raises(UserError, match="lacks G"):
        ev.load_generator(str(tmp_path / "no_g.pt"))


def test_a_prepared_folder_that_does_not_match_its_metadata_is_one_line(tmp_path):
    out = tmp_path / "prep"
    data.prepare("synthetic", None, 8, out, workers=0, length=12, log=open(os.devnull, "w"))
    assert len(make_dataset("prepared", out, 8)) == 12
    labels = np.load(out / "labels.npy")
    meta = json.loads((out / "meta.json").read_text())
    for name, content, message in [
            ("labels.npy", labels[:5], "labels.npy is int64 (5,), meta.json says 12 labels"),
            ("labels.npy", labels + 10, "labels outside 0..9"),
            ("labels.npy", labels.astype(np.float32), "labels.npy is float32"),
            ("meta.json", {**meta, "count": 13}, "images.npy is uint8 (12, 8, 8, 3), meta.json says 13 images"),
            ("meta.json", {k: v for k, v in meta.items() if k != "count"}, "not from this version")]:
        saved = (out / name).read_bytes()
        if name == "meta.json":
            (out / name).write_text(json.dumps(content))
        else:
            np.save(out / name, content)
        with pytest.raises(UserError, match=re.escape(message)):
            make_dataset("prepared", out, 8)
        (out / name).write_bytes(saved)


def test_two_prepares_into_one_folder_cannot_mix(tmp_path):
    out = tmp_path / "prep"
    out.mkdir()
    with runs.FolderLock(out, "data.py prepare (pid 12345)"):  # another process is preparing
        with pytest.raises(UserError, match=r"is in use by data.py prepare"):
            data.prepare("synthetic", None, 8, out, workers=0, length=12, log=open(os.devnull, "w"))
    assert not (out / "meta.json").exists() and not (out / "images.npy").exists()


def test_scanning_takes_regular_files_and_each_folder_once(tmp_path):
    root = tmp_path / "data"
    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel)
    os.mkfifo(root / "a" / "fifo.png")  # opening it would block forever
    os.symlink(".", root / "a" / "self")  # a loop
    os.symlink("..", root / "b" / "up")  # back to the root: every image again, under label b
    files, labels, classes, skipped = data.scan(root)
    assert [os.path.relpath(f, root) for f in files] == ["a/1.png", "a/2.png", "b/3.png"]
    assert labels == [0, 0, 1] and classes == ["a", "b"]
    reasons = {os.path.relpath(p, root): r for p, r in skipped}
    assert reasons["a/fifo.png"] == "not a regular file"
    assert reasons["b/up"] == "link to a folder that contains the data root"
    assert "read before" in reasons["a/self"]


def test_symbolic_links_never_merge_classes_nor_leave_the_data_root(tmp_path):
    """Real links: one from a class folder to its sibling class (followed, it would merge the two
    classes); a symbolic and a hard link to a file of another class; one to /, which would walk
    into /proc. Each is refused or left out, and said."""
    root = tmp_path / "data"
    for rel in ("a/1.png", "b/2.png", "b/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel)
    os.symlink("/", root / "b" / "everything")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "4.png")
    os.symlink(outside, root / "b" / "elsewhere")
    os.symlink(outside / "4.png", root / "a" / "4.png")
    files, labels, classes, skipped = data.scan(root)
    assert [os.path.relpath(f, root) for f in files] == ["a/1.png", "b/2.png", "b/3.png"] and labels == [0, 1, 1]
    assert {os.path.relpath(p, root): r for p, r in skipped} == {
        "a/4.png": "link leaving the data root", "b/elsewhere": "link leaving the data root",
        "b/everything": "link to a folder that contains the data root"}
    os.symlink("../b", root / "a" / "b_too")  # the sibling class, inside a
    with pytest.raises(UserError, match=r"reachable from two classes, a and b .*a link"):
        data.scan(root)
    (root / "a" / "b_too").unlink()
    os.symlink("../b/2.png", root / "a" / "2.png")
    with pytest.raises(UserError, match=r"the image .*2.png is reachable from two classes, (a and b|b and a)"):
        make_dataset("folder", root, 8)
    (root / "a" / "2.png").unlink()
    os.link(root / "b" / "3.png", root / "a" / "3.png")  # a hard link: the same file in both classes
    with pytest.raises(UserError, match=r"the image .*3.png is reachable from two classes, a and b"):
        data.scan(root)


def test_the_run_folder_lock_never_follows_a_link(tmp_path, capsys):
    """RUN/.lock as a real link to a file outside the run: refused in one line, the file whole."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / ".lock")
    assert train.main(TINY + ["--steps", "1", "--out", tmp_path / "run"]) == 2
    assert capsys.readouterr().err == f"error: cannot take the lock {tmp_path / 'run' / '.lock'}: it is a symbolic " \
                                      f"link; remove it\n"
    assert target.read_text() == "keep me" and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_a_folder_with_a_fifo_and_a_link_loop_trains(tmp_path):
    root = tmp_path / "data"
    save_odd_images(root)
    os.mkfifo(root / "stuck.png")
    os.symlink(".", root / "again")
    code, out, err = run_cli("train.py", "--data", "folder", "--data-root", root, "--size", "32", "--ch", "8",
                             "--batch-size", "2", "--steps", "2", "--out", tmp_path / "run", timeout=120)
    assert code == 0, err
    assert "1 not a regular file (stuck.png)" in out and "link to a folder that contains the data root (again)" in out


def test_statistics_that_would_poison_fid_are_refused_on_load(tmp_path):
    mu, sigma = np.zeros(2048), np.eye(2048)
    bad = {"nan": (np.full(2048, np.nan), sigma), "inf": (mu, np.where(np.eye(2048) > 0, np.inf, 0.0)),
           "asym": (mu, sigma + np.triu(np.ones((2048, 2048)), 1))}
    for name, (m, s) in bad.items():
        np.savez(tmp_path / f"{name}.npz", mu=m, sigma=s)
    for name, message in [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("asym", "not symmetric")]:
        with pytest.raises(UserError, match=message):
            ev.load_stats(str(tmp_path / f"{name}.npz"))
    np.savez(tmp_path / "good.npz", mu=mu, sigma=sigma)
    assert ev.load_stats(str(tmp_path / "good.npz"))[0].shape == (2048,)

