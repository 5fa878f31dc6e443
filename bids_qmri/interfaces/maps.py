"""The one interface that estimates and writes quantitative maps, for every modality.

``EstimateMaps`` loads the data volumes a modality's workflow prepared, calls the method's
``estimate()`` (``bids_qmri.modalities``), and writes each map the method declares through the
derivatives writer with its full sidecar: units, sources, algorithm, reference, the acquisition
parameters, the model card, the compute device, the counts, and whatever the workflow adds
(preprocessing notes, B1 provenance, denoising). Values outside the mask, and where the estimate
failed, are written as 0 (the sidecar counts them).
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

LOGGER = logging.getLogger("bids_qmri.interfaces.maps")


def entities(inputs) -> dict:
    """``subject`` [, ``session``, ``acq``] of an interface's inputs, for ``derivative_path``."""
    ent = {"subject": inputs.subject}
    if isdefined(inputs.session) and inputs.session:
        ent["session"] = inputs.session
    if isdefined(inputs.acq) and inputs.acq:
        ent["acq"] = inputs.acq
    return ent


def bids_sources(bids_dir: str, paths) -> list[str]:
    from bids_qmri.bids.derivatives import bids_uri

    return [bids_uri(bids_dir, p) for p in paths]


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _EstimateInputSpec(BaseInterfaceInputSpec):
    modality = traits.Str(mandatory=True, desc="registered modality name")
    method = traits.Str(mandatory=True)
    data_files = traits.Dict(traits.Str, File(exists=True), mandatory=True,
                             desc="role -> NIfTI volume on the mask's grid, as the method's estimate() expects")
    mask_file = File(exists=True, mandatory=True)
    protocol = traits.Dict(mandatory=True, desc="the protocol's as_dict()")
    model_dir = traits.Str(mandatory=True)
    seed = traits.Int(0, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    options = traits.Dict(desc="modality options from the command line")
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    session = traits.Str()
    acq = traits.Str()
    sources = traits.List(traits.Str, desc="raw input files")
    sidecar_info = traits.Dict(desc="fixed sidecar fields from the workflow")
    info = traits.List(traits.Dict, desc="sidecar fields from other nodes (merged in order)")
    fieldmap_magnitude = File(exists=True, desc="magnitude image written beside a fieldmap (BIDS requires one)")
    fieldmap_magnitude_description = traits.Str("")


class _EstimateOutputSpec(TraitedSpec):
    out_maps = traits.List(File(exists=True))
    provenance = traits.Dict()


class EstimateMaps(SimpleInterface):
    """One method of one modality on the masked voxels; writes every map it declares."""

    input_spec = _EstimateInputSpec
    output_spec = _EstimateOutputSpec

    def _run_interface(self, runtime):
        import torch

        from bids_qmri import modalities as registry
        from bids_qmri.bids.derivatives import derivative_path, map_sidecar, save_nifti
        from bids_qmri.modalities.base import EstimateContext

        torch.set_num_threads(max(1, self.inputs.num_threads))
        modality = registry.get(self.inputs.modality)
        method = modality.method(self.inputs.method)
        protocol = modality.protocol_from_dict(dict(self.inputs.protocol))
        mask_img = nib.load(self.inputs.mask_file)
        mask = np.asarray(mask_img.dataobj) > 0
        data = {role: np.asanyarray(nib.load(path).dataobj) for role, path in self.inputs.data_files.items()}
        context = EstimateContext(model_dir=Path(self.inputs.model_dir), seed=self.inputs.seed,
                                  device=self.inputs.device, num_threads=self.inputs.num_threads,
                                  options=dict(self.inputs.options) if isdefined(self.inputs.options) else {})
        maps, provenance = method.estimate(data, mask, protocol, context)

        info = dict(self.inputs.sidecar_info) if isdefined(self.inputs.sidecar_info) else {}
        for extra in (self.inputs.info if isdefined(self.inputs.info) else []):
            info.update(extra or {})
        sources = bids_sources(self.inputs.bids_dir, self.inputs.sources)
        ent = entities(self.inputs)
        # Wall-clock times stay out of the sidecars: outputs are identical for a given --seed.
        settings = jsonable({k: v for k, v in provenance.items()
                             if k not in {"model_card", "algorithm", "reference", "elapsed_s", "warnings", "device"}})
        # The participant report lists every sidecar's "Warnings" (reports.participant).
        warnings = {"Warnings": list(provenance["warnings"])} if provenance.get("warnings") else {}
        written = []
        for suffix, volume in maps.items():
            spec = method.map_spec(suffix)
            if spec is None:
                LOGGER.warning("%s %s returned an undeclared map %r: not written", modality.name, method.name, suffix)
                continue
            values = np.asarray(volume, dtype=np.float32)
            finite = np.isfinite(values) & mask
            out = np.where(finite, values, 0.0).astype(np.float32)  # 0 = not estimated, as outside the mask
            path = derivative_path(self.inputs.output_dir, datatype=spec.datatype, suffix=suffix, desc=method.name,
                                   **ent)
            sidecar = map_sidecar(
                units=spec.units,
                sources=sources,
                algorithm=provenance.get("algorithm", method.algorithm),
                reference=provenance.get("reference", method.reference),
                acquisition=protocol.as_dict(),
                model_card=jsonable(provenance.get("model_card")),
                skull_stripped=True,
                description=f"{suffix} of the {modality.title} series estimated with {method.name} inside the "
                            "brain mask (0 outside it and where the estimate failed)",
                MapDescription=spec.description,
                VoxelsInMask=int(mask.sum()),
                VoxelsNotEstimated=int((mask & ~finite).sum()),
                ComputeDevice=provenance.get("device", self.inputs.device),
                **info,
                **warnings,
                Provenance=settings,
            )
            save_nifti(path, out, mask_img.affine, sidecar=sidecar)
            written.append(str(path))
        if any(method.map_spec(s) and s == "fieldmap" for s in maps) and isdefined(self.inputs.fieldmap_magnitude):
            # BIDS requires a magnitude image beside every fieldmap.
            mag = nib.load(self.inputs.fieldmap_magnitude)
            path = derivative_path(self.inputs.output_dir, datatype="fmap", suffix="magnitude", **ent)
            save_nifti(path, np.asarray(mag.dataobj, dtype=np.float32), mag.affine, sidecar={
                "Description": self.inputs.fieldmap_magnitude_description,
                "SkullStripped": False, "Sources": sources})
        self._results.update(out_maps=written, provenance=jsonable(provenance))
        return runtime


def node_common(item, subject: str, session: str | None, config) -> dict:
    """Inputs every writing node of a modality workflow shares (output and BIDS folders and the
    entities of ``item``: subject, session, acq)."""
    common = {"output_dir": str(config.output_dir), "bids_dir": str(config.bids_dir), "subject": subject}
    if session:
        common["session"] = session
    if item.acq:
        common["acq"] = item.acq
    return common


def estimate_node(modality: str, method: str, protocol, config, *, omp: int, common: dict, **inputs):
    """The ``estimate_<method>`` node of a modality workflow: :class:`EstimateMaps` with the run's
    model folder, seed, device and thread count; ``inputs`` are the modality's own (sources,
    sidecar_info, options, ...)."""
    from nipype.pipeline import engine as pe

    return pe.Node(EstimateMaps(modality=modality, method=method, protocol=protocol.as_dict(),
                                model_dir=str(config.model_dir), seed=config.seed, device=config.torch_device(),
                                num_threads=omp, **inputs, **common),
                   name=f"estimate_{method}", n_procs=omp)
