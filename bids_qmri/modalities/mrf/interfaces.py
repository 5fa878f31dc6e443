"""Nipype interface of the MRF workflow: load the part pair (frames or SVD coefficients) into one
complex series with the receiver phase removed, its basis, and the reference image. Nothing here
writes into the output directory."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits


def remove_receiver_phase(signal: np.ndarray) -> np.ndarray:
    """``s · exp(−i arg Σ_k s_k)`` per voxel (SPEC §6): for coefficients of a basis whose first
    vector is the mean fingerprint's direction this makes the first coefficient ≈ real positive."""
    total = signal.sum(axis=-1, keepdims=True)
    mag = np.abs(total)
    phase = np.where(mag > 0, np.conj(total) / np.where(mag > 0, mag, 1), 1)
    return (signal * phase).astype(np.complex64)


def reference_image(signal: np.ndarray) -> np.ndarray:
    """RMS magnitude over the frames (or ‖c‖ over orthonormal-basis coefficients: the same up to √Nt)."""
    return np.sqrt(np.mean(np.abs(signal) ** 2, axis=-1)).astype(np.float32)


class _LoadInputSpec(BaseInterfaceInputSpec):
    part_files = traits.Dict(traits.Str, File(exists=True), mandatory=True, desc="part -> 4D image")
    basis_file = File(exists=True, desc="SVD basis TSV (coefficient input)")
    n_frames = traits.Int(mandatory=True, desc="frames of the schedule")


class _LoadOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="complex64 [X, Y, Z, K], receiver phase removed")
    ref_image = File(exists=True, desc="RMS magnitude")
    basis = File(desc="complex basis [Nt, R] as a NIfTI (coefficient input only)")
    note = traits.Str(desc="how the parts were combined")


class LoadFingerprints(SimpleInterface):
    """Part pair → complex series; coefficients are checked against their basis table."""

    input_spec = _LoadInputSpec
    output_spec = _LoadOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.bids.basis import read_basis_tsv
        from bids_qmri.errors import InputError
        from bids_qmri.preproc.complexdata import load_complex

        parts = {k: Path(v) for k, v in self.inputs.part_files.items()}
        data, affine, _, note = load_complex(parts)
        first = next(iter(parts.values()))
        k = data.shape[-1]
        if isdefined(self.inputs.basis_file) and self.inputs.basis_file:
            try:
                basis = read_basis_tsv(self.inputs.basis_file).numpy()
            except ValueError as exc:
                raise InputError(self.inputs.basis_file, str(exc).split(": ", 1)[-1], "fix the basis table") from exc
            if basis.shape != (self.inputs.n_frames, k):
                raise InputError(self.inputs.basis_file,
                                 f"basis is {basis.shape[0]} frames x rank {basis.shape[1]} but the data have {k} "
                                 f"coefficients and the schedule {self.inputs.n_frames} frames",
                                 "use the basis the coefficients were computed with")
            out_basis = Path(runtime.cwd) / "basis.nii.gz"
            img = nib.Nifti1Image(basis.astype(np.complex64)[:, :, None], np.eye(4))
            img.header.set_data_dtype(np.complex64)
            nib.save(img, str(out_basis))
            self._results["basis"] = str(out_basis)
        elif k != self.inputs.n_frames:
            raise InputError(first, f"{k} frames but the sidecar schedule has {self.inputs.n_frames}",
                             "FlipAngle and RepetitionTimeExcitation need one value per frame")
        data = remove_receiver_phase(data)
        out = Path(runtime.cwd) / "fingerprints.nii.gz"
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.complex64)
        nib.save(img, str(out))
        ref = Path(runtime.cwd) / "fingerprints_ref.nii.gz"
        nib.save(nib.Nifti1Image(reference_image(data), affine), str(ref))
        self._results.update(out_file=str(out), ref_image=str(ref), note=note)
        return runtime
