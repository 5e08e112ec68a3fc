"""Train SAGAN: the two-timescale hinge-loss loop of the paper, on one CPU, one GPU or many.

    python train.py                                    # small model, built-in data, CPU, minutes
    python train.py --data imagenet --data-root /data/imagenet/train --size 128   # the paper
    torchrun --nproc_per_node=8 train.py --data imagenet ...                      # many GPUs
    python train.py --resume --out runs/x              # continue a run (also after a crash)

The file reads top to bottom: the recipe (TrainConfig and PRESETS), the GAN with its D step and G
step (Eq. 4 with TTUR, Sec. 4), the training loop, the command line. The README's differences
7-10 are this file's. The bookkeeping around the loop (flags, run folder, checkpoints, signals,
progress) is runs.py's; a run folder holds config.json, log.jsonl (a line per --log-every
steps), samples/*.png (a fixed z, a row per class) and ckpt.pt.
"""

import copy
import dataclasses
import itertools
import json
import os
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize
from torchvision.utils import save_image

import data
import evaluate
import measures
from runs import (CKPT_FORMAT, CKPT_VERSION, Progress, RunFolder, StopSignals, UserError, at_least, check_outputs,
                  check_resumable, command, due, first_line, make_config, parse_flags, positive, resume_config, rng_state,
                  seed_all, set_rng_state, setup_processes)
from sagan import Discriminator, Generator, ModelConfig, d_hinge_loss, g_hinge_loss


# ---------------------------------------------------------------------------------------------
# The recipe: every field is a flag (its help the comment on its line), PRESETS set them per data
# source, and a flag given on the command line wins over both
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    data: str = "synthetic"  # synthetic | synthetic3d (volumes) | cifar10 | imagenet | folder | prepared
    data_root: str = ""  # the data source's folder (not for the built-in data)
    flip: bool = False  # random horizontal flips (the reference runs used none)
    workers: int = 0  # data-loading processes
    model: ModelConfig = field(default_factory=ModelConfig)  # its fields are flags too: --size, --ch, --attn, ...
    batch_size: int = 64  # global batch, per-process batch x processes x --accum (Sec. 5: 256)
    steps: int = 1000  # training iterations, one G step each (Sec. 5: about 1M)
    lr_g: float = 1e-4  # G's learning rate (Sec. 4, TTUR: 1e-4)
    lr_d: float = 4e-4  # D's learning rate (Sec. 4, TTUR: 4e-4, four times G's)
    equal_lr: bool = False  # ablation: D learns at lr_g too, no TTUR (Figure 3)
    beta1: float = 0.0  # Adam's beta1 (Sec. 4: 0)
    beta2: float = 0.9  # Adam's beta2 (Sec. 4: 0.9; the public ImageNet runs: 0.999, difference 8)
    d_steps: int = 1  # D steps per G step (Sec. 4: 1)
    accum: int = 1  # gradient accumulation: the same global batch in --accum parts, less memory
    ema: bool = False  # keep an EMA of G's weights (BigGAN-PyTorch's; not in the paper, difference 9)
    ema_decay: float = 0.9999  # the EMA's decay per step
    ema_start: int = 2000  # copy G into the EMA until this step
    out: str = "runs/sagan"  # run folder
    overwrite: bool = False  # start afresh in a folder that holds a run (kept in OUT/previous/ until the first checkpoint)
    seed: int = 0  # seed of every random generator
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (difference 9)
    channels_last: bool = True  # channels_last memory format (difference 9)
    compile: bool = False  # torch.compile G and D (difference 9)
    log_every: int = 50  # steps between log lines
    sample_every: int = 500  # steps between sample grids
    ckpt_every: int = 1000  # steps between checkpoints
    eval_every: int = 0  # steps between measurements, 0 never: IS/FID (FID needs --ref-stats); exact on synthetic data
    eval_n: int = 10000  # samples per measurement
    ref_stats: str = ""  # FID reference statistics (.npz of mu, sigma) for --eval-every
    inception_weights: str = ""  # the FID Inception weights for --eval-every (default: download once)
    resume: str = ""  # checkpoint to continue from; bare --resume: OUT/ckpt.pt


# Each data source's recipe (difference 10); the flags given win over it.
PRESETS = {
    # The default run: a small model that a 2-core CPU trains in minutes, at 8x the paper's
    # learning rates in its 1:4 ratio, where this model learns the shapes in 1,200 steps. z in
    # every G block keeps a class's samples as varied as its images; it needs 1,600 steps.
    "synthetic": dict(size=32, ch=16, z_blocks=True, batch_size=32, steps=1600, lr_g=8e-4, lr_d=3.2e-3,
                      log_every=50, sample_every=200, ckpt_every=200),
    # The default 3-D run: the same recipe on volumes of 16^3, the narrowest 3-D model.
    "synthetic3d": dict(size=16, dims=3, ch=8, batch_size=32, steps=1200, lr_g=8e-4, lr_d=3.2e-3,
                        log_every=50, sample_every=200, ckpt_every=200),
    # The ImageNet recipe on StudioGAN's 32 px layout, not StudioGAN's CIFAR-10 recipe.
    "cifar10": dict(size=32, ch=64, batch_size=64, steps=100_000, workers=4),
    # The paper's run (Sec. 5): 128 px, batch 256, ch 64, attention at 64x64 (feat64), 1M steps.
    "imagenet": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=8, ckpt_every=2000),
    "folder": dict(size=64, ch=64, batch_size=64, steps=100_000, workers=4),
    "prepared": dict(size=128, ch=64, batch_size=256, steps=1_000_000, workers=2, ckpt_every=2000),
}
# A folder of small images (--size 32 or less): the paper's learning rates, a model a CPU trains,
# and batch 64, with which a small real dataset's classes are learned in 1,500 steps.
SMALL_FOLDER = dict(ch=16, batch_size=64, steps=1500, log_every=50, sample_every=500, ckpt_every=500)


def parse_config(argv=None, config_class=None):
    """Dataclass defaults, then the data source's preset, then the flags given. Returns the
    config and the names of the flags given explicitly (they also override a resumed run)."""
    config_class = config_class or TrainConfig
    given = parse_flags(config_class, argv, skip=("n_classes",), options={"resume": dict(nargs="?", const="auto")})
    name = given.get("data") or data.default_source(given.get("dims", 2))
    if name not in PRESETS:
        raise UserError(f"unknown data source '{name}'; choose from {', '.join(PRESETS)}")
    preset = {k: min(v, os.cpu_count() or 1) if k == "workers" else v for k, v in PRESETS[name].items()}
    if name == "folder" and isinstance(given.get("size"), int) and given["size"] <= 32:
        preset.update(SMALL_FOLDER)
    return make_config(config_class, {"data": name, **preset, **given}), set(given)


def check_config(cfg, world=1, needs_data=True):
    at_least(cfg, 1, "batch_size", "steps", "d_steps", "accum", "log_every", "sample_every", "ckpt_every")
    at_least(cfg, 0, "workers", "eval_every", "ema_start")
    at_least(cfg, 10, "eval_n")
    positive(cfg, "lr_g", "lr_d")
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
    if cfg.data not in data.SOURCES:
        raise UserError(f"unknown data source {cfg.data!r}; choose from {', '.join(data.SOURCES)}")
    if needs_data and data.SOURCES[cfg.data].root == "required" and not cfg.data_root:
        raise UserError(f"--data {cfg.data} needs --data-root")
    if cfg.model.dims != 2 and (cfg.ref_stats or cfg.inception_weights):
        raise UserError("IS and FID are defined for images, not volumes: leave out --ref-stats and --inception-weights "
                        "(--eval-every measures a 3-D run with the exact synthetic measurements)")


# ---------------------------------------------------------------------------------------------
# The GAN and its iteration (Sec. 4: TTUR; Sec. 3, Eq. (4): hinge loss)
# ---------------------------------------------------------------------------------------------

class TrainingDiverged(UserError):
    """A loss or a weight became NaN or infinite."""

    code = 3


class GAN:
    """G, D, their Adam optimizers at the two learning rates, and the optional EMA of G."""

    def __init__(self, cfg, device, world=1, amp=False, channels_last=False, fused_attention=True):
        self.cfg, self.device = cfg, device
        # bf16 autocast: convs and matmuls in bf16 with fp32 weights; SN and losses stay fp32.
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
        self.memory_format = cfg.model.layers.channels_last if channels_last else torch.contiguous_format
        self.G = Generator(cfg.model).to(device, memory_format=self.memory_format)
        self.D = Discriminator(cfg.model).to(device, memory_format=self.memory_format)
        for attn in self.G.attention_layers + self.D.attention_layers:
            attn.use_fused = fused_attention
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema else None
        # TTUR (Sec. 4): D learns 4x faster than G; --equal-lr is the ablation without it.
        lr_d = cfg.lr_g if cfg.equal_lr else cfg.lr_d
        # fused=True: torch's one-kernel Adam update, the same arithmetic as the multi-tensor one.
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2), fused=True)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr_d, betas=(cfg.beta1, cfg.beta2), fused=True)
        # The network being updated runs through its DDP wrapper, which averages the gradients
        # over the processes; the one held fixed runs as itself. --compile compiles all four.
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = [DDP(self.G, device_ids=ids), DDP(self.D, device_ids=ids)] if world > 1 else []
        updated, held = self.ddp or [self.G, self.D], [self.G, self.D]
        if cfg.compile:
            updated, held = [torch.compile(m) for m in updated], [torch.compile(m) for m in held]
        (self.G_update, self.D_update), (self.G_held, self.D_held) = updated, held

    def latents(self, n):
        z = torch.randn(n, self.cfg.model.z_dim, device=self.device)
        classes = max(self.cfg.model.n_classes, 1)
        return z, torch.randint(0, classes, (n,), device=self.device)  # labels drawn uniformly

    @contextmanager
    def forward_context(self, *nets, sync=True):
        """Every forward runs in here: each spectrally normalised weight of `nets` computed once,
        in fp32 (sn_in_fp32), then bf16 autocast when it is on. Under DDP, `sync` False skips the
        averaging of gradients over processes, for the micro-batches of an accumulation but the last."""
        with ExitStack() as stack:
            for wrapper in [] if sync else self.ddp:
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
        """(1) Update D, G fixed. Eq. (4), at D's learning rate:

            min_D  L_D = E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z), y_fake))]

        For each of cfg.accum micro-batches: real images from `batches`, fake ones from G without
        a graph, both through D in one batch (difference 7), the two hinge terms, backward; then
        one optimizer step. Returns (loss_real, loss_fake, D's logits detached)."""
        self.opt_D.zero_grad(set_to_none=True)
        for micro in range(self.cfg.accum):
            x_real, y_real = next(batches)
            z, y_fake = self.latents(x_real.shape[0])
            with torch.no_grad(), self.forward_context(self.G):
                x_fake = self.G_held(z, y_fake)  # no graph: D's loss never reaches G
            # Real and fake in one batch, and only the first micro-batch in training mode: one
            # power iteration of D's spectral norm per D step (D has no batch norm).
            self.D.train(micro == 0)
            with self.forward_context(self.D, sync=micro == self.cfg.accum - 1):
                logits = self.D_update(torch.cat([x_real, x_fake]), torch.cat([y_real, y_fake]))
            loss_real, loss_fake = d_hinge_loss(*logits.float().chunk(2))  # in fp32
            ((loss_real + loss_fake) / self.cfg.accum).backward()
        self.opt_D.step()
        return loss_real, loss_fake, logits.detach().float()

    def g_step(self, n):
        """(2) Update G, D fixed (eval mode: no gradients, no spectral-norm update). Eq. (4), at
        G's learning rate:

            min_G  L_G = -E[D(G(z), y)]

        n fake images per micro-batch, fresh z and labels; returns L_G."""
        self.opt_G.zero_grad(set_to_none=True)
        self.D.eval().requires_grad_(False)
        for micro in range(self.cfg.accum):
            z, y = self.latents(n)
            with self.forward_context(self.G, self.D, sync=micro == self.cfg.accum - 1):
                loss_g = g_hinge_loss(self.D_held(self.G_update(z, y), y).float())
            (loss_g / self.cfg.accum).backward()
        self.opt_G.step()
        self.D.train().requires_grad_(True)
        return loss_g

    @torch.no_grad()
    def update_ema(self, step):
        """G_ema <- decay * G_ema + (1 - decay) * G; a plain copy before cfg.ema_start.
        Batch-norm statistics are copied from G, not averaged; the spectral-norm vectors stay
        G_ema's own, set by exact_spectral_norm where G_ema is used."""
        if self.G_ema is None:
            return
        decay = self.cfg.ema_decay if step >= self.cfg.ema_start else 0.0
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.lerp_(p, 1.0 - decay)
        for (name, b_ema), b in zip(self.G_ema.named_buffers(), self.G.buffers()):
            if not name.endswith(("._u", "._v")):
                b_ema.copy_(b)

    def G_to_show(self):
        """The generator to sample, measure and save: the EMA when kept, its spectral-norm vectors
        first set to the exact top singular pairs of its weights."""
        if self.G_ema is None:
            return self.G
        exact_spectral_norm(self.G_ema)
        return self.G_ema

    def first_bad_weight(self):
        """The name of the first weight holding a NaN or an infinity, or None."""
        nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        return next((f"{net_name}.{name}" for net_name, net in nets.items() if net is not None
                     for name, p in net.named_parameters() if not torch.isfinite(p).all()), None)

    def state(self, step):
        """The checkpoint: tensors and plain types only, so that loading it cannot run code."""
        train = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "model"}
        return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
                "model": dataclasses.asdict(self.cfg.model), "train": train,
                "G": self.G.state_dict(), "D": self.D.state_dict(),
                "G_ema": self.G_to_show().state_dict() if self.G_ema is not None else None,
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "rng": rng_state()}

    def load(self, ckpt, rank=0, world=1):
        """A checkpoint's state; one that does not fit (shapes, keys, optimizer states, RNG states)
        or holds weights that are not finite is a UserError, before anything trains."""
        try:
            self.G.load_state_dict(ckpt["G"])
            self.D.load_state_dict(ckpt["D"])
            for opt, name in ((self.opt_G, "opt_G"), (self.opt_D, "opt_D")):
                opt.load_state_dict(ckpt[name])
                for p in (p for group in opt.param_groups for p in group["params"]):  # fused Adam trusts them
                    if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in opt.state.get(p, {}).values()):
                        raise ValueError(f"{name} holds a state of another shape than its parameter {tuple(p.shape)}")
            if self.G_ema is not None:
                self.G_ema.load_state_dict(ckpt["G_ema"] if ckpt["G_ema"] is not None else ckpt["G"])
            if world == 1:
                set_rng_state(ckpt["rng"])
            else:  # each process has its own streams; a resumed multi-process run reseeds them
                torch.manual_seed(self.cfg.seed + rank + 1_000_003 * ckpt["step"])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"{self.cfg.resume} is a damaged sagan checkpoint: its state does not fit the model "
                            f"({first_line(e, 150)})") from None
        bad = self.first_bad_weight()
        if bad:
            raise UserError(f"{self.cfg.resume} holds weights that are not finite ({bad}): it cannot be continued")


# ---------------------------------------------------------------------------------------------
# The training loop (Sec. 4): each chore around an iteration is one call
# ---------------------------------------------------------------------------------------------

LOGGED = ("loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake")


def train(cfg, given=frozenset()):
    """Train (or continue) a run; returns the number of steps done. Everything that can fail before
    the first step (the config, the data, the model, a checkpoint's state, one batch read) is done
    before the run folder changes."""
    device, rank, world = setup_processes(cfg.device)
    try:
        cfg, ckpt, dataset, evaluator = check_run(cfg, given, device, rank, world)
        seed_all(cfg.seed + rank)
        gan = GAN(cfg, device, world, amp=use_bf16(cfg, device), channels_last=cfg.channels_last)
        start = ckpt["step"] if ckpt is not None else 0
        batches = device_batches(dataset, cfg, start * cfg.d_steps * cfg.accum, device, gan.memory_format, rank, world)
        if ckpt is not None:
            gan.load(ckpt, rank, world)
        batches = itertools.chain([next(batches)], batches)  # the first batch read, before the folder changes
        chores = (Chores if rank == 0 else Follower)(cfg, evaluator, dataset)
        try:
            return loop(cfg, gan, batches, chores.begin(gan, start), start, world)
        finally:
            chores.end()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def loop(cfg, gan, batches, chores, start, world):
    """Steps start .. cfg.steps of Sec. 4's loop, each chore one call (on the lead process; the
    others only train). Returns the number of steps done."""
    done = start
    with StopSignals() as signals:
        for step in range(start, cfg.steps):
            stats = gan.iteration(batches)  # D step(s) and G step: Eq. (4) with TTUR
            gan.update_ema(step)
            chores.check_finite(stats, step + 1)  # the divergence guard, every step
            done, stopping = step + 1, signals.agreed(world, gan.device)
            if due(done, cfg.log_every, cfg.steps):
                chores.log(done, stats)
            if due(done, cfg.sample_every, cfg.steps):
                chores.samples(done)
            if cfg.eval_every and done % cfg.eval_every == 0:
                chores.measure(done)
            if due(done, cfg.ckpt_every, cfg.steps) or stopping:
                chores.save(done, last=stopping or done == cfg.steps)
            if stopping:
                chores.stopped(done, signals.name)
                break
        if world > 1:  # wait for rank 0's last save: a process leaving early tears the group down
            dist.barrier()
    chores.finished(done)
    return done


# ---------------------------------------------------------------------------------------------
# The chores: resuming, the lead process's log, samples, measurements and checkpoints; spectral
# norm and precision; the data on the device
# ---------------------------------------------------------------------------------------------

def check_run(cfg, given, device, rank, world):
    """The checks that only read: the config (a resumed run's merged with the flags given), the
    run folder, the data, the checkpoint's model, the measurements' files. Returns (cfg,
    checkpoint or None, dataset, the --eval-every measurements or None)."""
    cfg, ckpt = resume_config(cfg, given)
    check_config(cfg, world)
    if rank == 0:
        check_outputs([cfg.out], [cfg.data_root, cfg.ref_stats, cfg.inception_weights])
        folder = RunFolder(cfg.out)
        folder.refuse_to_overwrite(cfg.resume, cfg.overwrite)
        if ckpt is not None and os.path.lexists(folder.ckpt) and os.path.realpath(cfg.resume) != os.path.realpath(folder.ckpt):
            raise UserError(f"{cfg.out} holds a run of its own; continue {cfg.resume} in another --out, or that "
                            f"run with --resume --out {cfg.out}")
    dataset = data.make_dataset(cfg.data, cfg.data_root or None, cfg.model.size, dims=cfg.model.dims)
    cfg.model = dataclasses.replace(cfg.model, n_classes=dataset.n_classes)
    if ckpt is not None:
        check_resumable(ckpt["model"], cfg.model, cfg.resume)
        if ckpt["step"] >= cfg.steps:
            raise UserError(f"{cfg.resume} is at step {ckpt['step']}, and --steps is {cfg.steps}: nothing to train; "
                            f"give a larger --steps to continue it")
    evaluator = measures.during_training(cfg.data, cfg.eval_n, cfg.ref_stats, cfg.inception_weights, device) \
        if cfg.eval_every and rank == 0 else None
    return cfg, ckpt, dataset, evaluator


class Chores:
    """What the loop does around each iteration on the lead process (rank 0): the divergence
    guard, the log line and its console line, sample grids, measurements and checkpoints. It
    takes the run folder when the loop begins, after every check."""

    def __init__(self, cfg, evaluator, dataset):
        self.cfg, self.evaluator, self.dataset = cfg, evaluator, dataset
        self.run = RunFolder(cfg.out)

    def begin(self, gan, start):
        self.gan, self.progress = gan, Progress(self.cfg.steps, start)
        cfg = self.cfg
        config = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(cfg.model)}
        self.run.open(config, start, cfg.resume, cfg.overwrite)  # from here on the folder is this run's
        print("config:", json.dumps(config["train"]), "\nmodel:", json.dumps(config["model"]))
        if self.dataset.summary:
            print(self.dataset.summary)
        return self

    def check_finite(self, stats, step):
        if not torch.isfinite(stats).all():
            i = int((~torch.isfinite(stats)).nonzero()[0])
            raise TrainingDiverged(f"training diverged: {LOGGED[i]} is {stats[i].item()} at step {step}; "
                                   f"the last good checkpoint is kept in {os.path.join(self.cfg.out, 'ckpt.pt')}")

    def log(self, done, stats):
        rate, eta = self.progress.update(done)
        r = dict(step=done, **{k: round(v, 5) for k, v in zip(LOGGED, stats.tolist())},
                 gamma_g=[round(a.gamma.item(), 5) for a in self.gan.G.attention_layers],
                 gamma_d=[round(a.gamma.item(), 5) for a in self.gan.D.attention_layers],
                 images_per_s=round(rate * self.cfg.batch_size, 1))
        print(f"step {done}/{self.cfg.steps} | D real {r['loss_d_real']:.3f} fake {r['loss_d_fake']:.3f}"
              f" | G {r['loss_g']:.3f} | D(x) {r['d_real']:+.2f} D(G(z)) {r['d_fake']:+.2f}"
              f" | gamma G {r['gamma_g']} D {r['gamma_d']} | {r['images_per_s']:.0f} img/s | {eta}", flush=True)
        self.run.log(r)

    def samples(self, done, cols=8):
        """A grid from a fixed z: one row per class (at most 10 classes, evenly spread), a column per
        z; a volume as slices and a projection side by side (evaluate.volume_views)."""
        G, n = self.gan.G_to_show(), self.cfg.model.n_classes
        rows = min(n, 10)
        training = G.training
        G.eval()  # running BN statistics; no spectral-norm update, so training is not disturbed
        x = evaluate.class_grid(G, [r * n // rows for r in range(rows)] if n else None, cols, device=self.gan.device,
                                seed=self.cfg.seed)
        G.train(training)
        pictures = evaluate.volume_views(x)
        self.run.picture(f"samples/step_{done:07d}.png", lambda f: save_image(pictures, f, nrow=cols, format="PNG"))

    def measure(self, done):
        if self.evaluator is not None:
            metrics = self.evaluator(self.gan.G_to_show())
            self.run.log({"step": done, **metrics})
            print(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)),
                  flush=True)

    def save(self, done, last):
        bad = self.gan.first_bad_weight()
        if bad:
            raise TrainingDiverged(f"training diverged: weight {bad} is not finite at step {done}; the last good "
                                   f"checkpoint is kept in {self.run.ckpt}")
        if not self.run.save(self.gan.state(done), done) and last:
            raise UserError(f"the final checkpoint could not be written to {self.run.ckpt}")

    def stopped(self, done, signal_number):
        print(f"stopped by signal {signal_number} at step {done}; checkpoint saved to {self.run.ckpt}; "
              f"continue with: python train.py --resume --out {self.cfg.out}", flush=True)

    def finished(self, done):
        if done < self.cfg.steps:  # stopped by a signal, which said where the checkpoint is
            return
        if self.dataset.summary:
            print(self.dataset.summary)
        ckpt = self.run.ckpt
        figure = f"; Figure 5: python evaluate.py --ckpt {ckpt} --attention" if self.gan.G.attention_layers else ""
        measured = f"; measured: python measures.py --ckpt {ckpt}" if data.SOURCES[self.cfg.data].synthetic else ""
        print(f"done: step {done} in {ckpt}, sample grids in {os.path.join(self.cfg.out, 'samples')}{figure}{measured}",
              flush=True)

    def end(self):
        self.run.close()


class Follower(Chores):
    """The chores of the processes but the lead: only the divergence guard."""

    def begin(self, gan, start):
        return self

    def nothing(self, *args, **kwargs):
        pass

    log = samples = measure = save = stopped = finished = end = nothing


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


@torch.no_grad()
def exact_spectral_norm(net):
    """Sets the vectors u, v of every spectral norm in `net` to the top singular pair of its weight,
    so that sigma = u^T W v is exact. For G_ema, which is never trained: an average of weights that
    move fast has close top singular values, and a power iteration per update does not keep up."""
    for m in net.modules():
        if parametrize.is_parametrized(m, "weight"):
            normalise = m.parametrizations.weight[0]
            w = normalise._reshape_weight_to_matrix(m.parametrizations.weight.original)
            u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
            normalise._u.copy_(u[:, 0])
            normalise._v.copy_(vh[0])


def device_batches(dataset, cfg, start, device, memory_format, rank=0, world=1):
    """Endless (x, y) micro-batches on the device, from batch number `start` on. Flips are drawn
    here from torch's RNG, not in loader workers, so a resumed run flips the same images."""
    sampler = data.EndlessBatches(len(dataset), cfg.batch_size // (world * cfg.accum), cfg.seed, start, rank, world)
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


def main(argv=None):
    return command(lambda argv: train(*parse_config(argv)), argv,
                   interrupted="stopped at once by a second signal; the last checkpoint written is kept")


if __name__ == "__main__":
    sys.exit(main())
