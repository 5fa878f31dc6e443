"""B1+ maps for pc-bSSFP relaxometry: conversion of the three BIDS forms to a ratio map,
rigid registration to the bSSFP reference, resampling onto the bSSFP grid and 3D median
filtering (seeds 000/001: kernel [10, 10, 10] at 1.3 mm, i.e. 13 mm, scaled to our voxels).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_qmri.errors import InputError

LOGGER = logging.getLogger("bids_qmri.preproc.b1")

# Seed 000/001 in vivo processing: median kernel of 10 voxels on the 1.3 mm bSSFP grid.
SEED_KERNEL_VOXELS = 10
SEED_VOXEL_MM = 1.3
B1_KERNEL_MM = SEED_KERNEL_VOXELS * SEED_VOXEL_MM

_PERCENT_UNITS = {"percent", "%", "pct", "percentage"}
_RATIO_UNITS = {"ratio", "1", "", "a.u.", "au", "arbitrary", "unitless", "dimensionless", "fraction"}


def b1_from_tb1map(values: np.ndarray, units: str | None, path: str | Path = "TB1map") -> tuple[np.ndarray, str]:
    """TB1map (ratio or percent of nominal, per its ``Units``) → ratio. Without ``Units`` the
    scale is inferred (a median above 10 can only be percent) and the guess is reported."""
    values = np.asarray(values, dtype=np.float64)
    unit = (units or "").strip().lower()
    if unit in _PERCENT_UNITS:
        return values / 100.0, "TB1map in percent / 100"
    if unit in _RATIO_UNITS and units is not None:
        return values, "TB1map as ratio"
    if units is None:
        positive = values[np.isfinite(values) & (values > 0)]
        if positive.size and np.median(positive) > 10:
            return values / 100.0, "TB1map without Units: values ≈100 read as percent"
        return values, "TB1map without Units: values ≈1 read as ratio"
    raise InputError(path, f"unsupported TB1map Units '{units}'", "set Units to 'percent' or 'ratio' in the sidecar")


def b1_from_tfl(famp: np.ndarray, prep_angle_deg: float = 80.0) -> np.ndarray:
    """Siemens tfl_b1_map: the famp image holds 10× the achieved preparation flip angle (deg),
    so B1 = famp / (10 · nominal preparation angle) (= famp/800 for the product's 80°)."""
    if prep_angle_deg <= 0:
        raise ValueError("the nominal preparation angle must be positive")
    return np.asarray(famp, dtype=np.float64) / (10.0 * float(prep_angle_deg))


def b1_from_dam(s1: np.ndarray, s2: np.ndarray, nominal_deg: float) -> np.ndarray:
    """Double-angle method (flip 2 = 2 × flip 1): α = arccos(S2 / (2 S1)), B1 = α / α_nom.
    Voxels without signal in S1 are NaN."""
    s1 = np.asarray(s1, dtype=np.float64)
    s2 = np.asarray(s2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.abs(s1) > 0, s2 / (2.0 * s1), np.nan)
    alpha = np.arccos(np.clip(ratio, -1.0, 1.0))
    return alpha / np.deg2rad(float(nominal_deg))


def convert_b1(kind: str, files: dict[str, Path], metadata: dict[str, dict], *, prep_angle_deg: float = 80.0
               ) -> tuple[nib.Nifti1Image, nib.Nifti1Image, str]:
    """Convert a B1 input (``B1Input`` fields) to a ratio image in its own space; return
    (ratio image, anatomical reference image for registration, description)."""
    if kind == "TB1map":
        img = nib.load(str(files["map"]))
        ratio, how = b1_from_tb1map(img.get_fdata(), (metadata.get("map") or {}).get("Units"), files["map"])
        ref = img  # no anatomy of its own: the map's support is the only reference
    elif kind == "TB1TFL":
        img = nib.load(str(files["famp"]))
        ratio = b1_from_tfl(img.get_fdata(), prep_angle_deg)
        how = f"TB1TFL famp / (10 × {prep_angle_deg:g}°)"
        ref = nib.load(str(files["anat"])) if "anat" in files else img
    elif kind == "TB1DAM":
        img = nib.load(str(files["flip1"]))
        img2 = nib.load(str(files["flip2"]))
        if img.shape != img2.shape:
            raise InputError(files["flip2"], f"shape {img2.shape} differs from flip-1 {img.shape}", "use one DAM pair")
        fa1 = (metadata.get("flip1") or {}).get("FlipAngle")
        fa2 = (metadata.get("flip2") or {}).get("FlipAngle")
        if fa1 is None:
            raise InputError(files["flip1"], "TB1DAM sidecar lacks FlipAngle", "add the nominal flip angle (deg)")
        if fa2 is not None and not np.isclose(float(fa2), 2 * float(fa1), rtol=0.02):
            raise InputError(files["flip2"], f"flip angles {fa1}° and {fa2}° are not a 1:2 double-angle pair",
                             "use flip-2 = 2 × flip-1")
        ratio = b1_from_dam(img.get_fdata(), img2.get_fdata(), float(fa1))
        how = f"TB1DAM arccos(S2/2S1) / {float(fa1):g}°"
        ref = img
    else:
        raise InputError(", ".join(map(str, files.values())), f"unknown B1 kind '{kind}'", "use TB1map, TB1TFL or TB1DAM")
    ratio = np.where(np.isfinite(ratio), ratio, 0.0).astype(np.float32)
    ratio_img = nib.Nifti1Image(ratio, img.affine)
    ref_img = nib.Nifti1Image(np.asarray(ref.get_fdata(), dtype=np.float32), ref.affine)
    if ratio_img.ndim != 3:
        raise InputError(files.get("map") or files.get("famp") or files.get("flip1"),
                         f"B1 image must be 3D, got shape {ratio_img.shape}", "give one volume per B1 file")
    return ratio_img, ref_img, how


def register_b1(b1_ratio: Path, b1_ref: Path, target_ref: Path, *, seed: int = 0, outprefix: str | None = None,
                register: bool = True) -> tuple[np.ndarray, list[str]]:
    """Rigidly register the B1 reference to the bSSFP reference (mean magnitude) and resample
    the ratio map onto the bSSFP grid with that transform (linear). With ``register=False``
    only the scanner coordinates align them. Returns (B1 on the target grid, transforms)."""
    import ants

    from bids_qmri.preproc.motion import register_rigid

    fixed = ants.image_read(str(target_ref))
    moving_ratio = ants.image_read(str(b1_ratio))
    transforms: list[str] = []
    if register:
        transforms = register_rigid(fixed, ants.image_read(str(b1_ref)), seed=seed, outprefix=outprefix)
        params = np.asarray(ants.read_transform(transforms[0]).parameters, dtype=np.float64)
        # A featureless reference (e.g. a constant image) makes the metric NaN: refuse the result.
        if not np.all(np.isfinite(params)) or abs(np.linalg.det(params[:9].reshape(3, 3)) - 1) > 1e-3:
            raise RuntimeError("rigid registration of the B1 reference did not converge")
    if transforms:
        warped = ants.apply_transforms(fixed, moving_ratio, transforms, interpolator="linear", defaultvalue=0)
    else:
        warped = ants.resample_image_to_target(moving_ratio, fixed, interp_type="linear")
    return warped.numpy().astype(np.float32), transforms


def median_kernel(zooms, kernel_mm: float = B1_KERNEL_MM) -> tuple[int, ...]:
    """Median kernel in voxels per axis: the seed's 10 voxels × 1.3 mm = 13 mm at our spacing."""
    # Half-up rounding (Python's round() would send 2.5 to 2).
    return tuple(max(1, int(np.floor(kernel_mm / float(z) + 0.5))) for z in np.asarray(zooms, dtype=float)[:3])


def median_filter_b1(b1: np.ndarray, valid: np.ndarray, zooms, kernel_mm: float = B1_KERNEL_MM,
                     out_mask: np.ndarray | None = None) -> np.ndarray:
    """3D median filter of a B1 ratio map that uses valid voxels only: the others (outside the
    brain or the B1 field of view) are first filled from their nearest valid voxel, so the brain
    edge is not pulled towards the background. Output is 0 outside ``out_mask`` (default:
    ``valid``); inside it, voxels the B1 map did not cover get the nearest filtered value."""
    b1 = np.asarray(b1, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(b1) & (b1 > 0)
    if not valid.any():
        raise ValueError("no valid B1 voxel inside the mask")
    _, nearest = ndimage.distance_transform_edt(~valid, sampling=np.asarray(zooms, dtype=float)[:3], return_indices=True)
    filled = b1[tuple(nearest)]
    filtered = ndimage.median_filter(filled, size=median_kernel(zooms, kernel_mm), mode="nearest")
    keep = valid if out_mask is None else np.asarray(out_mask, dtype=bool)
    return np.where(keep, filtered, 0.0).astype(np.float32)
