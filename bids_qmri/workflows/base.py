"""Participant-level workflow: anatomy, every modality's mapping workflow and ROI statistics,
per session.

nipreps style: ``init_participant_wf`` only wires sub-workflows; all work happens in their nodes.
The mapping workflows come from the modality registry (``Modality.init_workflow``), one per
input of a modality this run maps; their reference images and maps are merged into lists for the
ROI workflow, which matches each map to its reference image by ``acq``. The nipype working
directory caches every node's result, so a re-run after a kill redoes only unfinished nodes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from ..bids.discovery import selected_modalities  # noqa: E402
from ..bids.inputs import SessionInputs  # noqa: E402
from ..modalities.base import workflow_label  # noqa: E402
from .anat import init_anat_wf  # noqa: E402
from .roi import init_roi_wf  # noqa: E402

ANAT_FIELDS = ("t1w_preproc", "t1w_mask", "dseg", "probseg", "atlas_dseg", "atlas_table", "atlas_name")


def participant_wf_name(session_inputs: SessionInputs) -> str:
    """``single_subject_<sub>[_ses_<ses>]_wf`` (labels are alphanumeric, see discovery)."""
    name = f"single_subject_{session_inputs.subject}"
    if session_inputs.session:
        name += f"_ses_{session_inputs.session}"
    return name + "_wf"


def mapped_inputs(session_inputs: SessionInputs, config) -> list[tuple]:
    """``(modality, input)`` pairs this run maps for the session, in registry order."""
    return [(m, item) for m in selected_modalities(config) for item in session_inputs.inputs.get(m.name, [])]


def init_participant_wf(session_inputs: SessionInputs, config) -> pe.Workflow:
    """Workflow for one participant and session.

    ``anat_wf`` (T1w preprocessing, tissues, atlas in T1w space; without a T1w it registers the
    template to the first mapped input's reference image) and one ``<modality>_<acq>_wf`` per
    mapped input (B1 matched by the modality) feed one ``roi_wf``.
    """
    sess = session_inputs
    wf = pe.Workflow(name=participant_wf_name(sess))
    t1w = sess.t1w[0] if sess.t1w else None
    anat_wf = init_anat_wf(t1w, sess.subject, sess.session, config, name="anat_wf")
    roi_wf = init_roi_wf(sess.subject, sess.session, config, name="roi_wf")
    pairs = mapped_inputs(sess, config)
    n = len(pairs)
    merge_ref = pe.Node(niu.Merge(n), name="merge_ref_images")
    merge_maps = pe.Node(niu.Merge(n), name="merge_maps")
    merge_masks = pe.Node(niu.Merge(n), name="merge_brain_masks")
    wf.connect([
        (anat_wf, roi_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in ANAT_FIELDS]),
        (merge_ref, roi_wf, [("out", "inputnode.ref_image")]),
        (merge_maps, roi_wf, [("out", "inputnode.maps")]),
        (merge_masks, roi_wf, [("out", "inputnode.brain_mask")]),
    ])
    counts: dict[str, int] = {}
    for index, (modality, item) in enumerate(pairs, start=1):
        counts[modality.name] = counts.get(modality.name, 0) + 1
        tag = workflow_label(item, counts[modality.name])
        sub_wf = modality.init_workflow(item, sess, config, f"{modality.name}_{tag}_wf")
        # A mapping workflow that declares an ``inputnode`` with anatomy fields gets them.
        anat_in = sub_wf.get_node("inputnode")
        wanted = [f for f in ANAT_FIELDS if anat_in is not None and f in anat_in.inputs.copyable_trait_names()]
        if wanted:
            wf.connect([(anat_wf, sub_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in wanted])])
        wf.connect([
            (sub_wf, merge_ref, [("outputnode.ref_image", f"in{index}")]),
            (sub_wf, merge_maps, [("outputnode.maps", f"in{index}")]),
            (sub_wf, merge_masks, [("outputnode.brain_mask", f"in{index}")]),
        ])
        if t1w is None and index == 1:
            wf.connect(sub_wf, "outputnode.ref_image", anat_wf, "inputnode.ref_image")
    return wf
