"""Training of the VAE on normal images, with resumable orbax checkpoints (docs/method.md, Training).

`train` runs `iepjax.training_step.train_step` over a device mesh (`iepjax.sharding`; one device
is a mesh of one) and keeps the run's checkpoints and loss log; `collapse_check` tells whether
the trained VAE only predicts the mean image; `load_params` reads a trained run back.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from iepjax import checkpointing, distributed, sharding
from iepjax.atomic import dumps_json
from iepjax.config import ModelConfig, TrainConfig, from_dict, to_dict
from iepjax.losses import constant_prediction_loss, model_loss
from iepjax.model import VAE
from iepjax.runs import atomic_write_text
from iepjax.training_step import TrainState, batch_indices, image_loss, init_state, train_step  # noqa: F401 (API)

LOG_COLUMNS = ("step", "loss", "recon", "kl", "recon_per_pixel", "gamma")


class CollapseReport(NamedTuple):
    """Posterior-mean loss of the trained model against the constant (mean-image) predictor."""

    recon_per_pixel: float
    constant_per_pixel: float
    kl_per_image: float
    ratio: float
    collapsed: bool


class TrainSummary(NamedTuple):
    """What `train` returns: the final state, the collapse check, the step it resumed from, the config."""

    state: TrainState
    collapse: CollapseReport
    resumed_from: int
    config: TrainConfig


@functools.partial(jax.jit, static_argnames="config")
def _posterior_mean_terms(params: dict, x_BxHxWxC: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(reconstruction error, KL) per image at the posterior mean: (B, H, W, C) -> (B,), (B,).

    The error is L_r for BCE, and the squared error of f(x) for the Gaussian likelihood (its learned
    gamma left out, so that it compares with the constant predictor's, `collapse_check`)."""
    vae = VAE(config)
    out = vae.apply(params, x_BxHxWxC)  # one forward pass, decoded at the posterior mean
    terms = jax.vmap(model_loss, in_axes=(0, 0, 0, 0, None, None))(
        out.logits, x_BxHxWxC, out.posterior.mu, out.posterior.logvar, vae.apply(params, method=VAE.gamma_log), config)
    if config.likelihood == "bce":
        return terms.recon, terms.kl
    return jnp.sum(jnp.square(x_BxHxWxC - jax.nn.sigmoid(out.logits)), axis=(1, 2, 3)), terms.kl


def collapse_check(params: dict, images_NxHxWxC: np.ndarray, config: ModelConfig, *,
                   threshold: float = 0.97, max_images: int = 256) -> CollapseReport:
    """Detect a VAE that predicts the mean image (docs/method.md, Training): L_r near the
    constant predictor's.

    For BCE, both losses are per-pixel cross-entropies; for the Gaussian likelihood, per-pixel
    squared errors of f(x) (the learned gamma is left out so the two are comparable).
    collapsed = recon_per_pixel >= threshold * constant_per_pixel. The KL is reported beside it:
    usually near 0 in a collapse, but a decoder can also ignore a posterior that
    carries a few nats (seen on the built-in grass: KL 8.4 per image, ratio 1.000), which is a
    collapse all the same.
    """
    x = np.asarray(images_NxHxWxC[:max_images], np.float32) / 255.0
    recon, kl = [], []
    for xb, real in sharding.fixed_batches(x, 32):  # one program whatever the number of images
        err, kl_b = _posterior_mean_terms(params, jnp.asarray(xb), config)
        recon.append(np.asarray(err)[:real])
        kl.append(np.asarray(kl_b)[:real])
    d = math.prod(x.shape[1:])
    rpp = float(np.mean(np.concatenate(recon)) / d)
    const = constant_prediction_loss(x, config)
    klm = float(np.mean(np.concatenate(kl)))
    ratio = rpp / max(const, 1e-12)
    collapsed = not ratio < threshold  # a NaN ratio (non-finite reconstructions) counts as collapsed
    return CollapseReport(rpp, const, klm, ratio, bool(collapsed))


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# The VAE's remedy for a collapse to the mean image: a floor of this many nats on each latent
# dimension's KL term (free bits, `losses.kl_free_bits`; docs/calibration.md, Collapse).
COLLAPSE_FREE_BITS = 0.5


def collapse_remedy(config: TrainConfig) -> TrainConfig | None:
    """The config to train again with when `config`'s model collapsed (`collapse_check`): the same
    with free bits (`COLLAPSE_FREE_BITS`); None when there is no remedy to try (a deterministic AE
    has no KL term, and a config that already floors the KL is what the user chose). The train
    pipeline (`pipelines.train.train_category`) applies it."""
    if not config.model.use_kl or config.free_bits > 0:
        return None
    return dataclasses.replace(config, free_bits=COLLAPSE_FREE_BITS)


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto]


def train(config: TrainConfig, images_NxHxWxC: np.ndarray, run_dir: str | os.PathLike, *,
          progress: bool = True, mesh=None) -> TrainSummary:
    """Train `VAE(config.model)` on uint8 images (N, size, size, channels); resume from `run_dir`.

    Writes into run_dir: checkpoints/ (orbax; params, Adam state, step, config), train_log.csv
    (loss terms every `log_every` steps), training.json (collapse check). Rerunning with the same
    run_dir continues from the newest checkpoint.
    `mesh` (`iepjax.sharding.make_mesh`; default: one device per process): data parallel, each
    batch split over the mesh's devices (of every process, each process taking its share of the
    batch's images); the same steps on any number of devices up to float rounding. `batch_size`
    must divide over the devices. With several processes, process 0 writes the log files.
    """
    m = config.model
    # a lazy PatchBank (textures, iepjax.data.preprocess) is indexed per batch, not materialised
    images = images_NxHxWxC if getattr(images_NxHxWxC, "lazy", False) else np.asarray(images_NxHxWxC)
    if images.ndim != 4 or images.shape[1:] != (m.size, m.size, m.channels):
        raise ValueError(f"training images must be shaped (N, {m.size}, {m.size}, {m.channels}), got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"training images must be uint8, got {images.dtype}")
    mesh = sharding.make_mesh(1) if mesh is None else mesh
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(config)
    mngr = checkpointing.manager(run_dir / "checkpoints")
    start = checkpointing.latest_step(mngr) or 0
    if start:  # compare the stored config first: restoring another model's arrays fails obscurely
        saved_model = checkpointing.restore_config(run_dir / "checkpoints").get("model")
        if saved_model != cfg_dict["model"]:
            checkpointing.close(mngr)
            raise ValueError(f"{run_dir} holds a model with config {saved_model}, not {cfg_dict['model']}: "
                             "train into a new run folder")
    if config.batch_size % mesh.size:
        checkpointing.close(mngr)
        raise ValueError(f"batch size {config.batch_size} does not split over {mesh.size} devices: "
                         f"choose a multiple of {mesh.size} (or fewer --devices)")
    main = distributed.is_main()
    per = config.batch_size // jax.process_count()
    share = slice(jax.process_index() * per, (jax.process_index() + 1) * per)  # this process's images
    state, step_fn, put = sharding.training_on(mesh, init_state(config, key=jax.random.key(config.seed)))
    if start:
        state, _ = checkpointing.restore(mngr, state)
    log_path = run_dir / "train_log.csv"
    rows = _read_log(log_path, start)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    d = m.size * m.size * m.channels
    try:
        for step in range(start, config.steps):
            idx = batch_indices(len(images), config.batch_size, config.seed, step)[share]
            state, terms = step_fn(state, put(images[idx]), config)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                t = sharding.local_rows(terms)
                if not np.isfinite(float(t.total)):
                    raise FloatingPointError(
                        f"training diverged at step {done} (loss {float(t.total)}): lower the learning rate "
                        f"(--lr, now {config.learning_rate}); the last good checkpoint stays in {run_dir}/checkpoints")
                params = sharding.local_rows(state.params)
                gamma = float(np.exp(jax.device_get(VAE(m).apply(params, method=VAE.gamma_log))))
                rows.append({"step": done, "loss": float(t.total), "recon": float(t.recon), "kl": float(t.kl),
                             "recon_per_pixel": float(t.recon) / d, "gamma": gamma})
                if bar is not None:
                    bar.set_postfix(loss=f"{float(t.total):.1f}", recon=f"{float(t.recon):.1f}",
                                    kl=f"{float(t.kl):.2f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpointing.save(mngr, done, state, cfg_dict)
                if main:
                    _write_log(log_path, rows)
    finally:
        if bar is not None:
            bar.close()
        checkpointing.close(mngr)
    state = jax.tree.map(jnp.asarray, sharding.local_rows(state))  # this process's copy, on its default device
    report = collapse_check(state.params, images, m)
    if main:
        atomic_write_text(run_dir / "training.json",
                          dumps_json({"steps": int(state.step), "collapse": report._asdict()}))  # NaN ratio -> null
    return TrainSummary(state, report, start, config)


def load_params(run_dir: str | os.PathLike) -> tuple[dict, TrainConfig]:
    """Parameters and TrainConfig of the newest checkpoint of a run folder."""
    params, config, _ = load_checkpoint(run_dir)
    return params, config


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[dict, TrainConfig, int]:
    """Parameters, TrainConfig and step of the newest checkpoint of a run folder."""
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ folder: train a model first (python train.py)")
    config = from_dict(TrainConfig, checkpointing.restore_config(ckpt))
    mngr = checkpointing.reader(ckpt)  # changes nothing there: a training may be writing the folder
    abstract = jax.eval_shape(lambda: init_state(config, key=jax.random.key(0)))  # shapes only, nothing computed
    state, _ = checkpointing.restore(mngr, abstract)
    checkpointing.close(mngr)
    return state.params, config, int(state.step)
