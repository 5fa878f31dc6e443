"""Nipype interfaces of the pc-bSSFP preprocessing: thin wrappers over ``bids_qmri.preproc``.

Intermediate images live in each node's directory of the work dir (nipype caches them);
complex series are stored as complex64 NIfTI there. Nothing here writes into the output
directory: the shared ``interfaces.reference`` and ``interfaces.maps`` nodes do.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


LOGGER = logging.getLogger("bids_qmri.modalities.bssfp.interfaces")


# --------------------------------------------------------------------------- load
class _LoadBSSFPInputSpec(BaseInterfaceInputSpec):
    part_files = traits.Dict(traits.Str, traits.Str, mandatory=True, desc="part -> path")
    n_cycles = traits.Int(mandatory=True, desc="number of PhaseIncrements")


class _LoadBSSFPOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="complex64 [X, Y, Z, Npc]")
    note = traits.Str(desc="how the pair was combined")


class LoadBSSFP(SimpleInterface):
    """Part pair (mag/phase or real/imag) → one complex series."""

    input_spec = _LoadBSSFPInputSpec
    output_spec = _LoadBSSFPOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc.complexdata import load_complex, save_complex

        data, affine, _, note = load_complex({k: Path(v) for k, v in self.inputs.part_files.items()},
                                             self.inputs.n_cycles)
        out = Path(runtime.cwd) / "bssfp_complex.nii.gz"
        save_complex(out, data, affine)
        self._results.update(out_file=str(out), note=note)
        return runtime


# ----------------------------------------------------------------------- denoise
class _DenoiseInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="complex series [X, Y, Z, Npc]")
    method = traits.Enum("mppca", "none", usedefault=True)


class _DenoiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="denoised complex series")
    info = traits.Dict(desc="provenance for the sidecars")
    sidecar_info = traits.Dict(desc="{'Denoising': info}, for the maps' sidecars")


class DenoiseBSSFP(SimpleInterface):
    """MP-PCA of the raw complex phase cycles (``preproc.denoise``), before motion correction."""

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc.complexdata import load_nifti, save_complex
        from bids_qmri.preproc.denoise import denoise_series

        data, affine, _ = load_nifti(self.inputs.in_file)
        denoised, info = denoise_series(data, self.inputs.method)
        out = save_complex(Path(runtime.cwd) / "bssfp_denoised.nii.gz", denoised, affine)
        self._results.update(out_file=str(out), info=info, sidecar_info={"Denoising": info})
        return runtime


# ------------------------------------------------------------------------ motion
class _MotionCorrectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _MotionCorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected complex series")
    ref_image = File(exists=True, desc="mean magnitude over the corrected phase cycles")
    motion_file = File(exists=True, desc="per-cycle rigid parameters (TSV)")
    ref_index = traits.Int(desc="0-based index of the reference cycle")
    failed = traits.List(traits.Int, desc="cycles whose registration failed (left uncorrected)")


class MotionCorrect(SimpleInterface):
    """Rigid registration of each cycle's magnitude to the (Npc/2)-th cycle, applied to the
    real and imaginary parts."""

    input_spec = _MotionCorrectInputSpec
    output_spec = _MotionCorrectOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc.complexdata import load_nifti, save_complex
        from bids_qmri.preproc.motion import motion_correct, reference_index

        data, affine, zooms = load_nifti(self.inputs.in_file)
        reg_dir = Path(runtime.cwd) / "registration"
        reg_dir.mkdir(exist_ok=True)
        ref = reference_index(data.shape[-1])
        corrected, table = motion_correct(data, zooms, ref_index=ref, seed=self.inputs.seed, workdir=reg_dir,
                                          num_threads=self.inputs.num_threads)
        out = save_complex(Path(runtime.cwd) / "bssfp_moco.nii.gz", corrected, affine)
        mean_mag = np.abs(corrected).mean(axis=-1).astype(np.float32)
        ref_file = Path(runtime.cwd) / "bssfp_ref.nii.gz"
        nib.save(nib.Nifti1Image(mean_mag, affine), str(ref_file))
        table = table.round(6)  # µm and µrad: beyond any registration's precision
        table.insert(0, "phase_cycle", np.arange(1, len(table) + 1))
        motion_file = Path(runtime.cwd) / "motion.tsv"
        table.to_csv(motion_file, sep="\t", index=False, na_rep="n/a")
        failed = [int(i) for i in np.flatnonzero(table["trans_x"].isna().to_numpy())]
        self._results.update(out_file=str(out), ref_image=str(ref_file), motion_file=str(motion_file),
                             ref_index=ref, failed=failed)
        return runtime


# ---------------------------------------------------------------- configurations
class _ConfigurationsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    phase_increments = traits.List(traits.Float, mandatory=True, desc="degrees, one per cycle")
    gibbs_removal = traits.Bool(True, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _ConfigurationsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="complex64 [X, Y, Z, 3]: F-1, F0, F1")
    f0_magnitude = File(exists=True, desc="|F0| (the magnitude image beside the fieldmaps)")


class BSSFPConfigurations(SimpleInterface):
    """Receiver-phase removal, DFT to F-1/F0/F1 and optional Gibbs-ringing removal."""

    input_spec = _ConfigurationsInputSpec
    output_spec = _ConfigurationsOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc.complexdata import load_nifti, save_complex
        from bids_qmri.preproc.configurations import compute_configurations, remove_gibbs

        data, affine, zooms = load_nifti(self.inputs.in_file)
        F = compute_configurations(data, self.inputs.phase_increments)
        if self.inputs.gibbs_removal:
            # One process: dipy would start a multiprocessing pool inside a nipype worker.
            F = remove_gibbs(F, zooms, num_processes=1)
        out = save_complex(Path(runtime.cwd) / "bssfp_configurations.nii.gz", F, affine)
        f0 = Path(runtime.cwd) / "bssfp_f0_magnitude.nii.gz"
        nib.save(nib.Nifti1Image(np.abs(F[..., 1]).astype(np.float32), affine), str(f0))
        self._results.update(out_file=str(out), f0_magnitude=str(f0))
        return runtime


