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


def fit_voxels(t1: np.ndarray, mask: np.ndarray, n: int = 4) -> list[tuple[int, int, int]]:
    """``n`` voxels of the mask at evenly spaced quantiles (10–90 %) of the estimated T1."""
    idx = np.argwhere(mask & np.isfinite(t1) & (t1 > 0))
    if len(idx) == 0:
        return []
    values = t1[tuple(idx.T)]
    order = np.argsort(values, kind="stable")
    picks = np.linspace(0.1, 0.9, n) * (len(order) - 1)
    return [tuple(int(v) for v in idx[order[int(round(p))]]) for p in picks]


def fingerprint_fit_figure(out_png: Path, signal: np.ndarray, basis: np.ndarray | None, maps: dict, b1: np.ndarray,
                           mask: np.ndarray, protocol, title: str = "") -> Path | None:
    """Measured vs fitted fingerprints (|frames|) at a few voxels: the data (expanded from the
    coefficients with the basis when given) against ``M0 · fisp_mrf(T1, T2, B1)`` of the maps,
    both with the receiver phase removed. Written atomically; None when no voxel was estimated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from bids_qmri.physics import epg
    from bids_qmri.utils.atomic import atomic_path

    voxels = fit_voxels(np.asarray(maps["T1map"]), mask)
    if not voxels:
        return None
    schedule = protocol.schedule()
    fig, axes = plt.subplots(len(voxels), 1, figsize=(8, 1.7 * len(voxels)), sharex=True, squeeze=False)
    for ax, v in zip(axes[:, 0], voxels):
        s = np.asarray(signal[v], dtype=np.complex128)
        frames = s @ np.asarray(basis).conj().T if basis is not None else s
        t1, t2, m0 = (float(maps[k][v]) for k in ("T1map", "T2map", "M0map"))
        b = float(b1[v]) if np.isfinite(b1[v]) and b1[v] > 0 else 1.0
        model = epg.fisp_mrf(torch.tensor(t1, dtype=torch.float64), torch.tensor(t2, dtype=torch.float64),
                             torch.tensor(b, dtype=torch.float64), **schedule).numpy()
        if basis is not None:  # the model as the data see it: projected on the basis
            model = (model @ np.asarray(basis)) @ np.asarray(basis).conj().T
        scale = np.vdot(model, frames) / max(np.vdot(model, model).real, 1e-30)
        ax.plot(np.abs(frames), lw=2.0, color="0.75", label="data")
        ax.plot(np.abs(scale * model), lw=0.9, color="C3", label="fit")
        ax.set_ylabel("|signal|", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_title(f"voxel {v}: T1 {1e3 * t1:.0f} ms, T2 {1e3 * t2:.0f} ms, B1 {b:.2f}, M0 {m0:.3g}", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("frame", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return out_png


class _FitFigureInputSpec(BaseInterfaceInputSpec):
    maps = traits.List(File(exists=True), mandatory=True, desc="written maps of one method")
    signal = File(exists=True, mandatory=True)
    basis = File(desc="basis NIfTI (coefficient input)")
    b1 = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    protocol = traits.Dict(mandatory=True)
    output_dir = traits.Str(mandatory=True)


class _FitFigureOutputSpec(TraitedSpec):
    out_file = traits.Str(desc="the figure (empty if none)")


class FingerprintFitFigure(SimpleInterface):
    """``sub-X/figures/<map stem>_fingerprints.png`` for the report (``report_figures``)."""

    input_spec = _FitFigureInputSpec
    output_spec = _FitFigureOutputSpec

    def _run_interface(self, runtime):
        from .protocol import MRFProtocol

        paths = {Path(p).name.split("_desc-")[1].split("_")[1].split(".")[0]: Path(p) for p in self.inputs.maps}
        if not {"T1map", "T2map", "M0map"} <= set(paths):
            self._results["out_file"] = ""
            return runtime
        maps = {k: np.asanyarray(nib.load(p).dataobj) for k, p in paths.items()}
        maps = {k: np.where(v > 0, v, np.nan) for k, v in maps.items()}
        basis = (np.asanyarray(nib.load(self.inputs.basis).dataobj)[:, :, 0]
                 if isdefined(self.inputs.basis) and self.inputs.basis else None)
        t1_path = paths["T1map"]
        sub_dir = Path(self.inputs.output_dir) / t1_path.parent.relative_to(self.inputs.output_dir).parts[0]
        out = sub_dir / "figures" / t1_path.name.replace("_T1map.nii.gz", "_fingerprints.png")
        png = fingerprint_fit_figure(out, np.asanyarray(nib.load(self.inputs.signal).dataobj), basis, maps,
                                     np.asanyarray(nib.load(self.inputs.b1).dataobj),
                                     np.asanyarray(nib.load(self.inputs.mask_file).dataobj) > 0,
                                     MRFProtocol.from_dict(dict(self.inputs.protocol)),
                                     title=t1_path.name.replace("_T1map.nii.gz", ""))
        self._results["out_file"] = str(png or "")
        return runtime
