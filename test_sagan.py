"""Tests for sagan: the model, the trainer, the data and the metrics.

Three kinds, as in STYLE.md: equivalence to a reference (spectral norm against
torch.linalg.matrix_norm, the fused attention path against the explicit one), closed forms (hinge
values, FID of Gaussians, IS of known predictions), and invariants (gamma = 0 is the identity,
rows of beta sum to 1, shapes, parameter counts); plus end-to-end runs on tiny synthetic data.
Everything runs on a CPU in seconds; nothing is downloaded.
"""

import pytest
import torch

from sagan import (Discriminator, Generator, ModelConfig, SelfAttention, d_hinge_loss,
                   g_hinge_loss)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# sagan.py: self-attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooled", [True, False])
def test_attention_is_identity_at_init(pooled):
    torch.manual_seed(0)
    attn = SelfAttention(32, pooled=pooled)
    x = torch.randn(2, 32, 8, 8)
    assert attn.gamma.item() == 0.0
    assert torch.equal(attn(x), x)


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("spatial", [(16,), (8, 8), (4, 4, 4)])
def test_fused_and_explicit_attention_agree(spatial, pooled):
    torch.manual_seed(0)
    attn = SelfAttention(64, dims=len(spatial), pooled=pooled)
    attn.gamma.data.fill_(0.8)  # otherwise both paths return x exactly
    attn.eval()  # keep the spectral-norm vectors fixed between the two calls
    x = torch.randn(3, 64, *spatial)
    y_fused = attn(x)
    y_explicit, beta = attn(x, return_beta=True)
    rel = (y_fused - y_explicit).norm() / (y_explicit - x).norm()
    assert rel <= 1e-5
    n = x[0, 0].numel()
    assert beta.shape == (3, n, n // 2 ** len(spatial) if pooled else n)
    assert torch.allclose(beta.sum(-1), torch.ones(3, n), atol=1e-5)


def test_fused_attention_uses_the_fused_kernel_on_cpu():
    """The value split into heads is what lets torch pick its flash kernel over the math path."""
    attn = SelfAttention(64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        attn(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


@pytest.mark.parametrize("pooled,m", [(True, 16), (False, 64)])
def test_beta_shape_2d(pooled, m):
    attn = SelfAttention(16, pooled=pooled)
    _, beta = attn(torch.randn(2, 16, 8, 8), return_beta=True)
    assert beta.shape == (2, 64, m)


# ---------------------------------------------------------------------------------------------
# sagan.py: spectral norm, parameter counts, shapes
# ---------------------------------------------------------------------------------------------

def test_spectral_norm_makes_every_weight_unit_norm():
    torch.manual_seed(0)
    cfg = ModelConfig(size=32, ch=8, n_classes=10, attn=(16,))
    for net in (Generator(cfg), Discriminator(cfg)):
        net.train()
        sn_modules = [m for m in net.modules() if hasattr(m, "parametrizations")]
        # Every conv, linear and D's embedding: G 1 + 3 * 3 + 4 + 1, D 3 + 4 + 3 + 2 * 2 + 2.
        assert len(sn_modules) == (15 if isinstance(net, Generator) else 16)
        with torch.no_grad():
            for _ in range(200):  # each training-mode access runs one power iteration
                for m in sn_modules:
                    m.weight
        for m in sn_modules:
            w = m.weight.detach().flatten(1)  # (out, in * k * k); an embedding is (classes, C)
            sigma = torch.linalg.matrix_norm(w, ord=2)
            assert abs(sigma.item() - 1.0) < 1e-3, m


def test_no_spectral_norm_on_conditional_bn_and_optional_in_g():
    g = Generator(ModelConfig(size=32, ch=8, n_classes=10, attn=(16,)))
    assert not hasattr(g.blocks[0].bn1.gain, "parametrizations")
    assert torch.equal(g.blocks[0].bn1.gain.weight, torch.ones(10, 32))
    assert torch.equal(g.blocks[0].bn1.bias.weight, torch.zeros(10, 32))
    g_plain = Generator(ModelConfig(size=32, ch=8, n_classes=10, attn=(16,), g_sn=False))
    assert not any(hasattr(m, "parametrizations") for m in g_plain.modules())


@pytest.mark.parametrize("attn,g,d", [
    ((64,), 42_017_412, 39_448_258),
    ((32,), 42_078_852, 39_463_618),
    ((), 41_996_931, 39_443_137),
])
def test_parameter_counts_imagenet128(attn, g, d):
    """The counts of BigGAN-PyTorch's SA-GAN (81.5M in all, the BigGAN paper's baseline)."""
    cfg = ModelConfig(size=128, ch=64, n_classes=1000, attn=attn)
    with torch.device("meta"):  # counts only: no memory, no init time
        assert n_params(Generator(cfg)) == g
        assert n_params(Discriminator(cfg)) == d


def test_parameter_counts_cifar_layout():
    cfg = ModelConfig(size=32, ch=64, n_classes=10, attn=(16,))
    assert n_params(Generator(cfg)) == 4_386_308
    assert n_params(Discriminator(cfg)) == 1_075_586


@pytest.mark.parametrize("size", [32, 64, 128, 256])
@pytest.mark.parametrize("n_classes", [0, 7])
def test_output_shapes_and_range(size, n_classes):
    torch.manual_seed(0)
    cfg = ModelConfig(size=size, ch=8, n_classes=n_classes, attn=(16,))
    G, D = Generator(cfg), Discriminator(cfg)
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([0, n_classes - 1 if n_classes else 0])
    x = G(z, y)
    assert x.shape == (2, 3, size, size)
    assert x.abs().max() <= 1.0 and x.std() > 0
    assert D(x, y).shape == (2,)
    x2, betas = G(z, y, return_attention=True)
    assert len(betas) == 1 and betas[0].shape == (2, 256, 64)


def test_bad_model_config_is_refused():
    with pytest.raises(ValueError, match="size must be one of"):
        ModelConfig(size=48)
    with pytest.raises(ValueError, match="attention resolution 128"):
        ModelConfig(size=128, attn=(128,))


def test_projection_uses_the_label():
    torch.manual_seed(0)
    cfg = ModelConfig(size=32, ch=8, n_classes=10, attn=())
    D = Discriminator(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    assert D(x, torch.tensor([1])).item() != D(x, torch.tensor([2])).item()


# ---------------------------------------------------------------------------------------------
# sagan.py: losses and gradients
# ---------------------------------------------------------------------------------------------

def test_hinge_losses_on_hand_picked_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # margins: 0, 0.5, 2
    fake = torch.tensor([-3.0, 0.0, 1.0])  # margins: 0, 1, 2
    loss_real, loss_fake = d_hinge_loss(real, fake)
    assert loss_real.item() == pytest.approx(2.5 / 3, abs=1e-7)
    assert loss_fake.item() == pytest.approx(3.0 / 3, abs=1e-7)
    assert g_hinge_loss(fake).item() == pytest.approx(2.0 / 3, abs=1e-7)
    # Saturated on both sides: a confident, correct D has zero loss, and G's loss is not clipped.
    assert d_hinge_loss(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -5.0])) == (0.0, 0.0)
    assert g_hinge_loss(torch.tensor([-5.0])).item() == 5.0


def test_one_d_step_and_one_g_step_reach_every_parameter():
    torch.manual_seed(0)
    cfg = ModelConfig(size=32, ch=8, n_classes=10, attn=(16,))
    G, D = Generator(cfg), Discriminator(cfg)
    for a in G.attention_layers + D.attention_layers:
        a.gamma.data.fill_(0.1)  # at gamma = 0 the attention convs get no gradient, by design
    y = torch.randint(0, 10, (4,))
    x_real = torch.rand(4, 3, 32, 32) * 2 - 1
    x_fake = G(torch.randn(4, cfg.z_dim), y)
    logits = D(torch.cat([x_real, x_fake.detach()]), torch.cat([y, y]))
    sum(d_hinge_loss(*logits.chunk(2))).backward()
    for name, p in D.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    D.zero_grad()
    g_hinge_loss(D(x_fake, y)).backward()
    for name, p in G.named_parameters():
        if name.endswith(("gain.weight", "bias.weight")):
            used = p.grad[y.unique()]  # only the rows of classes in the batch learn
            assert used.abs().sum(1).min() > 0, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gamma_gets_a_gradient_at_zero():
    """gamma starts at 0 but must still learn: its gradient is <o, dL/dy>, not zero."""
    attn = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    attn(x).pow(2).sum().backward()
    assert attn.gamma.grad.abs() > 0


# ---------------------------------------------------------------------------------------------
# train.py
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--size", "32", "--ch", "8", "--batch-size", "8", "--log-every", "5", "--sample-every", "5",
        "--ckpt-every", "100"]


def run_cli(script, *args, timeout=120):
    """Run one of the project's scripts as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=HERE)
    return p.returncode, p.stdout, p.stderr


def assert_same_state(a, b, path="ckpt"):
    """Recursively: tensors bit-identical, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    """5 steps, resume, 5 more == 10 straight: G, D, EMA, optimizers, SN vectors and all RNGs,
    with flips on (their randomness must resume too) and the EMA switching on mid-run."""
    common = TINY + ["--ema", "--ema-start", "3", "--flip"]
    assert train.main(common + ["--steps", "10", "--out", tmp_path / "straight"]) == 0
    assert train.main(common + ["--steps", "5", "--out", tmp_path / "split"]) == 0
    assert train.main(["--resume", "--out", tmp_path / "split", "--steps", "10"]) == 0
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for key in ("G", "D", "G_ema", "opt_G", "opt_D", "rng", "model"):
        assert_same_state(a[key], b[key], key)
    # The log of the resumed run continues the first one: steps 5 and 10, one line each.
    log = [json.loads(l) for l in open(tmp_path / "split" / "log.jsonl")]
    assert [r["step"] for r in log] == [5, 10]
    assert log[1]["loss_d_real"] == [json.loads(l) for l in open(tmp_path / "straight" / "log.jsonl")][1]["loss_d_real"]


def test_run_folder_contents(tmp_path):
    assert train.main(TINY + ["--steps", "5", "--out", tmp_path]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "config.json", "log.jsonl", "samples"]
    assert os.listdir(tmp_path / "samples") == ["step_0000005.png"]
    record = json.loads(open(tmp_path / "log.jsonl").readline())
    for key in ("step", "loss_d_real", "loss_d_fake", "loss_g", "d_real", "d_fake", "gamma_g", "gamma_d", "images_per_s"):
        assert key in record, key
    assert len(record["gamma_g"]) == len(record["gamma_d"]) == 1
    config = json.load(open(tmp_path / "config.json"))
    assert config["train"]["lr_g"] == 1e-4 and config["train"]["lr_d"] == 4e-4  # TTUR
    assert config["train"]["beta1"] == 0.0 and config["train"]["beta2"] == 0.9


def test_imagenet_preset_is_the_papers():
    cfg, _ = train.parse_config(["--data", "imagenet", "--data-root", "/x"])
    train.check_config(cfg)
    assert (cfg.size, cfg.ch, cfg.batch_size, cfg.steps, cfg.attn) == (128, 64, 256, 1_000_000, "64")
    assert (cfg.lr_g, cfg.lr_d, cfg.beta1, cfg.beta2, cfg.d_steps) == (1e-4, 4e-4, 0.0, 0.9, 1)
    cfg, _ = train.parse_config(["--data", "imagenet", "--batch-size", "128", "--attn", "none"])
    assert cfg.batch_size == 128 and cfg.attn == "none"  # flags win over the preset


def test_ddp_with_two_gloo_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(HERE, "train.py"), *TINY, "--steps", "3", "--device", "cpu", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("step 3/3") == 1  # only rank 0 logs
    ckpt = train.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 3
    from sagan import Generator, ModelConfig
    G = Generator(ModelConfig(**ckpt["model"]))
    G.load_state_dict(ckpt["G"])


def test_missing_imagenet_root_is_one_clear_line():
    code, out, err = run_cli("train.py", "--data", "imagenet", "--data-root", "/nonexistent")
    assert code != 0
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert err.startswith("error:") and "/nonexistent" in err


def test_benchmark_smoke_prints_the_table():
    code, out, err = run_cli("train.py", "--benchmark", "--size", "32", "--ch", "8", "--batch-size", "4",
                             "--bench-iters", "1", "--bench-variants", "fp32,explicit_attn,channels_last")
    assert code == 0, err
    for word in ("ms/iter", "images/s", "peak MB", "fp32", "explicit_attn", "channels_last"):
        assert word in out, word
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0] in train.VARIANTS]
    assert len(rows) == 3 and all(float(r[2]) > 0 for r in rows)
