"""Load a pc-bSSFP part pair (mag/phase or real/imag) into one complex 4D series."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_qmri.errors import InputError

LOGGER = logging.getLogger("bids_qmri.preproc.complexdata")

_PAIRS = (("mag", "phase"), ("real", "imag"))


def phase_to_radians(phase: np.ndarray, path: str | Path = "phase image") -> tuple[np.ndarray, str]:
    """Return the phase in radians and how it was read.

    A phase image is either already in radians (range at most 2π, e.g. [−π, π] or [0, 2π]) or
    integer-coded over the full circle (Siemens: 12-bit, −4096…4094 after dcm2niix scaling, or
    0…4095 unsigned); the code range is the next power of two above the observed range, which
    covers both. Anything else is refused rather than guessed.
    """
    finite = phase[np.isfinite(phase)]
    if finite.size == 0:
        raise InputError(path, "phase image has no finite values", "check the phase export")
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo
    if span <= 2 * np.pi * 1.001:
        return np.asarray(phase, dtype=np.float64), "radians"
    integer_coded = np.allclose(finite[:: max(1, finite.size // 100000)], np.round(finite[:: max(1, finite.size // 100000)]))
    if not integer_coded:
        raise InputError(
            path,
            f"phase values span [{lo:g}, {hi:g}], neither radians (range ≤ 2π) nor integer-coded",
            "rescale the phase image to radians",
        )
    full_circle = 2.0 ** np.ceil(np.log2(span + 1.0))
    return np.asarray(phase, dtype=np.float64) * (2 * np.pi / full_circle), f"integer-coded, 2π = {full_circle:g}"


def load_complex(part_files: dict[str, Path], n_cycles: int | None = None) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, str]:
    """Read a part pair into ``complex64 [X, Y, Z, Npc]``; return (data, affine, header, note).

    ``note`` says how the pair was combined (for the sidecars). Shapes, dimensionality, the
    number of phase cycles (if given) and the grids of the two parts are checked.
    """
    keys = next((pair for pair in _PAIRS if set(pair) <= set(part_files)), None)
    if keys is None:
        raise InputError(
            ", ".join(str(p) for p in part_files.values()) or "bSSFP input",
            f"needs a part-mag/part-phase or part-real/part-imag pair, got parts {sorted(part_files)}",
            "provide both parts of one pair",
        )
    imgs = [nib.load(str(part_files[k])) for k in keys]
    first, second = imgs
    if first.shape != second.shape:
        raise InputError(part_files[keys[1]], f"shape {second.shape} differs from {keys[0]} part {first.shape}",
                         "both parts must come from the same reconstruction")
    if len(first.shape) != 4:
        raise InputError(part_files[keys[0]], f"expected a 4D image (last axis = phase cycles), got shape {first.shape}",
                         "stack the phase cycles along the 4th axis")
    if n_cycles is not None and first.shape[3] != n_cycles:
        raise InputError(part_files[keys[0]], f"{first.shape[3]} volumes but {n_cycles} PhaseIncrements in the sidecar",
                         "make PhaseIncrements list one increment per volume")
    if not np.allclose(first.affine, second.affine, atol=1e-3):
        raise InputError(part_files[keys[1]], f"affine differs from the {keys[0]} part",
                         "both parts must share one grid")
    a = np.asarray(first.dataobj, dtype=np.float64)
    b = np.asarray(second.dataobj, dtype=np.float64)
    if keys == ("mag", "phase"):
        phase, how = phase_to_radians(b, part_files["phase"])
        data = np.abs(a) * np.exp(1j * phase)
        note = f"magnitude and phase ({how})"
    else:
        data = a + 1j * b
        note = "real and imaginary parts"
    if not np.all(np.isfinite(data)):
        LOGGER.warning("%s: non-finite values set to 0", part_files[keys[0]])
        data = np.where(np.isfinite(data), data, 0)
    return data.astype(np.complex64), first.affine, first.header, note


def save_complex(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a complex series as a complex64 NIfTI (work-directory intermediate)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.complex64), affine)
    img.header.set_data_dtype(np.complex64)
    nib.save(img, str(path))
    return Path(path)


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(data, affine, zooms of the first three axes) of any NIfTI, complex preserved."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def lifted_channels(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Complex ``[..., K]`` → real float64 ``[..., 2K]`` (real parts, then imaginary parts), each
    channel lifted by a constant offset of twice its largest modulus so that every value is
    positive; returns ``(stacked, offsets)``.

    dipy's Gibbs removal and local-PCA denoising are written for magnitude images (one takes the
    modulus of shifted images, the other clips negative outputs); both are exact under a constant
    shift of a channel, so the offset passes through and :func:`complex_from_lifted` removes it.
    """
    data = np.asarray(data)
    stacked = np.concatenate([data.real, data.imag], axis=-1).astype(np.float64)
    offsets = 2.0 * np.abs(stacked).reshape(-1, stacked.shape[-1]).max(axis=0) + 1e-12
    return stacked + offsets, offsets


def complex_from_lifted(stacked: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`lifted_channels` (complex64)."""
    plain = stacked - offsets
    k = plain.shape[-1] // 2
    return (plain[..., :k] + 1j * plain[..., k:]).astype(np.complex64)
