"""Nipype interfaces of the pc-bSSFP workflow: thin wrappers over ``bids_qmri.preproc``,
``bids_qmri.fitting.bssfp.estimate_bssfp`` and the derivatives writer.

Intermediate images live in each node's directory of the work dir (nipype caches them);
complex series are stored as complex64 NIfTI there. Only ``BSSFPDerivatives`` and
``EstimateBSSFP`` write into the output directory, always through ``bids.derivatives``.
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
    isdefined,
    traits,
)


LOGGER = logging.getLogger("bids_qmri.interfaces.bssfp")

# The preprocessing (motion correction, receiver phase, configurations, B1 handling) follows
# the seed papers; each method's own reference comes from ``estimate_bssfp``'s provenance.
PREPROCESSING_REFERENCE = (
    "Birk F, Mahler L, Steiglechner J, Wang Q, Scheffler K, Heule R. Flexible and cost-effective "
    "deep learning for fast multi-parametric relaxometry using phase-cycled bSSFP. Sci Rep 15:4825 "
    "(2025) doi:10.1038/s41598-025-88579-z; preprint doi:10.21203/rs.3.rs-4049684/v1"
)
MAP_UNITS = {"T1map": "s", "T2map": "s", "fieldmap": "Hz"}


def _entities(inputs) -> dict:
    ent = {"subject": inputs.subject}
    if isdefined(inputs.session) and inputs.session:
        ent["session"] = inputs.session
    if isdefined(inputs.acq) and inputs.acq:
        ent["acq"] = inputs.acq
    return ent


def _bids_sources(bids_dir: str, paths) -> list[str]:
    from bids_qmri.bids.derivatives import bids_uri

    return [bids_uri(bids_dir, p) for p in paths]


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
        self._results.update(out_file=str(out), info=info)
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
        corrected, table = motion_correct(data, zooms, ref_index=ref, seed=self.inputs.seed, workdir=reg_dir)
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
        self._results["out_file"] = str(out)
        return runtime


# ------------------------------------------------------------------------- mask
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


# --------------------------------------------------------------------------- B1
class _PrepareB1InputSpec(BaseInterfaceInputSpec):
    kind = traits.Str("", usedefault=True, desc="TB1map | TB1TFL | TB1DAM, empty: no B1 input")
    files = traits.Dict(traits.Str, traits.Str, desc="role -> path (B1Input.files)")
    metadata = traits.Dict(traits.Str, traits.Any, desc="role -> sidecar (B1Input.metadata)")
    prep_angle_deg = traits.Float(80.0, usedefault=True)
    ref_image = File(exists=True, mandatory=True, desc="bSSFP mean magnitude (target grid)")
    mask_file = File(exists=True, mandatory=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _PrepareB1OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="B1 ratio on the bSSFP grid (0 outside the mask)")
    info = traits.Dict(desc="B1 provenance for the sidecars")
    sources = traits.List(traits.Str, desc="B1 input files")


class PrepareB1(SimpleInterface):
    """B1 → ratio, rigid registration to the bSSFP reference, resampling, 3D median filter.
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
        reg_note = ("rigid (ANTs, Mattes MI) of the B1 reference image to the bSSFP mean magnitude"
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
            warning = f"{kind} map covers no voxel of the bSSFP brain mask: B1 = 1 assumed"
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


# --------------------------------------------------------------------- estimate
class _EstimateInputSpec(BaseInterfaceInputSpec):
    method = traits.Str(mandatory=True)
    config_file = File(exists=True, mandatory=True, desc="complex configurations [X, Y, Z, 3]")
    b1_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    protocol = traits.Dict(mandatory=True, desc="BSSFPProtocol.as_dict()")
    model_dir = traits.Str(mandatory=True)
    seed = traits.Int(0, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str()
    acq = traits.Str()
    sources = traits.List(traits.Str, desc="raw input files (bSSFP parts and B1)")
    b1_info = traits.Dict()
    preproc_info = traits.Dict(desc="motion, receiver phase and Gibbs notes")
    denoise_info = traits.Dict(desc="DenoiseBSSFP provenance")


class _EstimateOutputSpec(TraitedSpec):
    out_maps = traits.List(File(exists=True))
    provenance = traits.Dict()


class EstimateBSSFP(SimpleInterface):
    """One mapping method on the masked voxels; writes T1map, T2map (s) and, for complex
    networks, the off-resonance ``fieldmap`` (Hz) with full sidecars."""

    input_spec = _EstimateInputSpec
    output_spec = _EstimateOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_qmri.bids.derivatives import derivative_path, map_sidecar, save_nifti
        from bids_qmri.fitting.bssfp import estimate_bssfp
        from bids_qmri.physics.bssfp import BSSFPProtocol

        torch.set_num_threads(max(1, self.inputs.num_threads))
        cfg_img = nib.load(self.inputs.config_file)
        F_vol = np.asanyarray(cfg_img.dataobj)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        b1 = np.asarray(nib.load(self.inputs.b1_file).dataobj, dtype=np.float64)
        p = self.inputs.protocol
        protocol = BSSFPProtocol(float(p["RepetitionTimeExcitation"]), float(p["EchoTime"]),
                                 float(p["FlipAngle"]), tuple(p["PhaseIncrements"]))
        F = F_vol[mask].astype(np.complex128)
        method = self.inputs.method
        maps, provenance = estimate_bssfp(method, F, b1[mask], protocol, model_dir=Path(self.inputs.model_dir),
                                          seed=self.inputs.seed, allow_training=True)
        sources = _bids_sources(self.inputs.bids_dir, self.inputs.sources)
        ent = _entities(self.inputs)
        acquisition = {**p, "NumberOfPhaseCycles": protocol.npc}
        # Wall-clock times stay out of the sidecars: outputs are identical for a given --seed.
        extra = _jsonable({k: v for k, v in provenance.items()
                           if k not in {"model_card", "algorithm", "reference", "elapsed_s", "warnings"}})
        # The participant report lists every sidecar's "Warnings" (reports.participant).
        warnings = {"Warnings": list(provenance["warnings"])} if provenance.get("warnings") else {}
        written = []
        for key, values in maps.items():
            suffix = key
            if suffix not in MAP_UNITS:
                LOGGER.warning("%s returned an unknown map %r: not written", method, key)
                continue
            values = np.asarray(values, dtype=np.float32).reshape(-1)
            finite = np.isfinite(values)
            volume = np.zeros(mask.shape, dtype=np.float32)
            volume[mask] = np.where(finite, values, 0.0)  # 0 = not estimated, as outside the mask
            datatype = "fmap" if suffix == "fieldmap" else "anat"
            path = derivative_path(self.inputs.output_dir, datatype=datatype, suffix=suffix, desc=method, **ent)
            sidecar = map_sidecar(
                units=MAP_UNITS[suffix],
                sources=sources,
                algorithm=provenance.get("algorithm", method),
                reference=provenance.get("reference", ""),
                acquisition=acquisition,
                model_card=_jsonable(provenance.get("model_card")),
                skull_stripped=True,
                description=f"{suffix} of the pc-bSSFP series estimated with {method} inside the brain mask "
                            "(0 outside it and where the estimate failed)",
                PreprocessingReference=PREPROCESSING_REFERENCE,
                VoxelsInMask=int(mask.sum()),
                VoxelsNotEstimated=int((~finite).sum()),
                **self.inputs.preproc_info,
                Denoising=self.inputs.denoise_info if isdefined(self.inputs.denoise_info) else {"Method": "none"},
                **self.inputs.b1_info,
                **warnings,
                Provenance=extra,
            )
            save_nifti(path, volume, cfg_img.affine, sidecar=sidecar)
            written.append(str(path))
        if "fieldmap" in maps:
            # BIDS requires a magnitude image beside every fieldmap: the bSSFP reference.
            _write_fieldmap_magnitude(self.inputs, cfg_img.affine)
        self._results.update(out_maps=written, provenance=_jsonable(provenance))
        return runtime


def _write_fieldmap_magnitude(inputs, affine):
    from bids_qmri.bids.derivatives import derivative_path, save_nifti

    ref_file = Path(inputs.config_file)
    F = np.asanyarray(nib.load(str(ref_file)).dataobj)
    magnitude = np.abs(F[..., 1]).astype(np.float32)  # |F0| = mean magnitude-like reference
    path = derivative_path(inputs.output_dir, datatype="fmap", suffix="magnitude", **_entities(inputs))
    save_nifti(path, magnitude, affine, sidecar={
        "Description": "|F0| of the pc-bSSFP series (magnitude of the mean over phase cycles), "
                       "the magnitude image of the off-resonance fieldmaps",
        "SkullStripped": False, "Sources": _bids_sources(inputs.bids_dir, inputs.sources)})


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------- derivatives
class _BSSFPDerivativesInputSpec(BaseInterfaceInputSpec):
    ref_image = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    b1_file = File(exists=True)
    b1_info = traits.Dict()
    b1_sources = traits.List(traits.Str)
    motion_file = File(exists=True, mandatory=True)
    motion_failed = traits.List(traits.Int)
    ref_index = traits.Int(mandatory=True)
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str()
    acq = traits.Str()
    sources = traits.List(traits.Str)
    protocol = traits.Dict()


class _BSSFPDerivativesOutputSpec(TraitedSpec):
    ref_image = File(exists=True)
    brain_mask = File(exists=True)
    b1_map = File()
    motion_tsv = File(exists=True)


class BSSFPDerivatives(SimpleInterface):
    """Writes the reference image, brain mask, motion parameters and the B1 map as used."""

    input_spec = _BSSFPDerivativesInputSpec
    output_spec = _BSSFPDerivativesOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from bids_qmri.bids.derivatives import derivative_path, save_json, save_nifti, save_tsv, sidecar_path

        ent = _entities(self.inputs)
        out_dir = self.inputs.output_dir
        sources = _bids_sources(self.inputs.bids_dir, self.inputs.sources)
        ref = nib.load(self.inputs.ref_image)
        ref_path = derivative_path(out_dir, suffix="bSSFP", desc="ref", **ent)
        save_nifti(ref_path, np.asarray(ref.dataobj, dtype=np.float32), ref.affine, sidecar={
            "Description": "mean magnitude over the motion-corrected phase cycles (bSSFP reference grid)",
            "Sources": sources, "SkullStripped": False, **self.inputs.protocol})
        mask = nib.load(self.inputs.mask_file)
        mask_path = derivative_path(out_dir, suffix="mask", desc="brain", **ent)
        save_nifti(mask_path, (np.asarray(mask.dataobj) > 0).astype(np.uint8), mask.affine, sidecar={
            "Description": "brain mask of the bSSFP mean magnitude (Otsu threshold of the smoothed "
                           "square-root magnitude, largest component, closing, hole filling)",
            "Type": "Brain", "Sources": [f"bids::{ref_path.relative_to(out_dir).as_posix()}"]})
        table = pd.read_csv(self.inputs.motion_file, sep="\t")
        motion_path = derivative_path(out_dir, suffix="bSSFP", desc="motion", extension=".tsv", **ent)
        save_tsv(motion_path, table)
        columns = {
            "phase_cycle": {"Description": "phase cycle (volume) number, 1-based"},
            "framewise_displacement": {"Description": "sum of |Δtranslation| and 50 mm × |Δrotation| "
                                                      "between consecutive phase cycles", "Units": "mm"},
        }
        for axis in "xyz":
            columns[f"trans_{axis}"] = {"Description": f"displacement of the image centre along the image {axis} "
                                                       "axis relative to the reference cycle", "Units": "mm"}
            columns[f"rot_{axis}"] = {"Description": f"rotation about the image {axis} axis relative to the "
                                                     "reference cycle (R = Rz Ry Rx)", "Units": "rad"}
        meta = {**columns,
                "Description": "rigid motion of each phase cycle's magnitude relative to the reference cycle "
                               "(ANTs, Mattes mutual information); transforms applied to the real and "
                               "imaginary parts",
                "ReferencePhaseCycle": int(self.inputs.ref_index) + 1,
                "Sources": sources}
        if isdefined(self.inputs.motion_failed) and self.inputs.motion_failed:
            meta["RegistrationFailed"] = [int(i) + 1 for i in self.inputs.motion_failed]
        save_json(sidecar_path(motion_path), meta)
        self._results.update(ref_image=str(ref_path), brain_mask=str(mask_path), motion_tsv=str(motion_path))
        if isdefined(self.inputs.b1_file) and self.inputs.b1_sources:
            b1 = nib.load(self.inputs.b1_file)
            b1_path = derivative_path(out_dir, datatype="fmap", suffix="TB1map", desc="bssfp", **ent)
            save_nifti(b1_path, np.asarray(b1.dataobj, dtype=np.float32), b1.affine, sidecar={
                "Description": "B1+ ratio (actual / nominal flip angle) as used by the pc-bSSFP mapping: "
                               "converted, registered to the bSSFP reference, resampled onto its grid and "
                               "3D median filtered inside the brain mask",
                "Units": "1", "SkullStripped": True,
                "Sources": _bids_sources(self.inputs.bids_dir, self.inputs.b1_sources),
                **self.inputs.b1_info})
            self._results["b1_map"] = str(b1_path)
        return runtime
