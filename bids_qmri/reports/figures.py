"""Report figures (matplotlib, Agg): three-plane montages, segmentation overlay, registration
edges, difference maps. Every function takes NIfTI paths or arrays on one grid and writes a PNG.

Images are shown in RAS+ orientation (``nibabel.as_closest_canonical``): axial and coronal views
in radiological-free "left is left" display with anterior/superior up, sagittal with anterior to
the right.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from scipy import ndimage  # noqa: E402

TISSUE_COLOURS = ListedColormap([(0, 0, 0, 0), (0.95, 0.55, 0.1, 1), (0.2, 0.6, 1.0, 1), (0.3, 0.9, 0.4, 1)])
DEFAULT_CMAPS = {"T1map": "magma", "T2map": "viridis", "M0map": "gray", "TB1map": "coolwarm", "fieldmap": "RdBu_r",
                 "PDmap": "gray", "R1map": "magma", "R2map": "viridis"}


def _save(fig, out_png, title: str = "", dpi: int = 90) -> Path:
    """Title, write (creating the figures folder) and close a figure; returns its path."""
    if title:
        fig.suptitle(title, fontsize=10)
    from bids_qmri.bids.derivatives import ensure_within_output
    from bids_qmri.utils.atomic import atomic_path

    out_png = ensure_within_output(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return out_png


def load_ras(path_or_img) -> tuple[np.ndarray, np.ndarray]:
    img = nb.load(path_or_img) if isinstance(path_or_img, (str, Path)) else path_or_img
    img = nb.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim > 3:
        data = data[..., 0]
    return np.nan_to_num(data), img.affine


def centre_slices(mask: np.ndarray) -> tuple[int, int, int]:
    if mask is not None and mask.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))
    return tuple(s // 2 for s in mask.shape)


def _planes(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    i, j, k = centre
    # Transpose so rows run along the display's vertical axis, then flip to put +y/+z up.
    return [np.flipud(vol[:, :, k].T), np.flipud(vol[:, j, :].T), np.flipud(vol[i, :, :].T)]


def _aspects(affine: np.ndarray) -> list[float]:
    z = np.sqrt((affine[:3, :3] ** 2).sum(0))
    return [z[1] / z[0], z[2] / z[0], z[2] / z[1]]


def robust_range(data: np.ndarray, mask: np.ndarray | None, lo=2, hi=98) -> tuple[float, float]:
    vals = data[mask] if mask is not None and mask.any() else data[data != 0]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(vals, [lo, hi])
    if vmax <= vmin:
        vmax = vmin + 1e-6
    return float(vmin), float(vmax)


def montage(path, out_png: Path, *, mask=None, title: str = "", units: str = "", cmap: str = "gray",
            vrange: tuple[float, float] | None = None, symmetric: bool = False) -> Path:
    """Three orthogonal planes through the brain centre with a colour bar labelled in ``units``."""
    data, affine = load_ras(path) if not isinstance(path, np.ndarray) else (path, np.eye(4))
    m = None
    if mask is not None:
        m = (load_ras(mask)[0] > 0.5) if not isinstance(mask, np.ndarray) else mask.astype(bool)
        if m.shape != data.shape:
            m = None
    if vrange is None:
        vrange = robust_range(data, m)
        if symmetric:
            a = max(abs(vrange[0]), abs(vrange[1]))
            vrange = (-a, a)
    shown = np.where(m, data, np.nan) if m is not None else data
    centre = centre_slices(m if m is not None else data != 0)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"wspace": 0.02})
    cm = plt.get_cmap(cmap).with_extremes(bad="black")
    im = None
    for ax, plane, asp in zip(axes, _planes(shown, centre), _aspects(affine)):
        im = ax.imshow(plane, cmap=cm, vmin=vrange[0], vmax=vrange[1], aspect=asp, interpolation="nearest")
        ax.set_axis_off()
        ax.set_facecolor("black")
    cbar = fig.colorbar(im, ax=axes, fraction=0.025, pad=0.01)
    cbar.set_label(units or "a.u.")
    fig.patch.set_facecolor("white")
    return _save(fig, out_png, title, dpi=90)


def segmentation_overlay(t1w, dseg, out_png: Path, title: str = "") -> Path:
    """T1w in grey with the tissue classes (GM orange, WM blue, CSF green) on top, two rows of
    slices: the centre planes and planes 25 % off-centre."""
    base, affine = load_ras(t1w)
    seg, _ = load_ras(dseg)
    seg = np.rint(seg).astype(int)
    centre = centre_slices(seg > 0)
    shifted = tuple(int(c + 0.25 * (s // 2 - c) + 0.15 * s) % s for c, s in zip(centre, seg.shape))
    vmin, vmax = robust_range(base, seg > 0, 1, 99)
    fig, axes = plt.subplots(2, 3, figsize=(10, 7), gridspec_kw={"wspace": 0.02, "hspace": 0.02})
    for row, c in zip(axes, (centre, shifted)):
        for ax, b, s, asp in zip(row, _planes(base, c), _planes(seg.astype(float), c), _aspects(affine)):
            ax.imshow(b, cmap="gray", vmin=vmin, vmax=vmax, aspect=asp, interpolation="nearest")
            ax.imshow(np.ma.masked_equal(s, 0), cmap=TISSUE_COLOURS, vmin=0, vmax=3, alpha=0.45, aspect=asp,
                      interpolation="nearest")
            ax.set_axis_off()
    handles = [plt.Rectangle((0, 0), 1, 1, color=TISSUE_COLOURS(i)) for i in (1, 2, 3)]
    fig.legend(handles, ["GM", "WM", "CSF"], loc="lower center", ncol=3, frameon=False)
    return _save(fig, out_png, title, dpi=80)


def edges(data: np.ndarray, mask: np.ndarray | None = None, fraction: float = 0.12) -> np.ndarray:
    """Strongest gradient-magnitude voxels (top ``fraction`` inside the head) as a boolean map."""
    sm = ndimage.gaussian_filter(data.astype(np.float32), 1.0)
    grad = np.sqrt(sum(ndimage.sobel(sm, axis=a) ** 2 for a in range(3)))
    region = mask if mask is not None and mask.any() else data > np.percentile(data, 50)
    if not region.any():
        return np.zeros_like(data, bool)
    thr = np.percentile(grad[region], 100 * (1 - fraction))
    return (grad >= thr) & ndimage.binary_dilation(region, iterations=2)


def registration_overlay(reference, moved_t1w: np.ndarray, out_png: Path, title: str = "",
                         mask: np.ndarray | None = None) -> Path:
    """Edges of the T1w (already resampled onto the reference grid) in red over the reference."""
    ref, affine = load_ras(reference)
    e = edges(moved_t1w, mask)
    centre = centre_slices(moved_t1w > np.percentile(moved_t1w, 60))
    vmin, vmax = robust_range(ref, ref > 0, 1, 99)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"wspace": 0.02})
    for ax, r, ed, asp in zip(axes, _planes(ref, centre), _planes(e.astype(float), centre), _aspects(affine)):
        ax.imshow(r, cmap="gray", vmin=vmin, vmax=vmax, aspect=asp, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(ed, 0), cmap=ListedColormap([(1, 0.1, 0.1, 1)]), alpha=0.8, aspect=asp,
                  interpolation="nearest")
        ax.set_axis_off()
    return _save(fig, out_png, title, dpi=90)
