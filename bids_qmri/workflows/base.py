"""Participant-level workflow: composes anatomy, bSSFP mapping and ROI statistics per session.

nipreps style: ``init_participant_wf`` only wires the sub-workflows that
``workflows/{anat,bssfp,roi}.py`` build; all work happens in their nodes. The nipype working
directory caches every node's result, so a re-run after a kill redoes only unfinished nodes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from ..bids.discovery import b1_for  # noqa: E402
from ..bids.inputs import SessionInputs  # noqa: E402
from .anat import init_anat_wf  # noqa: E402
from .bssfp import init_bssfp_wf  # noqa: E402
from .roi import init_roi_wf  # noqa: E402

ANAT_FIELDS = ("t1w_preproc", "t1w_mask", "dseg", "probseg", "atlas_dseg", "atlas_table", "atlas_name")


def participant_wf_name(session_inputs: SessionInputs) -> str:
    """``single_subject_<sub>[_ses_<ses>]_wf`` (labels are alphanumeric, see discovery)."""
    name = f"single_subject_{session_inputs.subject}"
    if session_inputs.session:
        name += f"_ses_{session_inputs.session}"
    return name + "_wf"


def init_participant_wf(session_inputs: SessionInputs, config) -> pe.Workflow:
    """Workflow for one participant and session.

    ``anat_wf`` (T1w preprocessing, tissues, atlas in T1w space; without a T1w it registers the
    template to the first bSSFP reference image) and one ``bssfp_<acq>_wf`` per bSSFP input, each
    with its matching B1 input (``IntendedFor``, else the session's first B1 map), feed one
    ``roi_wf``: reference images and maps of all bSSFP inputs are merged into lists, and the ROI
    workflow matches each map to its reference image by ``acq``.
    """
    sess = session_inputs
    wf = pe.Workflow(name=participant_wf_name(sess))
    t1w = sess.t1w[0] if sess.t1w else None
    anat_wf = init_anat_wf(t1w, sess.subject, sess.session, config, name="anat_wf")
    roi_wf = init_roi_wf(sess.subject, sess.session, config, name="roi_wf")
    n = len(sess.bssfp)
    merge_ref = pe.Node(niu.Merge(n), name="merge_ref_images")
    merge_maps = pe.Node(niu.Merge(n), name="merge_maps")
    wf.connect([
        (anat_wf, roi_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in ANAT_FIELDS]),
        (merge_ref, roi_wf, [("out", "inputnode.ref_image")]),
        (merge_maps, roi_wf, [("out", "inputnode.maps")]),
    ])
    for index, bssfp in enumerate(sess.bssfp, start=1):
        tag = bssfp.acq or str(index)
        bssfp_wf = init_bssfp_wf(bssfp, b1_for(sess, bssfp), sess.subject, sess.session, config,
                                 name=f"bssfp_{tag}_wf")
        wf.connect([
            (bssfp_wf, merge_ref, [("outputnode.ref_image", f"in{index}")]),
            (bssfp_wf, merge_maps, [("outputnode.maps", f"in{index}")]),
        ])
        if t1w is None and index == 1:
            wf.connect(bssfp_wf, "outputnode.ref_image", anat_wf, "inputnode.ref_image")
    return wf
