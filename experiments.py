"""The paper's claims measured on the built-in synthetic data: one command per table, and a
picture of any runs' measurements over training.

    python experiments.py table1    # Table 1: where attention goes, against the residual control
    python experiments.py figure3   # Figure 3: spectral norm in G and TTUR, over training
    python experiments.py figure5   # Figure 5: attention reach and gamma, over training
    python experiments.py curves --runs RUN,RUN --picture curves.png   # measurements over training

Each table's command trains its arms, SEEDS seeds each, with train.py (the default run's model
with z at G's input alone, as the paper has it, for 1,200 steps unless --steps is given, at the
paper's learning rates, PAPER_LR, or with --rates default at the default run's), with
measures.synthetic_metrics logged every --eval-every steps over --eval-n samples. The table of
means and sample standard deviations over the seeds is printed and written to OUT/NAME.md. Runs
live in OUT/ARM/seedK and are shared between tables; a finished run is reused and an interrupted
one resumed, so a command can be run again at any time. --jobs runs that many trainings at once,
splitting the CPU threads between them.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from runs import UserError, at_least, atomic_write, check_outputs, command, load_checkpoint, make_config, open_input, \
    parse_flags, read_json, write_json

# Each arm: the train.py flags that make it, on top of the default synthetic run (TTUR, attention
# at 16, spectral norm in G and D, 1:1) at the paper's learning rates, with the paper's G (z into
# its first layer only) and 1,200 steps. "attn16" is that run itself, in every table. (The
# default run's own rates are 8x the paper's, same ratio, and its z enters every G block: see
# train.PRESETS; the ablations keep the paper's recipe unless --rates default.)
PAPER_LR = ["--lr-g", "1e-4", "--lr-d", "4e-4"]
PAPER_G = ["--no-z-blocks"]
RATES = {"paper": "the paper's", "default": "the default run's (8x the paper's)"}
ARMS = {
    "none": ["--attn", "none"],
    "attn8": ["--attn", "8"],
    "attn16": [],
    "attn8+16": ["--attn", "8,16"],
    "res16": ["--attn", "16", "--attn-block", "residual"],
    "snD-equal-lr": ["--no-g-sn", "--equal-lr"],
    "snD-equal-lr-5D": ["--no-g-sn", "--equal-lr", "--d-steps", "5"],
    "snGD-equal-lr": ["--equal-lr"],
}
TABLES = {  # name: (arms, what the table shows)
    "table1": (["none", "attn8", "attn16", "attn8+16", "res16"], "final"),
    "figure3": (["snD-equal-lr", "snD-equal-lr-5D", "snGD-equal-lr", "attn16"], "over_steps"),
    "figure5": (["attn16"], "reach"),
}
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DEFAULT_STEPS = 1200  # every arm's unless --steps: the steps RESULTS.md's tables were measured at
RUNNING = set()  # the trainings under way
STOPPING = False  # set by an interrupt
STARTING = threading.Lock()  # held to start a training, and to stop them all: none slips between
FINAL = [("mirror_error", "mirror error", "{:.4f}"), ("colour_fidelity", "colour", "{:.3f}"),
         ("shape_fidelity", "shape", "{:.3f}"), ("fid_probe", "FID (probes)", "{:.1f}"),
         ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
         ("colour_recall", "recall colour", "{:.3f}"), ("shape_recall", "recall shape", "{:.3f}"),
         ("spread", "spread", "{:.2f}"), ("reach", "reach", "{:.2f}")]
OVER_STEPS = [("fid_probe", "FID (probes)", "{:.1f}"), ("colour_fidelity", "colour fidelity", "{:.3f}"),
              ("shape_fidelity", "shape fidelity", "{:.3f}"), ("mirror_error", "mirror error", "{:.4f}")]


@dataclass
class ExperimentConfig:
    table: str = ""  # the paper's table1, figure3 or figure5, or curves: the measures over training of --runs
    seeds: int = 3  # seeds 0 .. N-1 per arm
    steps: int = 0  # training steps per run (0: 1,200)
    eval_every: int = 200  # steps between measurements
    eval_n: int = 500  # samples per measurement
    jobs: int = 1  # trainings at once, the CPU threads split between them
    rates: str = "paper"  # learning rates: the paper's (1e-4 for G, 4e-4 for D), or the default run's (8x)
    out: str = ""  # folder of the runs and the tables (experiments, or experiments-default-rates)
    runs: str = ""  # for curves: run folders, comma-separated, whose log.jsonl holds measurements (--eval-every)
    picture: str = "curves.png"  # for curves: the PNG to write


def parse(argv):
    cfg = make_config(ExperimentConfig, parse_flags(ExperimentConfig, argv, positional=("table",),
                                                    choices={"table": list(TABLES) + ["curves"], "rates": list(RATES)}))
    cfg.out = cfg.out or ("experiments" if cfg.rates == "paper" else "experiments-default-rates")
    return cfg


def run_folder(cfg, arm, seed):
    return os.path.join(cfg.out, arm, f"seed{seed}")


def train_command(cfg, arm, seed):
    folder = run_folder(cfg, arm, seed)
    cmd = [sys.executable, TRAIN, "--out", folder, "--seed", str(seed), "--eval-every", str(cfg.eval_every),
           "--eval-n", str(cfg.eval_n), "--steps", str(cfg.steps or DEFAULT_STEPS), *PAPER_G,
           *(PAPER_LR if cfg.rates == "paper" else []), *ARMS[arm]]
    ckpt = os.path.join(folder, "ckpt.pt")
    if os.path.exists(ckpt):
        return cmd + ["--resume"]
    return cmd + (["--overwrite"] if os.path.isdir(folder) else [])  # a run that died before its first checkpoint


def finished(cfg, arm, seed):
    """The run's record (wall time of the call that finished it, threads, ...) if it has finished,
    else None. A run trained at the other learning rates is an error: its folder is not for this
    command."""
    path = os.path.join(run_folder(cfg, arm, seed), "experiment.json")
    if not os.path.lexists(path):
        return None
    done = read_json(path, "experiment record")
    kinds = {"wall_s": (int, float), "threads": int, "step": int, "eval_every": int, "eval_n": int}
    if not isinstance(done, dict) or not all(isinstance(done.get(k), t) for k, t in kinds.items()):
        raise UserError(f"the experiment record {path} is damaged; delete its folder to train that run again")
    rates = done.get("rates")
    if rates != cfg.rates:
        raise UserError(f"{os.path.dirname(path)} was trained at {RATES.get(rates, 'unknown')} learning rates, "
                        f"not at {RATES[cfg.rates]}; give another --out")
    return done if done.get("steps") == (cfg.steps or None) and done.get("eval_every") == cfg.eval_every \
        and done.get("eval_n") == cfg.eval_n else None


def train(cfg, arm, seed, threads):
    """Trains (or resumes) one run; returns its record, with the wall time in seconds of the call
    that finished it (a resumed run: of its last part only) and the threads it had."""
    done = finished(cfg, arm, seed)
    if done is not None:
        return done
    folder = run_folder(cfg, arm, seed)
    if os.path.lexists(os.path.join(folder, "ckpt.pt")):
        ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"), parts=("step", "train"))
        if ckpt["step"] >= (cfg.steps or DEFAULT_STEPS):  # finished, but not as this command asks
            was = ckpt["train"]
            raise UserError(f"the run {folder} has finished (step {ckpt['step']}, --eval-every {was.get('eval_every')}, "
                            f"--eval-n {was.get('eval_n')}) without a record of these settings; give them, another "
                            f"--out, or delete that folder to train the run again")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    log_path = folder + ".txt"
    t = time.perf_counter()
    with open(log_path, "a") as log:
        with STARTING:
            if STOPPING:  # interrupted: no new training starts
                raise KeyboardInterrupt
            # A session of its own: a Ctrl-C at the terminal reaches this process only, which
            # passes one SIGTERM on (a second signal would stop a training without saving).
            proc = subprocess.Popen(train_command(cfg, arm, seed), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": str(threads)}, start_new_session=True)
            RUNNING.add(proc)
        try:
            code = proc.wait()
        finally:
            RUNNING.discard(proc)
    if code != 0:
        with open(log_path) as f:
            last = ([line.strip() for line in f if line.strip()] or ["no output"])[-1]
        raise UserError(f"the run {folder} failed (exit {code}): {last}; its output is in {log_path}")
    ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"), parts=("step", "train"))
    step = ckpt["step"]
    if step < ckpt["train"]["steps"]:  # stopped by a signal: it saved, and the next call resumes it
        raise UserError(f"the run {folder} stopped at step {step}; run the same command again to continue")
    record = dict(wall_s=round(time.perf_counter() - t, 1), steps=cfg.steps or None, step=step,
                  eval_every=cfg.eval_every, eval_n=cfg.eval_n, threads=threads, rates=cfg.rates)
    write_json(os.path.join(folder, "experiment.json"), record)
    print(f"  {arm} seed {seed}: {step} steps in {record['wall_s'] / 60:.1f} min", flush=True)
    return record


def measurements(cfg, arm, seed):
    """{step: record} of the run's log: the synthetic measurements, and gamma from the
    training records at the same steps."""
    out = {}
    with open_input(os.path.join(run_folder(cfg, arm, seed), "log.jsonl"), "log") as f:
        for line in f:
            try:
                r = json.loads(line)
            except (ValueError, RecursionError):  # a damaged line, as train.py's resume drops them
                continue
            if isinstance(r, dict) and type(r.get("step")) is int:
                out.setdefault(r["step"], {}).update(r)
    return {step: r for step, r in out.items() if "fid_probe" in r}


def mean_std(values, fmt):
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    return fmt.format(np.mean(values)) + (" +- " + fmt.format(np.std(values, ddof=1)) if len(values) > 1 else "")


def table(cfg, name, records):
    arms, kind = TABLES[name]
    logs = {arm: [measurements(cfg, arm, s) for s in range(cfg.seeds)] for arm in arms}
    empty = [f"{arm} seed {s}" for arm in arms for s, log in enumerate(logs[arm]) if not log]
    if empty:
        raise UserError(f"the runs {', '.join(empty)} logged no measurement: --eval-every {cfg.eval_every} is more "
                        f"than their steps")
    last = max(logs[arms[0]][0])
    steps = sorted(logs[arms[0]][0])
    seeds = f"{cfg.seeds} seeds, {cfg.eval_n} samples per measurement"
    if kind == "final":
        lines = [f"| arm | flags | {' | '.join(label for _, label, _ in FINAL)} | minutes |",
                 "|---" * (len(FINAL) + 3) + "|"]
        for arm in arms:
            cells = [mean_std([log.get(last, {}).get(key) for log in logs[arm]], fmt) for key, _, fmt in FINAL]
            lines.append(f"| {arm} | `{' '.join(ARMS[arm]) or '(default)'}` | {' | '.join(cells)} | "
                         f"{mean_std([records[arm, s]['wall_s'] / 60 for s in range(cfg.seeds)], '{:.1f}')} |")
        header = f"At step {last}, mean +- std over {seeds}."
    elif kind == "over_steps":
        lines = []
        for key, label, fmt in OVER_STEPS:
            lines += [f"| {label} | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
            lines += [f"| {arm} | " + " | ".join(mean_std([log.get(s, {}).get(key) for log in logs[arm]], fmt)
                                                 for s in steps) + " |"
                      for arm in arms] + [""]
        header = f"Mean +- std over {seeds}."
    else:
        arm = arms[0]
        lines = ["| step | reach | gamma (G's attention) |", "|---|---|---|"]
        lines += [f"| {s} | {mean_std([log.get(s, {}).get('reach') for log in logs[arm]], '{:.2f}')} | "
                  f"{mean_std([(log.get(s, {}).get('gamma_g') or [None])[-1] for log in logs[arm]], '{:.4f}')} |"
                  for s in steps]
        header = f"The default run ({arm}), mean +- std over {seeds}."
    return f"{name}, at {RATES[cfg.rates]} learning rates: {header}\n\n" + "\n".join(lines).rstrip() + "\n"


def stop(signum, frame):
    raise KeyboardInterrupt


def train_all(cfg, runs, threads):
    """Trains the runs, cfg.jobs at a time; returns their records. Ctrl-C or SIGTERM stops them
    all: each training under way gets a SIGTERM, saves a checkpoint and stops, no new one starts,
    and the next call resumes them."""
    global STOPPING
    STOPPING = False
    pool, previous = ThreadPoolExecutor(cfg.jobs), signal.signal(signal.SIGTERM, stop)
    futures = [pool.submit(train, cfg, arm, seed, threads) for arm, seed in runs]
    try:
        while not all(f.done() for f in futures):  # waits in steps, so that a signal is heard at once
            wait(futures, timeout=0.5)
        return dict(zip(runs, (f.result() for f in futures)))
    except KeyboardInterrupt:
        with STARTING:
            STOPPING = True
            for proc in list(RUNNING):
                proc.send_signal(signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.shutdown(wait=True, cancel_futures=True)


CURVES = [("colour_fidelity", "colour fidelity", 1.0), ("shape_fidelity", "shape fidelity", 1.0),
          ("recall", "recall", 1.0), ("spread", "spread", 1.5), ("mirror_error", "mirror error", 0.1)]


def draw_curves(folders, path):
    """A picture of the synthetic measurements over training: a row per run folder, a panel per
    measurement (CURVES: its name and the top of its axis), steps across; real data reads 1 for
    all but the mirror error, 0. Drawn with Pillow, axes and labels included."""
    from PIL import Image, ImageDraw
    W, H, pad = 230, 150, 34
    picture = Image.new("RGB", (len(CURVES) * W, len(folders) * H + 20), "white")
    draw = ImageDraw.Draw(picture)
    for row, folder in enumerate(folders):
        rows = []
        with open_input(os.path.join(folder, "log.jsonl"), "log") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(r, dict) and "spread" in r and type(r.get("step")) is int:
                    rows.append(r)
        if not rows:
            raise UserError(f"{folder}/log.jsonl holds no synthetic measurements: train with --eval-every")
        last = max(r["step"] for r in rows)
        for col, (key, label, top) in enumerate(CURVES):
            x0, y0, x1, y1 = col * W + pad, 20 + row * H + 14, (col + 1) * W - 8, 20 + (row + 1) * H - 22
            draw.rectangle([x0, y0, x1, y1], outline="black")
            for value in (0, top / 2, top):
                y = y1 - (y1 - y0) * value / top
                draw.line([x0 - 3, y, x0, y], fill="black")
                draw.text((x0 - 30, y - 5), f"{value:g}", fill="black")
            if key != "mirror_error" and top >= 1:  # the real data's value
                y = y1 - (y1 - y0) / top
                draw.line([x0, y, x1, y], fill=(150, 150, 150))
            points = [(x0 + (x1 - x0) * r["step"] / last, y1 - (y1 - y0) * min(r[key], top) / top)
                      for r in rows if isinstance(r.get(key), (int, float))]
            draw.line(points, fill=(200, 30, 30), width=2)
            draw.text((x0, y1 + 4), "0", fill="black")
            draw.text(((x0 + x1) / 2 - 14, y1 + 4), "steps", fill="black")
            draw.text((x1 - draw.textlength(str(last)), y1 + 4), str(last), fill="black")
            draw.text((x0 + 4, y0 - 13), f"{label}" + (f"  ({os.path.basename(os.path.normpath(folder))})" if col == 0 else ""),
                      fill="black")
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def run(argv):
    cfg = parse(argv)
    if cfg.table == "curves":
        if not cfg.runs:
            raise UserError("curves needs --runs RUN[,RUN...]: run folders trained with --eval-every")
        folders = [r for r in cfg.runs.split(",") if r]
        check_outputs([cfg.picture], [os.path.join(r, "log.jsonl") for r in folders])
        draw_curves(folders, cfg.picture)
        return print(f"wrote {cfg.picture}")
    at_least(cfg, 1, "seeds", "eval_every", "eval_n", "jobs")
    at_least(cfg, 0, "steps")
    if cfg.eval_every > (cfg.steps or DEFAULT_STEPS):
        raise UserError(f"--eval-every {cfg.eval_every} is more than the runs' {cfg.steps or DEFAULT_STEPS} steps: "
                        f"they would log no measurement")
    arms = TABLES[cfg.table][0]
    runs = [(arm, seed) for seed in range(cfg.seeds) for arm in arms]
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    print(f"{cfg.table}: {len(runs)} runs ({len(arms)} arms x {cfg.seeds} seeds) in {cfg.out}, "
          f"{cfg.jobs} at a time; each run's output goes to {cfg.out}/ARM/seedK.txt", flush=True)
    t = time.perf_counter()
    records = train_all(cfg, runs, threads)
    text = table(cfg, cfg.table, records)
    used = sorted({r["threads"] for r in records.values()})  # as each run recorded: a reused one kept its own
    core_hours = sum(r["wall_s"] * r["threads"] for r in records.values()) / 3600
    text += f"\nRun time of the runs times their threads ({' or '.join(map(str, used))} each): {core_hours:.2f} " \
            f"core-hours; this command: {(time.perf_counter() - t) / 60:.1f} min.\n"
    atomic_write(os.path.join(cfg.out, cfg.table + ".md"), lambda f: f.write(text.encode()))
    print(text)


def main(argv=None):
    return command(run, argv, interrupted="interrupted: the trainings under way saved a checkpoint; the same command "
                                          "resumes them")


if __name__ == "__main__":
    sys.exit(main())
