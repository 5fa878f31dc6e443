"""B1 preparation for any modality: convert the session's B1 input to a ratio, register it to
the modality's reference image, resample onto that grid and median-filter it inside the mask
(``bids_qmri.preproc.b1``). Without a B1 input, B1 = 1 and a warning for the sidecars.
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

LOGGER = logging.getLogger("bids_qmri.interfaces.b1")


class _PrepareB1InputSpec(BaseInterfaceInputSpec):
    kind = traits.Str("", usedefault=True, desc="TB1map | TB1TFL | TB1DAM, empty: no B1 input")
    files = traits.Dict(traits.Str, traits.Str, desc="role -> path (B1Input.files)")
    metadata = traits.Dict(traits.Str, traits.Any, desc="role -> sidecar (B1Input.metadata)")
    prep_angle_deg = traits.Float(80.0, usedefault=True)
    ref_image = File(exists=True, mandatory=True, desc="reference image of the modality (target grid)")
    mask_file = File(exists=True, mandatory=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _PrepareB1OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="B1 ratio on the reference grid (0 outside the mask)")
    info = traits.Dict(desc="B1 provenance for the sidecars")
    sources = traits.List(traits.Str, desc="B1 input files")


class PrepareB1(SimpleInterface):
    """B1 → ratio, rigid registration to the reference image, resampling, 3D median filter.
    Without a B1 input, B1 = 1 inside the mask and a warning for the sidecars."""

    input_spec = _PrepareB1InputSpec
    output_spec = _PrepareB1OutputSpec

    def _run_interface(self, runtime):
        from bids_qmri.preproc import b1 as b1mod

        ref = nib.load(self.inputs.ref_image)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        zooms = tuple(float(z) for z in ref.header.get_zooms()[:3])
        out = Path(runtime.cwd) / "b1_ratio.nii.gz"
        kind = self.inputs.kind
        if not kind:
            warning = ("no B1 map for this acquisition: B1 = 1 assumed everywhere; T1 is biased "
                       "where the actual flip angle differs from the nominal one")
            LOGGER.warning(warning)
            nib.save(nib.Nifti1Image(mask.astype(np.float32), ref.affine), str(out))
            self._results.update(out_file=str(out), sources=[],
                                 info={"B1Source": "none (B1 = 1 assumed)", "B1Warning": warning})
            return runtime
        files = {k: Path(v) for k, v in self.inputs.files.items()}
        ratio_img, b1_ref_img, how = b1mod.convert_b1(kind, files, dict(self.inputs.metadata),
                                                      prep_angle_deg=self.inputs.prep_angle_deg)
        ratio_file = Path(runtime.cwd) / "b1_native_ratio.nii.gz"
        b1_ref_file = Path(runtime.cwd) / "b1_native_reference.nii.gz"
        nib.save(ratio_img, str(ratio_file))
        nib.save(b1_ref_img, str(b1_ref_file))
        # A TB1map has no anatomy of its own: align it by its scanner coordinates only.
        register = kind != "TB1map"
        reg_note = ("rigid (ANTs, Mattes MI) of the B1 reference image to the reference image"
                    if register else "scanner coordinates (TB1map has no anatomical reference)")
        try:
            b1_grid, _ = b1mod.register_b1(ratio_file, b1_ref_file, Path(self.inputs.ref_image),
                                           seed=self.inputs.seed, register=register,
                                           outprefix=str(Path(runtime.cwd) / "b1reg_"))
        except RuntimeError as exc:
            LOGGER.warning("B1 registration failed (%s); aligned by scanner coordinates", exc)
            b1_grid, _ = b1mod.register_b1(ratio_file, b1_ref_file, Path(self.inputs.ref_image), register=False)
            reg_note = "scanner coordinates (rigid registration failed)"
        kernel = b1mod.median_kernel(zooms)
        valid = mask & np.isfinite(b1_grid) & (b1_grid > 0.05)
        info = {"B1Source": kind, "B1Conversion": how, "B1Registration": reg_note,
                "B1MedianFilterKernelVoxels": list(kernel),
                "B1MedianFilterKernelMillimetres": round(b1mod.B1_KERNEL_MM, 3)}
        if not valid.any():
            warning = f"{kind} map covers no voxel of the brain mask: B1 = 1 assumed"
            LOGGER.warning(warning)
            filtered = mask.astype(np.float32)
            info["B1Warning"] = warning
        else:
            filtered = b1mod.median_filter_b1(b1_grid, valid, zooms, out_mask=mask)
            uncovered = float(1 - valid[mask].mean()) if mask.any() else 0.0
            if uncovered > 0.01:
                info["B1Warning"] = (f"{100 * uncovered:.1f} % of the brain mask outside the B1 map's "
                                     "coverage: filled from the nearest covered voxel")
        nib.save(nib.Nifti1Image(filtered.astype(np.float32), ref.affine), str(out))
        self._results.update(out_file=str(out), info=info, sources=[str(p) for p in files.values()])
        return runtime




def init_b1_node(b1, config, num_threads: int, name: str = "b1"):
    """A ``PrepareB1`` node for a modality workflow: the session's ``B1Input`` (or None: B1 = 1)
    with the run's preparation angle, seed and threads; connect ``ref_image`` and ``mask_file``."""
    from nipype.pipeline import engine as pe

    node = pe.Node(PrepareB1(prep_angle_deg=float(config.b1_prep_angle_deg), seed=config.seed,
                             num_threads=num_threads), name=name, n_procs=num_threads)
    if b1 is not None:
        node.inputs.kind = b1.kind
        node.inputs.files = {k: str(v) for k, v in b1.files.items()}
        node.inputs.metadata = {k: dict(v) for k, v in (b1.metadata or {}).items()}
    return node
