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

from ..bids.inputs import B1Input, BSSFPInput  # noqa: E402
from ..interfaces.bssfp import (  # noqa: E402
    BrainMask,
    BSSFPConfigurations,
    BSSFPDerivatives,
    DenoiseBSSFP,
    EstimateBSSFP,
    LoadBSSFP,
    MotionCorrect,
    PrepareB1,
)
from ..physics.bssfp import BSSFPProtocol  # noqa: E402


def _omp_threads(config) -> int:
    if config.omp_nthreads:
        return int(config.omp_nthreads)
    nprocs = config.nprocs or os.cpu_count() or 1
    return max(1, min(int(nprocs), 8))


def init_bssfp_wf(bssfp: BSSFPInput, b1: B1Input | None, subject: str, session: str | None, config,
                  name: str = "bssfp_wf") -> pe.Workflow:
    """Map one pc-bSSFP series with every method of ``config.methods["bssfp"]``.

    outputnode: ``ref_image`` (written mean-magnitude reference), ``brain_mask``, ``maps``
    (written T1map/T2map/fieldmap paths, all methods).
    """
    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_image", "brain_mask", "maps"]), name="outputnode")
    protocol = BSSFPProtocol.from_input(bssfp)
    omp = _omp_threads(config)
    common = {"output_dir": str(config.output_dir), "bids_dir": str(config.bids_dir), "subject": subject}
    if session:
        common["session"] = session
    if bssfp.acq:
        common["acq"] = bssfp.acq
    sources = [str(p) for p in bssfp.part_files.values()] + ([str(p) for p in b1.files.values()] if b1 else [])

    load = pe.Node(LoadBSSFP(part_files={k: str(v) for k, v in bssfp.part_files.items()},
                             n_cycles=bssfp.n_cycles), name="load")
    denoise = pe.Node(DenoiseBSSFP(method=config.bssfp_denoise), name="denoise")
    moco = pe.Node(MotionCorrect(seed=config.seed, num_threads=omp), name="motion_correct", n_procs=omp)
    confs = pe.Node(BSSFPConfigurations(phase_increments=list(protocol.phase_increments_deg),
                                        gibbs_removal=bool(config.gibbs_removal), num_threads=omp),
                    name="configurations", n_procs=omp)
    mask = pe.Node(BrainMask(), name="brain_mask")
    b1_node = pe.Node(PrepareB1(prep_angle_deg=float(config.b1_prep_angle_deg), seed=config.seed, num_threads=omp),
                      name="b1", n_procs=omp)
    if b1 is not None:
        b1_node.inputs.kind = b1.kind
        b1_node.inputs.files = {k: str(v) for k, v in b1.files.items()}
        b1_node.inputs.metadata = {k: dict(v) for k, v in (b1.metadata or {}).items()}
    ds = pe.Node(BSSFPDerivatives(sources=sources, protocol=protocol.as_dict(), **common), name="derivatives")

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

    preproc_info = {
        "MotionCorrection": "rigid registration (ANTs, Mattes MI) of each phase cycle's magnitude to "
                            f"phase cycle {max(1, protocol.npc // 2)}, applied to the real and imaginary "
                            "parts; parameters in the desc-motion_bSSFP.tsv table",
        "ReceiverPhaseRemoval": "S_j * exp(-i arg sum_j S_j) per voxel",
        "Configurations": "F_p = (1/Npc) sum_j S_j exp(+i p phi_j), p = -1, 0, 1, with the series' "
                          "PhaseIncrements",
        "GibbsRingingRemoval": bool(config.gibbs_removal),
    }
    methods = tuple(config.methods.get("bssfp", ()))
    if not methods:
        outputnode.inputs.maps = []
        return wf
    merge = pe.Node(niu.Merge(len(methods), ravel_inputs=True), name="merge_maps")
    for index, method in enumerate(methods, start=1):
        est = pe.Node(EstimateBSSFP(method=method, protocol=protocol.as_dict(), model_dir=str(config.model_dir),
                                    seed=config.seed, num_threads=omp, sources=sources,
                                    preproc_info=preproc_info, **common),
                      name=f"estimate_{method}", n_procs=omp)
        wf.connect([
            (confs, est, [("out_file", "config_file")]),
            (mask, est, [("out_file", "mask_file")]),
            (b1_node, est, [("out_file", "b1_file"), ("info", "b1_info")]),
            (denoise, est, [("info", "denoise_info")]),
            (est, merge, [("out_maps", f"in{index}")]),
        ])
    wf.connect(merge, "out", outputnode, "maps")
    return wf
