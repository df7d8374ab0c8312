"""Pictures of a localisation run: per-image panels and the energy curve (matplotlib, Agg).

Heat maps are scaled with one dataset-level bound `vmax` fitted on normal images (never per
image), so a good image's map stays cold and a defect stands out.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from iepjax.runs import atomic_write_bytes


def _figure(*args, **kwargs):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt, plt.figure(*args, **kwargs)


def _write_png(fig, path: Path, *, tight: bool = True) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, **({"bbox_inches": "tight"} if tight else {}))
    atomic_write_bytes(path, buf.getvalue())


def _save(fig, plt, path: Path) -> None:
    _write_png(fig, path)
    plt.close(fig)


def _show(ax, img_HxWxC: np.ndarray, title: str) -> None:
    img = np.clip(img_HxWxC, 0, 1)
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


class PanelFigure:
    """Draws `panel` PNGs on one reused matplotlib figure: new pixels, titles and contours per image.

    Building the five axes and the colorbar, and a tight bounding box (a second draw), are about
    half of the time of drawing a panel on a new figure; redrawing this one with new data skips
    them (`write_overlays` uses it). `vmax`: the dataset-level map bound; the image shape may
    change from call to call (the figure is then built again).
    """

    def __init__(self, vmax: float):
        self.vmax = float(vmax)
        self._shape = None

    def _build(self, shape: tuple[int, ...]) -> None:
        self.close()
        plt, fig = _figure(figsize=(13, 3.0))
        axes = fig.subplots(1, 5)
        fig.subplots_adjust(left=0.005, right=0.995, bottom=0.03, top=0.80, wspace=0.16)
        h, w, c = shape
        blank = np.zeros((h, w) if c == 1 else (h, w, c), np.float32)
        gray = {"cmap": "gray", "vmin": 0, "vmax": 1} if c == 1 else {}
        self._rgb = [ax.imshow(blank, **gray) for ax in axes[:3]]
        for ax, title in zip(axes[:3], ("input x0", "projected x_T", "reconstruction f(x0)")):
            ax.set_title(title, fontsize=9)
        self._map = axes[3].imshow(np.zeros((h, w)), cmap="inferno", vmin=0, vmax=self.vmax)
        axes[3].set_title("anomaly map |x_T - x0|", fontsize=9)
        fig.colorbar(self._map, ax=axes[3], fraction=0.046, pad=0.02)
        self._under = axes[4].imshow(np.zeros((h, w)), cmap="gray", vmin=0, vmax=1)
        self._over = axes[4].imshow(np.zeros((h, w)), cmap="inferno", vmin=0, vmax=self.vmax, alpha=0.5)
        axes[4].set_title("overlay (white: truth, cyan: predicted)", fontsize=9)
        for ax in axes:
            ax.axis("off")
        self._suptitle = fig.suptitle("", fontsize=10)
        self._plt, self._fig, self._axes, self._shape, self._contours = plt, fig, axes, shape, []

    def draw(self, path: Path, x0: np.ndarray, x_T: np.ndarray, recon: np.ndarray, grad_map: np.ndarray,
             mask: np.ndarray | None, title: str, threshold: float | None = None) -> None:
        """Write one panel PNG to `path` (see `panel` for the arguments)."""
        if x0.shape != self._shape:
            self._build(x0.shape)
        for im, img in zip(self._rgb, (x0, x_T, recon)):
            img = np.clip(img, 0, 1)
            im.set_data(img[..., 0] if img.shape[-1] == 1 else img)
        self._map.set_data(grad_map)
        self._under.set_data(x0[..., 0] if x0.shape[-1] == 1 else x0.mean(-1))
        self._over.set_data(grad_map)
        for cs in self._contours:
            cs.remove()
        self._contours = []
        ax = self._axes[4]
        if mask is not None and mask.any():
            self._contours.append(ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.0))
        if threshold is not None and (grad_map >= threshold).any():
            self._contours.append(ax.contour((grad_map >= threshold).astype(float), levels=[0.5], colors="cyan",
                                             linewidths=1.0))
        self._suptitle.set_text(title)
        _write_png(self._fig, path, tight=False)  # a fixed layout: a tight box would draw twice

    def close(self) -> None:
        """Free the figure (drawing again builds a new one)."""
        if self._shape is not None:
            self._plt.close(self._fig)
            self._shape = None


def panel(path: Path, x0: np.ndarray, x_T: np.ndarray, recon: np.ndarray, grad_map: np.ndarray,
          mask: np.ndarray | None, title: str, vmax: float, threshold: float | None = None) -> None:
    """One PNG: input, projected x_T, reconstruction f(x0), anomaly map, overlay with contours.

    x0, x_T, recon: (H, W, C) in [0, 1]; grad_map, mask: (H, W); vmax: dataset-level map bound;
    threshold: draws the predicted-mask contour (cyan) beside the ground truth (white). For many
    images, one `PanelFigure` draws them faster.
    """
    fig = PanelFigure(vmax)
    try:
        fig.draw(path, x0, x_T, recon, grad_map, mask, title, threshold)
    finally:
        fig.close()


def energy_curve(path: Path, energies_NxT: np.ndarray, labels_N: np.ndarray | None = None) -> None:
    """Mean energy E(x_t) per iteration (from the scan's per-step output), normal vs defective."""
    plt, fig = _figure(figsize=(5, 3.2))
    ax = fig.subplots()
    e = np.asarray(energies_NxT)
    if labels_N is None:
        ax.plot(e.mean(0), label="all images")
    else:
        for lab, name in ((0, "good"), (1, "defect")):
            if (labels_N == lab).any():
                ax.plot(e[labels_N == lab].mean(0), label=name)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("mean energy E(x_t)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, plt, path)


def write_overlays(out_dir: Path, images_NxHxWxC: np.ndarray, loc, masks_NxHxW: np.ndarray, ids: list[str],
                   defect_types: list[str], vmax: float, threshold: float | None = None) -> list[Path]:
    """A `panel` PNG per image, named after its id ("scratch/003" -> scratch_003.png)."""
    paths = []
    fig = PanelFigure(vmax)
    try:
        for i, id_ in enumerate(ids):
            path = Path(out_dir) / (id_.replace("/", "_") + ".png")
            fig.draw(path, images_NxHxWxC[i].astype(np.float32) / 255.0, loc.x_T[i], loc.recon[i], loc.grad_maps[i],
                     masks_NxHxW[i], f"{id_} ({defect_types[i]})  score {loc.grad_maps[i].max():.3f}", threshold)
            paths.append(path)
    finally:
        fig.close()
    return paths


def roc_curves(path: Path, maps_by_row: dict, masks_NxHxW: np.ndarray) -> None:
    """Pixel ROC curves of several anomaly maps (e.g. {"grad": ..., "recon": ...}) against the masks."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt, fig = _figure(figsize=(4, 3.6))
    ax = fig.subplots()
    y = np.asarray(masks_NxHxW).ravel().astype(bool)
    if y.any() and not y.all():
        for name, maps in maps_by_row.items():
            s = np.asarray(maps).ravel()
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false-positive rate (pixels)")
    ax.set_ylabel("true-positive rate")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:  # no ground-truth masks (or no defect pixels): no curve to draw
        ax.set_title("no defect pixels with masks: no ROC", fontsize=8)
    _save(fig, plt, path)


def trajectory_strip(path: Path, frames_BxFxHxWxC: np.ndarray, titles: list[str]) -> None:
    """Rows of x_t at evenly spaced iterations, one row per image, the last column |x_T - x_0|."""
    frames = np.asarray(frames_BxFxHxWxC)
    b, f = frames.shape[:2]
    plt, fig = _figure(figsize=(2.0 * (f + 1), 2.1 * b))
    axes = np.asarray(fig.subplots(b, f + 1)).reshape(b, f + 1)
    for i in range(b):
        for j in range(f):
            _show(axes[i, j], frames[i, j], f"{titles[i]}  t{j}" if j == 0 else f"frame {j}")
        d = np.abs(frames[i, -1] - frames[i, 0]).mean(-1)
        axes[i, f].imshow(d, cmap="inferno")
        axes[i, f].set_title("|x_T - x_0|", fontsize=9)
        axes[i, f].axis("off")
    _save(fig, plt, path)
