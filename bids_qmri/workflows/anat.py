"""Anatomical workflow: T1w -> N4 -> template registration -> brain mask -> Atropos -> atlas.

Nodes are thin ``niu.Function`` wrappers over ``bids_qmri.anatomy.pipeline``; the last node
writes every derivative through ``bids_qmri.bids.derivatives``.

Without a T1w (``t1w=None``) the template is registered to the image on ``inputnode.ref_image``
(e.g. a bSSFP ``desc-ref`` mean magnitude, mutual information for every stage), its tissue
priors become the probseg (no Atropos: the contrast is not T1-weighted), and every output
carries a warning for the report. The "T1w space" of the outputs is then that image's space.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

ANAT_OUTPUTS = ["t1w_preproc", "t1w_mask", "dseg", "probseg", "atlas_dseg", "atlas_table", "atlas_name"]



def _bias_correct(in_file, nthreads):
    from bids_qmri.anatomy.pipeline import bias_correct

    return bias_correct(in_file, ".", nthreads=nthreads)


def _register(fixed, template, contrast_agnostic, nthreads, seed):
    from bids_qmri.anatomy.pipeline import register_template

    return register_template(fixed, template, "reg", nthreads=nthreads, seed=seed, cross_modal=contrast_agnostic)


def _segment(in_file, regdict, use_atropos, nthreads, seed):
    from bids_qmri.anatomy.pipeline import segment

    return segment(in_file, regdict, "seg", use_atropos=use_atropos, nthreads=nthreads, seed=seed)


def _atlas(atlas, in_file, regdict, seg, nthreads):
    from bids_qmri.anatomy.pipeline import atlas_to_native

    return atlas_to_native(atlas, in_file, regdict["to_native"], "atlas", mask=seg["mask"], nthreads=nthreads)


def _write(output_dir, bids_dir, subject, session, source, t1w_preproc, seg, regdict, atlas, fallback):
    from pathlib import Path

    from bids_qmri.anatomy.outputs import write_anat_derivatives
    from bids_qmri.anatomy.roistats import parse_entities
    from bids_qmri.bids.derivatives import bids_uri

    warnings = []
    if fallback:
        ents = parse_entities(source)
        space_suffix, space_acq = ents["suffix"], ents.get("acq")
        warnings.append(
            f"No T1w found: the template and atlas were registered directly to {Path(source).name}; "
            "tissue probabilities are the warped template priors (no segmentation of the subject's contrast)."
        )
    else:
        space_suffix, space_acq = "T1w", None
    out = write_anat_derivatives(
        output_dir=output_dir, subject=subject, session=session, source=source,
        source_uri=bids_uri(bids_dir, source) if bids_dir else str(source), space_suffix=space_suffix,
        space_acq=space_acq, t1w_preproc=t1w_preproc, seg=seg, reg=regdict, atlas=atlas, warnings=warnings,
    )
    return (out["t1w_preproc"], out["t1w_mask"], out["dseg"], out["probseg"], out["atlas_dseg"],
            out["atlas_table"], out["atlas_name"])


def init_anat_wf(t1w: Path | str | None, subject: str, session: str | None, config, name: str = "anat_wf"):
    """Anatomical workflow of one participant/session (outputs in T1w space).

    inputnode: ``t1w`` (set from the argument), ``ref_image`` (only used when ``t1w`` is None).
    outputnode: t1w_preproc, t1w_mask, dseg, probseg [GM, WM, CSF], atlas_dseg, atlas_table,
    atlas_name (paths of the written derivatives).
    """
    from bids_qmri.anatomy.atlases import resolve_atlas
    from bids_qmri.anatomy.templates import check_template

    # Bad --template/--atlas: a one-line UsageError now, not a node crash later.
    template = check_template(getattr(config, "template", None))
    atlas_spec = getattr(config, "atlas", None) or "AAL"
    resolve_atlas(atlas_spec)
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w", "ref_image"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=ANAT_OUTPUTS), name="outputnode")
    fallback = t1w is None
    if not fallback:
        inputnode.inputs.t1w = str(t1w)
    nthreads = config.omp_threads()
    seed = int(getattr(config, "seed", 0) or 0)

    n4 = pe.Node(niu.Function(function=_bias_correct, input_names=["in_file", "nthreads"],
                              output_names=["out_file"]), name="n4")
    n4.inputs.nthreads = nthreads
    register = pe.Node(niu.Function(function=_register, input_names=["fixed", "template", "contrast_agnostic",
                                                                     "nthreads", "seed"],
                                    output_names=["regdict"]), name="register_template")
    register.inputs.template = template
    register.inputs.contrast_agnostic = fallback
    register.inputs.nthreads = nthreads
    register.inputs.seed = seed
    segment = pe.Node(niu.Function(function=_segment, input_names=["in_file", "regdict", "use_atropos", "nthreads",
                                                                   "seed"],
                                   output_names=["seg"]), name="segment")
    segment.inputs.use_atropos = not fallback
    segment.inputs.nthreads = nthreads
    segment.inputs.seed = seed
    atlas = pe.Node(niu.Function(function=_atlas, input_names=["atlas", "in_file", "regdict", "seg", "nthreads"],
                                 output_names=["atlas"]), name="atlas_to_native")
    atlas.inputs.atlas = atlas_spec
    atlas.inputs.nthreads = nthreads
    write = pe.Node(niu.Function(function=_write, input_names=["output_dir", "bids_dir", "subject", "session", "source",
                                                               "t1w_preproc", "seg", "regdict", "atlas", "fallback"],
                                 output_names=ANAT_OUTPUTS), name="ds_anat")
    write.inputs.output_dir = str(config.output_dir)
    write.inputs.bids_dir = str(config.bids_dir) if getattr(config, "bids_dir", None) else ""
    write.inputs.subject = subject
    write.inputs.session = session
    write.inputs.fallback = fallback

    source_field = "ref_image" if fallback else "t1w"
    wf.connect([
        (inputnode, n4, [(source_field, "in_file")]),
        (inputnode, write, [(source_field, "source")]),
        (n4, register, [("out_file", "fixed")]),
        (n4, segment, [("out_file", "in_file")]),
        (register, segment, [("regdict", "regdict")]),
        (n4, atlas, [("out_file", "in_file")]),
        (register, atlas, [("regdict", "regdict")]),
        (segment, atlas, [("seg", "seg")]),
        (n4, write, [("out_file", "t1w_preproc")]),
        (segment, write, [("seg", "seg")]),
        (register, write, [("regdict", "regdict")]),
        (atlas, write, [("atlas", "atlas")]),
        (write, outputnode, [(f, f) for f in ANAT_OUTPUTS]),
    ])
    return wf
