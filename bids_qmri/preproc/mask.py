"""Brain mask of a pc-bSSFP series from its mean magnitude."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a 1D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.ceil(radius_vox).astype(int), 1)
    grids = np.ogrid[tuple(slice(-ri, ri + 1) for ri in r)]
    return sum((g / max(rv, 1e-6)) ** 2 for g, rv in zip(grids, np.maximum(radius_vox, 1e-6))) <= 1.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _padded(op, mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary morphology with a margin, so objects touching the border are not cut."""
    pad = max(structure.shape)
    out = op(np.pad(mask, pad), structure=structure)
    return out[pad:-pad, pad:-pad, pad:-pad]


def brain_mask(mean_magnitude: np.ndarray, zooms, *, closing_mm: float = 6.0, erosion_mm: float = 8.0,
               min_brain_fraction: float = 0.3) -> np.ndarray:
    """Brain mask of the mean magnitude (boolean).

    1. Head: Otsu threshold of the smoothed square-root magnitude (the square root evens out
       bright CSF against darker tissue), largest component, holes filled.
    2. Brain: a second Otsu threshold inside the head drops the darker skull and scalp; an
       erosion (~8 mm) cuts the bridges left between brain and scalp, the largest component is
       kept and dilated back inside the thresholded voxels; closing (~6 mm) and hole filling
       restore dark structures inside the brain.
    If step 2 keeps less than ``min_brain_fraction`` of the head (an image without scalp, where
    the second threshold separates CSF from tissue instead), the head mask is used.
    """
    image = np.sqrt(np.clip(np.asarray(mean_magnitude, dtype=np.float64), 0, None))
    zooms = np.asarray(zooms, dtype=float)[:3]
    image = ndimage.gaussian_filter(image, sigma=np.maximum(1.0 / zooms, 0.5))
    if not np.any(image > 0):
        return np.zeros(image.shape, dtype=bool)
    head = _largest_component(image > otsu_threshold(image[image > 0].ravel()))
    head = ndimage.binary_fill_holes(head)
    candidate = head & (image > otsu_threshold(image[head].ravel()))
    ball = _ball(erosion_mm / zooms)
    core = _largest_component(ndimage.binary_erosion(candidate, structure=ball))
    brain = _padded(ndimage.binary_dilation, core, ball) & candidate if core.any() else candidate
    if brain.sum() < min_brain_fraction * head.sum():
        brain = head
    brain = _padded(ndimage.binary_closing, brain, _ball(closing_mm / zooms))
    return ndimage.binary_fill_holes(brain)
