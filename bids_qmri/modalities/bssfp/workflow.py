"""pc-bSSFP relaxometry workflow (seeds 000/001; SPEC §3, §4, §6, §7).

::

    load (part pair → complex) → denoise (MP-PCA, real+imag) → motion_correct (rigid → (Npc/2)-th cycle)
        → configurations (receiver phase, DFT F−1/F0/F1, Gibbs) ─┐
        → brain_mask (mean magnitude) → b1 (convert, register, resample, median) ─┤
                                                     estimate_<method> (one per method)
                                                     derivatives (ref, mask, motion, B1)

Outputs written (``acq-<label>`` is the bSSFP acquisition's label, omitted if it has none):

- ``anat/sub-X[_ses-Y]_acq-<label>_desc-<method>_{T1map,T2map}.nii.gz`` (seconds)
- ``fmap/sub-X[_ses-Y]_acq-<label>_desc-<method>_fieldmap.nii.gz`` (Hz, complex networks) with
  ``fmap/sub-X[_ses-Y]_acq-<label>_magnitude.nii.gz`` (|F0|), which BIDS requires beside a fieldmap
- ``anat/..._acq-<label>_desc-ref_bSSFP.nii.gz`` (mean magnitude after motion correction) and
  ``anat/..._acq-<label>_desc-brain_mask.nii.gz``
- ``anat/..._acq-<label>_desc-motion_bSSFP.tsv`` (+ JSON): per-cycle rigid parameters
  ``trans_{x,y,z}`` (mm), ``rot_{x,y,z}`` (rad), ``framewise_displacement`` (mm). BIDS has no
  motion table for anatomical series; the ``bSSFP`` suffix keeps it beside its series and under
  the ``*_bSSFP.*`` ``.bidsignore`` rule.
- ``fmap/..._acq-<label>_desc-bssfp_TB1map.nii.gz``: the B1 ratio exactly as the mapping used it
  (registered, resampled onto the bSSFP grid, median filtered); only when a B1 input exists.
  Without one, B1 = 1 and every map's sidecar carries ``B1Warning``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from bids_qmri.bids.inputs import B1Input  # noqa: E402
from bids_qmri.interfaces.b1 import init_b1_node  # noqa: E402
from bids_qmri.interfaces.maps import estimate_node, node_common  # noqa: E402
from bids_qmri.interfaces.reference import BrainMask, ReferenceDerivatives  # noqa: E402
from bids_qmri.physics.bssfp import BSSFPProtocol  # noqa: E402

from .inputs import BSSFPInput  # noqa: E402
from .interfaces import BSSFPConfigurations, DenoiseBSSFP, LoadBSSFP, MotionCorrect  # noqa: E402

# The preprocessing (motion correction, receiver phase, configurations, B1 handling) follows
# the seed papers; each method's own reference comes from its provenance.
PREPROCESSING_REFERENCE = (
    "Birk F, Mahler L, Steiglechner J, Wang Q, Scheffler K, Heule R. Flexible and cost-effective "
    "deep learning for fast multi-parametric relaxometry using phase-cycled bSSFP. Sci Rep 15:4825 "
    "(2025) doi:10.1038/s41598-025-88579-z; preprint doi:10.21203/rs.3.rs-4049684/v1"
)
DEFAULT_DENOISE = "mppca"


def init_bssfp_wf(bssfp: BSSFPInput, b1: B1Input | None, subject: str, session: str | None, config,
                  name: str = "bssfp_wf") -> pe.Workflow:
    """Map one pc-bSSFP series with every method of ``config.methods["bssfp"]``.

    outputnode: ``ref_image`` (written mean-magnitude reference), ``brain_mask``, ``maps``
    (written T1map/T2map/fieldmap paths, all methods).
    """
    from . import MODALITY

    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_image", "brain_mask", "maps"]), name="outputnode")
    protocol = BSSFPProtocol.from_input(bssfp)
    omp = config.omp_threads()
    common = node_common(bssfp, subject, session, config)
    sources = [str(p) for p in bssfp.part_files.values()] + ([str(p) for p in b1.files.values()] if b1 else [])
    options = dict(getattr(config, "options", {}) or {})
    gibbs = bool(options.get("bssfp_gibbs_removal", True))

    load = pe.Node(LoadBSSFP(part_files={k: str(v) for k, v in bssfp.part_files.items()},
                             n_cycles=bssfp.n_cycles), name="load")
    denoise = pe.Node(DenoiseBSSFP(method=options.get("bssfp_denoise", DEFAULT_DENOISE)), name="denoise")
    moco = pe.Node(MotionCorrect(seed=config.seed, num_threads=omp), name="motion_correct", n_procs=omp)
    confs = pe.Node(BSSFPConfigurations(phase_increments=list(protocol.phase_increments_deg),
                                        gibbs_removal=gibbs, num_threads=omp),
                    name="configurations", n_procs=omp)
    mask = pe.Node(BrainMask(), name="brain_mask")
    b1_node = init_b1_node(b1, config, omp)
    ds = pe.Node(ReferenceDerivatives(
        suffix=MODALITY.ref_suffix, title=MODALITY.title, sources=sources, protocol=protocol.as_dict(),
        ref_description="mean magnitude over the motion-corrected phase cycles (bSSFP reference grid)",
        volume_column="phase_cycle", volume_description="phase cycle (volume) number, 1-based",
        motion_description="rigid motion of each phase cycle's magnitude relative to the reference cycle "
                           "(ANTs, Mattes mutual information); transforms applied to the real and "
                           "imaginary parts", **common), name="derivatives")

    wf.connect([
        (load, denoise, [("out_file", "in_file")]),
        (denoise, moco, [("out_file", "in_file")]),
        (moco, confs, [("out_file", "in_file")]),
        (moco, mask, [("ref_image", "in_file")]),
        (moco, b1_node, [("ref_image", "ref_image")]),
        (mask, b1_node, [("out_file", "mask_file")]),
        (moco, ds, [("ref_image", "ref_image"), ("motion_file", "motion_file"),
                    ("ref_index", "ref_index"), ("failed", "motion_failed")]),
        (mask, ds, [("out_file", "mask_file")]),
        (b1_node, ds, [("out_file", "b1_file"), ("info", "b1_info"), ("sources", "b1_sources")]),
        (ds, outputnode, [("ref_image", "ref_image"), ("brain_mask", "brain_mask")]),
    ])

    sidecar_info = {
        "NumberOfPhaseCycles": protocol.npc,
        "PreprocessingReference": PREPROCESSING_REFERENCE,
        "MotionCorrection": "rigid registration (ANTs, Mattes MI) of each phase cycle's magnitude to "
                            f"phase cycle {max(1, protocol.npc // 2)}, applied to the real and imaginary "
                            "parts; parameters in the desc-motion_bSSFP.tsv table",
        "ReceiverPhaseRemoval": "S_j * exp(-i arg sum_j S_j) per voxel",
        "Configurations": "F_p = (1/Npc) sum_j S_j exp(+i p phi_j), p = -1, 0, 1, with the series' "
                          "PhaseIncrements",
        "GibbsRingingRemoval": gibbs,
    }
    methods = tuple(config.methods.get(MODALITY.name, ()))
    if not methods:
        outputnode.inputs.maps = []
        return wf
    merge = pe.Node(niu.Merge(len(methods), ravel_inputs=True), name="merge_maps")
    data = pe.Node(niu.Merge(2), name="data_files")  # [configurations, b1] -> the estimate's roles
    infos = pe.Node(niu.Merge(2), name="sidecar_infos")
    wf.connect([
        (confs, data, [("out_file", "in1")]),
        (b1_node, data, [("out_file", "in2")]),
        (denoise, infos, [("sidecar_info", "in1")]),
        (b1_node, infos, [("info", "in2")]),
    ])
    for index, method in enumerate(methods, start=1):
        est = estimate_node(MODALITY.name, method, protocol, config, omp=omp, common=common, sources=sources,
                            sidecar_info=sidecar_info, options=options, fieldmap_magnitude_description=(
                                "|F0| of the pc-bSSFP series (magnitude of the mean over phase cycles), "
                                "the magnitude image of the off-resonance fieldmaps"))
        wf.connect([
            (data, est, [(("out", _roles), "data_files")]),
            (mask, est, [("out_file", "mask_file")]),
            (infos, est, [("out", "info")]),
            (confs, est, [("f0_magnitude", "fieldmap_magnitude")]),
            (est, merge, [("out_maps", f"in{index}")]),
        ])
    wf.connect(merge, "out", outputnode, "maps")
    return wf


def _roles(files):
    return {"configurations": files[0], "b1": files[1]}
