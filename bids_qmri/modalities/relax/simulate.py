"""Training patches for the RIM and the ResNet (seed 004 §4.2, Table 1).

Anatomy: the package's digital-brain tissue fractions (``bids_qmri.synth.phantom.build_anatomy``
on the undeformed template: GM, WM, CSF, skull, marrow, fat, skin) at ``resolution_mm``; 2D
patches of 40×40 are cut in a random orientation (axial, coronal or sagittal, random flips and
transposition) around a centre drawn uniformly from the brain mask.

Parameters: for every patch and tissue separately, T1, T2 and A are drawn from the tissue's
normal distribution of seed 004 Table 1 (uniform within the patch's tissue); partial-volume
voxels mix relaxation rates (fast exchange, as the phantom) and A linearly (air lowers A); then
every voxel gets independent Gaussian noise of ``VOXEL_VARIATION`` (relative) on T1, T2 and A
(seed 004: "voxel-wise Gaussian noise ... except for B", size not given). B = 2 − Γ, Γ
half-normal with σ = 0.2, one value per patch. Table 1 gives σ_A only for CSF (0.3); the other
tissues get ``SIGMA_A_OTHER``. The phantom's skin takes Table 1's "muscle skin".

Signal: the magnitude model of ``bids_qmri.physics.relaxation`` plus complex Gaussian noise,
magnitude taken (Rician, as magnitude images are; seed 004 added real Gaussian noise), σ per
patch log-uniform in [0.0065, 0.255] (seed 004: SNR 100 to 3; here SNR = ``A_REFERENCE``/σ).
Patches are divided by their ``rim.signal_scale`` over the brain voxels, as whole images are at
inference; targets are in the networks' coordinates (``rim.to_network``).

Small structures (``structures=True``, ``add_structures``): seed 004's BrainWeb models have
vessels and one-voxel islands, our phantom's tissues are smooth and piecewise constant, so a
network trained on it learns to smooth away a one-voxel structure (the blur test of
``insilico``). With the option every patch gets 0-``MAX_POINTS`` one-voxel points and
0-``MAX_LINES`` one-voxel-wide horizontal or vertical lines (``LINE_LENGTH`` voxels) on brain
voxels, each with T1 and T2 of a random Table 1 row and A of another random row (or the host's).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import rim

__all__ = ["A_REFERENCE", "SIGMA_RANGE", "TABLE1", "Patches", "TissueAnatomy", "add_structures", "anatomy",
           "simulate_patches",
           "sigma_for_snr", "tissue_maps"]

#: seed 004 Table 1 (T1, T2 in seconds): tissue -> (μ_T1, σ_T1, μ_T2, σ_T2, μ_A, σ_A)
SIGMA_A_OTHER = 0.1
TABLE1 = {
    "CSF": (3.500, 0.300, 2.000, 0.300, 1.00, 0.3),
    "GM": (1.400, 0.300, 0.110, 0.030, 0.85, SIGMA_A_OTHER),
    "WM": (0.780, 0.250, 0.080, 0.020, 0.65, SIGMA_A_OTHER),
    "Fat": (0.420, 0.100, 0.070, 0.020, 0.90, SIGMA_A_OTHER),
    "Muscle": (1.200, 0.300, 0.050, 0.020, 0.70, SIGMA_A_OTHER),
    "Muscle skin": (1.230, 0.300, 0.050, 0.020, 0.70, SIGMA_A_OTHER),
    "Skull": (0.400, 0.100, 0.030, 0.010, 0.90, SIGMA_A_OTHER),
    "Vessels": (1.980, 0.300, 0.275, 0.070, 1.00, SIGMA_A_OTHER),
    "Marrow": (0.580, 0.100, 0.050, 0.020, 0.80, SIGMA_A_OTHER),
}
#: the phantom's tissues -> Table 1 rows
PHANTOM_TISSUES = {"GM": "GM", "WM": "WM", "CSF": "CSF", "skull": "Skull", "marrow": "Marrow", "fat": "Fat",
                   "skin": "Muscle skin"}
VOXEL_VARIATION = 0.05
B_HALF_NORMAL_SIGMA = 0.2
SIGMA_RANGE = (0.0065, 0.255)
#: SNR = A_REFERENCE / σ (white-matter A of Table 1: σ = 0.0065 is SNR 100)
A_REFERENCE = 0.65
PATCH = 40
#: ``add_structures``: at most this many one-voxel points and lines per patch, line lengths (voxels)
MAX_POINTS, MAX_LINES, LINE_LENGTH = 12, 4, (3, 12)
#: clipping of drawn values (seconds; A in Table 1 units)
BOUNDS = {"T1": (0.05, 6.0), "T2": (0.005, 3.0), "A": (0.05, 2.0)}


def sigma_for_snr(snr: float) -> float:
    return A_REFERENCE / float(snr)


@dataclass
class TissueAnatomy:
    fractions: np.ndarray  # [T, X, Y, Z] float32, T = len(PHANTOM_TISSUES)
    brain: np.ndarray  # [X, Y, Z] bool
    resolution_mm: float

    @property
    def tissues(self) -> tuple[str, ...]:
        return tuple(PHANTOM_TISSUES)


@functools.lru_cache(maxsize=2)
def anatomy(resolution_mm: float = 1.5) -> TissueAnatomy:
    """The undeformed digital-brain tissue fractions at ``resolution_mm`` (cached)."""
    from bids_qmri.synth import phantom as ph

    grid = ph.reference_grid(resolution_mm)
    fractions, _ = ph.build_anatomy(grid, np.ones(3), np.zeros((3, *grid.shape)))
    stack = np.stack([fractions[t] for t in PHANTOM_TISSUES]).astype(np.float32)
    brain = sum(fractions[t] for t in ph.BRAIN_TISSUES) > 0.5
    return TissueAnatomy(stack, brain, float(resolution_mm))


def _cut(vol: np.ndarray, axis: int, index: int, centre: tuple[int, int], size: int) -> np.ndarray:
    """A ``size``×``size`` window of the slice ``index`` along ``axis`` (zero outside)."""
    sl = np.take(vol, index, axis=axis + 1 if vol.ndim == 4 else axis)
    out = np.zeros(sl.shape[:-2] + (size, size), dtype=sl.dtype)
    h, w = sl.shape[-2:]
    r0, c0 = centre[0] - size // 2, centre[1] - size // 2
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + size, h), min(c0 + size, w)
    out[..., rs - r0:re - r0, cs - c0:ce - c0] = sl[..., rs:re, cs:ce]
    return out


@dataclass
class Patches:
    signal: torch.Tensor  # [batch, N, H, W] divided by scale
    target: torch.Tensor  # [batch, Q, H, W] network coordinates (A divided by scale)
    weight: torch.Tensor  # [batch, H, W] 1 in the head (loss voxels)
    brain: torch.Tensor  # [batch, H, W] bool
    scale: torch.Tensor  # [batch]
    sigma: torch.Tensor  # [batch] noise σ before scaling (Table 1 units)
    structure: torch.Tensor | None = None  # [batch, H, W] bool: voxels add_structures changed (structures=True)
    tissue: torch.Tensor | None = None  # [batch, H, W] int64: index in PHANTOM_TISSUES of the largest fraction, -1 outside


def tissue_maps(frac: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-patch tissue draws mixed by the fractions ``[T, H, W]`` -> T1, T2, A ``[H, W]``."""
    total = frac.sum(0)
    weight = np.where(total > 1e-6, 1.0 / np.maximum(total, 1e-6), 0.0)
    rates = {"T1": np.zeros(frac.shape[1:]), "T2": np.zeros(frac.shape[1:])}
    a = np.zeros(frac.shape[1:])
    for f, tissue in zip(frac, PHANTOM_TISSUES.values()):
        m1, s1, m2, s2, ma, sa = TABLE1[tissue]
        t1 = np.clip(rng.normal(m1, s1), *BOUNDS["T1"])
        t2 = np.clip(min(rng.normal(m2, s2), 0.9 * t1), *BOUNDS["T2"])
        rates["T1"] += f / t1
        rates["T2"] += f / t2
        a += f * np.clip(rng.normal(ma, sa), *BOUNDS["A"])
    out = {k: np.where(v > 0, 1.0 / np.maximum(v * weight, 1e-12), 1.0) for k, v in rates.items()}
    out["A"] = a * weight * np.clip(total, 0.0, 1.0)
    for k in out:
        out[k] = out[k] * (1.0 + VOXEL_VARIATION * rng.standard_normal(out[k].shape))
        lo, hi = BOUNDS[k]
        out[k] = np.where(total > 1e-6, np.clip(out[k], lo, hi), 0.0 if k == "A" else 1.0)
    return out


def add_structures(maps: dict[str, np.ndarray], brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Overwrite, in place, T1, T2 and A of ``maps`` (``[H, W]`` each) on random one-voxel points and
    lines (see the module's docstring) starting on ``brain`` voxels; returns the mask of the changed
    voxels."""
    changed = np.zeros(brain.shape, bool)
    where = np.argwhere(brain)
    if not len(where):
        return changed
    rows = list(TABLE1)
    h, w = brain.shape
    n_points, n_lines = int(rng.integers(MAX_POINTS + 1)), int(rng.integers(MAX_LINES + 1))
    for i in range(n_points + n_lines):
        r, c = where[rng.integers(len(where))]
        if i < n_points:
            rr, cc = np.array([r]), np.array([c])
        else:
            d = np.arange(int(rng.integers(LINE_LENGTH[0], LINE_LENGTH[1] + 1)))
            rr, cc = (r + 0 * d, c + d) if rng.random() < 0.5 else (r + d, c + 0 * d)
            keep = (rr < h) & (cc < w)
            rr, cc = rr[keep], cc[keep]
        m1, s1, m2, s2, _, _ = TABLE1[rows[rng.integers(len(rows))]]
        t1 = float(np.clip(rng.normal(m1, s1), *BOUNDS["T1"]))
        t2 = float(np.clip(min(rng.normal(m2, s2), 0.9 * t1), *BOUNDS["T2"]))
        n = len(rr)
        var = 1.0 + VOXEL_VARIATION * rng.standard_normal((3, n))
        maps["T1"][rr, cc] = np.clip(t1 * var[0], *BOUNDS["T1"])
        maps["T2"][rr, cc] = np.clip(np.minimum(t2 * var[1], 0.9 * maps["T1"][rr, cc]), *BOUNDS["T2"])
        if rng.random() < 0.5:  # else the host's A
            _, _, _, _, ma, sa = TABLE1[rows[rng.integers(len(rows))]]
            maps["A"][rr, cc] = np.clip(rng.normal(ma, sa) * var[2], *BOUNDS["A"])
        changed[rr, cc] = True
    return changed


def simulate_patches(kind: str, times, n: int, rng: np.random.Generator, *, resolution_mm: float = 1.5,
                     size: int = PATCH, sigma: float | None = None, b: float | None = None,
                     dtype=torch.float32, structures: bool = False) -> Patches:
    """``n`` training patches for model ``kind`` (``ir``/``t2``) at ``times`` (seconds).

    ``sigma`` (Table 1 units) and ``b`` fix the noise level and inversion efficiency instead of
    drawing them (test sets); ``structures`` adds one-voxel points and lines (``add_structures``) and
    returns their mask in ``Patches.structure``."""
    anat = anatomy(resolution_mm)
    times = np.asarray(times, dtype=np.float64)
    brain_idx = np.argwhere(anat.brain)
    sig_n, tgt_n, w_n, br_n, sd_n, st_n, ti_n = [], [], [], [], [], [], []
    for _ in range(n):
        centre = brain_idx[rng.integers(len(brain_idx))]
        axis = int(rng.integers(3))
        plane = [c for i, c in enumerate(centre) if i != axis]
        frac = _cut(anat.fractions, axis, int(centre[axis]), tuple(plane), size)
        brain = _cut(anat.brain, axis, int(centre[axis]), tuple(plane), size)
        if rng.random() < 0.5:
            frac, brain = frac[..., ::-1, :], brain[::-1, :]
        if rng.random() < 0.5:
            frac, brain = frac[..., :, ::-1], brain[:, ::-1]
        if rng.random() < 0.5:
            frac, brain = np.swapaxes(frac, -1, -2), brain.T
        maps = tissue_maps(np.ascontiguousarray(frac, dtype=np.float64), rng)
        if structures:
            st_n.append(add_structures(maps, np.ascontiguousarray(brain), rng))
        bb = 2.0 - abs(rng.normal(0.0, B_HALF_NORMAL_SIGMA)) if b is None else float(b)
        sd = math.exp(rng.uniform(*np.log(SIGMA_RANGE))) if sigma is None else float(sigma)
        a, t1, t2 = maps["A"], maps["T1"], maps["T2"]
        if kind == "ir":
            clean = np.abs(a[..., None] * (1.0 - bb * np.exp(-times / t1[..., None])))
            params = np.stack([a, np.full_like(a, bb), t1])
        elif kind == "t2":
            clean = np.abs(a[..., None] * np.exp(-times / t2[..., None]))
            params = np.stack([a, t2])
        else:
            raise ValueError(f"unknown relaxometry model {kind!r}; use one of {', '.join(rim.KINDS)}")
        noisy = np.hypot(clean + sd * rng.standard_normal(clean.shape), sd * rng.standard_normal(clean.shape))
        sig_n.append(np.moveaxis(noisy, -1, 0))
        tgt_n.append(params)
        w_n.append(frac.sum(0) > 0.5)
        ti_n.append(np.where(frac.sum(0) > 0, frac.argmax(0), -1))
        br_n.append(np.ascontiguousarray(brain))
        sd_n.append(sd)
    signal = torch.as_tensor(np.stack(sig_n), dtype=dtype)
    brain = torch.as_tensor(np.stack(br_n))
    scale = rim.signal_scale(signal, brain)
    signal = signal / scale[:, None, None, None]
    params = torch.as_tensor(np.stack(tgt_n), dtype=dtype)
    params[:, 0] = params[:, 0] / scale[:, None, None]
    return Patches(signal, rim.to_network(params, kind), torch.as_tensor(np.stack(w_n), dtype=dtype), brain, scale,
                   torch.as_tensor(sd_n, dtype=dtype), torch.as_tensor(np.stack(st_n)) if structures else None,
                   torch.as_tensor(np.stack(ti_n), dtype=torch.int64))
