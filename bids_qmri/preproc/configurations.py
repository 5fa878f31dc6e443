"""SSFP configurations from motion-corrected phase cycles (SPEC §6) and Gibbs-ringing removal.

Receiver-phase removal and the DFT are the physics layer's (``bids_qmri.physics.bssfp``): one
implementation serves simulation, training and data. Here we only stream voxels through it.
"""

from __future__ import annotations

import numpy as np
import torch

from bids_qmri.physics import bssfp as bssfp_physics

ORDERS = (-1, 0, 1)
_CHUNK = 1 << 18  # voxels per batch: bounds memory at high resolution


def compute_configurations(data: np.ndarray, phase_increments_deg) -> np.ndarray:
    """Complex ``[..., Npc]`` phase cycles → complex ``[..., 3]`` configurations F−1, F0, F1
    after removal of the constant receiver phase, using the actual PhaseIncrements."""
    data = np.asarray(data)
    increments = torch.as_tensor(np.deg2rad(np.asarray(phase_increments_deg, dtype=np.float64)))
    if data.shape[-1] != increments.numel():
        raise ValueError(f"{data.shape[-1]} phase cycles but {increments.numel()} phase increments")
    flat = data.reshape(-1, data.shape[-1])
    out = np.empty((flat.shape[0], len(ORDERS)), dtype=np.complex64)
    for start in range(0, flat.shape[0], _CHUNK):
        signal = torch.from_numpy(flat[start : start + _CHUNK].astype(np.complex128))
        signal = bssfp_physics.remove_receiver_phase(signal)
        F = bssfp_physics.configurations(signal, increments, orders=ORDERS)
        out[start : start + _CHUNK] = F.numpy()
    return out.reshape(*data.shape[:-1], len(ORDERS))


def gibbs_slice_axis(zooms) -> int:
    """Axis across which ringing is not corrected: the thickest one (2 when isotropic)."""
    zooms = np.asarray(zooms, dtype=float)[:3]
    return int(np.argmax(zooms)) if np.ptp(zooms) > 1e-3 * zooms.max() else 2


def remove_gibbs(F: np.ndarray, zooms, *, num_processes: int = 1) -> np.ndarray:
    """Gibbs-ringing removal (Kellner subvoxel shifts, dipy) of the real and imaginary parts of
    complex 3D volumes ``[X, Y, Z, K]`` (seed 001 applies it to the configurations).

    dipy's implementation is written for magnitude images (it takes the modulus of every shifted
    image); the channels are lifted to positive values first (``complexdata.lifted_channels``).
    """
    from dipy.denoise.gibbs import gibbs_removal

    from bids_qmri.preproc.complexdata import complex_from_lifted, lifted_channels

    stacked, offsets = lifted_channels(F)
    cleaned = gibbs_removal(stacked, slice_axis=gibbs_slice_axis(zooms), n_points=3, inplace=False,
                            num_processes=num_processes)
    return complex_from_lifted(cleaned, offsets)
