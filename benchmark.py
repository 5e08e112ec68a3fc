"""Speed and memory of SAGAN training and of its metrics, several variants side by side.

    python benchmark.py --size 128 --batch-size 16 --variants default,fp32,explicit_attn
    python benchmark.py --data imagenet --batch-size 256 --variants fp32,default --profile
    python benchmark.py --attention 4,128,64,64 --rounds 7 --iters 3
    python benchmark.py --attention 4,128,32,32,32 --iters 1          # one 3-D block: B,C,D,H,W
    python benchmark.py --metrics --size 128 --batch-size 50

Whole training iterations (the D steps and the G step of train.GAN.iteration, optimizer steps
included) are timed on one fixed random batch, so nothing but the model is measured; the `loader`
and `real_data` variants bring the real data loader in. Several variants run side by side in one
process, interleaved over --rounds so that a drifting machine hits them alike; the median
round is reported. Per variant: ms/iteration, images/s, peak memory (on CUDA the allocator's
peak, on a CPU the growth of resident memory), achieved TFLOP/s and, on GPUs whose dense bf16
peak is listed below, the model FLOPs utilisation (MFU), from the model's FLOPs (model_flops).
A variant that runs out of GPU memory is reported as such, and the others go on.
--profile adds where the time goes: the operators that take most of one iteration.
--attention times one attention block (2-D or 3-D), fused against explicit, leaving out the explicit
path when its score matrices cannot fit in the memory left; --metrics times the Inception
features and the Frechet distance of evaluate.py (metrics_speed, at the end).

The flags are train.py's (the same presets: --data, --size, --batch-size, ...) plus BenchConfig's.
This file sits on top of the others: nothing imports it.
"""

import dataclasses
import functools
import gc
import itertools
import math
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from torch.profiler import ProfilerActivity, profile

from data import SOURCES, make_dataset
from evaluate import FIDInception, frechet_distance, inception_outputs, load_inception
from runs import UserError, at_least, command, resolve_device, setup_processes
from sagan import SelfAttention
from train import GAN, TrainConfig, check_config, device_batches, parse_config, use_bf16


@dataclass
class BenchConfig(TrainConfig):
    variants: str = "default"  # side by side, e.g. default,fp32,channels_last,bf16,compile,explicit_attn,loader,real_data
    iters: int = 10  # timed iterations per variant and round (with --metrics: timed Inception batches)
    rounds: int = 1  # repeat the variants, interleaved; the median is reported
    profile: bool = False  # also print the operators that take most of one iteration's time
    attention: str = ""  # B,C,H,W or B,C,D,H,W: one attention block's forward and backward, fused and explicit
    metrics: bool = False  # time the Inception features of random --size images and the Frechet distance at d = 2048

VARIANTS = {  # amp (bf16 autocast), channels_last, compile, fused attention
    "fp32": (False, False, False, True),
    "explicit_attn": (False, False, False, False),
    "channels_last": (False, True, False, True),
    "bf16": (True, True, False, True),
    "compile": (True, True, True, True),
    "loader": None,  # the real data loader alone (--data, --workers): can it keep up?
    "real_data": None,  # the default variant, fed by the real data loader
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}  # dense


class PeakRSS:
    """Peak resident memory of this process while the block runs, minus the level at its start
    (sampled every 2 ms from /proc; ru_maxrss cannot be reset between variants)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.base


def next_batch_sum(batches):
    return next(batches)[0].sum()  # something to wait for, as an iteration's stats


def model_flops(cfg, n=2):
    """FLOPs of one training iteration at cfg.batch_size, the same for every variant.

    torch.utils.flop_counter counts the convolutions and matrix products (elementwise work, batch
    norm and the optimizer count zero, as MFU conventionally has it) of one eager iteration on the
    CPU for an n-image batch, with the explicit attention: its matmuls are the model's own FLOPs,
    while the fused path adds zero-padding work and torch counts nothing for its CPU flash kernel.
    Every counted operator is linear in the batch, so the count is scaled to the full batch.
    """
    small = dataclasses.replace(cfg, batch_size=n, accum=1, compile=False)
    gan = GAN(small, torch.device("cpu"), fused_attention=False)
    x = torch.rand(n, 3, *(cfg.model.size,) * cfg.model.dims) * 2 - 1
    y = torch.randint(0, max(cfg.model.n_classes, 1), (n,))
    with FlopCounterMode(display=False) as counter:
        gan.iteration(itertools.repeat((x, y)))
    return counter.get_total_flops() * cfg.batch_size / n


def time_variant(cfg, device, spec, batches, loader_only):
    """Builds the variant's GAN, warms it up, times cfg.iters iterations.
    Returns (seconds per iteration, peak bytes)."""
    amp, channels_last, compiled, fused = spec
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        gan = GAN(dataclasses.replace(cfg, compile=compiled), device, amp=amp,
                  channels_last=channels_last, fused_attention=fused)
        batches = batches(gan.memory_format)
        step = functools.partial(next_batch_sum if loader_only else gan.iteration, batches)
        for _ in range(3 if compiled else 2):  # warm-up: compilation, allocator, cuDNN's choice
            step()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(cfg.iters):
            out = step()
        out.tolist()  # waits for the device
        seconds = (time.perf_counter() - start) / cfg.iters
    return seconds, torch.cuda.max_memory_allocated() if cuda else rss.extra


def profile_iteration(gan, batches, device, label, top=12):
    """Prints the operators with the most self time in one iteration (device time on CUDA)."""
    cuda = device.type == "cuda"
    gan.iteration(batches).tolist()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        gan.iteration(batches).tolist()

    def self_us(e):  # torch >= 2.4 calls it device time; older releases only cuda time
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total

    events = sorted(prof.key_averages(), key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1
    print(f"where the time goes: one iteration of {label}, self {'CUDA' if cuda else 'CPU'} time by operator, "
          f"{total / 1000:.1f} ms in all")
    print(f"{'operator':<52} {'ms':>9} {'share':>6} {'calls':>6}")
    for e in events[:top]:
        print(f"{e.key[:52]:<52} {self_us(e) / 1000:9.1f} {100 * self_us(e) / total:5.1f}% {e.count:6d}")


def benchmark(cfg, variants=None):
    """Time cfg.iters iterations per variant, rounds interleaved; returns one row each."""
    device, _, _ = setup_processes(cfg.device)
    variants = variants or [v for v in cfg.variants.split(",") if v]
    check_config(cfg, needs_data=bool({"loader", "real_data"} & set(variants)))  # else random data
    cuda = device.type == "cuda"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_classes=SOURCES[cfg.data].classes or 1000))
    model = cfg.model
    # "default" is what train.py would run with these flags (--precision, --channels-last, --compile).
    table = {**VARIANTS, "default": (use_bf16(cfg, device), cfg.channels_last, cfg.compile, True)}
    unknown = [v for v in variants if v not in table]
    if unknown:
        raise UserError(f"unknown benchmark variant(s) {unknown}; choose from {', '.join(table)}")
    B = cfg.batch_size // cfg.accum
    x = torch.rand(B, 3, *(model.size,) * model.dims, device=device) * 2 - 1
    y = torch.randint(0, model.n_classes, (B,), device=device)
    dataset = None
    if {"loader", "real_data"} & set(variants):
        dataset = make_dataset(cfg.data, cfg.data_root or None, model.size, dims=model.dims)

    def batches_for(name):
        if table[name] is None:  # the real loader
            return lambda fmt: device_batches(dataset, cfg, 0, device, fmt)
        return lambda fmt: itertools.repeat((x.contiguous(memory_format=fmt), y))

    flops = model_flops(cfg) if set(variants) - {"loader"} else None
    times, peaks, oom = {v: [] for v in variants}, {v: [] for v in variants}, set()
    for _ in range(cfg.rounds):
        for name in variants:
            if name in oom:
                continue
            spec = table[name] or table["default"]
            try:
                sec, peak = time_variant(cfg, device, spec, batches_for(name), name == "loader")
            except torch.cuda.OutOfMemoryError:
                oom.add(name)
            else:
                times[name].append(sec)
                peaks[name].append(peak)
            gc.collect()  # the variant's model, optimizer states and activations go before the next

    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    rows = []
    for name in variants:
        if name in oom:
            rows.append(dict(variant=name, out_of_memory=True))
            continue
        sec = sorted(times[name])[len(times[name]) // 2]
        tflops = flops / sec / 1e12 if flops and name != "loader" else 0.0
        # CUDA: the true peak. CPU: RSS growth, which the first variant of a process overstates
        # (one-time allocations) and later ones understate (freed memory reused): the median.
        peak = max(peaks[name]) if cuda else sorted(peaks[name])[len(peaks[name]) // 2]
        rows.append(dict(variant=name, ms_per_iter=sec * 1000, images_per_s=cfg.batch_size / sec,
                         peak_mb=peak / 2**20, tflops=tflops, mfu=tflops / peak_tflops if peak_tflops else None))
    # On CUDA, "fp32" is PyTorch's default: convolutions may use TF32 tensor cores, matmuls not.
    where = f"{torch.cuda.get_device_name(device)} (TF32 convolutions {torch.backends.cudnn.allow_tf32}, " \
        f"matmuls {torch.backends.cuda.matmul.allow_tf32})" if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"benchmark: size {model.size}{'^3' if model.dims == 3 else ''}, ch {model.ch}, batch {cfg.batch_size} (accum {cfg.accum}), attn {model.attn}, "
          f"{where}, torch {torch.__version__}, {cfg.iters} iterations x {cfg.rounds} rounds, "
          f"{(flops or 0) / 1e12:.3f} TFLOP per iteration; peak memory is {'CUDA max allocated' if cuda else 'RSS growth'}")
    print(f"{'variant':<14} {'ms/iter':>9} {'images/s':>9} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        if r.get("out_of_memory"):
            print(f"{r['variant']:<14} out of memory (try --accum 2, or a smaller --batch-size)")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<14} {r['ms_per_iter']:9.1f} {r['images_per_s']:9.1f} {r['peak_mb']:9.0f} {r['tflops']:8.3g} {mfu:>6}")

    if cfg.profile:
        name = next((v for v in variants if v != "loader" and v not in oom), None)
        if name is None:
            raise UserError("--profile needs a variant that trains and fits in memory")
        amp, channels_last, compiled, fused = table[name] or table["default"]
        gan = GAN(dataclasses.replace(cfg, compile=compiled), device, amp=amp,
                  channels_last=channels_last, fused_attention=fused)
        profile_iteration(gan, batches_for(name)(gan.memory_format), device, name)
    return rows


def available_memory(device):
    """Bytes that can still be allocated: free GPU memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")  # not Linux: no guard


# The explicit path's peak holds about four (B, N, M) fp32 tensors: beta, kept for the backward,
# its gradient, the scores' gradient and softmax's temporary.
EXPLICIT_COPIES = 4


def benchmark_attention(cfg):
    """Forward + backward of one SelfAttention block on (B, C, [D,] H, W), fused and explicit,
    rounds interleaved. The explicit path is left out, with the arithmetic, when EXPLICIT_COPIES
    score matrices (B, N, M) would not fit in the memory available."""
    device, _, _ = setup_processes(cfg.device)
    try:
        B, C, *spatial = (int(v) for v in cfg.attention.split(","))
        if len(spatial) not in (2, 3) or min(B, *spatial) < 1 or C < 8:
            raise ValueError
    except ValueError:
        raise UserError(f"--attention takes B,C,H,W or B,C,D,H,W (positive, C at least 8), got {cfg.attention}") from None
    dims = len(spatial)
    attn = SelfAttention(C, dims, pooled=cfg.model.pooled).to(device)
    attn.gamma.data.fill_(0.5)
    N = math.prod(spatial)
    M = N // 2 ** dims if cfg.model.pooled else N  # key positions after the 2x2(x2) max-pool
    scores, free = B * N * M * 4, available_memory(device)
    paths = [True] + ([False] if EXPLICIT_COPIES * scores < free else [])
    x = torch.randn(B, C, *spatial, device=device, requires_grad=True)
    times, extra = {True: [], False: []}, {True: [], False: []}
    for _ in range(cfg.rounds):
        for fused in paths:
            attn.use_fused = fused
            attn(x).sum().backward()  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss:
                start = time.perf_counter()
                for _ in range(cfg.iters):
                    attn(x).sum().backward()
                x.grad.sum().item()  # waits for the device
                times[fused].append((time.perf_counter() - start) / cfg.iters)
            extra[fused].append(torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.extra)
    shape = ", ".join(map(str, [B, C, *spatial]))
    print(f"attention block, (B, C, {', '.join('DHW'[-dims:])}) = ({shape}), N = {N:,} positions, M = {M:,} keys, "
          f"pooled={cfg.model.pooled}, {device}, forward + backward, median of {cfg.rounds} rounds x {cfg.iters} iterations")
    for fused in paths:
        ms, mb = sorted(times[fused])[cfg.rounds // 2] * 1000, max(extra[fused]) / 2**20
        print(f"{'fused' if fused else 'explicit':<9} {ms:9.1f} ms   +{mb:7.0f} MB")
    if False not in paths:
        print(f"explicit  does not fit: its score matrix B x N x M x 4 bytes = {scores / 2**30:.3g} GiB, about "
              f"{EXPLICIT_COPIES * scores / 2**30:.3g} GiB at its peak, {free / 2**30:.3g} GiB available")
    return times, extra


def metrics_speed(cfg):
    """--metrics: Inception feature throughput (images/s; it does not depend on the weights, so
    random ones do where the real file is missing) and the time of one frechet_distance at d = 2048."""
    device = resolve_device(cfg.device)
    net = load_inception(cfg.inception_weights, device) if cfg.inception_weights else FIDInception().eval().to(device)
    size = cfg.model.size
    images = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    inception_outputs(net, [images], cfg.batch_size, device, progress=False)  # warm-up: allocator, cuDNN
    start = time.perf_counter()
    inception_outputs(net, [images] * cfg.iters, cfg.batch_size * cfg.iters, device, progress=False)
    rate = cfg.batch_size * cfg.iters / (time.perf_counter() - start)
    gen = torch.Generator().manual_seed(cfg.seed)
    a, b = (torch.randn(2048, 4096, generator=gen, dtype=torch.float64) for _ in range(2))
    stats = [(torch.randn(2048, generator=gen, dtype=torch.float64), x @ x.T / 4096) for x in (a, b)]
    seconds = []
    for _ in range(4):  # the first call pays one-time costs (LAPACK's threads and workspaces)
        start = time.perf_counter()
        frechet_distance(*stats[0], *stats[1])
        seconds.append(time.perf_counter() - start)
    seconds = sorted(seconds[1:])[1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"Inception features: {rate:.1f} images/s ({size}x{size} uint8 -> 299, batch {cfg.batch_size}, "
          f"fp32 without TF32, {where}, torch {torch.__version__})")
    print(f"frechet_distance at d = 2048: {seconds:.2f} s (float64, CPU, the median of 3 calls after one)")
    return rate, seconds


def run(argv):
    cfg, _ = parse_config(argv, BenchConfig)
    at_least(cfg, 1, "iters", "rounds", "batch_size")
    if cfg.attention:
        benchmark_attention(cfg)
    elif cfg.metrics:
        metrics_speed(cfg)
    else:
        benchmark(cfg)


def main(argv=None):
    return command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
