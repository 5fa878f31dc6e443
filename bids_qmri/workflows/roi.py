"""ROI workflow: reference images -> T1w (rigid), segmentation and atlas onto each map's grid,
ROI statistics per map, method and region (``..._atlas-<A>_roistats.tsv``).

A thin node over ``bids_qmri.anatomy.roistats.roi_analysis``. ``inputnode.ref_image``,
``inputnode.brain_mask`` and ``inputnode.maps`` take a path or (nested) lists of paths, so the
workflows of every modality can feed one ROI workflow through a ``niu.Merge``; each map is matched
to the reference image and the brain mask with the same ``acq`` label, and its statistics use
only the voxels inside that mask.
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from .anat import ANAT_OUTPUTS


def _roi_stats(output_dir, subject, session, t1w_preproc, t1w_mask, probseg, atlas_dseg, atlas_table, atlas_name,
               ref_image, maps, pv_threshold, nthreads, seed, brain_mask=None):
    from bids_qmri.anatomy.roistats import roi_analysis

    return roi_analysis(subject=subject, session=session, output_dir=output_dir, work_dir="work", t1w=t1w_preproc,
                        mask=t1w_mask, probseg=probseg, atlas_dseg=atlas_dseg, atlas_table=atlas_table,
                        atlas_name=atlas_name, ref_images=ref_image, maps=maps,
                        brain_masks=brain_mask or None, pv_threshold=pv_threshold, nthreads=nthreads, seed=seed)


def init_roi_wf(subject: str, session: str | None, config, name: str = "roi_wf"):
    """inputnode: the anatomical outputs + ``ref_image`` + ``brain_mask`` + ``maps``; outputnode:
    ``roistats``. ``brain_mask`` may stay unset (statistics over the maps' finite values)."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=ANAT_OUTPUTS + ["ref_image", "brain_mask", "maps"]),
                        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["roistats"]), name="outputnode")
    stats = pe.Node(niu.Function(function=_roi_stats, input_names=[
        "output_dir", "subject", "session", "t1w_preproc", "t1w_mask", "probseg", "atlas_dseg", "atlas_table",
        "atlas_name", "ref_image", "maps", "pv_threshold", "nthreads", "seed", "brain_mask"],
        output_names=["roistats"]),
        name="roi_stats")
    stats.inputs.output_dir = str(config.output_dir)
    stats.inputs.subject = subject
    stats.inputs.session = session
    stats.inputs.pv_threshold = float(getattr(config, "pv_threshold", 0.5))
    stats.inputs.nthreads = config.omp_threads()
    stats.inputs.seed = int(getattr(config, "seed", 0) or 0)
    # ``brain_mask`` has a default: an unset inputnode field reaches the function as a missing argument.
    wf.connect([
        (inputnode, stats, [(f, f) for f in ("t1w_preproc", "t1w_mask", "probseg", "atlas_dseg", "atlas_table",
                                             "atlas_name", "ref_image", "brain_mask", "maps")]),
        (stats, outputnode, [("roistats", "roistats")]),
    ])
    return wf
