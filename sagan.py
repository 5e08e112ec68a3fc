"""Self-Attention Generative Adversarial Networks: the model, in one file.

Zhang, Goodfellow, Metaxas, Odena, "Self-Attention Generative Adversarial Networks", ICML 2019
(arXiv 1805.08318). The layout follows the released code that produced the paper's numbers
(brain-research/self-attention-gan), as BigGAN-PyTorch's SA-GAN script re-implements it. The file
reads top to bottom in the paper's order: the self-attention block (Sec. 3) with spectral norm,
the generator (conditional BN, ResNet blocks), the discriminator (projection), the hinge losses.

Paper-to-code map
    Sec. 3, f(x) = W_f x, g(x) = W_g x       SelfAttention.f, SelfAttention.g (1x1 convs, C/8)
    Sec. 3, h(x) = W_h x, v(x) = W_v x       SelfAttention.h, SelfAttention.v
    Eq. (1): beta_{j,i} = softmax_i(s_ij)    attention_map (in SelfAttention.explicit), .fused (SDPA)
    Eq. (2): o_j = v(sum_i beta_{j,i} h(x_i))
    Eq. (3): y_i = gamma * o_i + x_i         SelfAttention.forward, gamma initialised to 0
    Sec. 4, spectral norm in G and D         sn(); ModelConfig.g_sn = False is the "SN on D" baseline
    Sec. 4, two-timescale update rule        train.py (lr 1e-4 for G, 4e-4 for D)
    Sec. 5, conditional BN / projection D    ConditionalBatchNorm, Discriminator.embed
    Sec. 5.2, Table 1, attention at featK    ModelConfig.attn (feature-map resolutions; () = none)
    Sec. 5.2, Table 1, "residual" rows       ResidualControl, ModelConfig.attn_block = "residual"
    Sec. 3, Eq. (4): hinge losses            d_hinge_loss, g_hinge_loss

The README's differences from the paper 1-6 are this file's, each cited by its number where it
happens. Widths, block layouts, xavier init and D's
sum pooling are the reference implementations'; test_sagan.py checks the parameter counts
against theirs (81.5 M at ImageNet 128, ch = 64).

Volumes (dims = 3) use the same blocks with 3-D convolutions, batch norm, pooling and upsampling:
LAYER_TYPES is the one place that picks the layer types per number of dimensions.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def sn(module, enabled=True):
    """Spectral normalisation (Miyato et al. 2018) through torch's parametrization.

    W is divided by its largest singular value, estimated with one power iteration per forward in
    training mode; the vectors u, v live in the module's buffers and travel with the state dict.
    In eval mode the last estimate is used unchanged. Weights are initialised xavier-uniform and
    biases zero first, as in the authors' code.
    """
    nn.init.xavier_uniform_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return spectral_norm(module) if enabled else module


class LayerTypes(NamedTuple):
    """The layer types for one number of spatial dimensions, and its channels-last memory format."""

    conv: type
    batch_norm: type
    avg_pool: Callable
    max_pool: Callable
    channels_last: torch.memory_format


# The one place where the number of spatial dimensions picks the layer types: sequences (the
# attention block alone), images (the paper) and volumes. The blocks below take a LayerTypes and
# never ask which it is; upsampling (F.interpolate) and the rest of the arithmetic work in any.
LAYER_TYPES = {
    1: LayerTypes(nn.Conv1d, nn.BatchNorm1d, F.avg_pool1d, F.max_pool1d, torch.contiguous_format),
    2: LayerTypes(nn.Conv2d, nn.BatchNorm2d, F.avg_pool2d, F.max_pool2d, torch.channels_last),
    3: LayerTypes(nn.Conv3d, nn.BatchNorm3d, F.avg_pool3d, F.max_pool3d, torch.channels_last_3d),
}


# ---------------------------------------------------------------------------------------------
# Self-attention (Sec. 3)
# ---------------------------------------------------------------------------------------------

def attention_map(query, key):
    """Eq. (1): beta_{j,i} = exp(s_ij) / sum_i exp(s_ij) with s_ij = f(x_i)^T g(x_j), for queries
    g(x) (B, C', N) and keys f(x) (B, C', M). Returns beta (B, N, M): row j says how much query
    position j attends to each key position i, and sums to 1."""
    s = query.transpose(1, 2) @ key  # (B, N, M): s[j, i] = f(x_i)^T g(x_j), no 1/sqrt(d) scale
    return s.softmax(dim=-1)  # over keys i


def new_gamma():
    """Eq. (3)'s gamma: the learned scalar that weighs a block's output o against its input x in
    y = gamma * o + x, created at the value Sec. 3 gives it (and says why)."""
    return nn.Parameter(torch.zeros(()))


class SelfAttention(nn.Module):
    """The SAGAN self-attention block on a (B, C, *spatial) feature map, N positions.

    In the query/key/value language: the query is g(x), the key is f(x) and the value is h(x);
    v is the output projection. (The released code calls them theta, phi, g and o.)
    """

    def __init__(self, channels, dims=2, pooled=True, use_sn=True):
        super().__init__()
        conv = LAYER_TYPES[dims].conv
        self.pool = LAYER_TYPES[dims].max_pool if pooled else None
        c8, c2 = channels // 8, channels // 2
        self.f = sn(conv(channels, c8, 1, bias=False), use_sn)  # key
        self.g = sn(conv(channels, c8, 1, bias=False), use_sn)  # query
        self.h = sn(conv(channels, c2, 1, bias=False), use_sn)  # value (C/2: difference 1)
        self.v = sn(conv(c2, channels, 1, bias=False), use_sn)  # output projection
        self.gamma = new_gamma()  # Eq. (3)
        self.use_fused = True  # scaled_dot_product_attention when beta is not requested

    def keys_values(self, x):
        fx, hx = self.f(x), self.h(x)  # (B, C/8, *spatial), (B, C/2, *spatial)
        if self.pool is not None:  # difference 2: N -> M = N / 2^dims key positions (N/8 in 3-D)
            fx, hx = self.pool(fx, 2), self.pool(hx, 2)
        return fx.flatten(2), hx.flatten(2)  # (B, C/8, M), (B, C/2, M)

    def explicit(self, x):
        """Eq. (1) and (2) as written: forms the attention map beta, O(N * M) memory.
        Returns o (B, C/2, N), before v, and beta (B, N, M)."""
        gx = self.g(x).flatten(2)  # (B, C/8, N) queries
        fx, hx = self.keys_values(x)  # (B, C/8, M), (B, C/2, M)
        beta = attention_map(gx, fx)  # (B, N, M), Eq. (1)
        o = hx @ beta.transpose(1, 2)  # (B, C/2, N): Eq. (2) before v
        return o, beta

    def fused(self, x):
        """The same o through torch's fused scaled_dot_product_attention, beta never stored.

        SAGAN does not scale its scores, hence scale=1.0. The fused CPU and GPU kernels want
        query, key and value of one width, but the value is 4x wider than query and key. So query
        and key are zero-padded from C/8 to C/2 channels (difference 4): the zeros add nothing to
        the scores f(x_i)^T g(x_j), so beta and o are unchanged. (Without this, torch silently
        falls back to its unfused math path, which stores the whole score matrix.)
        """
        gx = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C/8)
        fx, hx = self.keys_values(x)  # (B, C/8, M), (B, C/2, M)
        pad = hx.shape[1] - fx.shape[1]  # C/2 - C/8 zero channels
        q = F.pad(gx, (0, pad)).unsqueeze(1)  # (B, 1, N, C/2)
        k = F.pad(fx.transpose(1, 2), (0, pad)).unsqueeze(1)  # (B, 1, M, C/2)
        val = hx.transpose(1, 2).contiguous().unsqueeze(1)  # (B, 1, M, C/2), channels last
        o = F.scaled_dot_product_attention(q, k, val, scale=1.0)  # (B, 1, N, C/2)
        return o.squeeze(1).transpose(1, 2)  # (B, C/2, N)

    def forward(self, x, return_beta=False):
        B, C, *spatial = x.shape
        if return_beta or not self.use_fused:
            o, beta = self.explicit(x)
        else:
            o, beta = self.fused(x), None
        o = self.v(o.reshape(B, C // 2, *spatial))  # (B, C, *spatial): Eq. (2), output conv v
        y = self.gamma * o + x  # Eq. (3)
        return (y, beta) if return_beta else y


class ResidualControl(nn.Module):
    """Table 1's control: a residual block where the attention would be, with its parameters.

    y = x + gamma * v(relu(k(x))), k a 3x3 conv to C/8 channels and v a 1x1 conv back to C: it
    mixes only the 3x3 neighbourhood where attention mixes all positions. Its 9 C^2/8 + C^2/8 =
    1.25 C^2 weights equal SelfAttention's f, g, h, v (C^2/8 + C^2/8 + C^2/2 + C^2/2); like it, it is
    spectrally normalised and starts as the identity (its gamma is new_gamma()), so the two differ
    only in reach.
    """

    def __init__(self, channels, dims=2, pooled=True, use_sn=True):  # SelfAttention's arguments; pooled unused
        super().__init__()
        conv = LAYER_TYPES[dims].conv
        self.k = sn(conv(channels, channels // 8, 3, padding=1, bias=False), use_sn)
        self.v = sn(conv(channels // 8, channels, 1, bias=False), use_sn)
        self.gamma = new_gamma()

    def forward(self, x):
        return x + self.gamma * self.v(F.relu(self.k(x)))


# What goes at the attention resolutions (ModelConfig.attn_block): the paper's block, or its control.
ATTN_BLOCKS = {"attention": SelfAttention, "residual": ResidualControl}


# ---------------------------------------------------------------------------------------------
# Configuration: the widths of the reference layouts, and the one ModelConfig
# ---------------------------------------------------------------------------------------------

class Architecture(NamedTuple):
    g: list  # G's channels, in multiples of ch: the 4x4 (4x4x4) input, then each up-block's output
    d: list  # D's channels after each block; the first, "optimized" block reads the RGB image
    d_down: list  # whether each D block halves the resolution
    attn: tuple  # where attention goes when ModelConfig.attn is not given (Table 1's featK)


# The ResNet layouts by (dims, size). Images: the reference implementations' (BigGAN-PyTorch's
# SA-GAN at 128 px, StudioGAN's CIFAR-sized layout at 32 px), attention at the paper's "feat64"
# (Table 1's best) at 128 and 256 px, else at half the image side. Volumes, by the cube's side:
# at 32^3 the 32 px layout itself; at 16^3 one block fewer, and G's last block half as wide, as
# the larger image layouts narrow towards the output, for the convolutions at full resolution
# dominate G's work. A 3x3x3 convolution has 3x the weights of a 3x3 one and a cube of side S has
# S times the positions of a square, so the volume layouts stay narrow; there is none to match.
ARCHITECTURES = {
    (2, 32): Architecture([4, 4, 4, 4], [2, 2, 2, 2], [True, True, False, False], (16,)),
    (2, 64): Architecture([16, 16, 8, 4, 2], [1, 2, 4, 8, 16], [True, True, True, True, False], (32,)),
    (2, 128): Architecture([16, 16, 8, 4, 2, 1], [1, 2, 4, 8, 16, 16], [True] * 5 + [False], (64,)),
    (2, 256): Architecture([16, 16, 8, 8, 4, 2, 1], [1, 2, 4, 8, 8, 16, 16], [True] * 6 + [False], (64,)),
    (3, 16): Architecture([4, 4, 2], [2, 2, 2], [True, True, False], (8,)),
    (3, 32): Architecture([4, 4, 4, 4], [2, 2, 2, 2], [True, True, False, False], (16,)),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild G and D; checkpoints store it as a dict. train.py makes each
    field but n_classes (which comes from the data) a command-line flag, its help the comment on
    the field's line; attn None is the architecture's default."""

    size: int = 128  # image side: 32, 64, 128 or 256; for volumes (--dims 3) the cube's side, 16 or 32
    dims: int = 2  # 2 = images (B, 3, S, S); 3 = volumes (B, 3, S, S, S), the built-in synthetic3d data
    ch: int = 64  # width multiplier (64 in the reference implementations at ImageNet 128)
    z_dim: int = 128  # size of z
    n_classes: int = 1000  # 0 = unconditional: plain BN in G, no projection in D
    attn: Optional[tuple] = None  # resolutions with attention in G and D (Table 1's featK): 64, 32,64 or none
    attn_block: str = "attention"  # what goes there: attention, or residual (Table 1's control, equal parameters)
    pooled: bool = True  # keys and values max-pooled 2x2, as in the released code (difference 2)
    g_sn: bool = True  # spectral norm in G too (Sec. 4); --no-g-sn: the "SN on D only" baseline
    z_blocks: bool = False  # z into every G block's batch norm too, not only the first layer (BigGAN's skip-z)

    def __post_init__(self):
        sizes = sorted(size for dims, size in ARCHITECTURES if dims == self.dims)
        if not sizes:
            raise ValueError(f"dims {self.dims} is not supported; choose 2 (images) or 3 (volumes)")
        if self.size not in sizes:
            raise ValueError(f"size {self.size} is not supported at dims {self.dims}; choose from {sizes}")
        self.attn = self.architecture.attn if self.attn is None else tuple(int(r) for r in self.attn)
        g_res = [4 * 2 ** (i + 1) for i in range(len(self.architecture.g) - 1)]
        d_res = d_resolutions(self)
        for r in self.attn:
            if r not in g_res or r not in d_res:
                allowed = sorted(set(g_res) & set(d_res))
                raise ValueError(f"attention resolution {r} is not a feature-map size of both "
                                 f"G and D at size {self.size}; choose from {allowed}")
        if self.attn_block not in ATTN_BLOCKS:
            raise ValueError(f"attn_block {self.attn_block!r}: choose {' or '.join(ATTN_BLOCKS)}")
        if self.ch < 8 or self.z_dim < 1 or self.n_classes < 0:
            raise ValueError(f"need ch >= 8, z_dim >= 1 and n_classes >= 0; got ch {self.ch}, "
                             f"z_dim {self.z_dim}, n_classes {self.n_classes}")

    @property
    def layers(self):
        return LAYER_TYPES[self.dims]

    @property
    def architecture(self):
        return ARCHITECTURES[self.dims, self.size]


def d_resolutions(cfg):
    """The resolution after each D block."""
    out, res = [], cfg.size
    for down in cfg.architecture.d_down:
        res = res // 2 if down else res
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------------
# Generator (Sec. 5: ResNet blocks, conditional BN, spectral norm)
# ---------------------------------------------------------------------------------------------

class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, then a per-class gain and bias (difference 5).

    With n_classes = 0 it is plain BatchNorm with a learned affine (the unconditional model).
    With z_dim > 0 (ModelConfig.z_blocks, difference 11) z first scales and shifts the normalised
    x by W_g z and W_b z, which start at 0, so that it starts as the paper's conditional BN; z is
    ignored without them.
    """

    def __init__(self, channels, n_classes, layers, z_dim=0):
        super().__init__()
        self.n_classes = n_classes
        self.bn = layers.batch_norm(channels, affine=n_classes == 0)
        if n_classes:
            self.gain = nn.Embedding(n_classes, channels)
            self.bias = nn.Embedding(n_classes, channels)
            nn.init.ones_(self.gain.weight)
            nn.init.zeros_(self.bias.weight)
        self.z_gain = self.z_bias = None
        if z_dim:
            self.z_gain, self.z_bias = nn.Linear(z_dim, channels, bias=False), nn.Linear(z_dim, channels, bias=False)
            nn.init.zeros_(self.z_gain.weight)
            nn.init.zeros_(self.z_bias.weight)

    def forward(self, x, y, z=None):
        x = self.bn(x)
        if self.z_gain is not None:  # x (1 + W_g z) + W_b z
            g, b = (w(z)[(...,) + (None,) * (x.dim() - 2)] for w in (self.z_gain, self.z_bias))  # (B, C, 1, 1[, 1])
            x = x + x * g + b
        if not self.n_classes:
            return x
        shape = (*y.shape, -1) + (1,) * (x.dim() - 2)  # (B, C, 1, 1) or (B, C, 1, 1, 1)
        return x * self.gain(y).view(shape) + self.bias(y).view(shape)


class GBlock(nn.Module):
    """CBN -> ReLU -> 2x nearest upsample -> conv3x3 -> CBN -> ReLU -> conv3x3, plus a
    shortcut upsample -> conv1x1 (3x3x3 and 1x1x1 on volumes)."""

    def __init__(self, c_in, c_out, n_classes, use_sn, layers, z_dim=0):
        super().__init__()
        conv = layers.conv
        self.bn1 = ConditionalBatchNorm(c_in, n_classes, layers, z_dim)
        self.conv1 = sn(conv(c_in, c_out, 3, padding=1), use_sn)
        self.bn2 = ConditionalBatchNorm(c_out, n_classes, layers, z_dim)
        self.conv2 = sn(conv(c_out, c_out, 3, padding=1), use_sn)
        self.conv_sc = sn(conv(c_in, c_out, 1), use_sn)

    def forward(self, x, y, z=None):
        h = F.interpolate(F.relu(self.bn1(x, y, z)), scale_factor=2.0)  # (B, c_in, 2H, 2W) or (.., 2D, 2H, 2W)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y, z)))  # (B, c_out, 2H, 2W)
        return h + self.conv_sc(F.interpolate(x, scale_factor=2.0))


class Generator(nn.Module):
    """z (B, z_dim), y (B,) -> images (B, 3, size, size) in [-1, 1], or volumes
    (B, 3, size, size, size) with cfg.dims = 3."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers = cfg.layers
        widths = [w * cfg.ch for w in cfg.architecture.g]
        self.linear = sn(nn.Linear(cfg.z_dim, 4 ** cfg.dims * widths[0]), cfg.g_sn)
        self.blocks = nn.ModuleList()
        res = 4
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            res *= 2
            self.blocks.append(GBlock(c_in, c_out, cfg.n_classes, cfg.g_sn, layers, cfg.z_dim if cfg.z_blocks else 0))
            if res in cfg.attn:  # Table 1: attention (or its control) after the block that outputs res x res
                self.blocks.append(ATTN_BLOCKS[cfg.attn_block](c_out, cfg.dims, cfg.pooled, cfg.g_sn))
        self.bn = layers.batch_norm(widths[-1])
        self.conv_out = sn(layers.conv(widths[-1], 3, 3, padding=1), cfg.g_sn)

    @property
    def attention_layers(self):
        return [b for b in self.blocks if isinstance(b, SelfAttention)]

    def forward(self, z, y=None, return_attention=False):
        h = self.linear(z).view(z.shape[0], -1, *(4,) * self.cfg.dims)  # (B, 16ch, 4, 4) at size 128
        betas = []
        for block in self.blocks:  # each GBlock doubles the resolution
            if isinstance(block, SelfAttention) and return_attention:
                h, beta = block(h, return_beta=True)  # beta (B, N, M)
                betas.append(beta)
            elif isinstance(block, GBlock):
                h = block(h, y, z)  # z reaches the batch norms only with cfg.z_blocks
            else:  # SelfAttention or ResidualControl
                h = block(h)
        x = torch.tanh(self.conv_out(F.relu(self.bn(h))))  # (B, 3, size, size[, size])
        return (x, betas) if return_attention else x


# ---------------------------------------------------------------------------------------------
# Discriminator (projection discriminator, Miyato & Koyama 2018)
# ---------------------------------------------------------------------------------------------

class DBlock(nn.Module):
    """Pre-activation ReLU -> conv3x3 -> ReLU -> conv3x3 -> 2x2 avg-pool, plus a shortcut
    conv1x1 -> avg-pool (3x3x3, 2x2x2, 1x1x1 on volumes). The first ("optimized") block reads RGB,
    so it has no input ReLU and pools before its shortcut conv."""

    def __init__(self, c_in, c_out, down, first, layers):
        super().__init__()
        self.down, self.first, self.pool = down, first, layers.avg_pool
        self.conv1 = sn(layers.conv(c_in, c_out, 3, padding=1))
        self.conv2 = sn(layers.conv(c_out, c_out, 3, padding=1))
        learnable_sc = c_in != c_out or down
        self.conv_sc = sn(layers.conv(c_in, c_out, 1)) if learnable_sc else None

    def shortcut(self, x):
        if self.first:
            return self.conv_sc(self.pool(x, 2))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return self.pool(x, 2) if self.down else x

    def forward(self, x):
        # Out of place: an in-place ReLU here would also change x, which the shortcut reads.
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = self.pool(h, 2)  # (B, c_out, H/2, W/2)
        return h + self.shortcut(x)


class Discriminator(nn.Module):
    """x (B, 3, size, size) or (B, 3, size, size, size), y (B,) -> logits (B,)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        widths, downs = [3] + [w * cfg.ch for w in cfg.architecture.d], cfg.architecture.d_down
        self.blocks = nn.ModuleList()
        res, placed = cfg.size, set()
        for i, (c_in, c_out, down) in enumerate(zip(widths[:-1], widths[1:], downs)):
            res = res // 2 if down else res
            self.blocks.append(DBlock(c_in, c_out, down, i == 0, cfg.layers))
            if res in cfg.attn and res not in placed:  # after the first block that outputs res
                self.blocks.append(ATTN_BLOCKS[cfg.attn_block](c_out, cfg.dims, cfg.pooled))
                placed.add(res)
        self.linear = sn(nn.Linear(widths[-1], 1))
        # Projection (Miyato & Koyama 2018): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.
        self.embed = sn(nn.Embedding(cfg.n_classes, widths[-1])) if cfg.n_classes else None

    @property
    def attention_layers(self):
        return [b for b in self.blocks if isinstance(b, SelfAttention)]

    def forward(self, x, y=None):
        h = x
        for block in self.blocks:
            h = block(h)
        h = F.relu(h).sum(dim=tuple(range(2, h.dim())))  # (B, 16ch): global sum pooling
        out = self.linear(h).squeeze(1)  # (B,)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(dim=1)
        return out


# ---------------------------------------------------------------------------------------------
# Hinge losses (Sec. 3, Eq. (4))
# ---------------------------------------------------------------------------------------------

def d_hinge_loss(real_logits, fake_logits):
    """L_D = E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z), y))], returned as its two parts."""
    return F.relu(1.0 - real_logits).mean(), F.relu(1.0 + fake_logits).mean()


def g_hinge_loss(fake_logits):
    """L_G = -E[D(G(z), y)]."""
    return -fake_logits.mean()
