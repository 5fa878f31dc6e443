"""Nipype interfaces of the relaxometry series: stack the 3D files into one series and correct
the motion between them. Thin wrappers over ``bids_qmri.preproc``; nothing here writes into the
output directory (the shared ``interfaces.reference`` and ``interfaces.maps`` nodes do)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits


class _LoadSeriesInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="3D magnitude images, in time order")


class _LoadSeriesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="float32 [X, Y, Z, N]")


class LoadSeries(SimpleInterface):
    """One 4D series from the files of an IRT1 or MESE acquisition (same grid, checked in discovery)."""

    input_spec = _LoadSeriesInputSpec
    output_spec = _LoadSeriesOutputSpec

    def _run_interface(self, runtime):
        images = [nib.load(p) for p in self.inputs.in_files]
        data = np.stack([np.asarray(img.dataobj, dtype=np.float32) for img in images], axis=-1)
        out = Path(runtime.cwd) / "series.nii.gz"
        nib.save(nib.Nifti1Image(data, images[0].affine), str(out))
        self._results["out_file"] = str(out)
        return runtime


class _MotionInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="magnitude series [X, Y, Z, N]")
    ref_index = traits.Int(mandatory=True, desc="0-based reference volume")
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="volumes registered at once")
    enabled = traits.Bool(True, usedefault=True)
    mask_volume = traits.Int(-1, usedefault=True,
                             desc="0-based corrected volume written as mask_image; -1: the mean over the volumes")


class _MotionOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected series")
    ref_image = File(exists=True, desc="mean over the corrected volumes")
    mask_image = File(exists=True, desc="the image to compute the brain mask from (mask_volume)")
    motion_file = File(exists=True, desc="per-volume rigid parameters (TSV)")
    failed = traits.List(traits.Int, desc="volumes whose registration failed (left uncorrected)")


class MotionCorrectSeries(SimpleInterface):
    """Rigid registration (ANTs, Mattes MI) of every volume to the reference volume; the
    magnitudes are resampled with a windowed sinc and clipped at 0 (a magnitude is never
    negative). Mutual information copes with the contrast changing from volume to volume."""

    input_spec = _MotionInputSpec
    output_spec = _MotionOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from bids_qmri.preproc.complexdata import load_nifti
        from bids_qmri.preproc.motion import MOTION_COLUMNS, motion_correct

        data, affine, zooms = load_nifti(self.inputs.in_file)
        data = np.asarray(data, dtype=np.float32)
        n = data.shape[-1]
        if self.inputs.enabled:
            reg_dir = Path(runtime.cwd) / "registration"
            reg_dir.mkdir(exist_ok=True)
            moved, table = motion_correct(data.astype(np.complex64), zooms, ref_index=self.inputs.ref_index,
                                          seed=self.inputs.seed, workdir=reg_dir, num_threads=self.inputs.num_threads)
            corrected = np.clip(moved.real, 0.0, None).astype(np.float32)
        else:
            corrected = data
            table = pd.DataFrame(0.0, index=range(n), columns=list(MOTION_COLUMNS) + ["framewise_displacement"])
        out = Path(runtime.cwd) / "series_moco.nii.gz"
        nib.save(nib.Nifti1Image(corrected, affine), str(out))
        ref_file = Path(runtime.cwd) / "series_ref.nii.gz"
        nib.save(nib.Nifti1Image(corrected.mean(axis=-1).astype(np.float32), affine), str(ref_file))
        mask_file = ref_file
        if self.inputs.mask_volume >= 0:
            mask_file = Path(runtime.cwd) / "series_mask_image.nii.gz"
            nib.save(nib.Nifti1Image(corrected[..., self.inputs.mask_volume].astype(np.float32), affine),
                     str(mask_file))
        table = table.round(6)
        table.insert(0, "volume", np.arange(1, len(table) + 1))
        motion_file = Path(runtime.cwd) / "motion.tsv"
        table.to_csv(motion_file, sep="\t", index=False, na_rep="n/a")
        failed = [int(i) for i in np.flatnonzero(table["trans_x"].isna().to_numpy())]
        self._results.update(out_file=str(out), ref_image=str(ref_file), mask_image=str(mask_file),
                             motion_file=str(motion_file), failed=failed)
        return runtime


class _BackgroundInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="brain (object) mask of the series")
    margin_mm = traits.Float(10.0, usedefault=True)


class _BackgroundOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="voxels far from the head: pure noise, for σ")


class BackgroundMask(SimpleInterface):
    """Voxels at least ``margin_mm`` from the mask: where a magnitude image holds only noise
    (Rayleigh distributed), from which the noise σ of the Rician likelihood is estimated."""

    input_spec = _BackgroundInputSpec
    output_spec = _BackgroundOutputSpec

    def _run_interface(self, runtime):
        from scipy import ndimage

        img = nib.load(self.inputs.mask_file)
        mask = np.asarray(img.dataobj) > 0
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
        distance = ndimage.distance_transform_edt(~mask, sampling=zooms)
        background = distance >= self.inputs.margin_mm
        # the edges of the field of view often hold wrap-around or zero-filled voxels
        background[[0, -1], :, :] = background[:, [0, -1], :] = background[:, :, [0, -1]] = False
        out = Path(runtime.cwd) / "background_mask.nii.gz"
        nib.save(nib.Nifti1Image(background.astype(np.uint8), img.affine), str(out))
        self._results["out_file"] = str(out)
        return runtime
