"""Train SAGAN: the two-timescale hinge-loss loop of the paper, on one CPU, one GPU or many.

    python train.py                                    # small model, built-in data, CPU, minutes
    python train.py --data imagenet --data-root /data/imagenet/train --size 128   # the paper
    torchrun --nproc_per_node=8 train.py --data imagenet ...                      # many GPUs
    python train.py --resume --out runs/x              # continue a run (also after a crash)

The recipe (paper Sec. 4 and 5): hinge loss, spectral norm in G and D, Adam(beta1=0, beta2=0.9),
lr 1e-4 for G and 4e-4 for D (TTUR), one D step per G step, batch 256 at ImageNet 128.
Each iteration (GAN.iteration): one D step on real and fake images in one concatenated batch, so
D's spectral norm runs one power iteration per D step; then one G step with fresh z and labels
drawn uniformly, D held fixed. The README's differences 7-10 are this file's: spectral-norm
updates, Adam's beta2, the options that are not in the paper (EMA, bf16 autocast on CUDA,
channels_last, torch.compile), and the presets.

The file reads top to bottom: configuration, processes and precision, checkpoints, the GAN
iteration, the run folder, the training loop, the command line. A run folder holds config.json,
log.jsonl (one line per --log-every steps), samples/*.png (a fixed z, one row per class) and
ckpt.pt (written atomically: temp file, fsync, rename). Speed is measured by benchmark.py.
"""

import argparse
import copy
import dataclasses
import errno
import glob
import json
import os
import random
import signal
import stat
import sys
import time
from collections import namedtuple
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize
from torchvision.utils import save_image

import evaluate
import measures
from data import ArgumentParser, FolderLock, UserError, atomic_write, make_dataset, remove_stale
from evaluate import CKPT_FORMAT, CKPT_VERSION, load_checkpoint
from sagan import Discriminator, Generator, ModelConfig, d_hinge_loss, g_hinge_loss

# ---------------------------------------------------------------------------------------------
# Configuration: one dataclass for training, sagan.ModelConfig for the model; their fields are
# the command-line flags
# ---------------------------------------------------------------------------------------------


def opt(default, help):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    data: str = opt("synthetic", "synthetic | synthetic3d (volumes) | cifar10 | imagenet | folder | prepared")
    data_root: str = opt("", "dataset directory (not for synthetic)")
    flip: bool = opt(False, "random horizontal flips (the reference runs: none)")
    workers: int = opt(0, "data-loading processes")
    # the model: --size, --dims, --ch, --z-dim, --attn, --attn-block, --pooled, --g-sn (MODEL_HELP)
    model: ModelConfig = field(default_factory=ModelConfig)
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
    overwrite: bool = opt(False, "start afresh in a run folder that holds a run (deletes its checkpoint, log and samples)")
    seed: int = 0
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    channels_last: bool = opt(True, "channels_last memory format (faster on CUDA and CPU)")
    compile: bool = opt(False, "torch.compile G and D")
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 1000
    eval_every: int = opt(0, "IS/FID every N steps (0: never; FID needs --ref-stats); on synthetic data the exact measurements")
    eval_n: int = 10000
    ref_stats: str = ""
    inception_weights: str = ""
    resume: str = opt("", "checkpoint to continue from; bare --resume: OUT/ckpt.pt")


MODEL_HELP = {  # the flags of sagan.ModelConfig's fields; n_classes comes from the data
    "size": "image side: 32, 64, 128 or 256; for volumes (--dims 3) the cube's side, 16 or 32",
    "dims": "2 = images; 3 = volumes, trained on --data synthetic3d (which --dims 3 alone selects)",
    "ch": "width multiplier (64 in the paper)",
    "z_dim": "size of z",
    "attn": "attention resolutions, e.g. 64 or 32,64 or none; default: 64 at 128 px (Table 1)",
    "attn_block": "what goes at --attn: attention, or residual (Table 1's control, equal parameters)",
    "pooled": "max-pool keys and values 2x2 (released code)",
    "g_sn": "spectral norm in G too (Sec. 4); --no-g-sn: SN on D only",
}

# Presets by data source, then by (data source, size); every flag given on the command line wins.
CPUS = os.cpu_count() or 1
PRESETS = {
    "synthetic": dict(size=32, batch_size=64, steps=20_000),
    # The ImageNet recipe at StudioGAN's 32 px layout, not StudioGAN's CIFAR-10 recipe (difference 10).
    "cifar10": dict(size=32, ch=64, batch_size=64, steps=100_000, workers=min(4, CPUS)),
    # The paper's ImageNet recipe (Sec. 5): batch 256, ch 64, attention at 64x64, about 1M steps.
    "imagenet": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=min(8, CPUS), ckpt_every=2000),
    "folder": dict(size=64, ch=64, batch_size=64, steps=100_000, workers=min(4, CPUS)),
    "prepared": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=min(2, CPUS), ckpt_every=2000),
    "synthetic3d": dict(size=16, dims=3, batch_size=64, steps=20_000),
}
DEFAULT_DATA = {3: "synthetic3d"}  # the data that --dims alone selects; otherwise TrainConfig.data
PRESETS_BY_SIZE = {
    # The default run: small enough to finish on a 2-core CPU in under 10 minutes, with samples
    # whose classes are recognisable. Its learning rates are 8x the paper's, in the same 1:4
    # ratio: in 1,200 steps the measured best of 1x, 2x, 4x, 8x and 16x (README, "The default
    # run, measured"). experiments.py keeps the paper's rates.
    ("synthetic", 32): dict(ch=16, batch_size=32, steps=1200, lr_g=8e-4, lr_d=3.2e-3,
                            log_every=50, sample_every=200, ckpt_every=200),
    # The default 3-D run (python train.py --dims 3): volumes of 16^3, meant to take under 15
    # minutes on 2 cores (9 to 17 measured, by the day: README), at the same 8x rates (measured
    # against the paper's in the README's 3-D section).
    ("synthetic3d", 16): dict(ch=8, batch_size=32, steps=1200, lr_g=8e-4, lr_d=3.2e-3,
                              log_every=50, sample_every=200, ckpt_every=200),
}


def build_parser(config_class=TrainConfig):
    """One flag per field of config_class, with ModelConfig's fields in place of `model`."""
    doc = sys.modules[config_class.__module__].__doc__
    p = ArgumentParser(description=doc.split("\n")[0], allow_abbrev=False)
    model_fields = [f for f in dataclasses.fields(ModelConfig) if f.name in MODEL_HELP]
    for f in dataclasses.fields(config_class):
        for f in model_fields if f.name == "model" else [f]:
            flag = "--" + f.name.replace("_", "-")
            kw = dict(default=None, help=MODEL_HELP.get(f.name, f.metadata.get("help")))
            if f.type is bool:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif f.name == "resume":
                p.add_argument(flag, nargs="?", const="auto", **kw)
            else:
                p.add_argument(flag, type=str if f.name == "attn" else f.type, **kw)
    return p


def make_config(values, config_class=TrainConfig):
    """A config from flat values (flag names), the model's among them."""
    values = dict(values)
    model = {k: values.pop(k) for k in MODEL_HELP if k in values}
    if isinstance(model.get("attn"), str):  # the command line's "64", "32,64", "none"
        try:
            model["attn"] = () if model["attn"] in ("none", "") else tuple(int(r) for r in model["attn"].split(","))
        except ValueError:
            raise UserError(f"--attn takes resolutions such as 64 or 32,64, or none; got {model['attn']}") from None
    try:
        return config_class(**values, model=ModelConfig(**model))
    except ValueError as e:
        raise UserError(str(e)) from None


def parse_config(argv=None, config_class=TrainConfig):
    """Dataclass defaults, then the data source's preset, then the flags given. Returns the
    config and the names of the flags given explicitly (they also override a resumed run)."""
    argv = None if argv is None else [str(a) for a in argv]  # tests pass paths
    given = {k: v for k, v in vars(build_parser(config_class).parse_args(argv)).items() if v is not None}
    data = given.get("data", DEFAULT_DATA.get(given.get("dims"), TrainConfig.data))
    if data not in PRESETS:
        raise UserError(f"unknown data source '{data}'; choose from {', '.join(PRESETS)}")
    size = given.get("size", PRESETS[data]["size"])
    presets = {"data": data, **PRESETS[data], **PRESETS_BY_SIZE.get((data, size), {})}
    return make_config({**presets, **given}, config_class), set(given)


def check_config(cfg, world=1, needs_data=True):
    at_least = {1: ("batch_size", "steps", "d_steps", "accum", "log_every", "sample_every", "ckpt_every"),
                10: ("eval_n",), 0: ("workers", "eval_every", "ema_start")}
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
    if not cfg.out.strip():
        raise UserError("--out must name a folder")
    if not 0 <= cfg.seed <= 2**32 - 1 - world:
        raise UserError(f"--seed must lie in [0, {2**32 - 1 - world}], got {cfg.seed}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if cfg.batch_size % (world * cfg.accum):
        raise UserError(f"--batch-size {cfg.batch_size} must divide by processes x --accum = {world * cfg.accum}")
    if needs_data and cfg.data not in ("synthetic", "synthetic3d", "cifar10") and not cfg.data_root:
        raise UserError(f"--data {cfg.data} needs --data-root")
    if cfg.model.dims != 2 and (cfg.ref_stats or cfg.inception_weights):
        raise UserError("IS and FID are defined for images, not volumes: leave out --ref-stats and --inception-weights "
                        "(--eval-every measures a 3-D run with the exact synthetic measurements)")


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


def power_iteration(net):
    """One power iteration of every spectral norm in `net` on its current weights, in whatever
    mode `net` is (torch's parametrization iterates only in training mode)."""
    for m in net.modules():
        if parametrize.is_parametrized(m, "weight"):
            normalise = m.parametrizations.weight[0]
            training = normalise.training
            normalise.train()
            m.weight  # updates the vectors u, v in place
            normalise.train(training)


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
            x = torch.where(mask.view(-1, *(1,) * (x.dim() - 1)), x.flip(-1), x)  # left to right
        yield x, y.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain types only (GAN.state), written atomically (data.atomic_write),
# loaded with weights_only=True (evaluate.load_checkpoint)
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



# ---------------------------------------------------------------------------------------------
# The training iteration (Sec. 4: TTUR; Sec. 3, Eq. (4): hinge loss)
# ---------------------------------------------------------------------------------------------

class TrainingDiverged(Exception):
    """A loss or a weight became NaN or infinite."""


# The forwards of G and D that the iteration calls: `learn` for the network being updated (under
# DDP the wrapper that averages gradients over processes), `fixed` for the one held still (the
# plain module). Both are compiled with --compile; with neither, all four are G and D themselves.
Forwards = namedtuple("Forwards", "G D")


class GAN:
    """G, D, their optimizers and the optional EMA of G, on one device, in one process."""

    def __init__(self, cfg, mcfg, device, world=1, amp=False, channels_last=False, fused_attention=True):
        self.cfg, self.mcfg, self.device = cfg, mcfg, device
        # bf16 autocast: convs and matmuls in bf16 with fp32 weights; SN and losses stay fp32.
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        self.memory_format = mcfg.layers.channels_last if channels_last else torch.contiguous_format
        self.G = Generator(mcfg).to(device, memory_format=self.memory_format)
        self.D = Discriminator(mcfg).to(device, memory_format=self.memory_format)
        for attn in self.G.attention_layers + self.D.attention_layers:
            attn.use_fused = fused_attention
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema else None
        # TTUR: D learns 4x faster than G (Sec. 4); --equal-lr is the ablation without it.
        lr_d = cfg.lr_g if cfg.equal_lr else cfg.lr_d
        # fused=True: torch's one-kernel Adam update (CUDA; CPU since torch 2.4), the same arithmetic
        # as the default multi-tensor one; on a CPU 4.4x faster for the 81.5 M parameters of G and D.
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2), fused=True)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr_d, betas=(cfg.beta1, cfg.beta2), fused=True)
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = [DDP(self.G, device_ids=ids), DDP(self.D, device_ids=ids)] if world > 1 else []
        learn, fixed = self.ddp or [self.G, self.D], [self.G, self.D]
        if cfg.compile:
            learn, fixed = [torch.compile(m) for m in learn], [torch.compile(m) for m in fixed]
        self.learn, self.fixed = Forwards(*learn), Forwards(*fixed)

    def latents(self, n):
        z = torch.randn(n, self.mcfg.z_dim, device=self.device)
        classes = max(self.mcfg.n_classes, 1)
        return z, torch.randint(0, classes, (n,), device=self.device)  # labels drawn uniformly

    @contextmanager
    def forward(self, *nets, last=True):
        """Every forward runs in here: each spectrally normalised weight of `nets` computed once,
        in fp32 (sn_in_fp32), then bf16 autocast when it is on; under DDP, gradients are averaged
        only on the `last` micro-batch of an accumulation."""
        with ExitStack() as stack:
            for wrapper in [] if last else self.ddp:
                stack.enter_context(wrapper.no_sync())
            with sn_in_fp32(*nets), self.amp:
                yield

    def iteration(self, batches):
        """cfg.d_steps D steps, then one G step. Returns the logged quantities as one tensor."""
        for _ in range(self.cfg.d_steps):
            loss_real, loss_fake, logits = self.d_step(batches)
        loss_g = self.g_step(len(logits) // 2)
        d_real, d_fake = logits.chunk(2)
        return torch.stack([loss_real.detach(), loss_fake.detach(), loss_g.detach(), d_real.mean(), d_fake.mean()])

    def d_step(self, batches):
        """Eq. (4) for D, G fixed: L_D = E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z), y_fake))]."""
        self.opt_D.zero_grad(set_to_none=True)
        for micro in range(self.cfg.accum):
            x_real, y_real = next(batches)
            z, y_fake = self.latents(x_real.shape[0])
            with torch.no_grad(), self.forward(self.G):
                x_fake = self.fixed.G(z, y_fake)  # no graph: D's loss never reaches G
            # Real and fake in one batch, and only the first micro-batch in training mode: one
            # power iteration of D's spectral norm per D step (D has no batch norm).
            self.D.train(micro == 0)
            with self.forward(self.D, last=micro == self.cfg.accum - 1):
                logits = self.learn.D(torch.cat([x_real, x_fake]), torch.cat([y_real, y_fake]))
            loss_real, loss_fake = d_hinge_loss(*logits.float().chunk(2))  # in fp32
            ((loss_real + loss_fake) / self.cfg.accum).backward()
        self.opt_D.step()
        return loss_real, loss_fake, logits.detach().float()

    def g_step(self, n):
        """Eq. (4) for G, D fixed (no gradients, no spectral-norm update): L_G = -E[D(G(z), y)]."""
        self.opt_G.zero_grad(set_to_none=True)
        self.D.eval().requires_grad_(False)
        for micro in range(self.cfg.accum):
            z, y = self.latents(n)
            with self.forward(self.G, self.D, last=micro == self.cfg.accum - 1):
                loss_g = g_hinge_loss(self.fixed.D(self.learn.G(z, y), y).float())
            (loss_g / self.cfg.accum).backward()
        self.opt_G.step()
        self.D.train().requires_grad_(True)
        return loss_g

    @torch.no_grad()
    def update_ema(self, step):
        """G_ema <- decay * G_ema + (1 - decay) * G; a plain copy before cfg.ema_start.

        Batch-norm statistics are copied from G, not averaged. Spectral norm: G_ema keeps its own
        vectors u, v and runs one power iteration on its own averaged weights after each update;
        G's vectors would estimate sigma(W_ema) as u^T W_ema v, a lower bound of it.
        """
        if self.G_ema is None:
            return
        decay = self.cfg.ema_decay if step >= self.cfg.ema_start else 0.0
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
        for (name, b_ema), b in zip(self.G_ema.named_buffers(), self.G.buffers()):
            if not name.endswith(("._u", "._v")):  # spectral-norm vectors stay G_ema's own
                b_ema.copy_(b)
        power_iteration(self.G_ema)

    def state(self, step):
        train = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "model"}
        return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "model": dataclasses.asdict(self.mcfg), "train": train,
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
# The run folder, progress lines, signals
# ---------------------------------------------------------------------------------------------

LOGGED = ("loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake")


class RunFolder:
    """What a run keeps on disk, written by rank 0 alone: config.json, log.jsonl, samples/, ckpt.pt.

    A folder belongs to one run: a fresh run into a folder that holds a checkpoint is refused
    (unless --overwrite), and a lock (data.FolderLock) refuses a second process while one trains.
    Every file is written atomically or, for log lines, appended whole or not at all; a write
    that fails (a full disk, an I/O error) is one warning, and training goes on.
    """

    def __init__(self, out):
        self.out = out
        self.ckpt = os.path.join(out, "ckpt.pt")
        self.log_path = os.path.join(out, "log.jsonl")
        self.lock, self.failing = None, set()

    def refuse_to_overwrite(self, cfg):
        """A fresh run must not destroy the run already in the folder (only reads)."""
        if cfg.resume or cfg.overwrite or not os.path.exists(self.ckpt):
            return
        try:
            step = f"at step {torch.load(self.ckpt, map_location='cpu', weights_only=True, mmap=True)['step']}"
        except Exception:
            step = "unreadable"
        raise UserError(f"{self.out} already holds a run (its checkpoint is {step}); continue it with "
                        f"--resume, choose another --out, or start afresh with --overwrite")

    def open(self, cfg, mcfg, start):
        """Takes the folder for this run, after every check: locks it, removes the temporary
        files of dead processes, clears it for --overwrite, cuts the log back to step `start`
        (a resumed run writes what follows again) and writes config.json (and the console)."""
        try:
            os.makedirs(os.path.join(self.out, "samples"), exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.out}: {e.strerror or e}") from None
        self.lock = FolderLock(self.out, "a training run").__enter__()
        try:
            self.refuse_to_overwrite(cfg)  # again, now that no other process can start a run here
            remove_stale(self.out)
            remove_stale(os.path.join(self.out, "samples"))
            if cfg.overwrite:
                for path in [self.ckpt, self.log_path] + glob.glob(os.path.join(self.out, "samples", "*.png")):
                    if os.path.exists(path):
                        os.remove(path)
            self.trim_log(start)
            print("config:", json.dumps(dataclasses.asdict(cfg)), "\nmodel:", json.dumps(dataclasses.asdict(mcfg)))
            text = json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg)}, indent=1)
            self.attempt("config.json", lambda: atomic_write(os.path.join(self.out, "config.json"),
                                                            lambda f: f.write(text.encode())))
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None

    def trim_log(self, start):
        """Keeps the log's lines up to step `start`. A damaged line (half a line from a full disk,
        garbage, not a JSON object with an integer step) is dropped, with one warning."""
        if not os.path.isfile(self.log_path):
            return
        with open(self.log_path, "rb") as f:
            lines = [line for line in f.read().split(b"\n") if line.strip()]
        kept, damaged = [], 0
        for line in lines:
            try:
                record = json.loads(line)
                good = isinstance(record, dict) and type(record.get("step")) is int
            except ValueError:  # not JSON, or not UTF-8
                good = False
            damaged += not good
            if good and record["step"] <= start:
                kept.append(line + b"\n")
        if damaged:
            print(f"warning: dropped {damaged} damaged line{'s' * (damaged > 1)} of {len(lines)} from {self.log_path}",
                  file=sys.stderr)
        if len(kept) < len(lines):
            self.attempt("log", lambda: atomic_write(self.log_path, lambda f: f.writelines(kept)))

    def attempt(self, what, write):
        """Runs write(); an OSError is one warning (until the same kind of write works again)."""
        try:
            write()
        except OSError as e:
            if what not in self.failing:
                print(f"warning: could not write the {what} in {self.out} ({e.strerror or e}); training goes on",
                      file=sys.stderr)
            self.failing.add(what)
            return False
        self.failing.discard(what)
        return True

    def log(self, record):
        """Appends one line, whole or not at all: after a failed or short write the file is cut
        back to its length before, so a full disk never leaves half a line."""
        line = (json.dumps(record) + "\n").encode()

        def append():
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    if os.write(fd, line) != len(line):
                        raise OSError(errno.ENOSPC, "short write")
                except OSError:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        self.attempt("log", append)

    def save(self, gan, step):
        """Writes the checkpoint; False, with a warning, when the disk refuses (the previous one stays)."""
        bad = gan.first_bad_weight()
        if bad:
            raise TrainingDiverged(f"weight {bad} is not finite at step {step}; the last good checkpoint is kept in {self.ckpt}")
        try:
            atomic_write(self.ckpt, lambda f: torch.save(gan.state(step), f))
        except OSError as e:
            print(f"warning: could not write the checkpoint at step {step} ({e.strerror or e}); "
                  f"the previous one in {self.ckpt} is intact", file=sys.stderr)
            return False
        return True

    @torch.no_grad()
    def samples(self, G, mcfg, seed, step, device, cols=8):
        """A grid from a fixed z: one row per class (at most 10 classes, evenly spread); a volume
        as slices and a projection side by side (evaluate.volume_views)."""
        rows = min(mcfg.n_classes, 10) or cols
        labels = [r * mcfg.n_classes // rows for r in range(rows)] if mcfg.n_classes else [0] * rows
        z = torch.randn(rows * cols, mcfg.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
        y = torch.tensor(labels, device=device).repeat_interleave(cols)
        training = G.training
        G.eval()  # running BN statistics; no spectral-norm update, so training is not disturbed
        x = G(z, y)
        G.train(training)
        pictures = evaluate.volume_views(x.float() * 0.5 + 0.5)
        path = os.path.join(self.out, "samples", f"step_{step:07d}.png")
        self.attempt("sample grid", lambda: atomic_write(path, lambda f: save_image(pictures, f, nrow=cols, format="PNG")))


class Progress:
    """The log record and the console line of a step: losses, mean D(x) and D(G(z)), each
    attention layer's gamma, images/s since the last line and the time left."""

    def __init__(self, cfg, start):
        self.cfg, self.start = cfg, start
        self.t_start = self.t_last = time.perf_counter()
        self.step_last = start

    def record(self, done, stats, gan):
        now = time.perf_counter()
        rate = (done - self.step_last) * self.cfg.batch_size / (now - self.t_last)
        eta = (now - self.t_start) / (done - self.start) * (self.cfg.steps - done)
        self.t_last, self.step_last = now, done
        r = dict(step=done, **{k: round(v, 5) for k, v in zip(LOGGED, stats.tolist())},
                 gamma_g=[round(a.gamma.item(), 5) for a in gan.G.attention_layers],
                 gamma_d=[round(a.gamma.item(), 5) for a in gan.D.attention_layers],
                 images_per_s=round(rate, 1))
        print(f"step {done}/{self.cfg.steps} | D real {r['loss_d_real']:.3f} fake {r['loss_d_fake']:.3f}"
              f" | G {r['loss_g']:.3f} | D(x) {r['d_real']:+.2f} D(G(z)) {r['d_fake']:+.2f}"
              f" | gamma G {r['gamma_g']} D {r['gamma_d']} | {rate:.0f} img/s | ETA {format_eta(eta)}", flush=True)
        return r


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StopSignals:
    """Ctrl-C and SIGTERM (a preemption) ask the loop to stop after the current step, with a
    checkpoint. Every DDP process catches them (torchrun forwards them to all), and `agreed`
    makes all of them stop at the same step, from one snapshot per step: a signal landing after
    it counts next step. A second signal stops the process at once (KeyboardInterrupt), wherever
    it is waiting, keeping the last checkpoint."""

    def __enter__(self):
        self.caught = []
        self.saved = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self, signum, frame):
        if self.caught:
            raise KeyboardInterrupt
        self.caught.append(signum)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def agreed(self, world, device):
        stopping = bool(self.caught)
        if world > 1:
            flag = torch.tensor([float(stopping)], device=device)
            dist.all_reduce(flag)
            stopping = flag.item() > 0
        return stopping

    @property
    def name(self):
        return (self.caught or [signal.SIGTERM])[0]


def make_evaluator(cfg, device):
    """The measurements of --eval-every: a function of G returning a dict. On the built-in
    synthetic images and volumes, the exact ones (measures.synthetic_metrics), offline; IS (and
    FID with --ref-stats) on other data, and on synthetic data too when --ref-stats or
    --inception-weights asks for them. Without the Inception weights, one warning, and None when
    nothing is left to measure. A bad statistics file is an error before training starts, not
    after hours."""
    ref = evaluate.load_stats(cfg.ref_stats) if cfg.ref_stats else None
    synthetic = cfg.data in measures.SOURCES
    inception = None
    if not synthetic or cfg.ref_stats or cfg.inception_weights:  # never for volumes: check_config refuses these
        try:
            inception = evaluate.load_inception(cfg.inception_weights or None, device)
        except UserError as e:
            print(f"warning: no IS/FID during training: {e}", file=sys.stderr)
            if not synthetic:
                return None

    def evaluator(G):
        out = measures.synthetic_metrics(G, cfg.eval_n, device=device) if synthetic else {}
        if inception is not None:
            out.update(evaluate.compute_metrics(G, inception, cfg.eval_n, ref, device=device, progress=False))
        return out
    return evaluator


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

def with_resume(cfg, given):
    """(cfg, checkpoint or None): with --resume, the checkpoint's configuration with the flags
    given now on top (a flag may have gone from the code since the checkpoint was written), less
    --overwrite, which said how the run began and would refuse the resume."""
    if not cfg.resume:
        return cfg, None
    path = os.path.join(cfg.out, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
    ckpt = load_checkpoint(path)
    known = ({f.name for f in dataclasses.fields(TrainConfig)} - {"overwrite"}) | set(MODEL_HELP)
    saved = {k: v for k, v in {**ckpt["train"], **ckpt["model"]}.items() if k in known}
    now = {k: getattr(cfg.model if k in MODEL_HELP else cfg, k) for k in given}
    return make_config({**saved, **now, "resume": path}), ckpt


def check_resumable(ckpt, mcfg, path):
    conflicts = [f"{k} (checkpoint: {v}, now: {getattr(mcfg, k)})" for k, v in ckpt["model"].items()
                 if (tuple(v) if isinstance(v, list) else v) != getattr(mcfg, k)]
    if conflicts:
        raise UserError(f"cannot resume {path}: the model differs in " + "; ".join(conflicts))


def due(done, every, cfg):
    return done % every == 0 or done == cfg.steps


def train(cfg, given=frozenset()):
    """Train (or continue) a run; returns the number of steps done."""
    device, rank, world = setup_processes(cfg)
    try:
        cfg, ckpt = with_resume(cfg, given)
        check_config(cfg, world)
        main = rank == 0
        run = RunFolder(cfg.out)
        if main:
            run.refuse_to_overwrite(cfg)
        dataset = make_dataset(cfg.data, cfg.data_root or None, cfg.model.size, dims=cfg.model.dims)
        mcfg = cfg.model = dataclasses.replace(cfg.model, n_classes=dataset.n_classes)
        if ckpt is not None:
            check_resumable(ckpt, mcfg, cfg.resume)
        evaluator = make_evaluator(cfg, device) if cfg.eval_every and main else None
        start = ckpt["step"] if ckpt is not None else 0
        if main:  # every check is done: from here on the folder is this run's
            run.open(cfg, mcfg, start)
        try:
            return loop(cfg, mcfg, ckpt, start, dataset, run, evaluator, device, rank, world)
        finally:
            run.close()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def loop(cfg, mcfg, ckpt, start, dataset, run, evaluator, device, rank, world):
    """The training loop, from step `start` on; returns the number of steps done."""
    main = rank == 0
    for seed_everything in (random.seed, np.random.seed, torch.manual_seed):
        seed_everything(cfg.seed + rank)
    gan = GAN(cfg, mcfg, device, world, amp=use_bf16(cfg, device), channels_last=cfg.channels_last)
    batches = device_batches(dataset, cfg, start * cfg.d_steps * cfg.accum, device, gan.memory_format, rank, world)
    if ckpt is not None:
        gan.load(ckpt)
        if world == 1:
            set_rng_state(ckpt["rng"])
        else:  # each process has its own streams; a resumed multi-process run reseeds them
            torch.manual_seed(cfg.seed + rank + 1_000_003 * start)
    if getattr(dataset, "summary", None) and main:
        print(dataset.summary)

    progress, done = Progress(cfg, start), start
    with StopSignals() as signals:
        for step in range(start, cfg.steps):
            stats = gan.iteration(batches)  # D step(s) and G step: Eq. (4) with TTUR
            gan.update_ema(step)
            if not torch.isfinite(stats).all():  # the divergence guard, every step
                i = int((~torch.isfinite(stats)).nonzero()[0])
                raise TrainingDiverged(f"{LOGGED[i]} is {stats[i].item()} at step {step + 1}; "
                                       f"the last good checkpoint is kept in {run.ckpt}")
            done, stopping = step + 1, signals.agreed(world, device)
            if main and due(done, cfg.log_every, cfg):
                run.log(progress.record(done, stats, gan))
            G_show = gan.G_ema if gan.G_ema is not None else gan.G
            if main and due(done, cfg.sample_every, cfg):
                run.samples(G_show, mcfg, cfg.seed, done, device)
            if evaluator is not None and done % cfg.eval_every == 0:
                metrics = evaluator(G_show)
                run.log({"step": done, **metrics})
                print(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None), flush=True)
            if main and (due(done, cfg.ckpt_every, cfg) or stopping):
                if not run.save(gan, done) and (done == cfg.steps or stopping):
                    raise UserError(f"the final checkpoint could not be written to {run.ckpt}")
            if stopping:
                if main:
                    print(f"stopped by signal {signals.name} at step {done}; checkpoint saved to {run.ckpt}; "
                          f"continue with: python train.py --resume --out {cfg.out}", flush=True)
                break
        else:
            done = max(start, cfg.steps)
            if main and getattr(dataset, "summary", ""):
                print(dataset.summary)
        if world > 1:  # wait for rank 0's last save: a process leaving early tears the group down
            dist.barrier()
    return done


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    try:
        train(*parse_config(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("stopped at once by a second signal; the last checkpoint written is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
