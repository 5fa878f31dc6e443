"""Digital brain phantom: tissue fractions, tissue parameters and field maps per participant.

Two anatomies (``ANATOMIES``, ``bids_qmri-synth --anatomy``):

- ``mni152`` (the default, kept for continuity): the MNI152 2009 template shipped in nilearn
  (GM/WM probability maps and brain mask, offline). The pipeline registers to this very template
  and uses its maps as Atropos priors, so on this phantom anatomy scores measure a pipeline
  finding its own template (optimistic by construction).
- ``colin27``: the Colin27 single-subject head of Debian ``mricron-data`` (``ch2bet.nii.gz``: the
  1 mm T1w inside its brain extraction), classified into GM/WM/CSF here by a three-class
  Gaussian mixture on its intensities with morphological clean-up (:func:`_crisp_colin27`), not
  by the pipeline under test. The pipeline never uses Colin27 as a registration target, prior
  or initialiser (``anatomy.templates.synthetic_head``), so this phantom measures segmentation
  and normalisation on a head the pipeline has never seen.

The MNI152 anatomy is made crisp: each 1 mm template voxel is one tissue (GM, WM, or CSF =
intracranial hull minus GM and WM), each tissue keeping its volume (see _crisp_mni152). A
population map's fuzziness is inter-subject variability, not anything one head has; an
individual brain has sharp tissue boundaries, and its partial volume comes from the acquisition's
voxel size (here: anti-aliasing and interpolation onto the participant's grid). With the fuzzy
maps themselves, 2/3 of the CSF-labelled voxels held 40-60 % CSF at 3 mm and the CSF was spread
thinly everywhere. Per participant a global scaling and a small smooth random displacement
field deform the anatomy; outside the hull a skull (with a marrow layer), a scalp fat layer and
a skin/muscle layer form a closed head, and an air cavity below the orbitofrontal cortex
(ethmoid/sphenoid sinus) produces the susceptibility field.

Tissue parameters follow seed 004 Table 1 (T1, T2, PD per tissue); each tissue value is a
participant offset plus a smooth spatial field, so that over participants and voxels the values
have the Table 1 mean and standard deviation (90 % of the variance between participants, 10 %
within, as seed 004 draws tissue values per subject). qMT parameters (m0s, T2s, Rx) are per tissue from the literature (seed 003 training
ranges, Gloor et al. 2008), with the same kind of intra-tissue variation. Voxel values mix the
tissue values by their fractions (relaxation times as rates, see draw_tissue_parameters).

Everything lives on a *reference grid* in head space (mm, MNI-like RAS orientation). Acquisitions
see the head through a rigid pose (head mm → scanner mm) and sample these maps with
:func:`sample_to_grid`. All times in seconds, ΔB0 in Hz, B1 a ratio.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger("bids_qmri.synth.phantom")

#: Tissue classes of the phantom (label values of ``Phantom.labels``); 1-3 are the SPEC §4 dseg.
TISSUES = ("GM", "WM", "CSF", "skull", "marrow", "fat", "skin")
BRAIN_TISSUES = ("GM", "WM", "CSF")

#: Per-tissue (mean, SD) of each parameter, SI units. T1, T2, PD: seed 004 Table 1 (ms → s);
#: PD SDs not given in the table for tissues other than CSF are 0.05 (our choice). Skull PD is
#: 0.1 instead of the table's 0.9: cortical bone has an ultra-short T2* and appears dark, which
#: keeps brain extraction realistic. m0s (semi-solid fraction): seed 003 training range
#: (0.12 ± 0.08) and Gloor et al. (MRM 2008, bSSFP qMT: bound-pool fraction F ≈ 15 % in frontal WM,
#: ≈ 6-7 % in cortical GM). Rx (exchange rate, 1/s, our normalisation m0s + m0f = 1, so that the
#: forward rate is kf = Rx·m0s): Gloor et al. report kf ≈ 4.5 /s in WM and ≈ 2-2.5 /s in GM,
#: i.e. Rx = kf/m0s ≈ 30 /s (WM) and ≈ 35 /s (GM), inside seed 003's training range 44 ± 20 /s.
#: T2s (semi-solid T2): ≈ 12 µs in WM (Gloor et al. fix T2r = 12 µs; free fits give 11-13 µs),
#: slightly shorter in GM (11 µs, our reading of the same literature). Non-brain tissues (no
#: seed values): muscle-like skin 9.5 µs, bone 10 µs, fat/marrow 11 µs; their exchange rates
#: 30-40 /s. CSF has no semi-solid pool (m0s = 0), so its T2s/Rx do not affect the signal. SDs
#: are our choice (~10 % for T2s, 15-25 % for Rx); the qMT simulation uses each voxel's own values.
TISSUE_PARAMETERS: dict[str, dict[str, tuple[float, float]]] = {
    "GM": {"T1": (1.400, 0.300), "T2": (0.110, 0.030), "PD": (0.85, 0.05),
           "m0s": (0.07, 0.02), "T2s": (11e-6, 1.0e-6), "Rx": (35.0, 8.0)},
    "WM": {"T1": (0.780, 0.250), "T2": (0.080, 0.020), "PD": (0.65, 0.05),
           "m0s": (0.16, 0.03), "T2s": (12e-6, 1.0e-6), "Rx": (30.0, 5.0)},
    "CSF": {"T1": (3.500, 0.300), "T2": (2.000, 0.300), "PD": (1.00, 0.30),
            "m0s": (0.0, 0.0), "T2s": (12e-6, 1.0e-6), "Rx": (30.0, 5.0)},
    "skull": {"T1": (0.400, 0.100), "T2": (0.030, 0.010), "PD": (0.10, 0.05),
              "m0s": (0.10, 0.02), "T2s": (10e-6, 1.0e-6), "Rx": (30.0, 6.0)},
    "marrow": {"T1": (0.580, 0.100), "T2": (0.050, 0.020), "PD": (0.80, 0.05),
               "m0s": (0.02, 0.01), "T2s": (11e-6, 1.0e-6), "Rx": (40.0, 8.0)},
    "fat": {"T1": (0.420, 0.100), "T2": (0.070, 0.020), "PD": (0.90, 0.05),
            "m0s": (0.02, 0.01), "T2s": (11e-6, 1.0e-6), "Rx": (40.0, 8.0)},
    "skin": {"T1": (1.230, 0.300), "T2": (0.050, 0.020), "PD": (0.70, 0.05),
             "m0s": (0.10, 0.02), "T2s": (9.5e-6, 1.0e-6), "Rx": (35.0, 7.0)},
}
PARAMETERS = ("T1", "T2", "PD", "m0s", "T2s", "Rx")
#: Physical bounds applied to every drawn value (truncation is > 3 SD away for brain tissues).
BOUNDS = {"T1": (0.1, 6.0), "T2": (0.005, 3.0), "PD": (0.01, 2.0), "m0s": (0.0, 0.35),
          "T2s": (7e-6, 17e-6), "Rx": (5.0, 100.0)}
#: Share of each tissue's variance that is between participants (the rest is spatial). Seed 004
#: draws Table 1 values per subject ("uniform tissue properties within subjects but distinct
#: between subjects") and adds smaller voxel-wise variation: within a head the SD is then
#: √0.1 of Table 1's (GM T1 ±0.09 s, WM ±0.08 s). With half the variance within the head GM and
#: WM overlapped in T1 and the T1w showed almost no GM/WM contrast (intensity-only Dice ~0.5).
BETWEEN_FRACTION = 0.9
#: Smoothness (Gaussian SD, mm) of the intra-tissue parameter fields.
FIELD_SMOOTHNESS_MM = 8.0

#: Named populations of participants (``make_phantom(population=...)``); the first is the default.
#: ``seed004``: every tissue value varies between participants with BETWEEN_FRACTION of seed 004
#: Table 1's variance (GM T1 SD 0.28 s) -- a deliberately broad *training* distribution for a RIM,
#: not a cohort. ``healthy``: a healthy adult cohort at 3 T. Choi et al. (Cereb Cortex 33:3562,
#: 2023, doi:10.1093/cercor/bhac292; 3D MRF of 40 healthy adults at 3 T) report a between-subject
#: coefficient of variation of 3.5 % for cortical-region T1 and 7.3 % for T2; the healthy population
#: draws the brain tissues' (GM, WM, CSF) per-participant T1 and T2 with those CVs of the Table 1
#: means (GM T1 SD 49 ms, WM 27 ms; GM T2 8 ms), and PD with a CV of 3.5 % too (our choice: no
#: cohort value at hand; PD enters the MPRAGE, so its spread cannot be left at Table 1's). The
#: means, the within-head spatial fields (sqrt(1 - BETWEEN_FRACTION) of Table 1's SD), the qMT
#: parameters and the non-brain tissues are those of ``seed004``, and the random stream is the
#: same: a seed draws the same anatomy, fields and standard-normal offsets in both populations,
#: only scaled differently.
POPULATIONS = ("seed004", "healthy")
DEFAULT_POPULATION = "seed004"
#: ``healthy``: between-participant coefficient of variation per parameter of the brain tissues.
HEALTHY_BETWEEN_CV = {"T1": 0.035, "T2": 0.073, "PD": 0.035}

# Head layers outside the intracranial hull: (tissue, outer distance in mm).
HEAD_LAYERS = (("skull", 2.0), ("marrow", 4.0), ("skull", 6.0), ("fat", 10.0), ("skin", 12.0))
# Air cavity (ethmoid/sphenoid sinus) below the orbitofrontal cortex, template mm, radius mm.
SINUS_CENTRE_MM = (0.0, 38.0, -39.0)
SINUS_RADIUS_MM = 13.0
# Susceptibility difference air − tissue (SI, ppm) and proton frequency at 3 T (Hz).
DELTA_CHI_AIR = 9.4e-6
LARMOR_HZ = 127.74e6
# Head-space point about which participants scale and heads rotate (template mm).
HEAD_CENTRE_MM = np.array([0.0, -18.0, 10.0])
MARGIN_MM = 22.0

#: Anatomies the phantom can be built from (see the module docstring); the first is the default.
ANATOMIES = ("mni152", "colin27")
DEFAULT_ANATOMY = "mni152"
#: Colin27 (Holmes et al. 1998) as Debian mricron-data ships it: 1 mm, MNI space, brain-extracted.
COLIN27_BRAIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


@dataclass
class Grid:
    """A voxel grid: ``shape`` and ``affine`` (voxel index → mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def zooms(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def world(self) -> np.ndarray:
        """mm coordinates of every voxel centre, ``[3, *shape]``."""
        idx = np.indices(self.shape, dtype=np.float64).reshape(3, -1)
        xyz = self.affine[:3, :3] @ idx + self.affine[:3, 3:4]
        return xyz.reshape(3, *self.shape)


@dataclass
class Phantom:
    """One participant's tissues and parameters on the reference grid (head space)."""

    grid: Grid
    fractions: dict[str, np.ndarray]  # tissue -> fraction in [0, 1]
    params: dict[str, np.ndarray]  # T1, T2 (s), PD, m0s, T2s (s), Rx (1/s)
    tissue_means: dict[str, dict[str, float]]  # the participant's drawn tissue means
    air: np.ndarray  # sinus air fraction (drives ΔB0)
    displacement: np.ndarray  # [3, *shape] mm, head space -> template space (after scaling)
    scaling: np.ndarray  # [3] global scaling factors
    anatomy: str = DEFAULT_ANATOMY  # which head the tissues come from (ANATOMIES)

    @property
    def labels(self) -> np.ndarray:
        """Hard labels (index into TISSUES + 1; 0 for air) by the largest fraction."""
        stack = np.stack([self.fractions[t] for t in TISSUES])
        lab = stack.argmax(axis=0).astype(np.uint8) + 1
        lab[stack.sum(axis=0) < 0.5] = 0
        return lab

    @property
    def head_mask(self) -> np.ndarray:
        return sum(self.fractions[t] for t in TISSUES) > 0.5

    @property
    def brain_mask(self) -> np.ndarray:
        return sum(self.fractions[t] for t in BRAIN_TISSUES) > 0.5


@dataclass
class SessionFields:
    """Per-session fields in head space on the reference grid."""

    b1: np.ndarray  # transmit scaling (ratio), 0.7-1.3
    b0_hz: np.ndarray  # off-resonance, Hz
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Template


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, brain mask (1 mm, float32) and their affine, from nilearn (offline)."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    arrs = [np.asarray(img.dataobj, dtype=np.float32) for img in (gm, wm, mask)]
    return arrs[0], arrs[1], arrs[2], np.asarray(gm.affine, dtype=np.float64)


def check_anatomy(anatomy: str) -> str:
    """``anatomy`` if it can be built offline, else a one-line ``UsageError`` saying what to do."""
    from ..errors import UsageError

    if anatomy not in ANATOMIES:
        raise UsageError(f"unknown --anatomy {anatomy!r}: choose from {', '.join(ANATOMIES)}")
    if anatomy == "colin27" and not COLIN27_BRAIN.is_file():
        raise UsageError(f"--anatomy colin27 needs Colin27 from Debian mricron-data ({COLIN27_BRAIN} is "
                         "missing): apt-get install mricron-data, or use --anatomy mni152")
    return anatomy


def _crisp_tissues(anatomy: str = DEFAULT_ANATOMY) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, CSF indicators (float32, one tissue per 1 mm voxel) of ``anatomy`` and their affine."""
    check_anatomy(anatomy)
    return _crisp_colin27() if anatomy == "colin27" else _crisp_mni152()


def _gaussian_mixture_1d(x: np.ndarray, k: int, *, tied: bool = False, iterations: int = 500,
                         tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum-likelihood mixture of ``k`` Gaussians on the samples ``x`` by EM (``tied``: one
    variance shared by all components).

    EM runs on the distinct values with their counts (the same likelihood as on every sample;
    images hold few distinct intensities), from the k equal-count quantile bins
    (deterministic). Returns (weights, means, SDs) sorted by mean.
    """
    values, counts = np.unique(np.asarray(x, dtype=np.float64), return_counts=True)
    counts = counts.astype(np.float64)
    cum = np.cumsum(counts) / counts.sum()
    bins = np.minimum((cum * k - 1e-9).astype(int), k - 1)
    r = np.eye(k)[bins]  # initial responsibilities: quantile bins
    previous = -np.inf
    for _ in range(iterations):
        n = (r * counts[:, None]).sum(axis=0)
        w = n / counts.sum()
        mu = (r * (counts * values)[:, None]).sum(axis=0) / n
        var = (r * counts[:, None] * (values[:, None] - mu) ** 2).sum(axis=0) / n
        sd = np.sqrt(np.full(k, (w * var).sum()) if tied else var) + 1e-6
        logp = np.log(w) - np.log(sd) - 0.5 * ((values[:, None] - mu) / sd) ** 2
        top = logp.max(axis=1, keepdims=True)
        loglik = float((counts * (top[:, 0] + np.log(np.exp(logp - top).sum(axis=1)))).sum() / counts.sum())
        r = np.exp(logp - top)
        r /= r.sum(axis=1, keepdims=True)
        if loglik - previous < tol:
            break
        previous = loglik
    order = np.argsort(mu)
    return w[order], mu[order], sd[order]


@functools.lru_cache(maxsize=1)
def _crisp_colin27() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Colin27's crisp GM/WM/CSF at 1 mm, classified from its own T1w intensities.

    The intracranial hull is the brain extraction closed over the outer sulci as for MNI152
    (3 mm Gaussian, soft threshold at 0.5) with holes filled; hull voxels outside the extraction
    are CSF. Inside it a three-class Gaussian mixture on the intensities (EM, no spatial prior,
    no template) labels each voxel by its most probable class (dark CSF, GM, bright WM). The
    classes share one variance: Colin27 averages 27 scans, so a class's width is mostly partial
    volume at its borders, not noise. With a variance per class the narrow WM peak (SD 3.7 vs
    12.1 for GM) moved the GM/WM threshold from the histogram's valley (~100) to 107 and gave
    GM 1153 / WM 466 ml; shared: threshold 96, GM 866 / WM 756 / CSF 150 ml (8.5 % of the hull). Clean-up:
    WM keeps its largest connected component (isolated bright voxels at the surface, vessels and
    dura, become GM), and connected GM or CSF specks of fewer than 8 voxels take the label of
    the majority of their neighbours.
    """
    import nibabel as nb

    img = nb.load(COLIN27_BRAIN)
    t1 = np.asarray(img.dataobj, dtype=np.float64)
    aff = np.asarray(img.affine, dtype=np.float64)
    brain = ndimage.binary_fill_holes(t1 > 0)
    hull = ndimage.gaussian_filter(brain.astype(np.float64), 3.0) >= 0.5
    hull = ndimage.binary_fill_holes(hull | brain)
    w, mu, sd = _gaussian_mixture_1d(t1[brain], 3, tied=True)
    x = t1[brain][:, None]
    logp = np.log(w) - np.log(sd) - 0.5 * ((x - mu) / sd) ** 2
    labels = np.zeros(t1.shape, np.uint8)  # 1 CSF, 2 GM, 3 WM (by mean intensity)
    labels[hull] = 1
    labels[brain] = logp.argmax(axis=1).astype(np.uint8) + 1
    LOGGER.debug("Colin27 mixture: means %s, SDs %s, weights %s", mu.round(1), sd.round(1), w.round(3))
    # WM: the largest connected component.
    comp, n = ndimage.label(labels == 3)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        labels[(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 2
    # Specks: small GM or CSF components take their neighbours' majority label.
    for cls in (2, 1):
        comp, n = ndimage.label(labels == cls)
        if n == 0:
            continue
        sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1))
        small = np.isin(comp, 1 + np.flatnonzero(sizes < 8))
        if not small.any():
            continue
        ring = ndimage.binary_dilation(small) & ~small & hull
        counts = [ndimage.uniform_filter(((labels == c) & ring).astype(np.float32), 3) for c in (1, 2, 3)]
        labels[small] = 1 + np.argmax(np.stack([c[small] for c in counts]), axis=0).astype(np.uint8)
    labels[~hull] = 0
    gm, wm, csf = ((labels == c).astype(np.float32) for c in (2, 3, 1))
    return gm, wm, csf, aff


@functools.lru_cache(maxsize=1)
def _crisp_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One crisp anatomy on the 1 mm template: GM, WM, CSF indicators (float32) and the affine.

    Soft fractions first: the intracranial hull is the brain mask closed over sulci (3 mm
    Gaussian, then a soft threshold), GM + WM is scaled to at most 1 and CSF fills the rest of
    the hull. Inside the hull (fraction ≥ 0.5) the labels keep each tissue's volume of the soft
    maps: CSF where its fraction is among the highest (as many voxels as the soft CSF volume),
    then WM likewise by its share of GM + WM, GM elsewhere. A plain largest-fraction label would
    hand the sulci to GM and halve the CSF (116 instead of 211 ml of 1.9 l).
    """
    gm, wm, mask, aff = _template()
    hull = ndimage.gaussian_filter(np.maximum(mask, gm + wm), 3.0)
    hull = np.clip((hull - 0.25) / 0.5, 0.0, 1.0)
    hull = np.maximum(hull, np.clip(gm + wm, 0.0, 1.0))
    scale = np.where(gm + wm > 1.0, 1.0 / np.maximum(gm + wm, 1e-6), 1.0)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(hull - gm - wm, 0.0, 1.0)
    inside = hull >= 0.5

    def top(score: np.ndarray, where: np.ndarray, volume: float) -> np.ndarray:
        """The ``volume`` voxels of ``where`` with the highest ``score``."""
        ranked = np.sort(score[where])[::-1]
        threshold = ranked[min(int(round(volume)), ranked.size - 1)]
        return where & (score > threshold)

    is_csf = top(csf, inside, csf.sum())
    is_wm = top(wm / np.maximum(gm + wm, 1e-6), inside & ~is_csf, wm.sum())
    is_gm = inside & ~is_csf & ~is_wm
    return is_gm.astype(np.float32), is_wm.astype(np.float32), is_csf.astype(np.float32), aff


def reference_grid(resolution_mm: float) -> Grid:
    """Axis-aligned RAS grid covering the template brain plus the head layers and a margin.

    The same grid for every anatomy (Colin27 lies in MNI space and fits it with 8 mm to spare at
    the top, the closest side), so that one seed draws the same participant on it, deformation,
    tissue values and fields alike, whatever the anatomy: the phantoms differ only in the head.
    """
    _, _, mask, aff = _template()
    idx = np.argwhere(mask > 0)
    lo = aff[:3, :3] @ idx.min(axis=0) + aff[:3, 3] - MARGIN_MM
    hi = aff[:3, :3] @ idx.max(axis=0) + aff[:3, 3] + MARGIN_MM
    r = float(resolution_mm)
    shape = tuple(int(math.ceil((h - l) / r)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([r, r, r, 1.0])
    affine[:3, 3] = lo
    return Grid(shape, affine)


# --------------------------------------------------------------------------------------------
# Random smooth fields


def smooth_field(rng: np.random.Generator, grid: Grid, smoothness_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD smooth Gaussian random field on ``grid``.

    Drawn on a coarse grid (spacing smoothness/2) and interpolated, which is much cheaper than
    filtering at full resolution and equally smooth at this scale.
    """
    step = max(smoothness_mm / 2.0, float(grid.zooms.min()))
    factor = grid.zooms / step
    coarse_shape = tuple(int(math.ceil(n * f)) + 3 for n, f in zip(grid.shape, factor))
    noise = rng.standard_normal(coarse_shape)
    noise = ndimage.gaussian_filter(noise, sigma=smoothness_mm / step, mode="wrap")
    noise = (noise - noise.mean()) / noise.std()
    coords = [np.arange(n) * f + 1.0 for n, f in zip(grid.shape, factor)]
    mesh = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(noise, mesh, order=1, mode="nearest").astype(np.float64)


def _low_order_field(rng: np.random.Generator, grid: Grid, centre: np.ndarray, scale_mm: float,
                     amplitude: float) -> np.ndarray:
    """Random polynomial (orders 1-2) in normalised head coordinates, peak-to-peak ~amplitude."""
    xyz = (grid.world() - centre[:, None, None, None]) / scale_mm
    x, y, z = xyz
    terms = [x, y, z, x * y, x * z, y * z, x**2 - y**2, 2 * z**2 - x**2 - y**2]
    coef = rng.normal(0.0, 1.0, len(terms)) / np.sqrt(len(terms))
    return amplitude * sum(c * t for c, t in zip(coef, terms))


# --------------------------------------------------------------------------------------------
# Anatomy


def _deformation(rng: np.random.Generator, grid: Grid, max_displacement_mm: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Global scaling (per axis, ±5 %) and a smooth displacement field (mm) on ``grid``.

    The displacement is a smoothed random field (12 mm Gaussian SD) scaled to the requested
    maximum; its gradient stays well below 1, so the map is invertible (positive Jacobian).
    """
    scaling = 1.0 + rng.uniform(-0.05, 0.05, 3)
    disp = np.stack([smooth_field(rng, grid, 12.0) for _ in range(3)])
    peak = np.abs(disp).max()
    disp *= max_displacement_mm / peak if peak > 0 else 0.0
    return scaling, disp


def template_coordinates(grid: Grid, scaling: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Template mm coordinates of each head-space voxel: centre + (x − centre)/s + u(x)."""
    xyz = grid.world()
    c = HEAD_CENTRE_MM[:, None, None, None]
    return c + (xyz - c) / scaling[:, None, None, None] + displacement


@functools.lru_cache(maxsize=2)
def _template_at(resolution_mm: float, anatomy: str = DEFAULT_ANATOMY
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The crisp tissues low-pass filtered for sampling at ``resolution_mm`` (anti-aliasing)."""
    gm, wm, csf, aff = _crisp_tissues(anatomy)
    if resolution_mm > 1.0:
        sigma = math.sqrt(resolution_mm**2 - 1.0) / 2.3548  # FWHM of the coarser voxel
        gm, wm, csf = (ndimage.gaussian_filter(v, sigma) for v in (gm, wm, csf))
    return gm, wm, csf, aff


def _sample_template(volume: np.ndarray, affine: np.ndarray, coords_mm: np.ndarray) -> np.ndarray:
    """Trilinear sampling of a template volume at mm coordinates."""
    inv = np.linalg.inv(affine)
    shp = coords_mm.shape[1:]
    pts = inv[:3, :3] @ coords_mm.reshape(3, -1) + inv[:3, 3:4]
    out = ndimage.map_coordinates(volume, pts, order=1, mode="constant", cval=0.0)
    return np.clip(out.reshape(shp), 0.0, 1.0)


def build_anatomy(grid: Grid, scaling: np.ndarray, displacement: np.ndarray, anatomy: str = DEFAULT_ANATOMY
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue fractions (GM, WM, CSF and head layers) and sinus air on ``grid``."""
    res = float(grid.zooms.min())
    gm_t, wm_t, csf_t, aff = _template_at(res, anatomy)
    coords = template_coordinates(grid, scaling, displacement)
    gm, wm, csf = (_sample_template(v, aff, coords) for v in (gm_t, wm_t, csf_t))
    # The indicators partition the template, so their filtered, linearly interpolated values sum
    # to at most 1; the rescale only guards float round-off.
    total = gm + wm + csf
    scale = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-6), 1.0)
    gm, wm, csf = gm * scale, wm * scale, csf * scale
    hull = gm + wm + csf
    # Head layers by distance (mm) from the hull.
    inside = hull >= 0.5
    dist = ndimage.distance_transform_edt(~inside, sampling=grid.zooms)
    outside = 1.0 - np.clip(gm + wm + csf, 0.0, 1.0)
    fractions = {"GM": gm, "WM": wm, "CSF": csf}
    for t in ("skull", "marrow", "fat", "skin"):
        fractions[t] = np.zeros(grid.shape)
    inner = 0.0
    for tissue, outer in HEAD_LAYERS:
        sel = (~inside) & (dist > inner) & (dist <= outer)
        fractions[tissue][sel] += outside[sel]
        inner = outer
    # The first layer also takes the non-brain part of partial-volume voxels inside the hull edge.
    edge = inside & (outside > 0)
    fractions["skull"][edge] += outside[edge]
    # Sinus air cavity: replaces whatever non-brain tissue is there.
    world = grid.world()
    c = HEAD_CENTRE_MM
    centre = c + (np.asarray(SINUS_CENTRE_MM) - c) * scaling
    r = np.sqrt(((world - centre[:, None, None, None]) ** 2).sum(axis=0))
    air = np.clip((SINUS_RADIUS_MM - r) / res + 0.5, 0.0, 1.0)
    air *= 1.0 - np.clip(gm + wm + csf, 0.0, 1.0)
    for t in ("skull", "marrow", "fat", "skin"):
        fractions[t] = np.clip(fractions[t] - air, 0.0, 1.0)
    return {k: v.astype(np.float32) for k, v in fractions.items()}, air.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Parameters


# Relaxation times mix as rates (fast exchange); see draw_tissue_parameters.
RATE_MIXED = ("T1", "T2")


def between_sd(tissue: str, parameter: str, population: str = DEFAULT_POPULATION) -> float:
    """SD of the per-participant value of ``parameter`` in ``tissue`` in ``population`` (SI units)."""
    mu, sd = TISSUE_PARAMETERS[tissue][parameter]
    if population == "healthy" and tissue in BRAIN_TISSUES and parameter in HEALTHY_BETWEEN_CV:
        return HEALTHY_BETWEEN_CV[parameter] * mu
    return sd * math.sqrt(BETWEEN_FRACTION)


def check_population(population: str) -> str:
    """``population`` if it is one of ``POPULATIONS``, else a one-line ``UsageError``."""
    from ..errors import UsageError

    if population not in POPULATIONS:
        raise UsageError(f"unknown phantom population {population!r}: choose from {', '.join(POPULATIONS)}")
    return population


def draw_tissue_parameters(rng: np.random.Generator, grid: Grid,
                           fractions: dict[str, np.ndarray], population: str = DEFAULT_POPULATION
                           ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Parameter maps (partial-volume mixtures of tissue values) and the tissue means.

    Relaxation times mix in the fast-exchange limit: a voxel's rates are the fraction-weighted
    tissue rates, 1/T = Σ f_i/T_i / Σ f_i. Averaging the times themselves is not physical and
    lets CSF (T2 = 2 s) dominate: 5 % CSF in GM would give T2 ≈ 0.2 s instead of ≈ 0.115 s.
    Other parameters (PD, m0s, T2s, Rx) mix linearly.

    Tissue value at x = μ + σ (√b · z + √(1−b) · F(x)), z ~ N(0,1) per participant, F a smooth
    unit field, b = BETWEEN_FRACTION; truncated to ``BOUNDS`` and T2 < 0.9·T1. ``population``
    (``POPULATIONS``) sets the between-participant SD (``between_sd``: σ√b for ``seed004``, a
    healthy cohort's for ``healthy``); the spatial part and the random stream do not depend on it.
    """
    check_population(population)
    total = sum(fractions[t] for t in TISSUES).astype(np.float64)
    weight = np.where(total > 1e-6, 1.0 / np.maximum(total, 1e-6), 0.0)
    maps = {p: np.zeros(grid.shape) for p in PARAMETERS}
    means: dict[str, dict[str, float]] = {}
    b = math.sqrt(1.0 - BETWEEN_FRACTION)
    for tissue in TISSUES:
        f = fractions[tissue].astype(np.float64)
        means[tissue] = {}
        values = {}
        for p in PARAMETERS:
            mu, sd = TISSUE_PARAMETERS[tissue][p]
            offset = mu + between_sd(tissue, p, population) * rng.standard_normal()
            spatial = smooth_field(rng, grid, FIELD_SMOOTHNESS_MM)
            values[p] = np.clip(offset + sd * b * spatial, *BOUNDS[p])
            means[tissue][p] = float(offset)
        values["T2"] = np.minimum(values["T2"], 0.9 * values["T1"])
        for p in PARAMETERS:
            maps[p] += f * (1.0 / values[p] if p in RATE_MIXED else values[p])
    for p in PARAMETERS:
        maps[p] *= weight
        if p in RATE_MIXED:
            maps[p] = np.where(maps[p] > 0, 1.0 / np.maximum(maps[p], 1e-12), 0.0)
    # PD is a proton density: partial volume with air lowers it (no renormalisation).
    maps["PD"] *= np.clip(total, 0.0, 1.0)
    return {k: v.astype(np.float32) for k, v in maps.items()}, means


def make_phantom(rng: np.random.Generator, resolution_mm: float = 2.0,
                 max_displacement_mm: float = 3.0, anatomy: str = DEFAULT_ANATOMY,
                 population: str = DEFAULT_POPULATION) -> Phantom:
    """One participant's phantom on the reference grid at ``resolution_mm`` from ``anatomy``, its
    tissue values drawn from ``population`` (``POPULATIONS``)."""
    check_population(population)
    grid = reference_grid(resolution_mm)
    scaling, disp = _deformation(rng, grid, max_displacement_mm)
    fractions, air = build_anatomy(grid, scaling, disp, anatomy)
    params, means = draw_tissue_parameters(rng, grid, fractions, population)
    return Phantom(grid, fractions, params, means, air, disp.astype(np.float32), scaling, anatomy)


# --------------------------------------------------------------------------------------------
# Fields


def b0_from_susceptibility(air: np.ndarray, grid: Grid, b0_field_hz: float = LARMOR_HZ
                           ) -> np.ndarray:
    """ΔB0 (Hz) of the air cavities by the k-space dipole kernel D(k) = 1/3 − kz²/|k|².

    Air outside the head is treated as shimmed away; the cavity field is what shimming cannot
    remove (orbitofrontal / inferior temporal off-resonance). B0 is along the z (S-I) axis.
    """
    pad = [(n // 2, n // 2) for n in grid.shape]
    chi = np.pad(air.astype(np.float64) * DELTA_CHI_AIR, pad)
    k = np.meshgrid(*[np.fft.fftfreq(n, d) for n, d in zip(chi.shape, grid.zooms)],
                    indexing="ij")
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(k2 > 0, 1.0 / 3.0 - k[2] ** 2 / k2, 0.0)
    field = np.real(np.fft.ifftn(kernel * np.fft.fftn(chi)))
    sl = tuple(slice(p[0], p[0] + n) for p, n in zip(pad, grid.shape))
    return field[sl] * b0_field_hz


def make_session_fields(rng: np.random.Generator, phantom: Phantom) -> SessionFields:
    """B1 (centre-bright 3 T pattern, 0.7-1.3) and ΔB0 (sinus field + shim residual) in Hz."""
    grid = phantom.grid
    world = grid.world()
    centre = HEAD_CENTRE_MM + rng.normal(0.0, 8.0, 3)
    rad2 = (((world - centre[:, None, None, None]) / np.array([85.0, 100.0, 90.0])[:, None, None, None]) ** 2).sum(axis=0)
    b1 = rng.uniform(1.12, 1.22) - rng.uniform(0.25, 0.35) * rad2
    b1 = b1 + _low_order_field(rng, grid, HEAD_CENTRE_MM, 80.0, 0.04)
    b1 = b1 + 0.02 * smooth_field(rng, grid, 25.0)
    b1 = np.clip(b1, 0.7, 1.3)

    cavity = b0_from_susceptibility(phantom.air, grid) * rng.uniform(0.8, 1.2)
    brain = phantom.brain_mask
    # Linear shim over the brain removes the mean and first-order terms of the cavity field.
    xyz = world[:, brain].T
    design = np.c_[np.ones(len(xyz)), xyz]
    coef, *_ = np.linalg.lstsq(design, cavity[brain], rcond=None)
    cavity = cavity - (coef[0] + np.tensordot(coef[1:], world, axes=1))
    b0 = cavity + _low_order_field(rng, grid, HEAD_CENTRE_MM, 80.0, 15.0)
    b0 = np.clip(b0, -300.0, 300.0)
    return SessionFields(b1=b1.astype(np.float32), b0_hz=b0.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Poses and resampling


def rigid_matrix(rotation_deg, translation_mm, centre_mm=HEAD_CENTRE_MM) -> np.ndarray:
    """4×4 rigid transform: rotations about x, y, z (deg) about ``centre_mm``, then translation."""
    ax, ay, az = np.radians(rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    c = np.asarray(centre_mm, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=np.float64)
    return out


def sample_to_grid(volume: np.ndarray, source: Grid, target: Grid, pose: np.ndarray | None = None,
                   order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Values of a head-space ``volume`` (on ``source``) seen on the scanner grid ``target``.

    ``pose`` maps head mm to scanner mm (identity: no motion). Voxel v of the target sees the
    head point pose⁻¹ · A_target · v.
    """
    pose = np.eye(4) if pose is None else pose
    m = np.linalg.inv(source.affine) @ np.linalg.inv(pose) @ target.affine
    return ndimage.affine_transform(np.asarray(volume, dtype=np.float32), m[:3, :3], m[:3, 3],
                                    output_shape=tuple(target.shape), order=order,
                                    mode="constant", cval=cval)
