"""Inception Score and FID as the TensorFlow reference computes them, and the paper's Figure 5.

    python evaluate.py --ckpt runs/x/ckpt.pt --n 50000 --ref-stats train.npz --out metrics.json
    python evaluate.py --make-ref-stats train.npz --data imagenet --data-root DIR --size 128
    python evaluate.py --ckpt runs/x/ckpt.pt --attention attn.png  # Figure 5: where G looks
    python evaluate.py --ckpt runs/x/ckpt.pt --grid grid.png --classes 1,207,980

Reference protocol (the one behind published IS and FID: TTUR's and improved-gan's TensorFlow
code, which torch-fidelity re-implements)
    Network  the 2015-12-05 TensorFlow Inception graph as ported by pytorch-fid (weights file
             pt_inception-2015-12-05-6726825d.pth, hash-checked on download). Not torchvision's
             ImageNet Inception, a different network (CIFAR-10 IS ~9.5 with it instead of ~11.2).
    Input    uint8 images, generated ones quantised like real ones, round((x + 1) * 127.5);
             TF 1.x bilinear resize to 299x299; (x - 128) / 128; fp32 with TF32 off.
    IS       improved-gan's definition on the 1008 logits pool3 @ fc.weight^T (no bias), float64;
             samples shuffled by numpy's RandomState(2020) as torch-fidelity does; 10 splits;
             mean and population std over the splits.
    FID      2048-d pool3 features; float64 mean and unbiased covariance;
             |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2).
    Samples  50k generated images, labels uniform over the classes, against statistics of the
             training set (say which). FID is biased in N: compare numbers only at equal N.

Where this code departs from the reference code: tr sqrt(S1 S2) comes from the eigenvalues of
a symmetric matrix similar to S1 S2, not from scipy's sqrtm (frechet_distance: the same value to
~1e-12 relative, with no general matrix square root); the input is resized as TF 1.x does
(pytorch-fid uses torch's bilinear interpolate on 2x/255 - 1, so its FID differs slightly from
TF's); Figure 5 is drawn our way, since the paper does not say how (attention_figure).

A generator trained on the built-in synthetic data is measured exactly and offline by
measures.py, which builds on this file. Volumes (a generator trained with --dims 3) have no IS
or FID; their pictures show a few slices across the depth and a maximum-intensity projection
(volume_views), in the grids and in Figure 5.
"""

import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE
from torchvision.utils import make_grid, save_image

import data
from runs import Progress, UserError, at_least, atomic_write, check_outputs, command, first_line, load_checkpoint, \
    make_config, open_input, parse_flags, regular_file, resolve_device, write_json
from sagan import Generator, ModelConfig

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


# --- Input: quantise like real images, TF 1.x bilinear resize ---------------------------------

def quantize(x):
    """Generator output in [-1, 1] -> uint8, exactly how real images are stored."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _tf1_taps(n_in, n_out, device):
    """TF 1.x resize_bilinear along one axis (align_corners=False, legacy mode): output i reads
    source coordinate i * in/out in float32 (no half-pixel offset), between its floor and the
    next pixel, the latter clamped to the border."""
    scale = torch.tensor(n_in, dtype=torch.float32, device=device) / n_out  # in float32, as TF
    src = torch.arange(n_out, dtype=torch.float32, device=device) * scale
    lo = src.floor().long()
    return lo, (lo + 1).clamp(max=n_in - 1), src - lo


def tf1_resize(x, size):
    """TensorFlow 1.x bilinear resize, x (B, C, H, W) float -> (B, C, size, size); no antialiasing.
    TF interpolates along x in the top and the bottom row, then between the rows; the same order
    of operations gives the same float32 values."""
    ly, hy, fy = _tf1_taps(x.shape[-2], size, x.device)
    lx, hx, fx = _tf1_taps(x.shape[-1], size, x.device)
    rows = x[..., lx] + (x[..., hx] - x[..., lx]) * fx  # (B, C, H, size)
    return rows[..., ly, :] + (rows[..., hy, :] - rows[..., ly, :]) * fy[:, None]  # (B, C, size, size)


# --- The FID Inception network: torchvision's Inception v3 blocks, the TF graph's pooling ----
# torchvision's BasicConv2d (conv without bias, BN eps 1e-3, ReLU) and reduction blocks (Mixed_6a,
# 7a) match the TF graph. Its other blocks average with the zero padding counted; the TF graph
# averages over the pixels inside the image only, and its last block max-pools.

def avg_pool_valid(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(InceptionA):
    """Mixed_5b-5d at 35x35: 1x1, 5x5, double 3x3 and pool branches."""

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_valid(x))], 1)


class MixedC(InceptionC):
    """Mixed_6b-6e at 17x17: 7x7 convolutions factorised into 1x7 and 7x1."""

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d7 = self.branch7x7dbl_5(self.branch7x7dbl_4(d7))
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_valid(x))], 1)


class MixedE(InceptionE):
    """Mixed_7b, 7c at 8x8: 3x3 convolutions split into parallel 1x3 and 3x1 halves."""

    def __init__(self, c_in, max_pool):
        super().__init__(c_in)
        self.max_pool = max_pool  # Mixed_7c

    def forward(self, x):
        b3, d3 = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_valid(x)
        return torch.cat([self.branch1x1(x),  # 320
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),  # 768
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),  # 768
                          self.branch_pool(pool)], 1)  # 192 -> (B, 2048, 8, 8)


class FIDInception(nn.Module):
    """images (B, 3, H, W) in [0, 255], uint8 or float -> pool3 (B, 2048), logits (B, 1008).
    The state-dict keys are those of pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = MixedE(1280, max_pool=False), MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the 2015 graph's 1008 classes

    def forward(self, images):
        x = (tf1_resize(images.float(), 299) - 128) / 128  # the graph's ResizeBilinear, Sub and Mul
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): "pool3", the FID feature
        return pool, pool @ self.fc.weight.T  # (B, 1008): IS logits, no bias (improved-gan)


def load_inception(weights=None, device="cpu"):
    """The FID Inception network in eval mode, from a file or from pytorch-fid's release through
    torch.hub's cache (the SHA-256 prefix in the file name is checked on download)."""
    try:
        if weights:
            with open_input(weights, "Inception weights") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", check_hash=True,
                                                       weights_only=True)
    except UserError:
        raise
    except Exception as e:  # offline, a hash mismatch, not a torch file, a pickle the safe loader refuses
        if weights:
            raise UserError(f"cannot read the Inception weights {weights}: {first_line(e)}") from None
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_URL.split("/")[-1])
        raise UserError(f"cannot get the FID Inception weights ({first_line(e, 100)}); download "
                        f"{FID_WEIGHTS_URL} and pass --inception-weights PATH, or put it at {cache}") from None
    net = FIDInception()
    own = net.state_dict()
    # Copies of the file differ in whether they hold BN's num_batches_tracked (unused in eval).
    want = {k: v.shape for k, v in own.items() if not k.endswith("num_batches_tracked")}
    got = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")} if isinstance(state, dict) else {}
    problems = ([f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
                + [f"{k} is {tuple(getattr(got[k], 'shape', ()))}, expected {tuple(want[k])}"
                   for k in want if k in got and getattr(got[k], "shape", None) != want[k]])
    if problems:
        raise UserError(f"{weights or FID_WEIGHTS_URL} is not the FID Inception state dict (pt_inception-2015-12-05): "
                        f"{len(problems)} mismatches, first: {'; '.join(problems[:3])}")
    net.load_state_dict({**own, **got})
    return net.eval().to(device)


@contextmanager
def exact_fp32(device):
    """Plain fp32: TF32 (on by default for cuDNN convs) and autocast would change the features."""
    b = torch.backends  # torch >= 2.9 has per-backend flags, and mixing in the old ones can raise
    flags = [(b.cudnn.conv, "fp32_precision", "ieee"), (b.cuda.matmul, "fp32_precision", "ieee")] \
        if hasattr(b.cudnn, "conv") else [(b.cudnn, "allow_tf32", False), (b.cuda.matmul, "allow_tf32", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


@torch.no_grad()
def inception_outputs(inception, batches, n, device, label="images", progress=True):
    """Image batches (B, 3, H, W) in [0, 255] -> pool3 (n, 2048), logits (n, 1008), float32 on the
    CPU. Progress (n/N, images/s, ETA) goes to stderr at most every 2 s and at the end."""
    device, outputs, done, meter = torch.device(device), [], 0, Progress(n)
    with exact_fp32(device):
        for images in batches:
            outputs.append([t.cpu() for t in inception(images.to(device))])
            done += len(images)
            if progress and meter.due(done):
                print(f"{label}: {meter.line(done)}", file=sys.stderr)
    return torch.cat([p for p, _ in outputs]), torch.cat([lg for _, lg in outputs])


# --- The metrics ------------------------------------------------------------------------------

def inception_score(logits_or_probs, splits=10):
    """Inception Score (Salimans et al. 2016) of (N, classes) predictions -> (mean, std) over splits:
    exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction within a split. Rows that are
    non-negative and sum to 1 are taken as probabilities, anything else as logits."""
    x = torch.as_tensor(logits_or_probs).double()
    n = x.shape[0]
    if x.ndim != 2 or splits < 1 or n < splits:
        raise UserError(f"the Inception Score needs at least {splits} samples (one per split), got {n}")
    probs = bool((x >= 0).all()) and torch.allclose(x.sum(1), torch.ones(n, dtype=x.dtype), atol=1e-4)
    p = x if probs else x.softmax(dim=1)
    # Class-sorted samples would give each split a few classes only. torch-fidelity's fixed
    # permutation makes our IS equal to its IS.
    p = p[torch.from_numpy(np.random.RandomState(2020).permutation(n))]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]  # (n / splits, classes)
        py = part.mean(dim=0, keepdim=True)  # p(y) of the split, (1, classes)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, py)).sum(dim=1)  # 0 log 0 = 0
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(correction=0).item()


def feature_stats(features):
    """(mu, sigma): float64 mean and unbiased covariance of (N, d) features, as numpy arrays.
    Two passes over chunks, so 50k x 2048 features never exist in float64 at once."""
    x = torch.as_tensor(features)
    n, d = x.shape
    if n < 2:
        raise UserError(f"FID statistics need at least 2 images, got {n}")
    if n < d:
        warnings.warn(f"{n} images for {d}-d features: the covariance is singular and FID strongly "
                      f"biased; use 10k images at least, 50k as published", stacklevel=2)
    mu = sum(c.double().sum(0) for c in x.split(4096)) / n  # (d,)
    sigma = sum((c.double() - mu).T @ (c.double() - mu) for c in x.split(4096)) / (n - 1)  # (d, d)
    return mu.numpy(), sigma.numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), in float64. For any factor S1 = B B^T,
    S1 S2 = B (B^T S2) is similar to M = B^T S2 B, which is symmetric PSD, so tr sqrt(S1 S2) =
    sum_i sqrt(lambda_i(M)): the eigenvalues of a symmetric matrix, not a general matrix square root.
    B is S1's Cholesky factor, or V sqrt(W) from S1 = V W V^T when S1 is singular."""
    # Eigenvalues below numpy's rank tolerance are round-off (of either sign) of zeros; their square
    # roots, ~1e-8 each, would add up to errors of ~1e-7 with singular covariances.
    def significant(w):
        return torch.where(w > w.max().clamp(min=0) * len(w) * torch.finfo(w.dtype).eps, w, 0.0)

    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    b, not_pd = torch.linalg.cholesky_ex(sigma1)
    if not_pd:  # e.g. fewer samples than dimensions
        w, v = torch.linalg.eigh(sigma1)
        b = v * significant(w).sqrt()
    m = b.T @ sigma2 @ b
    lam = significant(torch.linalg.eigvalsh((m + m.T) / 2))  # symmetrised against round-off
    diff = mu1 - mu2
    return (diff @ diff + sigma1.trace() + sigma2.trace() - 2 * lam.sqrt().sum()).item()


def load_stats(path, dim=2048):
    """(mu, sigma) from a statistics .npz (ours, TTUR's or pytorch-fid's), checked."""
    try:
        with open_input(path, "statistics file") as stream:
            f = np.load(stream, allow_pickle=False)
            found = f.files if isinstance(f, np.lib.npyio.NpzFile) else ["one array (.npy)"]
            if not {"mu", "sigma"} <= set(found):
                raise UserError(f"{path} is not an FID statistics file: need arrays mu and sigma, found "
                                f"{', '.join(found)}")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except UserError:
        raise
    except Exception as e:  # not a zip, a damaged member (zlib), an absurd array header, object arrays
        raise UserError(f"cannot read the statistics file {path}: {first_line(e)}") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} should be ({dim},) and ({dim}, {dim}), "
                        f"statistics of the {dim}-d pool3 Inception features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu or sigma holds NaN or infinite values; compute the statistics again")
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-8 * np.abs(sigma).max()):
        raise UserError(f"{path}: sigma is not symmetric, so it is not a covariance matrix")
    return mu, sigma


# --- Generators from checkpoints, their samples and their metrics -----------------------------

def from_checkpoint(path, device, ema):
    """(G in eval mode, ModelConfig, "G_ema" or "G", step, the data it was trained on) from a
    train.py checkpoint (runs.load_checkpoint reads and checks it)."""
    ckpt = load_checkpoint(path, parts=("step", "model", "G"))
    name = "G_ema" if ema and ckpt.get("G_ema") is not None else "G"
    try:
        cfg = ModelConfig(**ckpt["model"])
        G = Generator(cfg)
        G.load_state_dict(ckpt[name])
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:  # wrong fields, shapes, keys
        raise UserError(f"{path} is a damaged sagan checkpoint: its {name} does not fit its model "
                        f"configuration ({first_line(e, 150)})") from None
    bad = [k for k, v in G.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a NaN that no sample shows (a class not drawn, a ReLU after an -inf) is still no generator
        raise UserError(f"{path}: its {name} holds weights that are not finite ({bad[0]})")
    source = ckpt["train"].get("data") if isinstance(ckpt.get("train"), dict) else None
    return G.eval().to(device), cfg, name, ckpt.get("step"), source if isinstance(source, str) else None


def load_generator(ckpt_path, device="cpu", ema=True):
    """(generator in eval mode, ModelConfig) from a checkpoint: the EMA weights when ema is set
    and the run kept them. G(z, y) maps z (B, z_dim) and labels y (B,) to images in [-1, 1]."""
    return from_checkpoint(ckpt_path, device, ema)[:2]


def latents(cfg, n, batch_size, seed=0):
    """Yields (z, y) batches on the CPU: z ~ N(0, I), labels uniform over the classes (None for an
    unconditional model), from a generator seeded with seed, so every device sees the same."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, cfg.z_dim, generator=gen)
        yield z, torch.randint(cfg.n_classes, (b,), generator=gen) if cfg.n_classes else None


def finite(samples):
    """G's samples, checked: a generator whose weights or statistics are broken (a NaN, a negative
    running variance) draws NaN, which bytes would turn into black pictures and measurements that
    look perfect."""
    if not torch.isfinite(samples).all():
        raise UserError("the generator's samples hold NaN or infinite values: its weights or batch-norm "
                        "statistics are damaged")
    return samples


@torch.no_grad()
def generated_images(G, n, batch_size, device, seed=0):
    """Yields uint8 batches (B, 3, S, S) of G's samples, from latents(G.cfg, n, batch_size, seed)."""
    for z, y in latents(G.cfg, n, batch_size, seed):
        yield quantize(finite(G(z.to(device), None if y is None else y.to(device))))


def metrics(pool, logits, ref_stats=None, splits=10):
    """{"IS", "IS_std"}, and "FID" against ref_stats = (mu, sigma) when given."""
    is_mean, is_std = inception_score(logits, splits)
    fid = {} if ref_stats is None else {"FID": frechet_distance(*feature_stats(pool), *ref_stats)}
    return {"IS": is_mean, "IS_std": is_std, **fid}


def compute_metrics(G, inception, n, ref_stats=None, batch_size=50, device="cpu", seed=0, splits=10, progress=True):
    """IS, and FID given ref_stats (an .npz path or (mu, sigma)), of n samples of G. The seed is
    fixed so that evaluations during training see the same z; G's train/eval mode is restored."""
    ref_stats = load_stats(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else ref_stats
    was_training = G.training
    try:
        pool, logits = inception_outputs(inception, generated_images(G.eval(), n, batch_size, device, seed), n,
                                         device, "samples", progress)
    finally:
        G.train(was_training)
    return metrics(pool, logits, ref_stats, splits)


# --- Real images: a folder, a uint8 .npy or a data.py source ----------------------------------

def _read_images(files):
    """uint8 (B, 3, H, W) from image files; mixed sizes are resized to 299 here, to make one batch.
    data.to_rgb converts 16-bit, palette and transparent images correctly."""
    images = []
    for f in files:
        try:
            with open_input(f, "image") as stream, Image.open(stream) as im:
                images.append(torch.from_numpy(np.array(data.to_rgb(im))).permute(2, 0, 1))
        except UserError:
            raise
        except Exception as e:  # OSError, a decompression bomb, ValueError, SyntaxError, ...
            raise UserError(f"cannot read image {f}: {first_line(e)}") from None
    if len({im.shape for im in images}) > 1:
        return torch.cat([tf1_resize(im[None].float(), 299) for im in images])
    return torch.stack(images)


def real_images(source, n, batch_size, seed=0, data_root="", size=128):
    """(count, iterator over uint8 batches (B, 3, H, W)) of at most n images from a folder, a
    uint8 .npy (N, H, W, 3) or a data.py source name; a seeded random subset when there are more,
    as sources are often sorted by class."""
    if source.endswith(".npy"):
        try:
            arr = np.load(regular_file(source, "array"), mmap_mode="r", allow_pickle=False)
        except UserError:
            raise
        except Exception as e:  # not an array file, a damaged or absurd header
            raise UserError(f"cannot read {source}: {first_line(e)}") from None
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 \
                or min(arr.shape[:3]) == 0:
            raise UserError(f"{source} must hold uint8 images (N, H, W, 3), N, H and W at least 1, not "
                            f"{getattr(arr, 'dtype', 'an archive')} {getattr(arr, 'shape', '')}")
        total, read = len(arr), lambda idx: torch.from_numpy(np.ascontiguousarray(arr[idx])).permute(0, 3, 1, 2)
    elif os.path.isdir(source):
        files, _, _, skipped = data.scan(source, classes=False)
        if skipped:
            warnings.warn(f"{len(skipped)} files under {source} left out: {data.summarise(skipped)}")
        if not files:
            raise UserError(f"no images ({' '.join(data.IMAGE_EXTENSIONS)}) in {source}")
        total, read = len(files), lambda idx: _read_images([files[i] for i in idx])
    else:
        if source not in data.SOURCES:
            raise UserError(f"{source} is not a folder, a .npy file or a data source ({', '.join(data.SOURCES)})")
        ds = data.make_dataset(source, data_root, size)
        if ds.dims != 2:
            raise UserError(f"IS and FID are defined for images; {source} holds volumes")
        total, read = len(ds), lambda idx: quantize(torch.stack([ds[i][0] for i in idx]))  # [-1, 1] to bytes
    idx = np.arange(total) if n >= total else np.sort(np.random.RandomState(seed).permutation(total)[:n])
    return len(idx), (read(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size))


# --- Pictures: Figure 5 (where G's last attention layer looks) and a class grid ---------------

SLICES = (0.25, 0.5, 0.75)  # depths of the slices shown of a volume, as fractions of its side


def slice_index(fraction, side):
    return min(int(fraction * side), side - 1)


def volume_views(x, pad_value=1.0):
    """Pictures of volumes: (B, C, D, H, W) -> (B, C, H, 4W + 3), the slices across the depth z at
    SLICES, then the maximum-intensity projection along z, a column of pad_value between panels.
    The mirror plane x = 0 is vertical in every panel. Images (B, C, H, W) pass unchanged."""
    if x.dim() == 4:
        return x
    D = x.shape[2]
    views = [x[:, :, slice_index(f, D)] for f in SLICES] + [x.amax(dim=2)]  # 4 x (B, C, H, W)
    gap = torch.full_like(views[0][..., :1], pad_value)  # (B, C, H, 1)
    return torch.cat([t for v in views for t in (v, gap)][:-1], dim=-1)


DOT_COLOURS = torch.tensor([[1.0, 0, 1], [0, 1, 1], [0.2, 1, 0.2], [0.2, 0.4, 1], [1, 1, 1]])  # not red-yellow


def heat_colours(a):
    """A colour map, a (..., H, W) in [0, 1] -> (..., 3, H, W): black, red, yellow."""
    a = a.clamp(0, 1).unsqueeze(-3)
    return torch.cat([(2 * a).clamp(max=1), (2 * a - 1).clamp(min=0), torch.zeros_like(a)], dim=-3)


def draw_dot(img, x, y, colour, radius):
    """A filled dot with a black rim at pixel (x, y) of img (3, H, W), in place."""
    yy, xx = torch.meshgrid(torch.arange(img.shape[1]), torch.arange(img.shape[2]), indexing="ij")
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    img[:, d2 <= (radius + 1) ** 2] = 0.0
    img[:, d2 <= radius ** 2] = colour[:, None]


def figure5_points(images):
    """Three query points for each synthetic-like sample uint8 (K, 3, S, S[, S]), from its own
    object masks (data.object_masks): the pixel of the left object nearest its centre, that
    pixel's mirror image, and the background pixel farthest from both objects (an eighth of the
    side from the border at least, where there is one). A sample without an object gets three
    spread points. Returns (K, 3, dims) as (x, y[, z])."""
    S, dims = images.shape[-1], images.dim() - 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(S)] * dims, indexing="ij"), -1).flatten(0, -2)  # (N, dims), (z,) y, x
    points = []
    for left, right in zip(*data.object_masks(images)):
        on, off = left.flatten(), ~(left | right).flatten()  # (N,)
        if not on.any() or not off.any():
            points.append(SPREAD_POINTS[dims] * S // 100)
            continue
        at = grid[on].float()
        centre = at[(at - at.mean(0)).norm(dim=1).argmin()]  # on the object, also where its centre is not
        mirror = centre.clone()
        mirror[-1] = S - 1 - centre[-1]
        objects, inner = grid[~off].float(), ((grid >= S // 8) & (grid < S - S // 8)).all(1)  # inner: away from the border
        candidates = grid[off & inner] if (off & inner).any() else grid[off]
        background = candidates[torch.cdist(candidates.float(), objects).amin(1).argmax()]
        points.append(torch.stack([centre.long(), mirror.long(), background]).flip(-1))  # as (x, y[, z])
    return torch.stack(points)


# Three spread query points, in hundredths of the side as (x, y[, z]), for samples without objects.
SPREAD_POINTS = {2: torch.tensor([[30, 30], [70, 45], [45, 75]]), 3: torch.tensor([[30, 30, 50], [70, 45, 50], [45, 75, 50]])}


@torch.no_grad()
def attention_maps(G, z, y, points=None):
    """G's samples and, for each query pixel (x, y) or voxel (x, y, z), the attention of its last
    attention layer (Figure 5). points: (K, P, dims), each sample's own, or None for
    figure5_points. Returns images (K, 3, S, S) or volumes (K, 3, S, S, S) in [-1, 1], beta
    (K, N, M), maps (K, P, h, w) or (K, P, d, h, w), beta's rows for the query points on the
    (pooled) key grid, each summing to 1, and the points."""
    images, betas = G(z, y, return_attention=True)
    if not betas:
        raise UserError("this generator has no attention layer (trained with --attn none)")
    finite(images)
    beta = betas[-1]  # (K, N, M), Eq. (1): softmax over the M keys for each of the N queries
    S, dims = images.shape[-1], images.dim() - 2
    points = figure5_points(quantize(images).cpu()) if points is None else torch.as_tensor(points)
    side_q, side_k = (round(n ** (1 / dims)) for n in beta.shape[1:])  # square or cubic feature maps
    queries = torch.zeros(points.shape[:2], dtype=torch.long)  # (K, P), row-major over (z,) y, x as SelfAttention flattens
    for d in reversed(range(dims)):
        queries = queries * side_q + points[..., d] * side_q // S
    rows = beta.gather(1, queries.to(beta.device)[..., None].expand(-1, -1, beta.shape[2]))  # (K, P, M)
    return images, beta, rows.reshape(*points.shape[:2], *(side_k,) * dims), points


def attention_figure(images, maps, points):
    """Figure 5's layout, a row per sample: the image with a coloured dot per query point (points
    (K, P, dims), each sample's own), then a panel per point with its attention map as heat over
    a grey copy of the image. Heat and opacity
    grow with log(attention / uniform attention): 0 where a key gets 1/M or less (a uniform map
    shows the plain grey image), 1 where all the attention is on one key. Returns (3, H, W) in [0, 1].

    Volumes are shown as volume_views shows them, slices and a projection side by side, and so is
    the heat: on the slices the map's own values there, on the projection its maximum along z. A
    query voxel's dot is drawn on the slice nearest to it and on the projection."""
    K, P, S, M = maps.shape[0], maps.shape[1], images.shape[-1], maps[0, 0].numel()
    f = max(1, (256 if images.dim() == 4 else 96) // S)  # an integer zoom to panels of 256 px (96 for volumes)
    heat = F.interpolate(maps.float().cpu(), size=images.shape[2:], mode="nearest")  # key cells as blocks
    heat = ((heat * M).log() / math.log(M)).clamp(0, 1)  # (K, P, S, S[, S])
    img = volume_views((images.float().cpu() + 1) / 2)  # (K, 3, S, S), or slices and projection side by side
    img = F.interpolate(img, scale_factor=f, mode="nearest").clamp(0, 1)
    heat = F.interpolate(volume_views(heat, pad_value=0.0), scale_factor=f, mode="nearest")
    grey = img.mean(dim=1, keepdim=True).expand_as(img)  # (K, 3, fH, fW)
    radius, pictures = max(2, f * S // 50), []
    for k in range(K):
        dots = []  # per point, its dots (x, y, colour) in the zoomed pictures
        for p, (px, py, *pz) in enumerate(points[k].tolist()):
            # An image: the point itself. A volume: on the nearest slice and on the projection; a
            # panel is S + 1 pixels wide with its gap.
            nearest = min(range(len(SLICES)), key=lambda i: abs(slice_index(SLICES[i], S) - pz[0])) if pz else 0
            panels = [nearest, len(SLICES)] if pz else [0]
            dots.append([((i * (S + 1) + px) * f + f // 2, py * f + f // 2, DOT_COLOURS[p % len(DOT_COLOURS)])
                         for i in panels])
        pictures.append(img[k].clone())
        for x, y, colour in sum(dots, []):
            draw_dot(pictures[-1], x, y, colour, radius)
        for p in range(P):
            pictures.append(grey[k] * (1 - heat[k, p]) + heat_colours(heat[k, p]) * heat[k, p])
            for x, y, colour in dots[p]:
                draw_dot(pictures[-1], x, y, colour, radius)
    return make_grid(torch.stack(pictures), nrow=1 + P, padding=4, pad_value=1.0)


@torch.no_grad()
def class_grid(G, classes, per_class, batch_size=64, device="cpu", seed=0):
    """Samples (rows * per_class, 3, S, S) in [0, 1] (volumes: (.., S, S, S)), one row per class. Every row uses the same
    z, so a column shows what the label alone changes. classes=None: per_class unconditional rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(classes) if classes else per_class
    z = torch.randn(1 if classes else rows, per_class, G.cfg.z_dim, generator=gen).expand(rows, -1, -1)
    z, y = z.reshape(-1, G.cfg.z_dim), torch.tensor(classes).repeat_interleave(per_class) if classes else None
    out = [finite(G(z[i:i + batch_size].to(device), None if y is None else y[i:i + batch_size].to(device))).cpu()
           for i in range(0, len(z), batch_size)]
    return (torch.cat(out) + 1) / 2


# --- Command line: the dataclass's fields are the flags ---------------------------------------

@dataclass
class EvalConfig:
    ckpt: str = ""  # a checkpoint written by train.py
    n: int = 50_000  # samples (50k: the published protocol); at most this many real images
    ref_stats: str = ""  # reference statistics .npz (mu, sigma) for FID
    ema: bool = True  # G's EMA weights when the checkpoint has them (--no-ema: the raw G)
    batch_size: int = 50  # images per batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seed of the samples' z and labels
    splits: int = 10  # IS splits (10, as improved-gan)
    out: str = ""  # also write the metrics as JSON to this file
    inception_weights: str = ""  # the FID Inception weights, pytorch-fid's file (default: download once)
    make_ref_stats: str = ""  # write mu and sigma of the images (--data, --images or --ckpt) to this .npz
    data: str = ""  # a data source of data.py: its IS, or its statistics
    data_root: str = ""  # the data source's folder
    size: int = 128  # image side for --data: the model's
    images: str = ""  # a folder of images or a uint8 .npy (N, H, W, 3): its IS and FID, or its statistics
    attention: str = ""  # write Figure 5 (G's last attention layer) to this PNG (alone: RUN/fig5.png), the maps to .npz
    points: str = ""  # query pixels "x,y;x,y;x,y" (voxels "x,y,z;...") for --attention (default: see figure5_points)
    k: int = 4  # images for --attention; samples per class for --grid
    grid: str = ""  # write a sample grid, a row per class, to this PNG (alone: RUN/grid.png)
    classes: str = ""  # classes for --grid and --attention, e.g. "1,5,9" (default: all, at most 16)


def _ints(text, flag, high, group=1):
    values = text.replace(";", ",").split(",")
    if not all(re.fullmatch(r"\s*\d+\s*", v) and int(v) < high for v in values) or len(values) % group:
        kind = {1: "", 2: "pairs x,y of ", 3: "triples x,y,z of "}[group]
        raise UserError(f"{flag} {text!r}: need {kind}integers from 0 to {high - 1}")
    return [int(v) for v in values]


def _classes(text, n_classes, cap=16):
    """--classes as a list (None for an unconditional G); by default all, or `cap` spread evenly."""
    if text and not n_classes:
        raise UserError("--classes: this generator is unconditional")
    if text or not n_classes:
        return _ints(text, "--classes", n_classes) if text else None
    return list(range(n_classes)) if n_classes <= cap else [round(i * (n_classes - 1) / (cap - 1)) for i in range(cap)]


def _write_pictures(cfg, G, device, synthetic):
    model = G.cfg
    classes = _classes(cfg.classes, model.n_classes)
    if cfg.attention:
        # The query points: the user's, the same in every sample; on the synthetic data each
        # sample's own object, its mirror image and the background (figure5_points); else three
        # points spread over the image.
        if cfg.points:
            values = _ints(cfg.points, "--points", model.size, model.dims)
            points = torch.tensor(values).view(1, -1, model.dims).expand(cfg.k, -1, -1)
        else:
            points = None if synthetic else (SPREAD_POINTS[model.dims] * model.size // 100).expand(cfg.k, -1, -1)
        gen = torch.Generator().manual_seed(cfg.seed)
        z = torch.randn(cfg.k, model.z_dim, generator=gen)
        y = torch.tensor(classes)[torch.randint(len(classes), (cfg.k,), generator=gen)] if classes else None
        images, beta, maps, points = attention_maps(G, z.to(device), None if y is None else y.to(device), points)
        atomic_write(cfg.attention, lambda f: save_image(attention_figure(images, maps, points), f,
                                                         format=image_format(cfg.attention)))
        raw = os.path.splitext(cfg.attention)[0] + ".npz"
        atomic_write(raw, lambda f: np.savez(f, images=quantize(images).cpu().numpy(), beta=beta.float().cpu().numpy(),
                                             points=points.numpy(), maps=maps.float().cpu().numpy(),
                                             labels=np.array([] if y is None else y.tolist())))
        where = "given" if cfg.points else "on each sample's object, its mirror image and the background, " \
            "from the object masks" if synthetic else "spread over the image"
        print(f"wrote {cfg.attention} and {raw} (beta: images x queries x keys = {tuple(beta.shape)}; "
              f"query points {where})")
    if cfg.grid:
        grid = volume_views(class_grid(G, classes, cfg.k, cfg.batch_size, device, cfg.seed))
        atomic_write(cfg.grid, lambda f: save_image(grid, f, nrow=cfg.k, format=image_format(cfg.grid)))
        print(f"wrote {cfg.grid}")


def image_format(path):
    """Pillow's format name for an output picture's extension ("fig.png" -> "PNG")."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UserError(f"{path}: name the picture with an image extension such as .png")
    return fmt


def evaluate(cfg):
    """Does what an EvalConfig asks; the module docstring lists the modes."""
    at_least(cfg, 1, "n", "batch_size", "k", "splits", "size")
    if sum(map(bool, (cfg.ckpt, cfg.images, cfg.data))) != 1:
        raise UserError("give one source of images: --ckpt RUN/ckpt.pt, --images DIR|FILE.npy or --data SOURCE")
    if (cfg.attention or cfg.grid) and not cfg.ckpt:
        raise UserError("--attention and --grid take samples of a generator: give --ckpt")
    for picture in (cfg.attention, cfg.grid):
        if picture:
            image_format(picture)  # before the work, not after it
    outputs = [cfg.attention, cfg.attention and os.path.splitext(cfg.attention)[0] + ".npz", cfg.grid, cfg.out,
               cfg.make_ref_stats]
    for written in filter(None, outputs):
        if not os.path.isdir(os.path.dirname(os.path.abspath(written))):
            raise UserError(f"cannot write {written}: its folder does not exist")
    check_outputs(outputs, [cfg.ckpt, cfg.ref_stats, cfg.inception_weights, cfg.images,
                            cfg.data in data.SOURCES and (cfg.data_root or (data.SOURCES[cfg.data].root == "optional" and "data"))])
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"--seed must lie in [0, {2**32 - 1}], got {cfg.seed}")
    device = resolve_device(cfg.device)
    ref = load_stats(cfg.ref_stats) if cfg.ref_stats else None  # fail before the long part
    result = {"n": cfg.n, "source": cfg.ckpt or cfg.images or cfg.data, "ref_stats": cfg.ref_stats or None}
    if cfg.ckpt:
        G, model, weights, step, source = from_checkpoint(cfg.ckpt, device, cfg.ema)
        synthetic = source in data.SOURCES and data.SOURCES[source].synthetic
        if cfg.attention or cfg.grid:
            return _write_pictures(cfg, G, device, synthetic)
        if model.dims != 2:
            raise UserError(f"IS and FID are defined for images; this generator makes volumes: "
                            f"python measures.py --ckpt {cfg.ckpt} measures it")
        if synthetic and not (cfg.ref_stats or cfg.inception_weights or cfg.make_ref_stats):
            raise UserError(f"this generator was trained on the built-in {source} data: python measures.py "
                            f"--ckpt {cfg.ckpt} measures it exactly, offline; IS and FID need --inception-weights "
                            f"or --ref-stats")
        result.update(step=step, weights=weights, seed=cfg.seed)
        batches = generated_images(G, cfg.n, cfg.batch_size, device, cfg.seed)
    else:
        result["n"], batches = real_images(cfg.images or cfg.data, cfg.n, cfg.batch_size, cfg.seed,
                                           cfg.data_root, cfg.size)
    if not cfg.make_ref_stats and result["n"] < cfg.splits:  # found out now, not after the long part
        raise UserError(f"the Inception Score needs at least --splits {cfg.splits} images, got {result['n']}")
    inception = load_inception(cfg.inception_weights or None, device)
    pool, logits = inception_outputs(inception, batches, result["n"], device, "images")
    if cfg.make_ref_stats:
        mu, sigma = feature_stats(pool)
        atomic_write(cfg.make_ref_stats, lambda f: np.savez(f, mu=mu, sigma=sigma))  # the TTUR / pytorch-fid format
        print(f"wrote {cfg.make_ref_stats}: mu and sigma of {result['n']} images of {result['source']}")
        return
    result.update(metrics(pool, logits, ref, cfg.splits))
    if not all(math.isfinite(v) for v in result.values() if isinstance(v, float)):
        raise UserError(f"the metrics are not finite ({result}): the images hold NaN or infinite values")
    fid = f"   FID {result['FID']:.3f}" if "FID" in result else ""
    print(f"IS {result['IS']:.3f} +- {result['IS_std']:.3f}{fid}   ({result['n']} images)")
    if cfg.out:
        write_json(cfg.out, result)


def parse(argv):
    """The EvalConfig of a command line; --attention and --grid without a name write into the
    checkpoint's run folder."""
    bare = {flag: "\0" + name for flag, name in PICTURES.items()}  # no path holds a NUL: no one types these
    given = parse_flags(EvalConfig, argv, options={flag: dict(nargs="?", const=bare[flag]) for flag in PICTURES})
    for flag, name in PICTURES.items():
        if given.get(flag) == bare[flag]:
            given[flag] = os.path.join(os.path.dirname(given.get("ckpt", "")) or ".", name)
    return make_config(EvalConfig, given)


PICTURES = {"attention": "fig5.png", "grid": "grid.png"}  # their names in the run folder


def main(argv=None):
    return command(lambda argv: evaluate(parse(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
