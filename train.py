"""Train SAGAN: the two-timescale hinge-loss loop of the paper, on one CPU, one GPU or many.

    python train.py                                    # small model, built-in data, CPU, minutes
    python train.py --data imagenet --data-root /data/imagenet/train --size 128   # the paper
    torchrun --nproc_per_node=8 train.py --data imagenet ...                      # many GPUs
    python train.py --resume --out runs/x              # continue a run (also after a crash)
    python train.py --benchmark --size 128 --batch-size 8          # speed only: benchmark.py

The recipe (paper Sec. 4 and 5): hinge loss, spectral norm in G and D, Adam(beta1=0, beta2=0.9),
lr 1e-4 for G and 4e-4 for D (TTUR), one D step per G step, batch 256 at ImageNet 128.
Each iteration: one D step on real and fake images in one concatenated batch (so D's spectral
norm runs one power iteration per D step), then one G step with fresh z and labels drawn
uniformly. Differences from the reference runs, all optional and off in the paper preset unless
said: an EMA of G's weights (--ema), bf16 autocast on CUDA (on by default there; spectral norm
and the losses stay fp32; the reference runs were fp32), channels_last (on by default),
torch.compile (--compile).

A run folder holds config.json, log.jsonl (one line per --log-every steps), samples/*.png
(a fixed z, one row per class) and ckpt.pt (written atomically: temp file, fsync, rename).
"""

import argparse
import copy
import dataclasses
import glob
import json
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize

from sagan import Discriminator, Generator, ModelConfig, d_hinge_loss, g_hinge_loss

CKPT_FORMAT, CKPT_VERSION = "sagan-checkpoint", 1


class UserError(Exception):
    """A mistake in the command line or the files it names: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass; its fields are the command-line flags
# ---------------------------------------------------------------------------------------------

def opt(default, help):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = opt("synthetic", "synthetic | cifar10 | imagenet | folder | prepared")
    data_root: str = opt("", "dataset directory (not for synthetic)")
    size: int = opt(32, "image side: 32, 64, 128 or 256")
    flip: bool = opt(False, "random horizontal flips (the reference runs: none)")
    workers: int = opt(0, "data-loading processes")
    # model (sagan.ModelConfig)
    ch: int = opt(64, "width multiplier (64 in the paper)")
    z_dim: int = 128
    attn: str = opt("auto", "attention resolutions, e.g. 64 or 32,64 or none; auto: 64 at 128 px (Table 1)")
    pooled: bool = opt(True, "max-pool keys and values 2x2 (released code)")
    g_sn: bool = opt(True, "spectral norm in G too (Sec. 4); --no-g-sn: SN on D only")
    # optimisation (Sec. 4: TTUR)
    batch_size: int = opt(64, "global batch: per-process batch x processes x --accum")
    steps: int = opt(1000, "training iterations (one G step each)")
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    equal_lr: bool = opt(False, "ablation: D uses lr_g too (no TTUR)")
    beta1: float = 0.0
    beta2: float = opt(0.9, "0.9 in the paper; the public ImageNet runs used 0.999")
    d_steps: int = opt(1, "D steps per G step (1:1 in the paper)")
    accum: int = opt(1, "gradient accumulation steps (same global batch, less memory)")
    ema: bool = opt(False, "keep an EMA of G's weights (BigGAN-PyTorch; not in the paper)")
    ema_decay: float = 0.9999
    ema_start: int = opt(2000, "copy G into the EMA until this step")
    # runtime
    out: str = opt("runs/sagan", "run folder")
    seed: int = 0
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    channels_last: bool = opt(True, "channels_last memory format (faster on CUDA and CPU)")
    compile: bool = opt(False, "torch.compile G and D")
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 1000
    eval_every: int = opt(0, "IS/FID every N steps (0: never); needs --ref-stats")
    eval_n: int = 10000
    ref_stats: str = ""
    inception_weights: str = ""
    resume: str = opt("", "checkpoint to continue from; bare --resume: OUT/ckpt.pt")
    benchmark: bool = opt(False, "time training iterations on random data, then exit")
    bench_iters: int = 10
    bench_rounds: int = opt(1, "repeat the variants, interleaved; the median is reported")
    bench_variants: str = opt("", "side by side, e.g. default,fp32,channels_last,bf16,compile,explicit_attn,loader,real_data")
    bench_attention: str = opt("", "B,C,H,W: time one attention block's forward + backward, fused vs explicit")
    bench_profile: bool = opt(False, "also print the operators that take most of one iteration's time")


# Presets by data source, then by (data source, size); every flag given on the command line wins.
CPUS = os.cpu_count() or 1
PRESETS = {
    "synthetic": dict(size=32, batch_size=64, steps=20_000),
    "cifar10": dict(size=32, ch=64, batch_size=64, steps=100_000, workers=min(4, CPUS)),
    # The paper's ImageNet recipe (Sec. 5): batch 256, ch 64, attention at 64x64, about 1M steps.
    "imagenet": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=min(8, CPUS), ckpt_every=2000),
    "folder": dict(size=64, ch=64, batch_size=64, steps=100_000, workers=min(4, CPUS)),
    "prepared": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=min(2, CPUS), ckpt_every=2000),
}
PRESETS_BY_SIZE = {
    # The default run: small enough to finish on a 2-core CPU in under 10 minutes, with samples
    # whose classes are recognisable.
    ("synthetic", 32): dict(ch=16, batch_size=32, steps=1200, log_every=50, sample_every=200, ckpt_every=200),
}
ATTN_BY_SIZE = {32: "16", 64: "32", 128: "64", 256: "64"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=None, help=f.metadata.get("help"))
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="auto", **kw)
        else:
            p.add_argument(flag, type=f.type, **kw)
    return p


def parse_config(argv=None):
    """Dataclass defaults, then the data source's preset, then the flags given. Returns the
    config and the names of the flags given explicitly (they also override a resumed run)."""
    argv = None if argv is None else [str(a) for a in argv]  # tests pass paths
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    data = given.get("data", TrainConfig.data)
    if data not in PRESETS:
        raise UserError(f"unknown data source '{data}'; choose from {', '.join(PRESETS)}")
    size = given.get("size", PRESETS[data]["size"])
    cfg = TrainConfig(**{**PRESETS[data], **PRESETS_BY_SIZE.get((data, size), {}), **given})
    return cfg, set(given)


def check_config(cfg, world=1, needs_data=True):
    if cfg.size not in ATTN_BY_SIZE:
        raise UserError(f"--size {cfg.size} is not supported; choose from {sorted(ATTN_BY_SIZE)}")
    if cfg.attn == "auto":
        cfg.attn = ATTN_BY_SIZE[cfg.size]
    at_least = {1: ("batch_size", "steps", "d_steps", "accum", "ch", "z_dim", "log_every", "sample_every",
                    "ckpt_every", "bench_iters", "bench_rounds"), 10: ("eval_n",), 0: ("workers", "eval_every", "ema_start")}
    for low, names in at_least.items():
        for name in names:
            if getattr(cfg, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(cfg, name)}")
    for name in ("lr_g", "lr_d"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, got {cfg.precision}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1 and 0 <= cfg.ema_decay < 1):
        raise UserError("--beta1, --beta2 and --ema-decay must lie in [0, 1)")
    if cfg.batch_size % (world * cfg.accum):
        raise UserError(f"--batch-size {cfg.batch_size} must divide by processes x --accum = {world * cfg.accum}")
    if needs_data and cfg.data not in ("synthetic", "cifar10") and not cfg.data_root:
        raise UserError(f"--data {cfg.data} needs --data-root")


def model_config(cfg, n_classes):
    try:
        attn = () if cfg.attn in ("none", "") else tuple(int(r) for r in cfg.attn.split(","))
    except ValueError:
        raise UserError(f"--attn takes resolutions such as 64 or 32,64, or none; got {cfg.attn}") from None
    try:
        return ModelConfig(size=cfg.size, ch=cfg.ch, z_dim=cfg.z_dim, n_classes=n_classes,
                           attn=attn, pooled=cfg.pooled, g_sn=cfg.g_sn)
    except ValueError as e:
        raise UserError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Processes, devices, precision
# ---------------------------------------------------------------------------------------------

def setup_processes(cfg):
    """A single process, or one per GPU (or CPU worker) when launched by torchrun."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is not supported; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but torch sees no CUDA GPU")
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time and pick its kernels
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device), rank, world


def use_bf16(cfg, device):
    """--precision auto: bf16 autocast on CUDA; fp32 on CPU, where bf16 is fast only on CPUs
    with native bf16 instructions (AVX512-BF16, AMX) and slow elsewhere."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


@contextmanager
def sn_in_fp32(*nets):
    """Spectral norm outside autocast: every normalised weight is computed once here, in fp32,
    and reused inside the forward (torch's parametrize.cached), so bf16 autocast never touches
    the power iteration. It also guarantees one power iteration per forward."""
    with parametrize.cached():
        for net in nets:
            for m in net.modules():
                if parametrize.is_parametrized(m, "weight"):
                    m.weight
        yield


class EndlessBatches(torch.utils.data.Sampler):
    """Shuffled batches of indices, epoch after epoch, starting at any batch number.

    Like torch's DistributedSampler (with drop_last), each global batch is split between the
    processes; unlike it, the position is a pure function of the batch number, so a resumed run
    reads exactly the batches an uninterrupted one would have read, also in mid-epoch.
    """

    def __init__(self, n, batch, seed, start=0, rank=0, world=1):
        self.n, self.batch, self.seed, self.start, self.rank, self.world = n, batch, seed, start, rank, world
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise UserError(f"the dataset has {n} images, fewer than one batch of {batch * world}")

    def __iter__(self):
        epoch, i = divmod(self.start, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            for i in range(i, self.per_epoch):
                first = (i * self.world + self.rank) * self.batch
                yield perm[first:first + self.batch].tolist()
            epoch, i = epoch + 1, 0


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain types only, written atomically, loaded with weights_only=True
# ---------------------------------------------------------------------------------------------

def rng_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    """Write to a temporary file, flush and fsync it, then rename it over `path`: a crash at any
    moment leaves either the old checkpoint or the new one, never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """Load and validate a checkpoint; every way it can be wrong is one clear UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a foreign pickle, code the safe unpickler refuses
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable sagan checkpoint (truncated, corrupt or unsafe): {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a sagan checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}; this code reads version {CKPT_VERSION}")
    return ckpt


# ---------------------------------------------------------------------------------------------
# The training iteration (Sec. 4: TTUR; Sec. 3, Eq. (4): hinge loss)
# ---------------------------------------------------------------------------------------------

class TrainingDiverged(Exception):
    """A loss or a weight became NaN or infinite."""


class GAN:
    """G, D, their optimizers and the optional EMA of G, on one device, in one process."""

    def __init__(self, cfg, mcfg, device, world=1, amp=False, channels_last=False, fused_attention=True):
        self.cfg, self.mcfg, self.device = cfg, mcfg, device
        cuda = device.type == "cuda"
        # bf16 autocast: convs and matmuls in bf16 with fp32 weights; SN and losses stay fp32.
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G = Generator(mcfg).to(device, memory_format=self.memory_format)
        self.D = Discriminator(mcfg).to(device, memory_format=self.memory_format)
        for attn in self.G.attention_layers + self.D.attention_layers:
            attn.fused = fused_attention
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema else None
        # TTUR: D learns 4x faster than G (Sec. 4); --equal-lr is the ablation without it.
        lr_d = cfg.lr_g if cfg.equal_lr else cfg.lr_d
        # fused=True: torch's one-kernel Adam update (CUDA; CPU since torch 2.4), the same arithmetic
        # as the default multi-tensor one; on a CPU 4.4x faster for the 81.5 M parameters of G and D.
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2), fused=True)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr_d, betas=(cfg.beta1, cfg.beta2), fused=True)
        # The modules that run the forward: DDP wrappers (gradients averaged over processes)
        # and optionally compiled. Checkpoints always hold the plain modules' state.
        # G_fwd and D_fwd are the plain (maybe compiled) forwards for the frozen network of a step.
        self.G_run, self.D_run, self.G_fwd, self.D_fwd = self.G, self.D, self.G, self.D
        if world > 1:
            ids = [device.index] if cuda else None
            self.G_run, self.D_run = DDP(self.G, device_ids=ids), DDP(self.D, device_ids=ids)
        if cfg.compile:
            self.G_run, self.D_run = torch.compile(self.G_run), torch.compile(self.D_run)
            self.G_fwd, self.D_fwd = torch.compile(self.G), torch.compile(self.D)

    def latents(self, n):
        z = torch.randn(n, self.mcfg.z_dim, device=self.device)
        classes = max(self.mcfg.n_classes, 1)
        return z, torch.randint(0, classes, (n,), device=self.device)  # labels drawn uniformly

    def _sync(self, net, last):
        """Under DDP, average gradients only on the last accumulation micro-batch."""
        return nullcontext() if last or not isinstance(net, DDP) else net.no_sync()

    def iteration(self, batches):
        """cfg.d_steps D steps, then one G step. Returns the logged quantities as one tensor."""
        cfg = self.cfg
        for _ in range(cfg.d_steps):
            self.opt_D.zero_grad(set_to_none=True)
            for micro in range(cfg.accum):
                x_real, y_real = next(batches)
                z, y_fake = self.latents(x_real.shape[0])
                with torch.no_grad(), sn_in_fp32(self.G), self.amp:
                    x_fake = self.G_fwd(z, y_fake)
                # One power iteration of D's spectral norm per D step: only the first
                # micro-batch runs in training mode (D has no batch norm, so this is all it does).
                self.D.train(micro == 0)
                with self._sync(self.D_run, micro == cfg.accum - 1), sn_in_fp32(self.D), self.amp:
                    # Real and fake in one batch: one forward, one spectral-norm update.
                    logits = self.D_run(torch.cat([x_real, x_fake]), torch.cat([y_real, y_fake]))
                loss_real, loss_fake = d_hinge_loss(*logits.float().chunk(2))  # Eq. (4), fp32
                ((loss_real + loss_fake) / cfg.accum).backward()
            self.opt_D.step()
        d_real, d_fake = logits.detach().float().chunk(2)

        # G step: D is frozen (no parameter gradients, no spectral-norm update).
        self.opt_G.zero_grad(set_to_none=True)
        self.D.eval().requires_grad_(False)
        for micro in range(cfg.accum):
            z, y = self.latents(x_real.shape[0])
            with self._sync(self.G_run, micro == cfg.accum - 1), sn_in_fp32(self.G, self.D), self.amp:
                loss_g = g_hinge_loss(self.D_fwd(self.G_run(z, y), y).float())  # Eq. (4)
            (loss_g / cfg.accum).backward()
        self.opt_G.step()
        self.D.train().requires_grad_(True)
        return torch.stack([loss_real.detach(), loss_fake.detach(), loss_g.detach(),
                            d_real.mean(), d_fake.mean()])

    @torch.no_grad()
    def update_ema(self, step):
        """G_ema <- decay * G_ema + (1 - decay) * G; a plain copy before cfg.ema_start."""
        decay = self.cfg.ema_decay if step >= self.cfg.ema_start else 0.0
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)  # batch-norm statistics and spectral-norm vectors

    def state(self, step):
        return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "model": dataclasses.asdict(self.mcfg), "train": dataclasses.asdict(self.cfg),
                "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "rng": rng_state()}

    def load(self, ckpt):
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        self.opt_G.load_state_dict(ckpt["opt_G"])
        self.opt_D.load_state_dict(ckpt["opt_D"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(ckpt["G_ema"] if ckpt["G_ema"] is not None else ckpt["G"])

    def first_bad_weight(self):
        nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        for net_name, net in nets.items():
            for name, p in (net.named_parameters() if net is not None else []):
                if not torch.isfinite(p).all():
                    return f"{net_name}.{name}"
        return None


# ---------------------------------------------------------------------------------------------
# The run: data, logging, samples, checkpoints, signals
# ---------------------------------------------------------------------------------------------

LOGGED = ("loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake")


def device_batches(dataset, cfg, start, device, memory_format, rank=0, world=1):
    """Endless (x, y) micro-batches on the device, from batch number `start` on. Flips are drawn
    here from torch's RNG, not in loader workers, so a resumed run flips the same images."""
    sampler = EndlessBatches(len(dataset), cfg.batch_size // (world * cfg.accum), cfg.seed, start, rank, world)
    # The loader's own generator seeds its workers, leaving the global RNG streams untouched.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.seed))
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        if cfg.flip:
            mask = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        yield x, y.to(device, non_blocking=True)


@torch.no_grad()
def save_samples(G, mcfg, seed, path, device, cols=8):
    """A grid from a fixed z: one row per class (at most 10 classes, evenly spread)."""
    rows = min(mcfg.n_classes, 10) or cols
    labels = [r * mcfg.n_classes // rows for r in range(rows)] if mcfg.n_classes else [0] * rows
    z = torch.randn(rows * cols, mcfg.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.tensor(labels, device=device).repeat_interleave(cols)
    training = G.training
    G.eval()  # running BN statistics; no spectral-norm update, so training is not disturbed
    x = G(z, y)
    G.train(training)
    from torchvision.utils import save_image
    save_image(x.float() * 0.5 + 0.5, path, nrow=cols)


def check_writable(out):
    try:
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg, given=frozenset()):
    """Train (or continue) a run; returns the number of steps done."""
    device, rank, world = setup_processes(cfg)
    ckpt = None
    if cfg.resume:
        path = os.path.join(cfg.out, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
        ckpt = load_checkpoint(path)
        known = {f.name for f in dataclasses.fields(TrainConfig)}  # a flag may have gone since
        saved = {k: v for k, v in ckpt["train"].items() if k in known}
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in given}})
        cfg.resume = path
    check_config(cfg, world)
    main_process = rank == 0
    from data import make_dataset
    dataset = make_dataset(cfg.data, cfg.data_root or None, cfg.size)
    mcfg = model_config(cfg, dataset.n_classes)
    if main_process:  # fail before training, not at the first checkpoint
        check_writable(cfg.out)
        for stale in glob.glob(os.path.join(cfg.out, "ckpt.pt.tmp*")):  # left by a killed save
            os.remove(stale)
    if ckpt is not None:
        conflicts = [f"{k} (checkpoint: {v}, now: {getattr(mcfg, k)})" for k, v in ckpt["model"].items()
                     if (tuple(v) if isinstance(v, list) else v) != getattr(mcfg, k)]
        if conflicts:
            raise UserError(f"cannot resume {cfg.resume}: the model differs in " + "; ".join(conflicts))
    if main_process:
        print("config:", json.dumps(dataclasses.asdict(cfg)), "\nmodel:", json.dumps(dataclasses.asdict(mcfg)))
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}, f, indent=1)

    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    gan = GAN(cfg, mcfg, device, world, amp=use_bf16(cfg, device), channels_last=cfg.channels_last)
    start = 0
    if ckpt is not None:
        gan.load(ckpt)
        start = ckpt["step"]
    batches = device_batches(dataset, cfg, start * cfg.d_steps * cfg.accum, device, gan.memory_format, rank, world)
    if ckpt is not None:  # after the loader has drawn its seeds, so the streams continue exactly
        if world == 1:
            set_rng_state(ckpt["rng"])
        else:  # each process has its own streams; a resumed multi-process run reseeds them
            torch.manual_seed(cfg.seed + rank + 1_000_003 * start)
    if getattr(dataset, "summary", None) and main_process:
        print(dataset.summary)

    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if main_process and os.path.exists(log_path):  # drop lines past the step we restart from
        with open(log_path) as f:
            kept = [l for l in f if l.strip() and json.loads(l)["step"] <= start]
        with open(log_path, "w") as f:
            f.writelines(kept)

    def save(step):
        bad = gan.first_bad_weight()
        if bad:
            raise TrainingDiverged(f"weight {bad} is not finite at step {step}; the last good checkpoint is kept in {ckpt_path}")
        try:
            atomic_save(gan.state(step), ckpt_path)
        except OSError as e:
            print(f"warning: could not write the checkpoint at step {step} ({e.strerror or e}); "
                  f"the previous one in {ckpt_path} is intact", file=sys.stderr)
            return False
        return True

    evaluator = make_evaluator(cfg, device) if cfg.eval_every and main_process else None
    stop = []
    # Every process catches the signal (torchrun forwards it to all); they agree on the step
    # to stop at through an all-reduce below, then rank 0 saves.
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        t_last, step_last, t_start = time.perf_counter(), start, time.perf_counter()
        for step in range(start, cfg.steps):
            stats = gan.iteration(batches)
            if gan.G_ema is not None:
                gan.update_ema(step)
            if not torch.isfinite(stats).all():  # the divergence guard, every step
                i = int((~torch.isfinite(stats)).nonzero()[0])
                raise TrainingDiverged(f"{LOGGED[i]} is {stats[i].item()} at step {step + 1}; "
                                       f"the last good checkpoint is kept in {ckpt_path}")
            done = step + 1
            # One decision per step, from a snapshot: a signal landing after it counts next step.
            # Under DDP every process must stop at the same step, so they agree by an all-reduce.
            stopping = bool(stop)
            if world > 1:
                flag = torch.tensor([float(stopping)], device=device)
                dist.all_reduce(flag)
                stopping = flag.item() > 0
            if main_process and (done % cfg.log_every == 0 or done == cfg.steps):
                now = time.perf_counter()
                rate = (done - step_last) * cfg.batch_size / (now - t_last)
                eta = (now - t_start) / (done - start) * (cfg.steps - done)
                record = dict(step=done, **{k: round(v, 5) for k, v in zip(LOGGED, stats.tolist())},
                              gamma_g=[round(a.gamma.item(), 5) for a in gan.G.attention_layers],
                              gamma_d=[round(a.gamma.item(), 5) for a in gan.D.attention_layers],
                              images_per_s=round(rate, 1))
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"step {done}/{cfg.steps} | D real {record['loss_d_real']:.3f} fake {record['loss_d_fake']:.3f}"
                      f" | G {record['loss_g']:.3f} | D(x) {record['d_real']:+.2f} D(G(z)) {record['d_fake']:+.2f}"
                      f" | gamma G {record['gamma_g']} D {record['gamma_d']} | {rate:.0f} img/s | ETA {format_eta(eta)}",
                      flush=True)
                t_last, step_last = now, done
            if main_process and (done % cfg.sample_every == 0 or done == cfg.steps):
                G_show = gan.G_ema if gan.G_ema is not None else gan.G
                save_samples(G_show, mcfg, cfg.seed, os.path.join(cfg.out, "samples", f"step_{done:07d}.png"), device)
            if evaluator is not None and done % cfg.eval_every == 0:
                metrics = evaluator(gan.G_ema if gan.G_ema is not None else gan.G)
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, **metrics}) + "\n")
                print(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
            if main_process and (done % cfg.ckpt_every == 0 or done == cfg.steps or stopping):
                if not save(done) and (done == cfg.steps or stopping):
                    raise UserError(f"the final checkpoint could not be written to {ckpt_path}")
            if stopping:
                if main_process:
                    print(f"stopped by signal {(stop or [signal.SIGTERM])[0]} at step {done}; checkpoint saved to {ckpt_path}; "
                          f"continue with: python train.py --resume --out {cfg.out}", flush=True)
                break
        else:
            done = max(start, cfg.steps)
            if main_process and getattr(dataset, "summary", ""):
                print(dataset.summary)
        if world > 1:  # wait for rank 0's last save: a process leaving early tears the group down
            dist.barrier()
        return done
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def make_evaluator(cfg, device):
    """IS (and FID with --ref-stats) through evaluate.py, for --eval-every: a function of G, or
    None, with one warning, when the Inception weights cannot be had. A bad statistics file is
    an error before training starts, not after hours."""
    import evaluate  # here, not at the top: evaluate.py imports this module
    try:
        ref = evaluate.load_stats(cfg.ref_stats) if cfg.ref_stats else None
    except evaluate.UserError as e:
        raise UserError(str(e)) from None
    try:
        inception = evaluate.load_inception(cfg.inception_weights or None, device)
    except evaluate.UserError as e:
        print(f"warning: no IS/FID during training: {e}", file=sys.stderr)
        return None
    return lambda G: evaluate.compute_metrics(G, inception, cfg.eval_n, ref, device=device, progress=False)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    from data import DataError
    try:
        cfg, given = parse_config(argv)
        if cfg.benchmark:  # speed and memory only: benchmark.py
            import benchmark
            if cfg.bench_attention:
                benchmark.benchmark_attention(cfg)
            else:
                benchmark.benchmark(cfg, [v for v in cfg.bench_variants.split(",") if v])
        else:
            train(cfg, given)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
