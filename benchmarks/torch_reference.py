#!/usr/bin/env python3
"""PyTorch reference of the method: the same VAE and the projection loop as PyTorch users run it.

The benchmarks compare iepjax against this file, so it is written the way the public PyTorch
ports of Dehaene et al. (ICLR 2020) work: one image at a time (batch 1), an eager Python loop,
`torch.autograd.grad` of the energy through the whole network at every step (docs/method.md,
"Projection"). Nothing here imports JAX or iepjax: it runs under a PyTorch-only interpreter.

- `VAE`: the convolutional VAE of Bergmann et al. 2018 as `iepjax/model.py` builds it (encoder of
  nine convolutions to 1x1, dense mu and logvar, latent 100, LeakyReLU 0.2, no batch norm; the
  decoder either nearest upsampling + 3x3 convs or transposed convs; sigmoid output) with the
  Bernoulli (BCE) or the Gaussian likelihood with a learned scalar gamma.
- `loss_terms`, `energy`, `project`: the model's loss, E(x) = L_r(x) + lam ||x - x0||_1 and the
  update x <- clip(x - alpha grad E(x) * (x - f(x))^2, 0, 1).
- `load_flax_params`: iepjax's parameters (from `iepjax.init_params` or a checkpoint) copied
  into a `VAE`, kernel layouts converted; `agreement`: how far this loop is from iepjax's
  results on the same images (the check behind `compare_torch.py --check` and
  `tests/runtime/test_benchmarks.py`).

Timing from the command line prints one JSON line:

    python benchmarks/torch_reference.py --size 128 --channels 3 --iters 100 --batch 1 \
        [--decoder upsample|transposed] [--likelihood bce|gaussian] [--detach]

`--detach` mimics the public port exactly: f(x) is held fixed (no gradient through the network),
a cheaper loop and not the paper's method. Needs torch (the `bench` extra: torch==2.13.0).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# (features, kernel, stride) of the encoder's convolutions, padding 1: iepjax.model.ENCODER_SPEC
ENCODER_SPEC = ((32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1))
LOGVAR_RANGE = (-15.0, 8.0)  # iepjax bounds logvar so exp(logvar) neither overflows nor vanishes


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def _upsample_decoder(z_dim: int, channels: int, size: int) -> nn.Sequential:
    """Nearest upsampling + 3x3 convs: the public PyTorch port's decoder."""
    def conv(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), _act()]

    def up():
        return [nn.Upsample(scale_factor=2, mode="nearest")]

    return nn.Sequential(
        nn.Upsample(scale_factor=size // 16, mode="nearest"),
        *conv(z_dim, 32), *conv(32, 64), *conv(64, 128), *up(),
        *conv(128, 64), *conv(64, 64), *up(),
        *conv(64, 32), *conv(32, 32), *up(),
        *conv(32, 32), *up(),
        nn.Conv2d(32, channels, 3, 1, 1), nn.Sigmoid())


def _transposed_decoder(z_dim: int, channels: int, size: int) -> nn.Sequential:
    """Transposed convolutions: Bergmann et al. 2018's decoder."""
    def conv(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), _act()]

    def up(i, o):
        return [nn.ConvTranspose2d(i, o, 4, 2, 1), _act()]

    return nn.Sequential(
        nn.ConvTranspose2d(z_dim, 32, size // 16), _act(),  # 1x1 -> (size/16)^2
        *conv(32, 64), *conv(64, 128),
        *up(128, 64), *conv(64, 64),
        *up(64, 32), *conv(32, 32),
        *up(32, 32),
        nn.ConvTranspose2d(32, channels, 4, 2, 1), nn.Sigmoid())


class VAE(nn.Module):
    """x (B, C, H, W) in [0, 1] -> (f(x) (B, C, H, W), mu (B, z), logvar (B, z)), decoding the mean.

    `encoder`, `mu`, `logvar` and `decoder` are public (the training benchmark samples z itself).
    With the Gaussian likelihood the model owns `log_gamma`, the log of the decoder's std.
    """

    def __init__(self, channels: int, z_dim: int = 100, size: int = 128, decoder: str = "upsample",
                 likelihood: str = "bce"):
        super().__init__()
        if decoder not in ("upsample", "transposed"):
            raise ValueError(f"unknown decoder {decoder!r}: choose upsample or transposed")
        if likelihood not in ("bce", "gaussian"):
            raise ValueError(f"unknown likelihood {likelihood!r}: choose bce or gaussian")
        layers, c = [], channels
        for features, kernel, stride in ENCODER_SPEC:
            layers += [nn.Conv2d(c, features, kernel, stride, padding=1), _act()]
            c = features
        layers.append(nn.Conv2d(c, z_dim, size // 16))  # 'valid': (size/16)^2 -> 1x1
        self.encoder = nn.Sequential(*layers)
        self.mu = nn.Linear(z_dim, z_dim)
        self.logvar = nn.Linear(z_dim, z_dim)
        build = _upsample_decoder if decoder == "upsample" else _transposed_decoder
        self.decoder = build(z_dim, channels, size)
        self.likelihood = likelihood
        if likelihood == "gaussian":
            self.log_gamma = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.mu(h), self.logvar(h).clamp(*LOGVAR_RANGE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decoder(mu[:, :, None, None]), mu, logvar


def reconstruction_loss(model: VAE, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_r of each image (B,), summed over its pixels: BCE, or the Gaussian negative log-likelihood
    sum (x - f)^2 / (2 gamma^2) + D log gamma + D/2 log(2 pi)."""
    if model.likelihood == "bce":
        return F.binary_cross_entropy(rec, x, reduction="none").flatten(1).sum(1)
    d = x[0].numel()
    lg = model.log_gamma
    sq = (x - rec).square().flatten(1).sum(1)
    return sq * 0.5 * torch.exp(-2.0 * lg) + d * lg + 0.5 * d * math.log(2 * math.pi)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of each image (B,)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)


def loss_terms(model: VAE, x: torch.Tensor, use_kl: bool = True):
    """(L_r + KL per image (B,), f(x)): the model's own loss at the posterior mean."""
    rec, mu, logvar = model(x)
    loss = reconstruction_loss(model, rec, x)
    if use_kl:
        loss = loss + kl_divergence(mu, logvar)
    return loss, rec


def energy(model: VAE, x: torch.Tensor, x0: torch.Tensor, lam: float, use_kl: bool = True):
    """(E(x) per image (B,), f(x)) with E(x) = L_r(x) + lam ||x - x0||_1."""
    loss, rec = loss_terms(model, x, use_kl)
    return loss + lam * (x - x0).abs().flatten(1).sum(1), rec


def project(model: VAE, x0: torch.Tensor, iters: int, alpha: float = 0.5, lam: float = 0.05,
            detach: bool = False, use_kl: bool = True, least_magnitude: bool = False) -> torch.Tensor:
    """The paper's loop: `iters` times x <- clip(x - alpha grad E(x) * (x - f(x))^2, 0, 1).

    The gradient flows through the encoder and the decoder (f depends on x); the weighting
    (x - f(x))^2 is not differentiated. Images of a batch do not interact (the energy is a sum
    of per-image terms, no batch statistics). At x = x0 PyTorch's abs has the subgradient 0;
    `least_magnitude=True` takes iepjax's least-magnitude subgradient there instead (a pixel
    stays at x0 while |grad L_r| <= lam). `detach=True` is the public port's cheaper variant:
    f(x) held fixed, no KL, and for BCE the arguments swapped as the port writes them.
    Defaults alpha 0.5, lam 0.05 are the ports' values for BCE models.
    """
    x = x0.clone()
    for _ in range(iters):
        x = x.detach().requires_grad_(True)
        if detach:
            rec = model(x)[0].detach()
            if model.likelihood == "bce":
                e = F.binary_cross_entropy(x, rec, reduction="sum")
            else:
                e = (x - rec).square().sum() * 0.5 * torch.exp(-2.0 * model.log_gamma.detach())
            e = e + lam * (x - x0).abs().sum()
        else:
            e, rec = energy(model, x, x0, lam, use_kl)
            e = e.sum()
        (grad,) = torch.autograd.grad(e, x)
        if least_magnitude:
            grad = torch.where(x == x0, grad - grad.clamp(-lam, lam), grad)
        x = (x - alpha * grad * (x - rec.detach()).square()).clamp(0, 1)
    return x.detach()


# ------------------------------------------------------------------ iepjax's parameters, checked
def _flat(tree, prefix: str = "") -> dict:
    """Nested mapping -> {"a/b/c": array}; a mapping that is already flat passes through."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if hasattr(v, "items"):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def flax_names(model: VAE) -> list[tuple[nn.Module, str]]:
    """(torch layer, iepjax parameter path) of every layer with weights, in the network's order.

    flax names a module's layers by class and creation order: the encoder's convolutions are
    encoder/Conv_0..8, its heads encoder/mu and encoder/logvar; the decoder's convolutions are
    decoder/Conv_i and its transposed convolutions decoder/ConvTranspose_j, each counted apart.
    """
    pairs = [(m, f"encoder/Conv_{i}") for i, m in enumerate(l for l in model.encoder if isinstance(l, nn.Conv2d))]
    pairs += [(model.mu, "encoder/mu"), (model.logvar, "encoder/logvar")]
    counts = {nn.Conv2d: 0, nn.ConvTranspose2d: 0}
    for m in model.decoder:
        if type(m) in counts:
            pairs.append((m, f"decoder/{'Conv' if type(m) is nn.Conv2d else 'ConvTranspose'}_{counts[type(m)]}"))
            counts[type(m)] += 1
    return pairs


def load_flax_params(model: VAE, params) -> VAE:
    """Copy iepjax's parameters into `model` (in place) and return it.

    `params` is what `iepjax.init_params` or `iepjax.training.load_params` returns (a nested dict
    with a "params" key), or the same flattened to "encoder/Conv_0/kernel"-style keys. Layouts:
    a conv kernel (kh, kw, in, out) -> Conv2d (out, in, kh, kw); a transposed-conv kernel of iepjax
    (a convolution of the dilated input with the kernel as stored) -> ConvTranspose2d (in, out,
    kh, kw) spatially flipped (PyTorch's transposed conv is the gradient of a conv, which flips
    it); a dense kernel (in, out) -> Linear (out, in). Shapes are checked; a parameter left over
    on either side is an error.
    """
    flat = _flat(params.get("params", params) if hasattr(params, "get") else params)
    flat = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in flat.items()}
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in flat:
            raise KeyError(f"iepjax parameter {name!r} missing; have {sorted(flat)}")
        used.add(name)
        return flat[name]

    for layer, path in flax_names(model):
        w = take(f"{path}/kernel")
        if isinstance(layer, nn.ConvTranspose2d):
            w = np.flip(w, (0, 1)).transpose(2, 3, 0, 1)
        elif isinstance(layer, nn.Conv2d):
            w = w.transpose(3, 2, 0, 1)
        else:
            w = w.T
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise ValueError(f"{path}: iepjax kernel gives {tuple(w.shape)}, the PyTorch layer has "
                             f"{tuple(layer.weight.shape)} (another size, channel count or decoder?)")
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(np.ascontiguousarray(w, np.float32)))
            layer.bias.copy_(torch.tensor(np.asarray(take(f"{path}/bias"), np.float32)))
    if model.likelihood == "gaussian":
        with torch.no_grad():
            model.log_gamma.copy_(torch.tensor(np.asarray(take("log_gamma"), np.float32)))
    left = sorted(set(flat) - used)
    if left:
        raise ValueError(f"iepjax parameters with no PyTorch layer: {left} (likelihood {model.likelihood!r}?)")
    return model


def agreement(model: VAE, x0_nhwc: np.ndarray, jax_f0: np.ndarray, jax_e0: np.ndarray, jax_x_T: np.ndarray,
              steps: int, alpha: float, lam: float, use_kl: bool = True, least_magnitude: bool = True) -> dict:
    """How far this reference is from iepjax on the same images (NHWC numpy in, floats out).

    `jax_f0`, `jax_e0` and `jax_x_T` are iepjax's f(x0) (B, H, W, C), E(x0) (B,) and x_T after
    `steps` steps of the paper's loop (`ProjectionConfig(backtrack=False)`, no early stopping).
    The reference projects one image at a time, as the benchmarks time it. Returns the maximum
    absolute differences of f(x0) and x_T, the maximum relative difference of E(x0), and the mean
    update |x_T - x0| (so a check that moved nothing cannot pass unnoticed).
    """
    x0 = torch.tensor(np.asarray(x0_nhwc, np.float32).transpose(0, 3, 1, 2))
    with torch.no_grad():
        e0, f0 = energy(model, x0, x0, lam, use_kl)  # the prior is 0 at x = x0
    x_T = torch.cat([project(model, x0[i:i + 1], steps, alpha=alpha, lam=lam, use_kl=use_kl,
                             least_magnitude=least_magnitude) for i in range(len(x0))])
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    jax_e0 = np.asarray(jax_e0, np.float64)
    return {"max_abs_diff_f_x0": float(np.abs(nhwc(f0) - jax_f0).max()),
            "max_rel_diff_energy_x0": float(np.max(np.abs(e0.double().numpy() - jax_e0) / np.abs(jax_e0))),
            "max_abs_diff_x_T": float(np.abs(nhwc(x_T) - jax_x_T).max()),
            "mean_abs_update_x_T": float(np.abs(np.asarray(jax_x_T) - np.asarray(x0_nhwc)).mean())}


# ------------------------------------------------------------------------------------- timing
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--iters", type=int, default=100, help="projection steps")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (the ports use 1)")
    p.add_argument("--images", type=int, default=4, help="images timed")
    p.add_argument("--decoder", choices=["upsample", "transposed"], default="upsample",
                   help="upsample+conv (the PyTorch port) or transposed convs (Bergmann et al. 2018)")
    p.add_argument("--likelihood", choices=["bce", "gaussian"], default="bce")
    p.add_argument("--detach", action="store_true", help="the public port's loop: no gradient through f")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = VAE(a.channels, size=a.size, decoder=a.decoder, likelihood=a.likelihood).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    xs = torch.rand(a.images, a.channels, a.size, a.size)
    project(model, xs[:a.batch], 2, detach=a.detach)  # warm-up
    t = time.perf_counter()
    for i in range(0, a.images, a.batch):
        project(model, xs[i:i + a.batch], a.iters, detach=a.detach)
    dt = time.perf_counter() - t
    print(json.dumps({"impl": "torch-eager" + ("-detach" if a.detach else ""), "decoder": a.decoder,
                      "likelihood": a.likelihood, "size": a.size, "channels": a.channels, "iters": a.iters,
                      "batch": a.batch, "images": a.images, "threads": torch.get_num_threads(),
                      "seconds": round(dt, 3), "img_per_s": round(a.images / dt, 4),
                      "iter_img_per_s": round(a.images * a.iters / dt, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
