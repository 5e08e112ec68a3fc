"""Exact measurements of a generator trained on the built-in synthetic data (data.Synthetic).

    python measures.py --ckpt runs/sagan/ckpt.pt    # a synthetic or synthetic3d run, offline
    python measures.py --ckpt runs/sagan/ckpt.pt --mirror --n 1000    # the mirror error alone
    python train.py --eval-every 200                # the same, logged while training

The synthetic images (and volumes) are drawn by a known program, so the paper's claims can be
measured where no natural-image metric reaches:
    mirror error     is each sample its own mirror image? (long-range coherence, what attention is for)
    class fidelity   does it show the asked-for colour and shape? Two small probe classifiers,
                     trained here in seconds on real synthetic images, answer.
    FID, precision   does G cover the data? In the probes' features, so no Inception download.
    and recall
    spread           do a class's samples vary as its images do? Object position and size, against
                     the data's (1 is the data's variety, 0 one picture per class)
    reach            does G's attention reach the mirror object? (Figure 5 as a number)

Volumes (a generator trained with --dims 3) get the same measurements, with 3-D probes.
The probes are small and briefly trained, so samples far from real ones lie where probes of
another seed (--probe-seed) may judge them otherwise. This file builds on evaluate.py (samples,
the Frechet distance) and sits above it: evaluate.py knows nothing of it.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data
from evaluate import (compute_metrics, feature_stats, finite, frechet_distance, from_checkpoint, generated_images,
                      latents, load_inception, load_stats, quantize)
from runs import UserError, at_least, check_outputs, command, make_config, parse_flags, resolve_device, write_json
from sagan import LAYER_TYPES

PROBE_TRAIN, PROBE_TEST, PROBE_STEPS = 4000, 1000, 200  # probe data: indices from 10^6 on, unseen in training


def synthetic_images(size, start, n, dims=2):
    """Synthetic images start .. start + n - 1: uint8 (n, 3, S, S) and labels (n,); volumes
    (n, 3, S, S, S) with dims = 3."""
    ds = data.Synthetic(size, length=start + n, dims=dims)
    pixels, labels = zip(*(ds.pixels(i) for i in range(start, start + n)))
    return torch.from_numpy(np.stack(pixels)).movedim(-1, 1).contiguous(), torch.tensor(labels)


class Probe(nn.Module):
    """A small classifier of the synthetic classes from one cue, to ask which class a sample shows.

    "colour" sees every pixel's colour but no shape: 1x1 convolutions, then the maximum over the
    image. "shape" sees no colour: 3x3 convolutions on the grey image, stretched to [0, 1] per
    image, so that neither hue nor brightness is left. Their features (the maximum over the image
    of the last layer, 32 each) are the space of the distribution distances. With dims = 3 the
    same on volumes (sagan.LAYER_TYPES picks the 3-D layers)."""

    def __init__(self, cue, dims=2):
        super().__init__()
        self.cue, self.layers = cue, LAYER_TYPES[dims]
        k, c_in = (3, 1) if cue == "shape" else (1, 3)
        self.convs = nn.ModuleList(self.layers.conv(a, b, k, padding=k // 2) for a, b in [(c_in, 8), (8, 16), (16, 32)])
        self.head = nn.Linear(32, 10)

    def features(self, images):  # uint8 (B, 3, S, S[, S]) -> (B, 32)
        x = images.float() / 255
        space = tuple(range(2, x.dim()))
        if self.cue == "shape":
            x = x.mean(dim=1, keepdim=True)  # (B, 1, S, S[, S])
            low, high = x.amin(dim=space, keepdim=True), x.amax(dim=space, keepdim=True)
            x = (x - low) / (high - low).clamp(min=1e-3)
        else:
            x = self.layers.avg_pool(x, 2)  # colours stay, at a quarter (an eighth) of the work
        if x.dim() == 5:  # volumes channels-last: their 3-D convolutions then take half the time on a CPU
            x = x.contiguous(memory_format=self.layers.channels_last)
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if self.cue == "shape" and i < 2:
                x = self.layers.max_pool(x, 2)
        return x.amax(dim=space)

    def forward(self, images):
        return self.head(self.features(images))


_probes = {}


@contextmanager
def one_thread():
    """torch's intra-op threads set to 1 inside the block, and restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probes(size, seed=0, dims=2):
    """The colour and the shape probe for size x size images (size^3 volumes with dims = 3),
    trained on first use (seconds on a CPU, seeded, without touching the global random state) and
    kept for the process. Returns ({cue: probe}, {cue: accuracy on PROBE_TEST held-out real images}).

    They are trained on one thread, whatever the machine: a convolution's backward rounds
    differently with the thread count, and 200 Adam steps carry that into weights that judge
    samples far from real ones differently."""
    if (size, seed, dims) not in _probes:
        x, y = synthetic_images(size, 10 ** 6, PROBE_TRAIN + PROBE_TEST, dims)
        nets, accuracy = {}, {}
        with one_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be in no_grad
            torch.manual_seed(seed)
            for cue in ("colour", "shape"):
                net = Probe(cue, dims)
                opt = torch.optim.Adam(net.parameters(), lr=1e-2)
                for step in range(PROBE_STEPS):
                    i = torch.randint(PROBE_TRAIN, (64,))
                    loss = F.cross_entropy(net(x[i]), y[i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                nets[cue] = net.eval().requires_grad_(False)
                with torch.no_grad():
                    accuracy[cue] = (net(x[PROBE_TRAIN:]).argmax(1) == y[PROBE_TRAIN:]).float().mean().item()
        _probes[size, seed, dims] = nets, accuracy
    return _probes[size, seed, dims]


def mirror_gap(images):
    """Mean |x - flip(x)| over the vertical centre line (plane) of uint8 images (volumes), in [0, 1]."""
    x = images.double() / 255
    return (x - x.flip(-1)).abs().mean().item()


@torch.no_grad()
def mirror_error(G, n, batch_size=50, device="cpu", seed=0):
    """Mean |x - flip(x)| over the mirror line (plane, for volumes) x = 0 of n samples of G,
    quantised like stored images, pixels in [0, 1]: 0 for a perfect mirror, as every synthetic
    training image is. Each mirrored pair is counted twice, which leaves the mean unchanged."""
    gaps = [(mirror_gap(images), len(images)) for images in generated_images(G, n, batch_size, device, seed)]
    return sum(gap * b for gap, b in gaps) / n


@torch.no_grad()
def precision_recall(real, fake, k=3, chunk=1000):
    """Kynkaanniemi et al. 2019: precision is the share of fake features inside the k-NN ball of
    some real one (k-th nearest other real feature), recall the share of real features inside
    some fake one's. Low recall with high precision is mode dropping."""
    def radii(f):  # distance to the k-th nearest other point (the 0 to itself comes first)
        return torch.cat([torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), chunk)])

    def inside(points, centres, r):
        return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= r).any(dim=1)
                          for i in range(0, len(points), chunk)]).double().mean().item()

    real, fake = real.double(), fake.double()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def object_layout(images):
    """Where the left object of each synthetic-like image (volume) is and how large: (B, dims + 1),
    its centre's coordinates in the order of the axes (row, column; depth, row, column for a volume)
    and the square (cube) root of its area (volume), in pixels, from object_masks; NaN for an image
    without an object."""
    left = data.object_masks(images)[0].flatten(1).double()  # (B, N)
    spatial = images.shape[2:]
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in spatial), indexing="ij"), -1)
    count = left.sum(1, keepdim=True)  # (B, 1)
    centre = left @ grid.reshape(-1, len(spatial)) / count  # (B, dims), NaN where count is 0
    return torch.cat([centre, count ** (1 / len(spatial))], 1).masked_fill(count == 0, float("nan"))


def object_spread(fake, labels, real, real_labels):
    """How widely a class's samples vary, against the data: for each class, the standard deviation
    of its samples' object positions and sizes (object_layout) over that of the real images of the
    class, averaged over positions and size. 1 is the data's own variety, 0 one picture per class.
    Returns (the mean over the classes, {class: its spread}); a class with fewer than two samples
    showing an object is left out."""
    f, r = object_layout(fake), object_layout(real)
    per_class = {}
    for c in sorted(set(labels.tolist())):
        fc, rc = f[labels == c], r[real_labels == c]
        fc, rc = fc[~fc.isnan().any(1)], rc[~rc.isnan().any(1)]
        if len(fc) >= 2 and len(rc) >= 2:
            per_class[c] = (fc.std(0) / rc.std(0)).mean().item()
    return (sum(per_class.values()) / len(per_class) if per_class else float("nan")), per_class


def attention_reach(beta, left, right, cover=0.5):
    """Figure 5 as a number, per sample: for the query positions on one object, the share of
    their attention (beta (B, N, M), query and key grids square, or cubic for volumes) that
    falls on the mirror object, divided by that object's share of the image; averaged over the
    queries, then over the two objects. 1 is attention spread uniformly, more is attention drawn
    to the mirror object.

    A query (key) cell's object share is the fraction of its pixels in the object mask; queries
    count as on an object when that is at least `cover`. NaN where a sample has no such query or
    an empty mirror object."""
    dims = left.dim() - 1
    side_q, side_k = (round(n ** (1 / dims)) for n in beta.shape[1:])
    pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]

    def share(mask, side):  # (B, S, S[, S]) -> (B, side^dims), row-major like SelfAttention's flattening
        return pool(mask[:, None].float(), side).flatten(1)

    reach = []
    for here, there in ((left, right), (right, left)):
        queries = share(here, side_q) >= cover  # (B, N)
        keys = share(there, side_k).to(beta.dtype)  # (B, M)
        on_mirror = (beta @ keys[..., None]).squeeze(-1) / keys.mean(dim=1, keepdim=True)  # (B, N)
        reach.append((on_mirror * queries).sum(dim=1) / queries.sum(dim=1))  # NaN for 0 / 0
    return torch.stack(reach).float().nanmean(dim=0)  # (B,)


@torch.no_grad()
def synthetic_metrics(G, n, batch_size=50, device="cpu", seed=0, probe_seed=0):
    """The measurements of a generator of synthetic images or volumes over n samples (z and labels from
    latents(..., seed)): those of sample_metrics, and
        reach    mean attention_reach of G's last attention layer over the samples where it is
                 defined (None without attention, or when no sample has two objects)
    G's train/eval mode is restored; the global random state is not touched."""
    was_training = G.training
    G.eval()
    fakes, labels, reach = [], [], []
    try:
        for z, y in latents(G.cfg, n, batch_size, seed):
            images, betas = G(z.to(device), y.to(device), return_attention=True)
            fakes.append(quantize(finite(images)).cpu())
            labels.append(y)
            if betas:
                reach.append(attention_reach(betas[-1].float().cpu(), *data.object_masks(fakes[-1])))
    finally:
        G.train(was_training)
    reach = torch.cat(reach) if reach else torch.tensor([])
    reach = reach[~reach.isnan()]
    return {**sample_metrics(torch.cat(fakes), torch.cat(labels), probe_seed),
            "reach": reach.mean().item() if len(reach) else None}


@torch.no_grad()
def sample_metrics(fake, labels, probe_seed=0):
    """Measurements of n images uint8 (n, 3, S, S) (or volumes (n, 3, S, S, S)) meant to show
    classes labels (n,), against the first n training images (volumes) of the synthetic data:
        mirror_error       mean |x - flip(x)|, pixels in [0, 1] (real images: 0)
        colour_fidelity    share of the images whose colour probe says the asked-for class
        shape_fidelity     the same for the shape probe
        fid_probe          Frechet distance in the two probes' features side by side (64-d)
        precision, recall  Kynkaanniemi et al. (k = 3) in the same features
        colour_recall      recall in the colour probe's features alone: low when the samples of a
                           class share one background tint and shade
        shape_recall       recall in the shape probe's features alone: low when they share one
                           layout, and also when they carry pixel noise, which these features see;
                           the 64-d recall follows this one, whose distances are the larger
        spread             object_spread: how the samples of a class vary in object position and
                           size, against the real images of the class (real images: about 1)
        spread_per_class   the same for each class, a list
    FID, precision and recall depend on n: compare them at equal n."""
    size, dims = fake.shape[-1], fake.dim() - 2
    nets, _ = probes(size, probe_seed, dims)
    real, real_labels = synthetic_images(size, 0, len(fake), dims)

    def features(images, cue):
        return torch.cat([nets[cue].features(images[i:i + 500]) for i in range(0, len(images), 500)])

    per_cue = {c: (features(real, c), features(fake, c)) for c in nets}  # cue -> (real, fake), each (n, 32)
    f_real, f_fake = (torch.cat(f, dim=1) for f in zip(*per_cue.values()))  # (n, 64): colour, then shape
    precision, recall = precision_recall(f_real, f_fake)
    spread, per_class = object_spread(fake, labels, real, real_labels)
    return {
        "mirror_error": mirror_gap(fake),
        "colour_fidelity": (nets["colour"](fake).argmax(1) == labels).double().mean().item(),
        "shape_fidelity": (nets["shape"](fake).argmax(1) == labels).double().mean().item(),
        "fid_probe": frechet_distance(*feature_stats(f_real), *feature_stats(f_fake)),
        "precision": precision, "recall": recall,
        **{f"{c}_recall": precision_recall(*per_cue[c])[1] for c in nets},
        "spread": spread, "spread_per_class": [round(per_class.get(c, float("nan")), 4) for c in range(10)],
    }


def during_training(source, n, ref_stats, inception_weights, device):
    """What train.py --eval-every logs: a function of G returning a dict of n samples' measurements.
    On the built-in synthetic images and volumes, the exact ones (synthetic_metrics), offline; IS
    (and FID with ref_stats) on other data, and on synthetic data too when ref_stats or
    inception_weights asks for them. Without the Inception weights, one warning, and None when
    nothing is left to measure. A bad statistics file is an error before training starts."""
    ref = load_stats(ref_stats) if ref_stats else None
    synthetic = data.SOURCES[source].synthetic
    inception = None
    if not synthetic or ref_stats or inception_weights:  # never for volumes: train.py refuses these
        try:
            inception = load_inception(inception_weights or None, device)
        except UserError as e:
            print(f"warning: no IS/FID during training: {e}", file=sys.stderr)
            if not synthetic:
                return None

    def evaluator(G):
        out = synthetic_metrics(G, n, device=device) if synthetic else {}
        if inception is not None:
            out.update(compute_metrics(G, inception, n, ref, device=device, progress=False))
        return out
    return evaluator


def print_measurements(r, model):
    """Prints a result of synthetic_metrics, with what real data reads."""
    _, accuracy = probes(model.size, r["probe_seed"], model.dims)
    real = "images" if model.dims == 2 else "volumes"
    reach = "no attention layer" if r["reach"] is None else f"{r['reach']:.2f} (1 = uniform)"
    print(f"synthetic-data measurements of {r['n']} samples ({r['weights']}, step {r['step']}):\n"
          f"  mirror error     {r['mirror_error']:.4f}   mean |x - flip(x)|, pixels in [0, 1]; real {real} 0\n"
          f"  class fidelity   colour {r['colour_fidelity']:.3f}, shape {r['shape_fidelity']:.3f}   "
          f"(the probes of seed {r['probe_seed']} on held-out real {real}: {accuracy['colour']:.3f}, {accuracy['shape']:.3f})\n"
          f"  FID (probes)     {r['fid_probe']:.2f}   against {r['n']} training {real}, 64-d probe features\n"
          f"  precision        {r['precision']:.3f}, recall {r['recall']:.3f}   (k = 3, same features)\n"
          f"                   recall in the colour probe's features {r['colour_recall']:.3f} (tint and shade), "
          f"in the shape probe's {r['shape_recall']:.3f} (layout, pixel noise)\n"
          f"  spread           {r['spread']:.2f}   of object positions and sizes within a class, over the data's; "
          f"real {real} 1, one picture per class 0\n"
          f"                   per class: {' '.join(f'{v:.2f}' for v in r['spread_per_class'])}\n"
          f"  attention reach  {reach}: attention on the mirror object over its share of the image")


@dataclass
class MeasureConfig:
    ckpt: str = ""  # a checkpoint of a run on --data synthetic or synthetic3d
    n: int = 1000  # samples; FID, precision and recall depend on it: compare at equal n
    ema: bool = True  # G's EMA weights when the checkpoint has them (--no-ema: the raw G)
    seed: int = 0  # seed of the samples' z and labels
    probe_seed: int = 0  # seed of the probes (another seed: how far to trust them)
    mirror: bool = False  # only the mirror error, without training the probes
    batch_size: int = 50  # samples per batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = ""  # also write the measurements as JSON to this file


def measure(cfg):
    at_least(cfg, 1, "n", "batch_size")
    if not cfg.ckpt:
        raise UserError("give --ckpt RUN/ckpt.pt, a checkpoint of a run on the synthetic data")
    if cfg.out and not os.path.isdir(os.path.dirname(os.path.abspath(cfg.out))):
        raise UserError(f"cannot write {cfg.out}: its folder does not exist")
    check_outputs([cfg.out], [cfg.ckpt])
    if not 0 <= cfg.seed < 2**32 or cfg.probe_seed < 0:
        raise UserError("--seed must lie in [0, 4294967295] and --probe-seed be at least 0")
    device = resolve_device(cfg.device)
    G, model, weights, step, source = from_checkpoint(cfg.ckpt, device, cfg.ema)
    result = {"ckpt": cfg.ckpt, "step": step, "weights": weights, "n": cfg.n, "seed": cfg.seed}
    if cfg.mirror:
        result["mirror_error"] = mirror_error(G, cfg.n, cfg.batch_size, device, cfg.seed)
        print(f"mirror error {result['mirror_error']:.4f}: mean |x - flip(x)| over the mirror "
              f"{'line' if model.dims == 2 else 'plane'} of {cfg.n} samples, pixels in [0, 1] ({weights}, step {step})")
    else:
        if not (source in data.SOURCES and data.SOURCES[source].synthetic):
            trained = f"was trained on {source} data" if source else "does not say what data it was trained on"
            raise UserError(f"{cfg.ckpt} {trained}; these measurements need the built-in synthetic data "
                            f"(evaluate.py gives IS and FID)")
        at_least(cfg, 10, "n")
        result.update(probe_seed=cfg.probe_seed,
                      **synthetic_metrics(G, cfg.n, cfg.batch_size, device, cfg.seed, cfg.probe_seed))
        print_measurements(result, model)
    if cfg.out:
        write_json(cfg.out, result)


def main(argv=None):
    return command(lambda argv: measure(make_config(MeasureConfig, parse_flags(MeasureConfig, argv))), argv)


if __name__ == "__main__":
    sys.exit(main())
