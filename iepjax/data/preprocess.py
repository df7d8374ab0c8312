"""Bring images and masks to the model's input size (objects: resize; method.md, Training)."""
from __future__ import annotations

import numpy as np


def resize_images(images_NxHxWxC: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images (N, H, W, C) to (N, size, size, C) with anti-aliasing; no-op if already there."""
    images = np.asarray(images_NxHxWxC)
    if images.shape[1:3] == (size, size):
        return images
    from skimage.transform import resize
    out = [resize(im, (size, size), order=1, anti_aliasing=True, preserve_range=True) for im in images]
    return np.clip(np.rint(np.stack(out)), 0, 255).astype(np.uint8)


def resize_masks(masks_NxHxW: np.ndarray, size: int) -> np.ndarray:
    """Resize bool masks (N, H, W) to (N, size, size): a pixel is anomalous if half its area is."""
    masks = np.asarray(masks_NxHxW)
    if masks.shape[1:3] == (size, size):
        return masks.astype(bool)
    from skimage.transform import resize
    return np.stack([resize(m.astype(np.float32), (size, size), order=1, anti_aliasing=True) >= 0.5 for m in masks])
