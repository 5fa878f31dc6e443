"""Training pairs for mprage2mrf from the digital brain phantom (seed 002 §2.3, simulated).

One phantom participant per seed (its own deformation, tissue draws and B1 field), on the
phantom's reference grid: the MPRAGE magnitude from ``physics.mprage`` with the T1w protocol
(Rician noise at ``snr``), and the MRF SVD coefficients of the synthetic dataset's FISP schedule
and basis (``synth.dataset.mrf_dictionary``: the same dictionary and interpolation that write
the dataset's MRF), times PD, on the same grid (so registration is exact). As in seed 002 the
MPRAGE is skull-stripped with the brain mask and divided by its maximum; the coefficients are
phase-renormalised (SV1 real, first four SVs kept) and divided by the volume's maximum of SV1
(the matcher is invariant to that scale). Axial slices (third axis) are zero-padded to a multiple
of the network's pooling factor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .unet import N_SV, coefficients_to_channels

__all__ = ["PairVolume", "coefficient_targets", "mrf_target_basis", "long_t2_weights", "simulate_pair", "slices_of", "normalise_mprage", "pad_to"]

log = logging.getLogger("bids_qmri.modalities.mprage2mrf.simulate")


@dataclass
class PairVolume:
    mprage: np.ndarray  # [X, Y, Z] normalised, skull-stripped
    target: np.ndarray  # [X, Y, Z, 7] normalised coefficient channels
    brain: np.ndarray  # [X, Y, Z] bool
    t1: np.ndarray  # ground truth (s)
    t2: np.ndarray
    affine: np.ndarray
    template_mm: np.ndarray | None = None  # [3, X, Y, Z] template (MNI) coordinates of every voxel
    pd: np.ndarray | None = None  # ground truth proton density and B1 field (for a simulated MRF of the phantom)
    b1: np.ndarray | None = None


def mrf_target_basis():
    """``(schedule, basis [Nt, 4] complex)`` of the synthetic dataset's MRF (its first four SVs)."""
    from bids_qmri.synth.dataset import mrf_dictionary

    _, _, basis, schedule = mrf_dictionary()
    return schedule, basis[:, :N_SV]


def normalise_mprage(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Skull-strip and divide by the brain's maximum (seed 002): values in [0, 1].

    The maximum is an outlier (noise, fat or marrow partial volume at the brain's edge): over the
    3 mm training phantoms (seeds 0-11) it lies 1.37-2.85x above the WM median, against 0.93-1.11x
    for the 80th percentile. But the bundled model, trained on the maximum, does worse on the
    held-out phantoms when fed 80th-percentile-scaled inputs at the same mean level (CCC T1 0.449
    vs 0.617, T2 0.241 vs 0.256; README), so a percentile scaling needs a model trained with it
    and was not adopted without one."""
    v = np.where(brain, np.nan_to_num(np.asarray(volume, dtype=np.float64)), 0.0)
    top = float(v.max()) if brain.any() else 0.0
    return (v / top if top > 0 else v).astype(np.float32)


def rotate_and_scale(coeffs: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Complex ``[..., 4]``: phase set so SV1 is real and positive, divided by the brain's max SV1."""
    c = coeffs * torch.exp(-1j * coeffs[..., :1].angle())
    top = c[..., 0].real[brain].max() if bool(brain.any()) else torch.tensor(1.0)
    return c / (top if top > 0 else 1.0)


def coefficient_targets(t1, t2, pd, valid: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Network targets ``[X, Y, Z, 7]`` (float32, zero outside ``brain``): the first four SVD
    coefficients of the synthetic dataset's MRF dictionary at each ``valid`` voxel's T1/T2 (s) and
    B1 = 1, times ``pd``, SV1 rotated real and divided by the brain's maximum SV1."""
    from bids_qmri.synth import dataset as ds

    m = torch.from_numpy(np.asarray(valid, dtype=bool))
    t1, t2, pd = (torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in (t1, t2, pd))
    axes, table, _, _ = ds.mrf_dictionary()
    c = torch.zeros(m.shape + (N_SV,), dtype=torch.complex128)
    # Targets at nominal B1: a T1w-only participant has no B1 map, so the synthesised coefficients
    # are matched at B1 = 1 and must be the fingerprints that B1 = 1 gives (the MPRAGE keeps the true B1).
    pts = [np.log(t1[m].numpy().clip(1e-3)), np.log(t2[m].numpy().clip(1e-4)), np.ones(int(m.sum()))]
    c[m] = ds.interpolate_coefficients(axes, table, pts)[:, :N_SV] * pd[m][:, None]
    c = rotate_and_scale(c, torch.from_numpy(np.asarray(brain, dtype=bool)) & m)
    return coefficients_to_channels(c).float().numpy() * np.asarray(brain, dtype=bool)[..., None]


def simulate_pair(seed: int, *, protocol, resolution_mm: float = 3.0, snr: float = 25.0,
                  anatomy: str | None = None, bias_correct: bool = False,
                  population: str | None = None) -> PairVolume:
    """One phantom participant's (MPRAGE, MRF coefficients) pair; ``seed`` draws everything,
    ``population`` (``synth.phantom.POPULATIONS``, default the phantom's) the tissue values' spread.
    ``bias_correct``: N4 on the whole head first, as the anatomy workflow does to the T1w that
    mprage2mrf receives (it also flattens the MPRAGE's B1-driven shading)."""
    from bids_qmri.physics.mprage import mprage_signal
    from bids_qmri.synth import dataset as ds, phantom as ph

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2002]))
    phantom = ph.make_phantom(rng, resolution_mm, anatomy=anatomy or ph.DEFAULT_ANATOMY,
                              population=population or ph.DEFAULT_POPULATION)
    fields = ph.make_session_fields(rng, phantom)
    p = {k: torch.from_numpy(phantom.params[k].astype(np.float64)) for k in ("T1", "T2", "PD")}
    b1 = torch.from_numpy(fields.b1.astype(np.float64))
    m = p["PD"] > 1e-4
    brain = torch.from_numpy(phantom.brain_mask)
    s = torch.zeros(phantom.grid.shape, dtype=torch.float64)
    s[m] = mprage_signal(p["T1"][m].clamp_min(1e-3), p["PD"][m], b1[m], **protocol.signal_kwargs())
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    ref = float(s[brain].abs().mean()) if bool(brain.any()) else 1.0
    s = ds.add_noise(s, snr, gen, ref).abs()
    if bias_correct:
        import nibabel as nib

        from bids_qmri.anatomy import registration as reg

        head = nib.Nifti1Image(s.numpy().astype(np.float32), phantom.grid.affine)
        head.header.set_xyzt_units("mm", "sec")
        s = torch.from_numpy(reg.n4(head).numpy().astype(np.float64))
    target = coefficient_targets(phantom.params["T1"], phantom.params["T2"], phantom.params["PD"],
                                 m.numpy(), phantom.brain_mask)
    return PairVolume(normalise_mprage(s.numpy(), phantom.brain_mask), target, phantom.brain_mask,
                      phantom.params["T1"], phantom.params["T2"], phantom.grid.affine,
                      ph.template_coordinates(phantom.grid, phantom.scaling, phantom.displacement).astype(np.float32),
                      phantom.params["PD"], fields.b1)


def pad_to(a: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad the first two axes of ``a`` at their ends to multiples of ``multiple``."""
    pads = [(0, (-n) % multiple) for n in a.shape[:2]] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pads)


def _kept_slices(pair: PairVolume, min_brain: int) -> list[int]:
    return [z for z in range(pair.brain.shape[2]) if pair.brain[..., z].sum() >= min_brain]


def long_t2_weights(pair: PairVolume, multiple: int, weight: float, long_t2_s: float, min_brain: int = 20):
    """Per-voxel loss weights ``[S, H, W]`` (float32) of the slices ``slices_of`` keeps: ``weight``
    where the ground-truth T2 is at least ``long_t2_s`` (CSF-rich voxels: T2 is rate-mixed, so
    0.2 s is about half CSF, half GM), 1 elsewhere (padding included; the mask removes it)."""
    keep = _kept_slices(pair, min_brain)
    t2 = pad_to(np.asarray(pair.t2)[..., keep], multiple)
    w = np.where(t2 >= long_t2_s, np.float32(weight), np.float32(1.0)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(w.transpose(2, 0, 1)))


def slices_of(pair: PairVolume, multiple: int, min_brain: int = 20):
    """Axial slices with at least ``min_brain`` brain voxels: ``(x [S, 1, H, W], y [S, 7, H, W], mask [S, H, W])``."""
    keep = _kept_slices(pair, min_brain)
    x = pad_to(pair.mprage[..., keep], multiple)  # [H, W, S]
    y = pad_to(pair.target[:, :, keep], multiple)  # [H, W, S, 7]
    b = pad_to(pair.brain[..., keep], multiple)
    return (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[:, None])),
            torch.from_numpy(np.ascontiguousarray(y.transpose(2, 3, 0, 1))),
            torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1))))
