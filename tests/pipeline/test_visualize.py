"""Overlay panels: one reused figure (`PanelFigure`) draws what a fresh figure per panel draws."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
from scipy.ndimage import gaussian_filter

from iepjax import visualize


def _case(seed: int, size: int, channels: int):
    rng = np.random.default_rng(seed)
    x0 = rng.random((size, size, channels)).astype(np.float32)
    grad = gaussian_filter(rng.random((size, size)), 2).astype(np.float32)
    mask = np.zeros((size, size), bool)
    mask[size // 4: size // 2, size // 3: size // 2] = True
    return x0, 0.5 * x0, 0.8 * x0, grad, mask


def test_reused_figure_draws_what_a_fresh_figure_draws(tmp_path):
    """Panels drawn one after another (a mask and a threshold, then neither, then another size and
    channel count, then the first again) equal one-off `panel` PNGs pixel for pixel: nothing of an
    earlier panel (contours, pixels) is left on a later one."""
    cases = [(_case(0, 32, 1), "mask", 0.5), (_case(1, 32, 1), None, None), (_case(2, 48, 3), "mask", 0.4),
             (_case(0, 32, 1), "mask", 0.5)]
    fig = visualize.PanelFigure(vmax=0.8)
    try:
        for i, ((x0, x_T, recon, grad, mask), with_mask, threshold) in enumerate(cases):
            m = mask if with_mask else None
            title = f"case {i % 3}"  # the last case repeats the first, title included
            fig.draw(tmp_path / f"reused{i}.png", x0, x_T, recon, grad, m, title, threshold)
            visualize.panel(tmp_path / f"fresh{i}.png", x0, x_T, recon, grad, m, title, 0.8, threshold)
    finally:
        fig.close()
    images = [(mpimg.imread(tmp_path / f"reused{i}.png"), mpimg.imread(tmp_path / f"fresh{i}.png"))
              for i in range(len(cases))]
    for reused, fresh in images:
        assert reused.shape == fresh.shape and reused.shape[0] > 32
        np.testing.assert_array_equal(reused, fresh)
    assert not np.array_equal(images[0][0], images[1][0])  # the panels do differ from case to case
    np.testing.assert_array_equal(images[0][0], images[3][0])
