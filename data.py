"""Training data for SAGAN: the built-in synthetic images (and volumes), CIFAR-10, ImageNet, any
image folder, and a prepared memory-mapped copy of any source of images.

SOURCES, below, is the one table of the data sources: what each holds and needs. Every dataset
yields (image, label): image a float32 tensor (3, size, size) in [-1, 1], label an int (0 when
unconditional); `dataset.n_classes` is 0 for unconditional data. The one source of volumes,
synthetic3d, yields (3, size, size, size) tensors instead (`dataset.dims` is 3). Build one with
`make_dataset(source, root, size)`; `EndlessBatches` orders a training run's batches so that a
resumed run reads exactly what an uninterrupted one would have.

Preprocessing follows the reference runs (BigGAN-PyTorch's ImageNet loader, used by its SA-GAN
script): centre crop to a square on the short side, antialiased bilinear resize to `size`, scale to
[-1, 1]; optional random horizontal flips (the reference runs used no augmentation: off by
default). Differences, all for robustness: grayscale, palette, CMYK and 16-bit images are converted
to 8-bit RGB explicitly (Pillow's own conversion saturates 16-bit images to white); transparent
images are composited on white; non-image files are skipped when the folder is scanned and
unreadable images when they are loaded (with a warning; the next readable image stands in), never
a crash mid-epoch. `dataset.skipped` lists them as (path, reason) and `dataset.summary` says it in
one line, counting skips made inside DataLoader workers too. Folders are scanned for regular image
files only (a FIFO or a device named like an image is skipped, not opened) and each directory is
read once, so a symbolic link loop cannot duplicate images.

Reading JPEGs bounds a GPU run, so `python data.py prepare ...` decodes and resizes a source once
into a uint8 array that training reads through a memory map:
    DIR/images.npy  (N, size, size, 3) uint8     DIR/labels.npy  (N,) int64
    DIR/meta.json   {"format": "sagan-prepared", "version": 1, "source", "size", "n_classes",
                     "count", "skipped": the summary line}
"""

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from runs import FolderLock, Progress, UserError, atomic_write, check_outputs, command, first_line, fsync_folder, \
    make_config, open_input, parse_flags, read_json, regular_file, remove_stale, remove_tree


class Source(NamedTuple):
    dims: int  # 2: images (3, S, S); 3: volumes (3, S, S, S)
    classes: Optional[int]  # known in advance, or None: the data says (class folders, meta.json)
    root: str  # the --data-root it needs: "required", "optional" (a default folder) or "none"
    synthetic: bool  # drawn by a known program: measures.py measures its generators exactly


SOURCES = {
    "synthetic": Source(2, 10, "none", True),  # built in: coloured shapes and their mirror images
    "synthetic3d": Source(3, 10, "none", True),  # built in: coloured solids and their mirror images
    "cifar10": Source(2, 10, "optional", False),  # torchvision's CIFAR-10 training set, downloaded to ./data
    "imagenet": Source(2, None, "required", False),  # an ImageNet-style train folder, a subfolder per class
    "folder": Source(2, None, "required", False),  # any folder of images; class subfolders give labels
    "prepared": Source(2, None, "required", False),  # the arrays `python data.py prepare` writes
}
PREPARABLE = [name for name, s in SOURCES.items() if s.dims == 2 and name != "prepared"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def default_source(dims):
    """The built-in data of the model's dimensionality: synthetic, or synthetic3d for volumes."""
    return next((name for name, s in SOURCES.items() if s.synthetic and s.dims == dims), "synthetic")


class ImageSet(Dataset):
    """Base class: a subclass implements `pixels(index) -> ((S, S, 3) uint8 array, label)`, or
    (S, S, S, 3) for volumes; this turns them into tensors and flips. `prepare` reads `pixels`
    directly, so a prepared copy holds exactly the bytes the direct dataset would have produced."""

    n_classes = 0
    dims = 2  # spatial dimensions of an item: 2 for images, 3 for volumes

    def __init__(self, size, flip=False):
        self.size, self.flip = size, flip

    def pixels(self, index):
        raise NotImplementedError

    def __getitem__(self, index):
        pixels, label = self.pixels(int(index))
        # Channels first, made contiguous before the arithmetic, which is slow on permuted strides.
        x = torch.from_numpy(np.array(pixels)).movedim(-1, 0).contiguous().float()  # (3, S, S[, S]) in [0, 255]
        x = x.div_(127.5).sub_(1.0)
        # Global torch RNG: each DataLoader worker gets its own seed from the loader.
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)  # left to right
        return x, label

    @property
    def skipped(self):
        """Files left out so far, as (path, reason) pairs; unreadable files are found on loading."""
        return []

    @property
    def summary(self):
        """One line, e.g. 'skipped 1 non-image file (a.txt), 1 unreadable image (b.png)', or ''."""
        return "skipped " + summarise(self.skipped) if self.skipped else ""


# --- synthetic ----------------------------------------------------------------------------------

# Ten classes, each a distinct colour and a distinct shape. A shape is a level function of the
# offset (dx, dy) from its centre in units of its radius: < 1 inside, growing about one unit per
# radius outside, so (1 - level) * radius is roughly the signed distance to the edge.
COLOURS = np.array([
    (0.90, 0.10, 0.10),  # red
    (1.00, 0.55, 0.00),  # orange
    (0.95, 0.90, 0.10),  # yellow
    (0.15, 0.75, 0.15),  # green
    (0.00, 0.85, 0.90),  # cyan
    (0.15, 0.30, 1.00),  # blue
    (0.60, 0.20, 0.90),  # purple
    (1.00, 0.45, 0.75),  # pink
    (0.95, 0.95, 0.95),  # white
    (0.60, 0.35, 0.10),  # brown
], dtype=np.float32)


def _plus(ax, ay):
    # Union of a horizontal and a vertical arm, each 0.6 radii thick.
    return np.minimum(np.maximum(ax, ay / 0.3), np.maximum(ax / 0.3, ay))


SHAPES = (  # each takes |dx|, |dy|, dy (image rows grow downwards)
    lambda ax, ay, dy: np.sqrt(ax * ax + ay * ay),  # disc
    lambda ax, ay, dy: np.maximum(ax, ay),  # square
    lambda ax, ay, dy: ax + ay,  # diamond
    lambda ax, ay, dy: np.abs(np.sqrt(ax * ax + ay * ay) - 0.75) / 0.25,  # ring
    lambda ax, ay, dy: _plus(ax, ay),  # plus
    lambda ax, ay, dy: _plus(np.abs(ax - ay) * 0.7071, (ax + ay) * 0.7071),  # x (plus turned 45)
    lambda ax, ay, dy: 2 * np.maximum(dy, 0.866 * ax - 0.5 * dy),  # triangle, apex up
    lambda ax, ay, dy: np.maximum(ax, np.abs(ay - 0.6) / 0.3),  # two horizontal bars
    lambda ax, ay, dy: np.abs(np.maximum(ax, ay) - 0.75) / 0.25,  # square frame
    lambda ax, ay, dy: np.maximum(ay, np.abs(ax - 0.6) / 0.3),  # two vertical bars
)



# The same idea in 3-D: ten solids, in the same colours. Each takes |dx|, |dy|, dy, |dz|, with z
# the depth axis (towards the viewer of a slice or a projection along it).
def _cross(ax, ay, az):
    # Union of three bars along x, y and z, each 0.6 radii thick.
    return np.minimum(np.minimum(np.maximum(ax, np.maximum(ay, az) / 0.3),
                                 np.maximum(ay, np.maximum(ax, az) / 0.3)), np.maximum(az, np.maximum(ax, ay) / 0.3))


SOLIDS = (
    lambda ax, ay, dy, az: np.sqrt(ax * ax + ay * ay + az * az),  # ball
    lambda ax, ay, dy, az: np.maximum(np.maximum(ax, ay), az),  # cube
    lambda ax, ay, dy, az: ax + ay + az,  # octahedron
    lambda ax, ay, dy, az: np.sqrt((np.sqrt(ax * ax + ay * ay) - 0.65) ** 2 + az * az) / 0.35,  # torus, facing z
    lambda ax, ay, dy, az: _cross(ax, ay, az),  # cross of three bars
    lambda ax, ay, dy, az: np.maximum(np.sqrt(ax * ax + az * az) / 0.55, ay),  # upright cylinder (a post)
    lambda ax, ay, dy, az: 2 * np.maximum(dy, 0.866 * np.sqrt(ax * ax + az * az) - 0.5 * dy),  # cone, apex up
    lambda ax, ay, dy, az: np.maximum(np.maximum(ax, az), np.abs(ay - 0.6) / 0.3),  # two horizontal plates
    lambda ax, ay, dy, az: np.maximum(np.abs(np.maximum(ax, ay) - 0.75) / 0.25, az / 0.5),  # square frame, facing z
    lambda ax, ay, dy, az: np.maximum(_plus(np.abs(ax - ay) * 0.7071, (ax + ay) * 0.7071), az / 0.3),  # x, facing z
)

# Per number of dimensions: the shapes, and the ranges (low, high) of the centre's x, y (and z),
# the radius and the brightness, as fractions of the half side. Volumes are coarse (16 voxels a
# side), so their solids are larger, at least 4.5 voxels across at 16^3, yet a clear voxel apart
# from their mirror images (cx - r >= 0.14), and every one crosses a slice that evaluate.py shows
# (at depths -0.5, 0 and 0.5: the gaps are shorter than the smallest diameter).
SYNTHETIC = {
    2: (SHAPES, (0.40, -0.55, 0.20, 0.80), (0.60, 0.55, 0.32, 1.00)),
    3: (SOLIDS, (0.50, -0.55, -0.50, 0.28, 0.80), (0.58, 0.55, 0.50, 0.36, 1.00)),
}


class Synthetic(ImageSet):
    """Built-in class-conditional data: no files, no downloads, any size, cheap on a CPU.

    Image i has class i % 10 and shows two copies of that class's shape in that class's colour
    (red disc, orange square, yellow diamond, green ring, cyan plus, blue x, purple triangle, pink
    horizontal bars, white frame, brown vertical bars), placed as mirror images of each other about
    the vertical centre line, on a dark vertical gradient. Position, size, brightness and background
    are drawn from a generator seeded with i alone, so an index always gives the same image.

    The mirror is the point: the two objects are about half the image apart and must agree in
    shape, colour, size and height, which a convolution sees only after many layers and a
    self-attention layer sees at once.

    With dims = 3 (the synthetic3d source) item i is a volume (3, S, S, S), indexed (z, y, x), with
    two copies of a solid (red ball, orange cube, yellow octahedron, green torus, cyan cross of three
    bars, blue upright cylinder, purple cone, pink pair of horizontal plates, white square frame,
    brown x) mirrored about the centre plane x = 0, at the same height and depth.
    """

    n_classes = 10

    def __init__(self, size, flip=False, length=50_000, dims=2):
        super().__init__(size, flip)
        self.length, self.dims = length, dims
        self.shapes, *self.ranges = SYNTHETIC[dims]
        u = (2 * np.arange(size, dtype=np.float32) + 1) / size - 1  # pixel centres in (-1, 1)
        # Distance from the vertical centre line, made exactly symmetric so the mirror is exact.
        au = np.abs(u)
        self.ax = np.maximum(au, au[::-1]).reshape((1,) * (dims - 1) + (size,))  # (1, S) or (1, 1, S)
        # y (rows grow downwards), then z for volumes: (S, 1), or (1, S, 1) and (S, 1, 1).
        self.grids = [u.reshape([size if a == axis else 1 for a in range(dims)]) for axis in range(dims - 2, -1, -1)]

    def __len__(self):
        return self.length

    def pixels(self, index):
        label = index % 10
        rng = np.random.default_rng(index)
        cx, *centre, r, shade = rng.uniform(*self.ranges)  # centre: cy (and cz)
        top, bottom = rng.uniform(0.0, 0.25, (2, 3)).astype(np.float32)
        # Using |x| as the horizontal coordinate draws the object and its mirror image in one go.
        dx = (self.ax - cx) / r
        dy, *dz = [(g - c) / r for g, c in zip(self.grids, centre)]  # (S, 1), or (1, S, 1) and (S, 1, 1)
        level = self.shapes[label](np.abs(dx), np.abs(dy), dy, *(np.abs(d) for d in dz))  # (S, S[, S])
        # Antialiased edge: opacity ramps over one pixel (a pixel is 2 / S wide).
        alpha = np.clip((1 - level) * (r * self.size / 2) + 0.5, 0, 1)[..., None]  # (S, S[, S], 1)
        y = self.grids[0]
        background = top + (bottom - top) * ((y[..., None] + 1) / 2)  # (S, 1, 3) or (1, S, 1, 3)
        image = background + alpha * (shade * COLOURS[label] - background)  # (S, S[, S], 3)
        return (image * 255 + 0.5).astype(np.uint8), label


# The brightest channel of an object pixel is above this, of a background pixel below: the
# background is at most 0.25, the dimmest object (brown at its lowest shade) 0.48.
OBJECT_LEVEL = 0.375


def object_masks(images):
    """The two objects of synthetic-like images, uint8 (B, 3, S, S) -> left and right masks
    (B, S, S), or of volumes (B, 3, S, S, S) -> (B, S, S, S): the pixels whose brightest channel
    is above OBJECT_LEVEL, split at the vertical centre line (plane), which no real object crosses."""
    bright = images.amax(dim=1).float() / 255 > OBJECT_LEVEL  # (B, S, S[, S])
    left = bright.clone()
    left[..., images.shape[-1] // 2:] = False
    return left, bright & ~left



# --- image files --------------------------------------------------------------------------------

def load_image(path, size):
    """Read any image file as (size, size, 3) uint8 RGB: centre square crop, antialiased resize."""
    with Image.open(path) as img:
        return resize_square(to_rgb(img), size)


def to_rgb(img):
    """Convert any Pillow mode to 8-bit RGB without the conversions Pillow gets wrong."""
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit (and 32-bit integer) grayscale: Pillow's convert("L") clips at 255, turning
        # most pixels white; scale 0..65535 down to 0..255 instead.
        scale = 1.0 if img.mode == "F" else 1 / 257
        gray = np.asarray(img, dtype=np.float64) * scale
        img = Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    # Covers L, 1, P, CMYK (Pillow applies the Adobe inversion), YCbCr and RGB itself.
    return img.convert("RGB")


def resize_square(img, size):
    """Centre crop to a square on the short side, then antialiased bilinear resize."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    # Crop first: resize(box=...) would blend in pixels from outside the box at the edges.
    # Pillow's bilinear filter widens its support when shrinking, so this is antialiased.
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)  # (size, size, 3)


def scan(root, classes=True):
    """Find the images under root. Returns (files, labels, classes, skipped).

    Class subfolders (with images somewhere inside) give labels in sorted name order, as in
    torchvision's ImageFolder; a root with no such subfolder, or classes=False, is one unlabelled
    class. Hidden files and folders are ignored; other non-image files are skipped by extension and
    reported, and so are entries that are not regular files (FIFOs, sockets, devices, broken links:
    opening a FIFO would block forever). Symbolic links are followed only where they stay inside
    the root, and each folder is read once (by device and inode), so a link loop cannot repeat
    images; a file or folder that two classes reach (a symbolic or hard link from one class into
    another) is an error naming both, not a silent merge of the two.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data root {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data root {root} is not a directory")
    real_root = os.path.realpath(root)
    top, by_class, skipped, owner = [], {}, [], {}  # owner: a file (device, inode) -> the class that reached it
    seen, todo = {}, [(str(root), ())]

    def claim(entry, device, label):
        if entry.is_symlink():
            info = os.stat(entry.path)
            device, inode = info.st_dev, info.st_ino
        else:
            inode = entry.inode()  # known from the folder listing: no system call per image
        if owner.setdefault((device, inode), label) != label:
            first = owner[device, inode]
            raise UserError(f"the image {os.path.realpath(entry.path)} is reachable from two classes, "
                            f"{min(first, label) or '(top)'} and {max(first, label)} (a link?); give each image "
                            f"one class")

    while todo:
        folder, rel = todo.pop()
        label = rel[0] if classes and rel else ""
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            first = seen[info.st_dev, info.st_ino]
            if first != label:
                raise UserError(f"the folder {os.path.realpath(folder)} is reachable from two classes, "
                                f"{min(first, label) or '(top)'} and {max(first, label)} (a link?); "
                                f"give each image one class")
            skipped.append((folder, "folder read before (a second link to it)"))
            continue
        seen[info.st_dev, info.st_ino] = label
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append((folder, f"unreadable folder ({err.strerror})"))
            continue
        subfolders = []
        for entry in (e for e in entries if not e.name.startswith(".")):
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if os.path.commonpath([real, real_root]) == real:
                    skipped.append((entry.path, "link to a folder that contains the data root"))
                    continue
                if os.path.commonpath([real, real_root]) != real_root:
                    skipped.append((entry.path, "link leaving the data root"))
                    continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
            except OSError:
                is_dir = is_file = False
            if is_dir:
                subfolders.append((entry.path, rel + (entry.name,)))
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append((entry.path, "non-image file"))
            elif not is_file:
                skipped.append((entry.path, "not a regular file"))
            else:
                claim(entry, info.st_dev, label)
                if label:
                    by_class.setdefault(label, []).append(entry.path)
                else:
                    top.append(entry.path)
        todo += reversed(subfolders)  # depth first, in name order
    if not by_class:
        return top, [0] * len(top), [], skipped
    skipped += [(path, "image outside class folders") for path in top]
    names = sorted(by_class)
    files = [path for c in names for path in by_class[c]]
    labels = [label for label, c in enumerate(names) for _ in by_class[c]]
    return files, labels, names, skipped


def summarise(skipped):
    """One line of (path, reason) pairs, e.g. '1 non-image file (a.txt), 1 unreadable image (b.png)'."""
    by_reason = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(os.path.basename(path))
    parts = []
    for reason, names in by_reason.items():
        more = ", ..." if len(names) > 3 else ""
        parts.append(f"{len(names)} {reason}{'s' * (len(names) > 1)} ({', '.join(names[:3])}{more})")
    return ", ".join(parts)


class ImageFolder(ImageSet):
    """Images under a folder: class subfolders give labels, a flat folder is unconditional."""

    def __init__(self, root, size, flip=False, require_classes=False):
        super().__init__(size, flip)
        self.root = Path(root)
        self.files, labels, self.classes, self.scan_skipped = scan(root)
        # Marks files that failed to decode. Shared memory, so that marks made inside DataLoader
        # workers reach the main process's summary and each bad file is warned about once.
        self.bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        if not self.files:
            detail = f" ({self.summary})" if self.scan_skipped else ""
            raise UserError(f"no images found under {root}{detail}")
        if require_classes and not self.classes:
            raise UserError(f"{root} has images but no class subfolders; expected an ImageNet-"
                            "style train directory with one subfolder per class (synset)")
        if require_classes and "train" in self.classes:
            raise UserError(f"{root} looks like the dataset's top folder (it has a 'train' "
                            f"subfolder); pass {self.root / 'train'}")
        self.labels = np.array(labels, dtype=np.int64)
        self.n_classes = len(self.classes)

    def __len__(self):
        return len(self.files)

    def pixels(self, index):
        # An unreadable file gives the next readable one instead, so an epoch never stops.
        for i in range(index, index + len(self.files)):
            i %= len(self.files)
            if self.bad[i]:
                continue
            try:
                return load_image(self.files[i], self.size), int(self.labels[i])
            except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, ...
                self.bad[i] = True
                warnings.warn(f"skipping unreadable image {self.files[i]}: {err}", stacklevel=2)
        raise UserError(f"none of the {len(self.files)} images under {self.root} can be read")

    @property
    def skipped(self):
        bad = [(self.files[i], "unreadable image") for i in self.bad.nonzero().flatten().tolist()]
        return self.scan_skipped + bad


# --- CIFAR-10 and prepared arrays ---------------------------------------------------------------

class Cifar10(ImageSet):
    """The CIFAR-10 training set (50,000 images, 10 classes) through torchvision."""

    n_classes = 10

    def __init__(self, root, size, flip=False):
        super().__init__(size, flip)
        import torchvision  # only this source needs it

        try:
            train = torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as err:  # offline: URLError; partial download: RuntimeError, ReadError
            reason = " ".join(str(err).split())  # keep the message on one line
            raise UserError(f"CIFAR-10 is not in {root} and could not be downloaded ({reason}); "
                            f"on a machine with internet, fetch {CIFAR10_URL} and extract it into "
                            f"{root}") from None
        self.data = train.data  # (50000, 32, 32, 3) uint8
        self.labels = np.asarray(train.targets, dtype=np.int64)

    def __len__(self):
        return len(self.data)

    def pixels(self, index):
        image = self.data[index]
        if self.size != 32:
            image = resize_square(Image.fromarray(image), self.size)
        return image, int(self.labels[index])


class Prepared(ImageSet):
    """A folder written by `prepare`, read through a memory map (the fast path for big data)."""

    def __init__(self, root, size, flip=False):
        super().__init__(size, flip)
        self.root = Path(root)
        if not (self.root / "meta.json").exists():
            raise UserError(f"no prepared data in {root} (no meta.json); create it with "
                            f"python data.py prepare --out {root} ...")
        meta = read_json(self.root / "meta.json", "prepared data's meta.json")
        keys = {"format": str, "version": int, "size": int, "n_classes": int, "count": int}
        if not isinstance(meta, dict) or meta.get("format") != "sagan-prepared" or meta.get("version") != 1 \
                or not all(isinstance(meta.get(k), t) for k, t in keys.items()) or min(meta["n_classes"], meta["count"]) < 0:
            raise UserError(f"{root}/meta.json is not from this version of data.py prepare")
        if meta["size"] != size:
            raise UserError(f"prepared data in {root} is {meta['size']}x{meta['size']}, not "
                            f"{size}x{size}; prepare it again with --size {size}")
        n = meta["count"]
        missing = [name for name in ("images.npy", "labels.npy") if not (self.root / name).exists()]
        if missing:
            raise UserError(f"prepared data in {root} is incomplete (no {' and no '.join(missing)}); prepare it again")
        try:
            with open_input(self.root / "labels.npy", "prepared labels") as f:
                self.labels = np.load(f, allow_pickle=False)  # (N,) int64
            images = self._open()
        except UserError:
            raise
        except Exception as err:  # missing, truncated, not an array, an absurd header
            raise UserError(f"prepared data in {root} is incomplete ({first_line(err, 150)}); prepare it again") from None
        problems = []
        if not isinstance(self.labels, np.ndarray) or not isinstance(images, np.ndarray):  # an .npz named .npy
            raise UserError(f"prepared data in {root} is not this code's: images.npy and labels.npy must be arrays, "
                            f"not archives; prepare it again")
        if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
            problems.append(f"images.npy is {images.dtype} {images.shape}, meta.json says {n} images")
        if self.labels.shape != (n,) or self.labels.dtype.kind not in "iu":
            problems.append(f"labels.npy is {self.labels.dtype} {self.labels.shape}, meta.json says {n} labels")
        elif n and not 0 <= self.labels.min() <= self.labels.max() < max(meta["n_classes"], 1):
            problems.append(f"labels.npy holds labels outside 0..{max(meta['n_classes'], 1) - 1}")
        if problems:
            raise UserError(f"prepared data in {root} does not match its meta.json: {'; '.join(problems)}; prepare it again")
        self.n_classes = meta["n_classes"]

    def _open(self):
        # Opened lazily in each process: pickling a memory map to a worker would copy all of it.
        if getattr(self, "images", None) is None:
            self.images = np.load(regular_file(self.root / "images.npy", "prepared images"), mmap_mode="r")
        return self.images

    def __getstate__(self):
        return {**self.__dict__, "images": None}

    def __len__(self):
        return len(self.labels)

    def pixels(self, index):
        return self._open()[index], int(self.labels[index])


def make_dataset(source, root, size, flip=False, length=None, dims=None):
    """The dataset for a source in SOURCES; see the module docstring for what each item is.

    root: data folder (cifar10 default "./data"; unused by synthetic). length: number of
    synthetic images or volumes (default 50,000). dims: the model's, when the items must match it
    (2 images, 3 volumes). Raises UserError for any problem with the user's data.
    """
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if not isinstance(size, int) or size < 1:
        raise UserError(f"image size must be a positive integer, got {size!r}")
    kind = SOURCES[source]
    if dims is not None and dims != kind.dims:
        raise UserError(f"{source} data is {kind.dims}-D and the model {dims}-D (--dims {dims}); "
                        f"the one source of volumes is {default_source(3)}")
    if length is not None and not kind.synthetic:
        raise UserError(f"a length only applies to synthetic data, not to {source}")
    if length is not None and length < 1:
        raise UserError(f"the synthetic length must be positive, got {length}")
    if kind.synthetic:
        return Synthetic(size, flip, 50_000 if length is None else length, kind.dims)
    if source == "cifar10":
        return Cifar10(root or "./data", size, flip)
    if not root:
        raise UserError(f"data source {source} needs a data root (--data-root)")
    if source == "prepared":
        return Prepared(root, size, flip)
    return ImageFolder(root, size, flip, require_classes=source == "imagenet")


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


# --- prepare ------------------------------------------------------------------------------------

class _Pixels(Dataset):
    """Items as (S, S, 3) uint8 tensors, for prepare's loader workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        pixels, label = self.dataset.pixels(index)
        return torch.from_numpy(np.array(pixels)), label


def prepare(source, root, size, out, workers=4, length=None, batch_size=256, log=sys.stderr):
    """Decode and resize a source once into `out` (layout in the module docstring).

    One process at a time (FolderLock). The arrays are written into a staging folder inside
    `out`, with their space reserved first (a memory map on a full disk would crash the process),
    and only then moved into place: the old meta.json goes first and the new one last, so a
    folder that `make_dataset("prepared", ...)` accepts always holds one whole preparation.
    Returns the dataset that was read, for its summary of skipped files.
    """
    if source not in PREPARABLE:
        raise UserError(f"prepare copies a source of images, not {source}; choose one of {', '.join(PREPARABLE)}")
    check_outputs([out], [root])
    dataset = make_dataset(source, root, size, length=length)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to {out}: {err.strerror or err}") from None
    with FolderLock(out, "data.py prepare"):
        remove_stale(out)
        staging = out / f".staging{os.getpid()}"
        try:
            staging.mkdir()
            images = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(dataset), size, size, 3))
            with open(staging / "images.npy", "r+b") as f:  # reserve the space now, or fail now
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            labels = np.zeros(len(dataset), dtype=np.int64)
            loader = DataLoader(_Pixels(dataset), batch_size=batch_size, num_workers=workers)
            done, progress = 0, Progress(len(dataset))
            for x, y in loader:  # (B, S, S, 3) uint8, (B,)
                images[done:done + len(x)] = x.numpy()
                labels[done:done + len(x)] = y.numpy()
                done += len(x)
                if progress.due(done):
                    print(f"prepare {progress.line(done)}", file=log)
            images.flush()
            del images
            meta = {"format": "sagan-prepared", "version": 1, "source": source, "size": size,
                    "n_classes": dataset.n_classes, "count": len(dataset), "skipped": dataset.summary}
            atomic_write(staging / "labels.npy", lambda f: np.save(f, labels))
            atomic_write(staging / "meta.json", lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
            (out / "meta.json").unlink(missing_ok=True)  # from here until the last rename: refused
            for name in ("images.npy", "labels.npy", "meta.json"):
                os.replace(staging / name, out / name)
            fsync_folder(out)
        except OSError as err:
            raise UserError(f"cannot write the prepared data to {out}: {err.strerror or err}"
                            f"{'; the previous preparation there is intact' if (out / 'meta.json').exists() else ''}") from None
        finally:
            remove_tree(staging)
    return dataset


@dataclass
class PrepareConfig:
    data: str = "synthetic"  # the source of images to copy
    data_root: str = ""  # its folder (cifar10: ./data)
    size: int = 0  # image side in pixels
    out: str = ""  # the folder to write images.npy, labels.npy and meta.json into
    workers: int = min(8, os.cpu_count() or 1)  # decoding processes
    length: Optional[int] = None  # number of synthetic images (default 50,000)


def main(argv=None):
    """python data.py prepare --data SOURCE [--data-root DIR] --size S --out DIR"""
    def run(argv):
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        if not argv or argv[0] != "prepare":
            raise UserError("usage: python data.py prepare --data SOURCE [--data-root DIR] --size S --out DIR")
        cfg = make_config(PrepareConfig, parse_flags(PrepareConfig, argv[1:], choices={"data": PREPARABLE}))
        if cfg.size < 1 or not cfg.out:
            raise UserError("give --size (at least 1) and --out DIR")
        if cfg.workers < 0:
            raise UserError("--workers must be at least 0")
        dataset = prepare(cfg.data, cfg.data_root or None, cfg.size, cfg.out, cfg.workers, cfg.length)
        if dataset.summary:
            print(dataset.summary, file=sys.stderr)
        print(f"wrote {len(dataset)} images of {cfg.size}x{cfg.size} to {cfg.out}", file=sys.stderr)
    return command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
