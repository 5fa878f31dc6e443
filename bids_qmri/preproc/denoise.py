"""Marchenko–Pastur PCA denoising of complex phase-cycled series (before any interpolation).

The Npc complex phase cycles of a voxel depend on a handful of tissue and field parameters (T1,
T2, M0, B1, ΔB0, receiver phase), so within a small patch the 2·Npc real channels (real and
imaginary parts) are a low-rank signal plus white noise. MP-PCA (Veraart et al., NeuroImage
142:394, 2016; dipy's ``localpca.mppca``) estimates the noise level from the Marchenko–Pastur
distribution of each patch's PCA eigenvalues and keeps only the components above it. It runs
on the raw series, where the noise is still independent between voxels (motion correction
interpolates and correlates it), as MRtrix's ``dwidenoise`` does for diffusion data.

At the seed SNR (25) the per-voxel noise alone puts the median |relative error| of T1 and T2
near 7–9 % for every estimator (seed 001 reports MC means, not single draws). On the 4-mm
phantom without motion, MP-PCA with 3×3×3 patches brings MIRACLE to ~4.5 % without measurable
bias; with the phantom's motion, motion correction spends much of that gain (README, "Accuracy").
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from bids_qmri.preproc.complexdata import complex_from_lifted, lifted_channels

LOGGER = logging.getLogger("bids_qmri.preproc.denoise")

DENOISE_METHODS = ("mppca", "none")


def patch_radius_for(n_channels: int) -> int:
    """Smallest cubic patch radius with more samples than channels (after mean removal).

    Small patches keep the local signal low-rank (a 5×5×5 patch spans several tissues and was
    worse than 3×3×3 on the phantom at 4 mm); MP-PCA needs at least as many samples as channels.
    """
    radius = 1
    while (2 * radius + 1) ** 3 - 1 < n_channels:
        radius += 1
    return radius


def head_support(data: np.ndarray, fraction: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Voxels worth denoising: mean magnitude above ``fraction`` of its 99th percentile, dilated
    (the background is left as it is and costs nothing)."""
    mean_mag = np.abs(data).mean(axis=-1)
    level = fraction * np.percentile(mean_mag, 99)
    support = mean_mag > level
    return ndimage.binary_dilation(support, iterations=dilate) if support.any() else support


def mppca_complex(data: np.ndarray, *, patch_radius: int | None = None,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """MP-PCA of a complex ``[X, Y, Z, N]`` series on its ``2N`` real channels.

    Returns ``(denoised complex64, noise σ per voxel and real channel, patch radius)``. Voxels
    outside ``mask`` (default :func:`head_support`) and voxels too close to the volume's edge for
    a full patch keep their input values (σ = NaN there).
    """
    from dipy.denoise.localpca import mppca

    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"MP-PCA needs a 4D series, got shape {data.shape}")
    radius = patch_radius or patch_radius_for(2 * data.shape[-1])
    if min(data.shape[:3]) < 2 * radius + 1:
        raise ValueError(f"MP-PCA: volume {data.shape[:3]} is thinner than a {2 * radius + 1}-voxel patch")
    support = head_support(data) if mask is None else np.asarray(mask, dtype=bool)
    stacked, offsets = lifted_channels(data)
    with np.errstate(invalid="ignore", divide="ignore"):  # edge voxels outside every patch: 0/0
        cleaned, sigma = mppca(stacked, mask=support, patch_radius=radius, return_sigma=True,
                               suppress_warning=True)
    covered = support & np.all(np.isfinite(cleaned), axis=-1) & np.isfinite(sigma)
    cleaned[~covered] = stacked[~covered]
    sigma = np.where(covered, sigma, np.nan)
    return complex_from_lifted(cleaned, offsets), sigma.astype(np.float32), radius


def denoise_series(data: np.ndarray, method: str = "mppca") -> tuple[np.ndarray, dict]:
    """Denoise a complex phase-cycle series with ``method`` (``DENOISE_METHODS``).

    Returns the series and a provenance record for the sidecars (method, patch, median noise σ).
    A volume too thin for a patch is passed through with the reason recorded.
    """
    if method not in DENOISE_METHODS:
        raise ValueError(f"denoising method must be one of {DENOISE_METHODS}, got {method!r}")
    if method == "none":
        return np.asarray(data, dtype=np.complex64), {"Method": "none"}
    try:
        out, sigma, radius = mppca_complex(data)
    except ValueError as err:
        LOGGER.warning("%s; denoising skipped", err)
        return np.asarray(data, dtype=np.complex64), {"Method": "none", "Skipped": str(err)}
    finite = sigma[np.isfinite(sigma)]
    info = {
        "Method": "MP-PCA (Veraart 2016, dipy localpca.mppca) on the real and imaginary parts of "
                  "all phase cycles, before motion correction",
        "PatchSize": [2 * radius + 1] * 3,
        "NoiseSigmaMedian": float(np.median(finite)) if finite.size else None,
    }
    LOGGER.info("MP-PCA: patch %d^3, median noise sigma %.4g per real channel", 2 * radius + 1,
                info["NoiseSigmaMedian"] or float("nan"))
    return out, info
