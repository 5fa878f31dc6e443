"""Participant-level workflow: composes anatomy, bSSFP mapping and ROI statistics per session.

nipreps style: ``init_participant_wf`` only wires the sub-workflows that
``workflows/{anat,bssfp,roi}.py`` build; all work happens in their nodes. The nipype working
directory caches every node's result, so a re-run after a kill redoes only unfinished nodes.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

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

    ``anat_wf`` (T1w preprocessing, tissues, atlas in T1w space) feeds one ``roi_wf`` per bSSFP
    input; each ``bssfp_<acq>_wf`` maps its series with the matching B1 input (``IntendedFor``,
    else the session's first B1 map) and hands its reference image and maps to its ``roi_wf``.
    """
    sess = session_inputs
    wf = pe.Workflow(name=participant_wf_name(sess))
    t1w = sess.t1w[0] if sess.t1w else None
    anat_wf = init_anat_wf(t1w, sess.subject, sess.session, config, name="anat_wf")
    wf.add_nodes([anat_wf])
    for index, bssfp in enumerate(sess.bssfp):
        tag = bssfp.acq or str(index)
        bssfp_wf = init_bssfp_wf(bssfp, b1_for(sess, bssfp), sess.subject, sess.session, config,
                                 name=f"bssfp_{tag}_wf")
        roi_wf = init_roi_wf(sess.subject, sess.session, config, name=f"roi_{tag}_wf")
        wf.connect([
            (anat_wf, roi_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in ANAT_FIELDS]),
            (bssfp_wf, roi_wf, [("outputnode.ref_image", "inputnode.ref_image"),
                                ("outputnode.maps", "inputnode.maps")]),
        ])
    return wf
