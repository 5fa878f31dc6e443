"""What every modality's workflow writes besides its maps: the reference image, its brain mask,
the per-volume motion table and the B1 map as used (all through ``bids.derivatives``).

The reference image is ``..._acq-<label>_desc-ref_<suffix>.nii.gz`` (``suffix``: the modality's
``ref_suffix``); the ROI workflow registers it to the T1w and names the transform after it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from .maps import bids_sources, entities


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="mean magnitude")


class _BrainMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class BrainMask(SimpleInterface):
    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc.complexdata import load_nifti
        from bids_qmri.preproc.mask import brain_mask

        image, affine, zooms = load_nifti(self.inputs.in_file)
        mask = brain_mask(image, zooms)
        out = Path(runtime.cwd) / "brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(out))
        self._results["out_file"] = str(out)
        return runtime



# ------------------------------------------------------------------- derivatives
class _ReferenceDerivativesInputSpec(BaseInterfaceInputSpec):
    suffix = traits.Str(mandatory=True, desc="the modality's reference suffix (desc-ref_<suffix>)")
    title = traits.Str(mandatory=True, desc="the modality, for people (descriptions)")
    ref_image = File(exists=True, mandatory=True)
    ref_description = traits.Str(mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    b1_file = File(exists=True)
    b1_info = traits.Dict()
    b1_sources = traits.List(traits.Str)
    motion_file = File(exists=True, desc="per-volume rigid parameters (TSV, first column: volume_column)")
    motion_failed = traits.List(traits.Int)
    ref_index = traits.Int(desc="0-based reference volume of the motion correction")
    volume_column = traits.Str("volume", usedefault=True)
    volume_description = traits.Str("volume number, 1-based", usedefault=True)
    motion_description = traits.Str("")
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str()
    acq = traits.Str()
    sources = traits.List(traits.Str)
    protocol = traits.Dict()


class _ReferenceDerivativesOutputSpec(TraitedSpec):
    ref_image = File(exists=True)
    brain_mask = File(exists=True)
    b1_map = File()
    motion_tsv = File()


class ReferenceDerivatives(SimpleInterface):
    """Writes the reference image, brain mask, motion parameters and the B1 map as used."""

    input_spec = _ReferenceDerivativesInputSpec
    output_spec = _ReferenceDerivativesOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from bids_qmri.bids.derivatives import derivative_path, save_json, save_nifti, save_tsv, sidecar_path

        ent = entities(self.inputs)
        out_dir = self.inputs.output_dir
        suffix = self.inputs.suffix
        sources = bids_sources(self.inputs.bids_dir, self.inputs.sources)
        ref = nib.load(self.inputs.ref_image)
        ref_path = derivative_path(out_dir, suffix=suffix, desc="ref", **ent)
        save_nifti(ref_path, np.asarray(ref.dataobj, dtype=np.float32), ref.affine, sidecar={
            "Description": self.inputs.ref_description,
            "Sources": sources, "SkullStripped": False, **self.inputs.protocol})
        mask = nib.load(self.inputs.mask_file)
        mask_path = derivative_path(out_dir, suffix="mask", desc="brain", **ent)
        save_nifti(mask_path, (np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine, sidecar={
            "Description": f"brain mask of the {self.inputs.title} reference image (Otsu threshold of the smoothed "
                           "square-root magnitude, largest component, closing, hole filling)",
            "Type": "Brain", "Sources": [f"bids::{ref_path.relative_to(out_dir).as_posix()}"]})
        self._results.update(ref_image=str(ref_path), brain_mask=str(mask_path))
        if isdefined(self.inputs.motion_file):
            self._results["motion_tsv"] = str(self._write_motion(ent, sources, derivative_path, save_tsv, save_json,
                                                                 sidecar_path, pd))
        if isdefined(self.inputs.b1_file) and self.inputs.b1_sources:
            b1 = nib.load(self.inputs.b1_file)
            b1_path = derivative_path(out_dir, datatype="fmap", suffix="TB1map", desc=suffix.lower(), **ent)
            save_nifti(b1_path, np.asarray(b1.dataobj, dtype=np.float32), b1.affine, sidecar={
                "Description": f"B1+ ratio (actual / nominal flip angle) as used by the {self.inputs.title} mapping: "
                               "converted, registered to the reference image, resampled onto its grid and "
                               "3D median filtered inside the brain mask",
                "Units": "1", "SkullStripped": True,
                "Sources": bids_sources(self.inputs.bids_dir, self.inputs.b1_sources),
                **self.inputs.b1_info})
            self._results["b1_map"] = str(b1_path)
        return runtime

    def _write_motion(self, ent, sources, derivative_path, save_tsv, save_json, sidecar_path, pd) -> Path:
        table = pd.read_csv(self.inputs.motion_file, sep="\t")
        motion_path = derivative_path(self.inputs.output_dir, suffix=self.inputs.suffix, desc="motion",
                                      extension=".tsv", **ent)
        save_tsv(motion_path, table)
        columns = {
            self.inputs.volume_column: {"Description": self.inputs.volume_description},
            "framewise_displacement": {"Description": "sum of |Δtranslation| and 50 mm × |Δrotation| "
                                                      "between consecutive volumes", "Units": "mm"},
        }
        for axis in "xyz":
            columns[f"trans_{axis}"] = {"Description": f"displacement of the image centre along the image {axis} "
                                                       "axis relative to the reference volume", "Units": "mm"}
            columns[f"rot_{axis}"] = {"Description": f"rotation about the image {axis} axis relative to the "
                                                     "reference volume (R = Rz Ry Rx)", "Units": "rad"}
        meta = {**columns, "Description": self.inputs.motion_description,
                "ReferenceVolume": int(self.inputs.ref_index) + 1, "Sources": sources}
        if isdefined(self.inputs.motion_failed) and self.inputs.motion_failed:
            meta["RegistrationFailed"] = [int(i) + 1 for i in self.inputs.motion_failed]
        save_json(sidecar_path(motion_path), meta)
        return motion_path
