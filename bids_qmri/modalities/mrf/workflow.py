"""MR fingerprinting workflow (seed 002; SPEC §3, §4, §6).

::

    load (part pair → complex, receiver phase removed; basis TSV checked) → brain_mask (RMS magnitude)
        → b1 (convert, register, resample, median; B1 = 1 without a B1 map) ─┐
                                                      estimate_<method> (one per method)
                                                      derivatives (reference image, mask, B1 as used)

Outputs (``acq-<label>`` the MRF acquisition's label): ``anat/..._acq-<label>_desc-<method>_{T1map,
T2map,M0map}.nii.gz`` with the schedule summary, dictionary grid, hash and SVD rank in the
sidecars; ``anat/..._acq-<label>_desc-ref_MRF.nii.gz`` (RMS magnitude over frames or
coefficients), ``anat/..._acq-<label>_desc-brain_mask.nii.gz`` and, with a B1 map,
``fmap/..._acq-<label>_desc-mrf_TB1map.nii.gz``; for the report,
``sub-X/figures/..._acq-<label>_desc-<method>_fingerprints.png`` (measured vs fitted fingerprints
at four voxels). MRF data are single volumes: no motion table.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from bids_qmri.bids.inputs import B1Input, FingerprintInput  # noqa: E402
from bids_qmri.interfaces.b1 import init_b1_node  # noqa: E402
from bids_qmri.interfaces.maps import estimate_node, node_common  # noqa: E402
from bids_qmri.interfaces.reference import BrainMask, ReferenceDerivatives  # noqa: E402

from .interfaces import FingerprintFitFigure, LoadFingerprints  # noqa: E402
from .protocol import protocol as mrf_protocol  # noqa: E402


def init_mrf_wf(item: FingerprintInput, b1: B1Input | None, subject: str, session: str | None, config,
                name: str = "mrf_wf") -> pe.Workflow:
    """Map one MRF acquisition with every method of ``config.methods["mrf"]``.

    outputnode: ``ref_image`` (written reference), ``brain_mask``, ``maps``.
    """
    from . import MODALITY

    protocol = mrf_protocol(item)
    kind = "SVD coefficients" if item.basis_file else "frames"
    sidecar_info = {**protocol.summary(), "MRFInput": kind}

    def figure(wf, method, est, nodes):
        fig = pe.Node(FingerprintFitFigure(protocol=protocol.as_dict(), output_dir=str(config.output_dir)),
                      name=f"figure_{method}")
        wf.connect([
            (est, fig, [("out_maps", "maps")]),
            (nodes["load"], fig, [("out_file", "signal")]),
            (nodes["b1"], fig, [("out_file", "b1")]),
            (nodes["mask"], fig, [("out_file", "mask_file")]),
        ])
        if item.basis_file:
            wf.connect(nodes["load"], "basis", fig, "basis")

    return init_fingerprint_wf(MODALITY, item, b1, protocol, protocol.n_frames, subject, session, config, name=name,
                               sidecar_info=sidecar_info, per_method=figure)


def init_fingerprint_wf(modality, item: FingerprintInput, b1: B1Input | None, protocol, n_frames: int, subject: str,
                        session: str | None, config, *, name: str, sidecar_info: dict, estimate_inputs=None,
                        per_method=None) -> pe.Workflow:
    """The workflow of a fingerprint-like input (a part pair of frames or SVD coefficients with its
    basis), for ``modality`` (this plug-in and others built on it): load → mask → B1 →
    ``estimate_<method>`` per method of ``config.methods[modality.name]`` (roles ``signal``, ``b1``,
    [``basis``]; options: the run's ``<modality>_*`` options and ``<modality>_b1_from_map``, whether
    the B1 role is a measured map) → ``ReferenceDerivatives``. ``estimate_inputs``: extra
    ``EstimateMaps`` inputs; ``per_method(wf, method, est, nodes)`` adds nodes per method
    (``nodes``: ``load``, ``mask``, ``b1``).

    outputnode: ``ref_image`` (written reference), ``brain_mask``, ``maps``.
    """
    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_image", "brain_mask", "maps"]), name="outputnode")
    omp = config.omp_threads()
    common = node_common(item, subject, session, config)
    sources = [str(p) for p in item.files] + ([str(p) for p in b1.files.values()] if b1 else [])
    prefix = f"{modality.name}_"
    options = {k: v for k, v in (getattr(config, "options", {}) or {}).items() if k.startswith(prefix)}
    options[f"{prefix}b1_from_map"] = b1 is not None

    load = pe.Node(LoadFingerprints(part_files={k: str(v) for k, v in item.part_files.items()},
                                    n_frames=n_frames), name="load")
    if item.basis_file:
        load.inputs.basis_file = str(item.basis_file)
    mask = pe.Node(BrainMask(), name="brain_mask")
    b1_node = init_b1_node(b1, config, omp)
    kind = "SVD coefficients" if item.basis_file else "frames"
    ds = pe.Node(ReferenceDerivatives(
        suffix=modality.ref_suffix, title=modality.title, sources=sources, protocol=protocol.as_dict(),
        ref_description=f"RMS magnitude over the {modality.ref_suffix} {kind} (receiver phase removed)", **common),
        name="derivatives")
    wf.connect([
        (load, mask, [("ref_image", "in_file")]),
        (load, b1_node, [("ref_image", "ref_image")]),
        (mask, b1_node, [("out_file", "mask_file")]),
        (load, ds, [("ref_image", "ref_image")]),
        (mask, ds, [("out_file", "mask_file")]),
        (b1_node, ds, [("out_file", "b1_file"), ("info", "b1_info"), ("sources", "b1_sources")]),
        (ds, outputnode, [("ref_image", "ref_image"), ("brain_mask", "brain_mask")]),
    ])
    methods = tuple(config.methods.get(modality.name, ()))
    if not methods:
        outputnode.inputs.maps = []
        return wf
    sidecar_info = {**sidecar_info, "ReceiverPhaseRemoval": "s * exp(-i arg sum_k s_k) per voxel"}
    data = pe.Node(niu.Merge(3), name="data_files")
    infos = pe.Node(niu.Merge(1), name="sidecar_infos")
    merge = pe.Node(niu.Merge(len(methods), ravel_inputs=True), name="merge_maps")
    wf.connect([
        (load, data, [("out_file", "in1")]),
        (b1_node, data, [("out_file", "in2")]),
        (b1_node, infos, [("info", "in1")]),
    ])
    if item.basis_file:
        wf.connect(load, "basis", data, "in3")
    else:
        data.inputs.in3 = []
    for index, method in enumerate(methods, start=1):
        est = estimate_node(modality.name, method, protocol, config, omp=omp, common=common, sources=sources,
                            sidecar_info=sidecar_info, options=options, **(estimate_inputs or {}))
        wf.connect([
            (data, est, [(("out", _roles), "data_files")]),
            (mask, est, [("out_file", "mask_file")]),
            (infos, est, [("out", "info")]),
            (est, merge, [("out_maps", f"in{index}")]),
        ])
        if per_method is not None:
            per_method(wf, method, est, {"load": load, "mask": mask, "b1": b1_node})
    wf.connect(merge, "out", outputnode, "maps")
    return wf


def _roles(files):
    roles = {"signal": files[0], "b1": files[1]}
    if len(files) > 2 and files[2]:
        roles["basis"] = files[2]
    return roles
