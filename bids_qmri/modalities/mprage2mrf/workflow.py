"""mprage2mrf workflow (seed 002): the T1w anatomy's preprocessed T1w and brain mask (from the
participant's ``anat_wf``, connected to this workflow's ``inputnode``) -> ``EstimateMaps``
(seven U-Nets slice by slice, the MRF matcher) -> ``..._desc-mprage2mrf_{T1map,T2map}`` in T1w
space, plus the reference image (the preprocessed T1w) and brain mask as every modality writes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from bids_qmri.interfaces.maps import estimate_node, node_common  # noqa: E402
from bids_qmri.interfaces.reference import ReferenceDerivatives  # noqa: E402

from .protocol import MPRAGEProtocol  # noqa: E402


def init_mprage2mrf_wf(item, subject: str, session: str | None, config, name: str = "mprage2mrf_wf") -> pe.Workflow:
    """inputnode: ``t1w_preproc``, ``t1w_mask`` (the anatomy's); outputnode: ``ref_image``,
    ``brain_mask``, ``maps``."""
    from . import MODALITY

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w_preproc", "t1w_mask"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_image", "brain_mask", "maps"]), name="outputnode")
    protocol = MPRAGEProtocol.from_dict(item.metadata)
    omp = config.omp_threads()
    common = node_common(item, subject, session, config)
    sources = [str(p) for p in item.files]
    ds = pe.Node(ReferenceDerivatives(
        suffix=MODALITY.ref_suffix, title=MODALITY.title, sources=sources, protocol=protocol.as_dict(),
        ref_description="the T1w as preprocessed by the anatomy workflow (bias-corrected), input of the U-Nets",
        **common), name="derivatives")
    wf.connect([
        (inputnode, ds, [("t1w_preproc", "ref_image"), ("t1w_mask", "mask_file")]),
        (ds, outputnode, [("ref_image", "ref_image"), ("brain_mask", "brain_mask")]),
    ])
    methods = tuple(config.methods.get(MODALITY.name, ()))
    if not methods:
        outputnode.inputs.maps = []
        return wf
    options = {k: v for k, v in (getattr(config, "options", {}) or {}).items()
               if k.startswith("mprage2mrf_") or k == "mrf_grid_steps"}
    if options.get("mprage2mrf_train_on_cohort") == "on":
        # cohort fine-tuning reads the other participants' derivatives and leaves this one out
        options.update(mprage2mrf_participant=f"sub-{subject}", mprage2mrf_output_dir=str(config.output_dir))
    merge = pe.Node(niu.Merge(len(methods), ravel_inputs=True), name="merge_maps")
    sidecar_info = {"InputImage": "T1w (MPRAGE) after the anatomy workflow's bias correction, skull-stripped with "
                                  "its brain mask", "SpatialReference": "T1w"}
    for index, method in enumerate(methods, start=1):
        est = estimate_node(MODALITY.name, method, protocol, config, omp=omp, common=common, sources=sources,
                            sidecar_info=sidecar_info, options=options)
        wf.connect([
            (inputnode, est, [(("t1w_preproc", _roles), "data_files"), ("t1w_mask", "mask_file")]),
            (est, merge, [("out_maps", f"in{index}")]),
        ])
    wf.connect(merge, "out", outputnode, "maps")
    return wf


def _roles(path):
    return {"T1w": path}
