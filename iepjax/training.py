"""Training of the VAE on normal images, with resumable orbax checkpoints (method.md, Training).

Loss of one image: L_r(x, f(z)) + KL(q(z|x) || N(0, I)) with z ~ q(z|x) (reparameterisation),
averaged over the batch; Adam(lr, b1, b2). Textures get random flips and 90-degree rotations.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iepjax import checkpointing
from iepjax.config import ModelConfig, TrainConfig, to_dict
from iepjax.losses import LossTerms, constant_prediction_loss, model_loss
from iepjax.model import VAE, init_params
from iepjax.runs import atomic_write_text

LOG_COLUMNS = ("step", "loss", "recon", "kl", "recon_per_pixel", "gamma")


class TrainState(NamedTuple):
    """Everything a resumed run needs: step, parameters, Adam state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


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


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam with the paper's settings (lr 2e-4, betas (0.5, 0.999) by default)."""
    return optax.adam(config.learning_rate, b1=config.b1, b2=config.b2)


def init_state(config: TrainConfig, *, key: jax.Array) -> TrainState:
    """Fresh parameters and optimiser state."""
    params = init_params(config.model, key=key)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer(config).init(params))


def augment(x_HxWxC: jax.Array, *, key: jax.Array) -> jax.Array:
    """Random horizontal flip and rotation by a multiple of 90 degrees of one square image."""
    k_flip, k_rot = jax.random.split(key)
    x = jnp.where(jax.random.bernoulli(k_flip), x_HxWxC[:, ::-1], x_HxWxC)
    r = jax.random.randint(k_rot, (), 0, 4)
    return jax.lax.switch(r, [lambda a, k=k: jnp.rot90(a, k, axes=(0, 1)) for k in range(4)], x)


def image_loss(params: dict, x_HxWxC: jax.Array, config: ModelConfig, *, key: jax.Array | None) -> LossTerms:
    """Training loss of one image (H, W, C): L_r + KL with z sampled when `key` is given."""
    vae = VAE(config)
    out = vae.apply(params, x_HxWxC[None], key)
    log_gamma = vae.apply(params, method=VAE.gamma_log)
    return model_loss(out.logits[0], x_HxWxC, out.posterior.mu[0], out.posterior.logvar[0], log_gamma, config)


GAMMA_MIN = 1e-3  # floor of the Gaussian decoder's std
GAMMA_EMA = 0.98  # decay of the running estimate of gamma^2 kept in the parameters


class BatchAux(NamedTuple):
    """Batch means of the loss terms, and the batch's per-pixel mean squared error of f(z)."""

    terms: LossTerms
    mse: jax.Array


def batch_loss(params: dict, x_BxHxWxC: jax.Array, config: ModelConfig, *, key: jax.Array) -> tuple[jax.Array, BatchAux]:
    """Mean over the batch of the per-image loss, z sampled with one key per image.

    Gaussian likelihood: gamma is the calibrated decoder std (Dai & Wipf 2019; Rybkin et al. 2021,
    "sigma-VAE"): gamma^2 = the batch's mean squared error, its maximum-likelihood value, so the
    balance between L_r and KL is right from the first step.
    """
    keys = jax.random.split(key, x_BxHxWxC.shape[0])
    # a VAE samples z; without KL (config.use_kl=False) the model is a deterministic AE on the mean.
    # issue 6: the network runs on the whole batch (not vmapped per image): the kernel gradients of
    # a vmapped conv are grouped convolutions, which XLA's SPMD partitioner gets wrong when the batch
    # is sharded (Shardy: wrong values, GSPMD: crash; JAX 0.10.2). Same values: eps_i ~ N(0, I) from key i.
    vae = VAE(config)
    post = vae.apply(params, x_BxHxWxC, method=VAE.encode)
    mu, logvar = post.mu, post.logvar
    z = mu
    if config.use_kl:
        eps = jax.vmap(lambda k: jax.random.normal(k, mu.shape[1:], mu.dtype))(keys)
        z = mu + jnp.exp(0.5 * logvar) * eps
    logits = vae.apply(params, z, method=VAE.decode)
    mse = jnp.mean(jnp.square(x_BxHxWxC - jax.nn.sigmoid(logits)))
    log_gamma = 0.5 * jnp.log(jnp.maximum(jax.lax.stop_gradient(mse), GAMMA_MIN ** 2))
    terms = jax.vmap(model_loss, in_axes=(0, 0, 0, 0, None, None))(logits, x_BxHxWxC, mu, logvar, log_gamma, config)
    terms = jax.tree.map(jnp.mean, terms)
    return terms.total, BatchAux(terms, mse)


@functools.partial(jax.jit, static_argnames="config", donate_argnums=0)
def train_step(state: TrainState, batch_BxHxWxC: jax.Array, config: TrainConfig) -> tuple[TrainState, LossTerms]:
    """One Adam step on a uint8 batch (B, H, W, C); keys derive from (seed, step).

    With the Gaussian likelihood the parameter log_gamma is not trained by Adam (its gradient is
    zero) but set to a running average of the batches' optimal gamma^2, for use at test time.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)
    k_aug, k_z = jax.random.split(key)
    x = batch_BxHxWxC.astype(jnp.float32) / 255.0
    if config.augment:
        x = jax.vmap(lambda a, k: augment(a, key=k))(x, jax.random.split(k_aug, x.shape[0]))
    (_, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, x, config.model, key=k_z)
    updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if config.model.likelihood == "gaussian":
        old = jnp.exp(2.0 * state.params["params"]["log_gamma"])
        var = jnp.where(state.step == 0, aux.mse, GAMMA_EMA * old + (1 - GAMMA_EMA) * aux.mse)
        inner = dict(params["params"], log_gamma=0.5 * jnp.log(jnp.maximum(var, GAMMA_MIN ** 2)))
        params = dict(params, params=inner)
    return TrainState(state.step + 1, params, opt_state), aux.terms


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training images used at `step` (deterministic in (seed, step), so resumes repeat it)."""
    return np.random.default_rng([seed, step]).choice(n, size=batch_size, replace=n < batch_size)


@functools.partial(jax.jit, static_argnames="config")
def _posterior_mean_terms(params: dict, x_BxHxWxC: jax.Array, config: ModelConfig) -> LossTerms:
    return jax.vmap(lambda x: image_loss(params, x, config, key=None))(x_BxHxWxC)


def collapse_check(params: dict, images_NxHxWxC: np.ndarray, config: ModelConfig, *,
                   threshold: float = 0.97, max_images: int = 256) -> CollapseReport:
    """Detect a VAE that predicts the mean image (method.md): L_r near the constant predictor's.

    For BCE, both losses are per-pixel cross-entropies; for the Gaussian likelihood, per-pixel
    squared errors of f(x) (the learned gamma is left out so the two are comparable).
    collapsed = recon_per_pixel >= threshold * constant_per_pixel. The KL is reported beside it:
    usually near 0 in a collapse, but a decoder can also ignore a posterior that
    carries a few nats (seen on the built-in grass: KL 8.4 per image, ratio 1.000), which is a
    collapse all the same.
    """
    x = np.asarray(images_NxHxWxC[:max_images], np.float32) / 255.0
    recon, kl = [], []
    for i in range(0, len(x), 32):
        xb = jnp.asarray(x[i:i + 32])
        if config.likelihood == "bce":
            terms = _posterior_mean_terms(params, xb, config)
            recon.append(np.asarray(terms.recon))
        else:
            f = jax.nn.sigmoid(VAE(config).apply(params, xb).logits)
            recon.append(np.asarray(jnp.sum(jnp.square(xb - f), axis=(1, 2, 3))))
            terms = _posterior_mean_terms(params, xb, config)
        kl.append(np.asarray(terms.kl))
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
    `mesh` (issue 6, `iepjax.sharding.make_mesh`): data parallel, each batch split over the mesh's
    devices (of every process, each process taking its share of the batch's images); the same
    steps as on one device up to float rounding. `batch_size` must divide over the devices.
    """
    m = config.model
    # a lazy PatchBank (textures, iepjax.data.preprocess) is indexed per batch, not materialised
    images = images_NxHxWxC if getattr(images_NxHxWxC, "lazy", False) else np.asarray(images_NxHxWxC)
    if images.ndim != 4 or images.shape[1:] != (m.size, m.size, m.channels):
        raise ValueError(f"training images must be shaped (N, {m.size}, {m.size}, {m.channels}), got {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"training images must be uint8, got {images.dtype}")
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
    state = init_state(config, key=jax.random.key(config.seed))
    # --- issue 6: data-parallel step over a mesh (state replicated, batch split)
    from iepjax import distributed, sharding
    share, main = slice(None), True
    if mesh is not None:
        if config.batch_size % mesh.size:
            checkpointing.close(mngr)
            raise ValueError(f"batch size {config.batch_size} does not split over {mesh.size} devices: "
                             f"choose a multiple of {mesh.size} (or fewer --devices)")
        main = distributed.is_main()
        per = config.batch_size // jax.process_count()
        share = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        progress = progress and main
    # --- end issue 6
    state, step_fn, put = sharding.training_on(mesh, state)
    if start:
        state, _ = checkpointing.restore(mngr, state)
    log_path = run_dir / "train_log.csv"
    rows = _read_log(log_path, start)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    d = m.size * m.size * m.channels
    try:
        for step in range(start, config.steps):
            idx = batch_indices(len(images), config.batch_size, config.seed, step)[share]
            state, terms = step_fn(state, put(images[idx]), config)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                t = jax.device_get(terms) if mesh is None else sharding.local_rows(terms)
                if not np.isfinite(float(t.total)):
                    raise FloatingPointError(
                        f"training diverged at step {done} (loss {float(t.total)}): lower the learning rate "
                        f"(--lr, now {config.learning_rate}); the last good checkpoint stays in {run_dir}/checkpoints")
                params = state.params if mesh is None else sharding.local_rows(state.params)
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
    if mesh is not None:  # issue 6: this process's copy of the replicated state, on its default device
        state = jax.tree.map(jnp.asarray, sharding.local_rows(state))
    report = collapse_check(state.params, images, m)
    if main:
        atomic_write_text(run_dir / "training.json",
                          json.dumps({"steps": int(state.step), "collapse": report._asdict()}, indent=2))
    return TrainSummary(state, report, start, config)


def load_params(run_dir: str | os.PathLike) -> tuple[dict, TrainConfig]:
    """Parameters and TrainConfig of the newest checkpoint of a run folder."""
    from iepjax.config import from_dict
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ folder: train a model first (python train.py)")
    config = from_dict(TrainConfig, checkpointing.restore_config(ckpt))
    mngr = checkpointing.manager(ckpt)
    abstract = jax.eval_shape(lambda: init_state(config, key=jax.random.key(0)))  # shapes only, nothing computed
    state, _ = checkpointing.restore(mngr, abstract)
    checkpointing.close(mngr)
    return state.params, config


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (train, held-out) index arrays; the held-out normal images fit thresholds."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    k = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and k == 0:
        k = 1
    if n - k < 1:
        raise ValueError(f"only {n} training image(s): nothing left to train on after holding out {k}")
    return np.sort(perm[k:]), np.sort(perm[:k])


def train_run(config: TrainConfig, dataset: str, category: str, *, results: str | os.PathLike = "results",
              data_dir: str | None = None, holdout: float = 0.1, new: bool = False,
              progress: bool = True, source_dir: str | None = None, prep=None, mesh=None) -> tuple[Path, TrainSummary]:
    """Train on the `train` split of dataset/category in a run folder; resume its latest run if unfinished.

    The run folder is results/vae/<dataset>/<category>/v<N>/ (see `iepjax.runs`); a run with the
    same config is resumed, a different config or `new=True` starts v<N+1>. A fraction `holdout`
    of the normal training images is kept out of training (its ids in holdout.json) for thresholds.
    `source_dir`: the image folder (dataset "folder") or MVTec AD download ("mvtec_ad"); `prep`: an
    `iepjax.data.preprocess.Preprocess` (default: the category preset's at the model size), stored
    in preprocess.json. `mesh` (issue 6): data-parallel training (`train`); with several processes
    process 0 chooses the run folder and writes its files. Returns (run folder, summary).
    """
    from iepjax import data, distributed, runs

    from iepjax.data.preprocess import Preprocess, from_preset, training_inputs

    split = distributed.main_first(  # issue 6: process 0 prepares the data set, then the others read it
        lambda: data.load_split(dataset, category, "train", data_dir, source_dir=source_dir, progress=progress))
    channels = int(np.shape(split.images[0])[-1])
    if channels != config.model.channels:  # the channel count is the data's
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, channels=channels))
    # --- issue 3: per-kind preprocessing (objects resized, textures cropped) and the data's source ---
    prep = prep or from_preset(dataset, category, size=config.model.size)
    if prep.size != config.model.size:
        raise ValueError(f"preprocess size {prep.size} differs from the model size {config.model.size}")
    source = os.path.abspath(source_dir) if (source_dir is not None and dataset == "folder") else None
    train_idx, held_idx = holdout_split(len(split.ids), holdout, config.seed)
    cat_dir = runs.category_dir(results, "vae", dataset, category)
    run_dir = None
    if distributed.is_main():  # issue 6: one process chooses the folder and writes its files
        run_dir = None if new else runs.latest_run(cat_dir)
        cfg_json = json.dumps(to_dict(config), indent=2)
        if run_dir is not None:
            old = (run_dir / "config.json").read_text() if (run_dir / "config.json").exists() else None
            if old is not None and json.loads(old) != json.loads(cfg_json):
                run_dir = None  # a different config is a new run
            elif not _same_training_inputs(Preprocess.load(run_dir) or prep, prep) or _stored_source(run_dir) != source:
                run_dir = None  # other preprocessing or another image folder: a new run
            # (a different test-time tile stride alone keeps the run: prep.save below updates it, and
            # the thresholds, keyed by the preprocessing, are fitted again)
        run_dir = runs.resume_or_new(cat_dir, run_dir)  # held by this process: concurrent runs never share it
        runs.atomic_write_text(run_dir / "config.json", cfg_json)
        prep.save(run_dir)
        runs.atomic_write_text(run_dir / "holdout.json", json.dumps(
            {"dataset": dataset, "category": category, "fraction": holdout, "source_dir": source,
             "ids": [split.ids[i] for i in held_idx]}, indent=2))
    run_dir = Path(distributed.broadcast_text(str(run_dir) if run_dir is not None else None))
    images = training_inputs([split.images[i] for i in train_idx], prep, seed=config.seed)
    summary = train(config, images, run_dir, progress=progress, mesh=mesh)
    return run_dir, summary


def _same_training_inputs(a, b) -> bool:
    """Whether two `Preprocess` give the same training crops (they may differ in the test-time tile stride)."""
    return dataclasses.replace(a, tile_stride=0) == dataclasses.replace(b, tile_stride=0)


def _stored_source(run_dir: Path) -> str | None:
    """The image folder a run was trained on (holdout.json), None for built-in / MVTec AD data."""
    path = Path(run_dir) / "holdout.json"
    return json.loads(path.read_text()).get("source_dir") if path.exists() else None
