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


def brain_mask(mean_magnitude: np.ndarray, zooms, *, closing_mm: float = 6.0) -> np.ndarray:
    """Foreground mask: Otsu threshold of the smoothed square-root magnitude (the square root
    evens out bright CSF against darker tissue), largest connected component, morphological
    closing (~6 mm) and hole filling. Returns a boolean array."""
    image = np.sqrt(np.clip(np.asarray(mean_magnitude, dtype=np.float64), 0, None))
    zooms = np.asarray(zooms, dtype=float)[:3]
    image = ndimage.gaussian_filter(image, sigma=np.maximum(1.0 / zooms, 0.5))
    if not np.any(image > 0):
        return np.zeros(image.shape, dtype=bool)
    mask = image > otsu_threshold(image[image > 0].ravel())
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    ball = _ball(closing_mm / zooms)
    pad = max(ball.shape)
    padded = np.pad(mask, pad)
    padded = ndimage.binary_closing(padded, structure=ball)
    mask = padded[pad:-pad, pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(mask)
