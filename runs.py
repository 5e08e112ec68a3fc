"""The bookkeeping of a run. Nothing in this file is SAGAN.

Every command of the project (train.py, evaluate.py, measures.py, data.py, benchmark.py,
experiments.py) takes its chores from here, so that the files a reader opens for the paper hold
none of them:

    errors        UserError, and command(), which turns one into a line "error: ..." and exit 2
    flags         the command line of a config dataclass: one flag per field, its help the
                  comment on the field's line (parse_flags, make_config)
    checks        at_least, positive
    devices       resolve_device, and the processes of a torchrun launch
    files         open_input, regular_file and read_json (inputs: regular files only, never
                  blocking), check_outputs (no output onto an input or a run's files),
                  atomic_write, FolderLock, remove_stale
    checkpoints   the checkpoint format and load_checkpoint
    run folders   RunFolder: config.json, log.jsonl, pictures and ckpt.pt of one run
    signals       StopSignals: Ctrl-C and SIGTERM end a run at a step boundary, with a checkpoint
    progress      Progress: the rate and the time left, in one format everywhere
    randomness    seed_all, rng_state, set_rng_state

It imports nothing of the project.
"""

import argparse
import ast
import dataclasses
import errno
import fcntl
import inspect
import io
import json
import os
import random
import re
import signal
import stat
import sys
import textwrap
import time
import tokenize
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------
# Errors: a user's mistake is one line and exit 2, never a traceback
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake in the command line or in the files it names (data, checkpoints, statistics).
    command() prints it as one line starting with "error:" and exits with `code`."""

    code = 2


def command(run, argv=None, interrupted="interrupted"):
    """Runs run(argv) as a command line program; returns its exit code. A UserError is one line
    "error: ..." (exit 2, or the error's own code), and so are an OSError (a file that cannot be
    read or written) and a size too large for memory; Ctrl-C is one line and exit 130. Warnings are
    one line "warning: ..." each, and a file name the terminal cannot show is escaped, not a crash.
    Any other exception is a bug and keeps its traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with warnings.catch_warnings():  # restores the warnings machinery when called in-process
        warnings.simplefilter("always")
        # One write per line: warnings from several DataLoader workers share stderr, and a line
        # written in two parts could be cut by another process's.
        warnings.showwarning = lambda message, *args, **kwargs: sys.stderr.write(f"warning: {message}\n")
        try:
            run(argv)
        except UserError as e:
            # One raised in a DataLoader worker comes back wrapped in the worker's traceback: its
            # own message is the last line.
            message = str(e).strip().splitlines()[-1] if "\nOriginal Traceback" in str(e) else str(e)
            message = re.sub(r"^[\w.]*UserError: ", "", message)
            print(f"error: {message}", file=sys.stderr)
            return e.code
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and "allocat" not in str(e) and "out of memory" not in str(e):
                raise
            print(f"error: not enough memory for what was asked ({first_line(e, 120) or 'MemoryError'}); "
                  f"ask for a smaller size, batch or number of samples", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr)
            return 130
    return 0


# ---------------------------------------------------------------------------------------------
# Flags: a config dataclass is its own command line
# ---------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed command line a UserError like any other mistake: one line
    instead of argparse's usage block."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def flag(name):
    return "--" + name.replace("_", "-")


def field_comments(cls):
    """{field: the comment at the end of its line} over cls and its dataclass bases: a flag's help."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        on_line = {t.start[0]: t.string.lstrip("# ") for t in tokenize.generate_tokens(io.StringIO(source).readline)
                   if t.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and node.lineno in on_line:
                comments[node.target.id] = on_line[node.lineno]
    return comments


def is_tuple(kind):
    return kind is tuple or tuple in typing.get_args(kind)


def int_tuple(name, text):
    """A flag's "32,64" as (32, 64); "none" or "" as ()."""
    try:
        return () if text.strip() in ("none", "") else tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag(name)} takes integers such as 64 or 32,64, or none; got {text}") from None


def leaf_fields(cls):
    """cls's fields, those of a nested config dataclass in its place: (field, owning field or None)."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            yield from ((inner, f.name) for inner in dataclasses.fields(f.type))
        else:
            yield f, None


def build_parser(cls, description="", positional=(), choices=None, options=None, skip=()):
    """One flag per field of cls (a nested config's fields flat among them), named --field-name,
    its help the comment on the field's line; booleans take --x / --no-x. `positional` names
    fields given without a flag, `choices` the allowed values of fields, `options` extra
    add_argument keywords per field. Unset flags parse as None, so that the caller knows which
    were given."""
    parser = ArgumentParser(description=description, allow_abbrev=False)
    helps = {**{k: v for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.type)
                for k, v in field_comments(f.type).items()}, **field_comments(cls)}
    for f, _ in leaf_fields(cls):
        if f.name in skip:
            continue
        kw = dict(help=helps.get(f.name), choices=(choices or {}).get(f.name), **(options or {}).get(f.name, {}))
        if f.name in positional:
            parser.add_argument(f.name, **kw)
        elif f.type is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=None, **kw)
        else:
            kind = str if is_tuple(f.type) else typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
            parser.add_argument(flag(f.name), type=kind, default=None, **kw)
    return parser


def parse_flags(cls, argv, **parser_options):
    """{field: value} of the flags given on the command line (tests may pass paths and numbers)."""
    argv = None if argv is None else [str(a) for a in argv]
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
    values = vars(build_parser(cls, doc, **parser_options).parse_args(argv))
    return {k: v for k, v in values.items() if v is not None}


def of_type(value, kind):
    """Whether value is of a field's type: int, float (an int too), bool, str, or a tuple of ints."""
    if is_tuple(kind):
        return value is None and type(None) in typing.get_args(kind) or \
            isinstance(value, (tuple, list)) and all(type(v) is int for v in value)
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
    return type(value) is kind or kind is float and type(value) is int or value is None and kind is not bool and \
        type(None) in typing.get_args(kind)


def make_config(cls, values):
    """A config from flat values, the nested config's fields among them (unknown names are
    refused); a value of the wrong type, or one the dataclass refuses (its ValueError), is a
    UserError, so a config read back from a file is checked as the command line is."""
    own, nested, fields = {}, {}, {f.name: (f, owner) for f, owner in leaf_fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown configuration field {', '.join(map(str, unknown))}")
    for name, value in values.items():
        f, owner = fields[name]
        if is_tuple(f.type) and isinstance(value, str):
            value = int_tuple(name, value)
        if not of_type(value, f.type):
            raise UserError(f"{flag(name)} must be {getattr(f.type, '__name__', f.type)}, got {value!r}")
        (nested.setdefault(owner, {}) if owner else own)[name] = value
    try:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type):
                own[f.name] = f.type(**nested.get(f.name, {}))
        return cls(**own)
    except ValueError as e:
        raise UserError(str(e)) from None


def flat_values(cfg):
    """The inverse of make_config: {field: value}, a nested config's fields among them."""
    return {f.name: getattr(getattr(cfg, owner) if owner else cfg, f.name) for f, owner in leaf_fields(type(cfg))}


# ---------------------------------------------------------------------------------------------
# Checks of values, devices, processes
# ---------------------------------------------------------------------------------------------

def at_least(cfg, low, *names):
    for name in names:
        if getattr(cfg, name) < low:
            raise UserError(f"{flag(name)} must be at least {low}, got {getattr(cfg, name)}")


def positive(cfg, *names):
    for name in names:
        if not getattr(cfg, name) > 0:
            raise UserError(f"{flag(name)} must be positive, got {getattr(cfg, name)}")


def resolve_device(name):
    """--device auto | cpu | cuda | cuda:N as a torch.device; auto is CUDA where torch sees a GPU."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {name}, but torch sees no CUDA GPU")
    return torch.device(device)


def setup_processes(device_name):
    """(device, rank, world): one process, or one per GPU (or CPU worker) under torchrun, which
    sets WORLD_SIZE, RANK and LOCAL_RANK. Several processes form a DDP group (NCCL, gloo on CPU)."""
    try:
        world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not a process of WORLD_SIZE {world}; unset both to train in one process")
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time and pick its kernels
    if world > 1:
        if device.type == "cuda":
            device = torch.device(f"cuda:{local}")
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            except (ValueError, RuntimeError) as e:
                raise UserError(f"WORLD_SIZE {world} asks for several processes, but they could not meet "
                                f"({first_line(e, 120)}); launch them with torchrun, or unset WORLD_SIZE and RANK") from None
    return device, rank, world


# ---------------------------------------------------------------------------------------------
# Files: whole or not at all, and one process per folder
# ---------------------------------------------------------------------------------------------

def fsync_folder(folder):
    """Make renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write a file whole or not at all: write(f) fills a temporary file beside `path` (opened
    "wb"), which is flushed, fsynced and renamed over `path`. A crash, a kill or a full disk at any
    moment leaves the previous file as it was. A failure raises OSError, after the temporary file
    is removed; torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
    pos ..."), which becomes an OSError here."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    except RuntimeError as err:
        raise OSError(errno.EIO, f"{str(err).strip().splitlines()[0][:120]} (a full disk?)") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def open_input(path, what="file"):
    """Opens an input for reading ("rb") only if it is a regular file: a FIFO, a socket, a device or
    a folder named like the input is one UserError, and opening never blocks (O_NONBLOCK, cleared
    once the file is known to be regular). The commands read their inputs through this, or check
    them with regular_file first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise UserError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UserError(f"the {what} {path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def regular_file(path, what="file"):
    """Raises a UserError unless path is a regular file (for readers that take a path, such as a
    memory map): opened as open_input opens it, and closed unread."""
    open_input(path, what).close()
    return path


def read_json(path, what="file"):
    """A JSON file's value; a file that is not JSON, or nests too deep to read, is a UserError."""
    with open_input(path, what) as f:
        try:
            return json.loads(f.read())
        except (ValueError, RecursionError) as e:
            raise UserError(f"the {what} {path} is not readable JSON: {first_line(e, 100)}") from None


RUN_FILES = ("ckpt.pt", "log.jsonl", "config.json", ".lock")  # a run folder's own files, RunFolder's


def check_outputs(outputs, inputs=()):
    """No output of a command may land on one of its inputs, nor on a run folder's own files
    (a folder that holds a ckpt.pt). Both are lists of paths, empty ones ignored."""
    given = {os.path.realpath(p): p for p in inputs if p}
    for path in filter(None, outputs):
        real = os.path.realpath(path)
        inside = [p for r, p in given.items() if r == real or os.path.isdir(r) and os.path.commonpath([r, real]) == r]
        if inside:
            raise UserError(f"{path} is also an input of this command, or inside one ({inside[0]}); write the output "
                            f"elsewhere")
        if os.path.basename(real) in RUN_FILES and os.path.lexists(os.path.join(os.path.dirname(real), "ckpt.pt")):
            raise UserError(f"{path} is a file of the run in {os.path.dirname(path) or '.'}; write the output elsewhere")


def write_json(path, value):
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder):
    """Remove the temporary files ("NAME.tmp<pid>") and staging folders (".staging<pid>") in
    `folder` whose writing process is gone; those of a living process are left alone."""
    for name in os.listdir(folder):
        match = re.fullmatch(r".+\.tmp(\d+)|\.staging(\d+)", name)
        pid = int(next(g for g in match.groups() if g)) if match else None
        if pid is not None and pid != os.getpid() and not _alive(pid):
            remove_tree(Path(folder, name))


def remove_tree(path):
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            remove_tree(child)
        path.rmdir()
    elif os.path.lexists(path):
        path.unlink()


class FolderLock:
    """`with FolderLock(folder, "a training run"):` gives the folder to this process alone. It
    holds fcntl.flock on folder/.lock, which the operating system releases when the process ends,
    however it ends; a second process is refused at once, in one line naming the first."""

    def __init__(self, folder, what):
        self.path, self.what = os.path.join(folder, ".lock"), what

    def __enter__(self):
        try:  # never through a link: it could truncate a file outside the folder
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            reason = "it is a symbolic link; remove it" if os.path.islink(self.path) else err.strerror or err
            raise UserError(f"cannot take the lock {self.path}: {reason}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(self.fd)
            what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
            raise UserError(f"cannot take the lock {self.path}: it is {what}; remove it")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to end "
                            f"or choose another folder") from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{self.what} (pid {os.getpid()})".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only its note of the holder is missing
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# Checkpoints: one self-describing dict of tensors and plain types, loaded without running code
# ---------------------------------------------------------------------------------------------

CKPT_FORMAT, CKPT_VERSION = "sagan-checkpoint", 1
CKPT_PARTS = ("step", "model", "train", "G", "D", "G_ema", "opt_G", "opt_D", "rng")


def first_line(e, limit=200):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def load_checkpoint(path, parts=CKPT_PARTS):
    """Load and validate a checkpoint; every way it can be wrong is one clear UserError. `parts`
    are the entries the caller needs (resuming needs all, sampling only the model and G).
    weights_only=True: a checkpoint holds tensors and plain types, and its pickle cannot run code."""
    if not os.path.lexists(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with open_input(path, "checkpoint") as f:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # truncated zip, a foreign pickle, code the safe unpickler refuses
        raise UserError(f"{path} is not a readable sagan checkpoint (truncated, corrupt or unsafe): "
                        f"{first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a sagan checkpoint")
    if ckpt.get("version") != CKPT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}; this code reads version {CKPT_VERSION}")
    missing = [k for k in parts if k not in ckpt]
    if missing:
        raise UserError(f"{path} is a damaged sagan checkpoint: it lacks {', '.join(missing)}")
    kinds = {"step": int, "model": dict, "train": dict, "G": dict, "D": dict, "G_ema": (dict, type(None)),
             "opt_G": dict, "opt_D": dict, "rng": dict}
    wrong = [k for k in parts if not isinstance(ckpt[k], kinds[k]) or (k == "step" and (type(ckpt[k]) is bool or ckpt[k] < 0))]
    if wrong:
        raise UserError(f"{path} is a damaged sagan checkpoint: its {', '.join(wrong)} "
                        f"{'is' if len(wrong) == 1 else 'are'} not what train.py writes")
    return ckpt


def resume_config(cfg, given):
    """(cfg, checkpoint or None): with cfg.resume (a path, or "auto" for OUT/ckpt.pt), the
    checkpoint's configuration with the flags `given` now on top, less `overwrite`, which said how
    the run began and would refuse the resume. A field the code no longer has is left out."""
    if not cfg.resume:
        return cfg, None
    path = os.path.join(cfg.out, "ckpt.pt") if cfg.resume == "auto" else cfg.resume
    ckpt = load_checkpoint(path)
    known = set(flat_values(cfg)) - {"overwrite"}
    saved = {k: v for k, v in {**ckpt["train"], **ckpt["model"]}.items() if k in known}
    now = {k: v for k, v in flat_values(cfg).items() if k in given}
    return make_config(type(cfg), {**saved, **now, "resume": path}), ckpt


def check_resumable(saved, model, path):
    """The model a checkpoint holds (`saved`, a dict) must be the one built now."""
    missing = object()  # a field this code's model does not have: another model
    conflicts = [f"{k} (checkpoint: {v}, now: {'none' if getattr(model, k, missing) is missing else getattr(model, k)})"
                 for k, v in saved.items() if (tuple(v) if isinstance(v, list) else v) != getattr(model, k, missing)]
    if conflicts:
        raise UserError(f"cannot resume {path}: the model differs in " + "; ".join(conflicts))


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------

class RunFolder:
    """What a run keeps on disk, written by one process: config.json, log.jsonl, pictures, ckpt.pt.

    A folder belongs to one run: a fresh run into a folder that holds a run (a checkpoint, a log or
    a config) is refused unless it overwrites, which moves the old run to OUT/previous/ until the
    new run's first checkpoint is written; a symbolic link among its files is refused; a
    FolderLock refuses a second process while one runs. Every file
    is written atomically or, for log lines, appended whole or not at all; a write that fails (a
    full disk, an I/O error) is one warning per kind of file, and the run goes on.
    """

    def __init__(self, out):
        self.out = out
        self.ckpt = os.path.join(out, "ckpt.pt")
        self.log_path = os.path.join(out, "log.jsonl")
        self.lock, self.failing, self.previous = None, set(), None

    def refuse_to_overwrite(self, resume, overwrite):
        """A fresh run must not destroy the run already in the folder, with a checkpoint or not yet
        (only reads). The folder's own files must be its own: none may be a symbolic link."""
        for name in RUN_FILES[:3] + ("samples", "previous"):
            if os.path.islink(os.path.join(self.out, name)):
                raise UserError(f"{os.path.join(self.out, name)} is a symbolic link; a run folder's files are its own: "
                                f"remove the link")
        previous = os.path.join(self.out, "previous", "ckpt.pt")
        if not resume and not overwrite and os.path.lexists(previous) and not os.path.lexists(self.ckpt):
            raise UserError(f"{self.out} holds a run in {os.path.dirname(previous)}, moved aside by an --overwrite "
                            f"that did not reach its first checkpoint; move it back, or start afresh with --overwrite")
        if resume or overwrite:
            return
        if not os.path.lexists(self.ckpt):
            begun = [name for name in ("log.jsonl", "config.json") if os.path.lexists(os.path.join(self.out, name))]
            if begun:
                raise UserError(f"{self.out} holds a run that has no checkpoint yet (its {' and '.join(begun)}); start "
                                f"afresh with --overwrite, or choose another --out")
            return
        try:
            with open_input(self.ckpt, "checkpoint") as f:
                step = f"at step {torch.load(f, map_location='cpu', weights_only=True)['step']}"
        except Exception:
            step = "unreadable"
        raise UserError(f"{self.out} already holds a run (its checkpoint is {step}); continue it with "
                        f"--resume, choose another --out, or start afresh with --overwrite")

    def open(self, config, start, resume=False, overwrite=False, subfolders=("samples",)):
        """Takes the folder for this run, after every check: locks it, removes the temporary
        files of dead processes, moves the old run aside for an overwrite, cuts the log back to step `start`
        (a resumed run writes what follows again) and writes config.json (a dict of plain values)."""
        try:
            for sub in subfolders:
                os.makedirs(os.path.join(self.out, sub), exist_ok=True)
            os.makedirs(self.out, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.out}: {e.strerror or e}") from None
        self.lock = FolderLock(self.out, "a training run").__enter__()
        try:
            self.refuse_to_overwrite(resume, overwrite)  # again, now that no other process can start a run here
            for folder in [self.out] + [os.path.join(self.out, sub) for sub in subfolders]:
                remove_stale(folder)
            if overwrite:
                self.move_aside(subfolders)
            self.trim_log(start)
            text = json.dumps(config, indent=1).encode()
            self.attempt("config.json", lambda: atomic_write(os.path.join(self.out, "config.json"), lambda f: f.write(text)))
        except BaseException:
            self.close()
            raise

    def move_aside(self, subfolders):
        """--overwrite: the old run's checkpoint, log and pictures move into OUT/previous/, which
        the first checkpoint of the new run deletes; until then the old run is whole there. (An
        earlier overwrite that died before its first checkpoint left the old run there already.)"""
        previous = os.path.join(self.out, "previous")
        if os.path.lexists(os.path.join(previous, "ckpt.pt")) and not os.path.lexists(self.ckpt):
            self.previous = previous
            return
        remove_tree(previous)
        names = ["ckpt.pt", "log.jsonl", "config.json"] + [os.path.join(sub, name) for sub in subfolders
                                                           for name in os.listdir(os.path.join(self.out, sub))]
        for name in [n for n in names if os.path.lexists(os.path.join(self.out, n))]:
            os.makedirs(os.path.dirname(os.path.join(previous, name)), exist_ok=True)
            os.replace(os.path.join(self.out, name), os.path.join(previous, name))
        fsync_folder(self.out)
        self.previous = previous

    def close(self):
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None

    def trim_log(self, start):
        """Keeps the log's lines up to step `start`. A damaged line (half a line from a full disk,
        garbage, not a JSON object with an integer step) is dropped, with one warning."""
        if not os.path.lexists(self.log_path):
            return
        with open_input(self.log_path, "log") as f:
            lines = [line for line in f.read().split(b"\n") if line.strip()]
        kept, damaged = [], 0
        for line in lines:
            try:
                record = json.loads(line)
                good = isinstance(record, dict) and type(record.get("step")) is int
            except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to read
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
        """Appends one JSON line, whole or not at all: after a failed or short write the file is
        cut back to its length before, so a full disk never leaves half a line."""
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

    def picture(self, name, write):
        """Writes the picture `name` (a path inside the folder) with write(f)."""
        self.attempt("sample grid", lambda: atomic_write(os.path.join(self.out, name), write))

    def save(self, state, step):
        """Writes the checkpoint; False, with a warning (once until a save works again), when the
        disk refuses: the previous one stays. The first one written ends an --overwrite's keeping
        of the old run."""
        try:
            atomic_write(self.ckpt, lambda f: torch.save(state, f))
        except OSError as e:
            if "checkpoint" not in self.failing:
                print(f"warning: could not write the checkpoint at step {step} ({e.strerror or e}); "
                      f"the previous one in {self.ckpt} is intact", file=sys.stderr)
            self.failing.add("checkpoint")
            return False
        self.failing.discard("checkpoint")
        if self.previous is not None:
            remove_tree(self.previous)
            self.previous = None
        return True


# ---------------------------------------------------------------------------------------------
# Signals and progress
# ---------------------------------------------------------------------------------------------

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


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """The rate of some work and the time it has left, from `total` units, `done` at the start.
    update(done) returns (units per second since the last update, "ETA 3m05s"), the time left
    from the average rate so far; line(done) says it as "done/total, R UNIT/s, ETA 3m05s"."""

    def __init__(self, total, done=0, unit="images"):
        self.total, self.first, self.unit = total, done, unit
        self.t_first = self.t_last = time.perf_counter()
        self.last = done

    def update(self, done):
        now = time.perf_counter()
        rate = (done - self.last) / max(now - self.t_last, 1e-9)
        left = (now - self.t_first) / max(done - self.first, 1) * (self.total - done)
        self.t_last, self.last = now, done
        return rate, f"ETA {format_eta(left)}"

    def due(self, done, seconds=2.0):
        """Whether a line is due: every `seconds` at most, and at the end."""
        return done >= self.total or time.perf_counter() - self.t_last >= seconds

    def line(self, done):
        rate, eta = self.update(done)
        return f"{done}/{self.total}, {rate:.1f} {self.unit}/s, {eta}"


def due(done, every, total):
    """Whether something done every `every` steps is due after step `done` (and at the last)."""
    return done % every == 0 or done == total


# ---------------------------------------------------------------------------------------------
# Randomness: every generator seeded, saved and restored, so that a resumed run is exact
# ---------------------------------------------------------------------------------------------

def seed_all(seed):
    for seed_everything in (random.seed, np.random.seed, torch.manual_seed):
        seed_everything(seed)


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
