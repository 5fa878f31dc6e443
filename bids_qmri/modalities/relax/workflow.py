"""Relaxometry series workflow (IRT1 or MESE; seed 004, SPEC §3, §4, §7).

::

    load (stack the files) → motion_correct (rigid → middle volume) → brain_mask (IRT1: the
        shortest-TI volume; MESE: the mean magnitude; ``mask_volume``)
        → background (noise voxels, for a Rician σ) → estimate_<method> (one per method)
        → derivatives (reference image, mask, motion table)

Outputs (``acq-<label>`` is the series' label; ``<S>`` its suffix, IRT1 or MESE):
``anat/..._acq-<label>_desc-<method>_{T1map,M0map,IEmap}.nii.gz`` (IRT1) or
``..._desc-<method>_{T2map,M0map}.nii.gz`` (MESE), ``..._acq-<label>_desc-ref_<S>.nii.gz`` (mean
magnitude after motion correction), ``..._acq-<label>_desc-brain_mask.nii.gz`` and
``..._acq-<label>_desc-motion_<S>.tsv`` (per-volume rigid parameters).
"""

from __future__ import annotations

import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry, ever

from nipype.interfaces import utility as niu  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402

from bids_qmri.bids.inputs import SeriesInput  # noqa: E402
from bids_qmri.interfaces.maps import estimate_node, node_common  # noqa: E402
from bids_qmri.interfaces.reference import BrainMask, ReferenceDerivatives  # noqa: E402

from .inputs import protocol as series_protocol  # noqa: E402
from .inputs import reference_volume  # noqa: E402
from .interfaces import BackgroundMask, LoadSeries, MotionCorrectSeries  # noqa: E402


def init_relax_wf(series: SeriesInput, modality, subject: str, session: str | None, config,
                  name: str = "relax_wf") -> pe.Workflow:
    """Map one IRT1 or MESE series with every method of ``config.methods[modality.name]``.

    outputnode: ``ref_image`` (written mean-magnitude reference), ``brain_mask``, ``maps``.
    """
    wf = pe.Workflow(name=name)
    outputnode = pe.Node(niu.IdentityInterface(fields=["ref_image", "brain_mask", "maps"]), name="outputnode")
    protocol = series_protocol(series)
    omp = config.omp_threads()
    common = node_common(series, subject, session, config)
    sources = [str(p) for p in series.files]
    ref = reference_volume(len(series.files))
    symbol = "TI" if series.kind == "IRT1" else "TE"

    load = pe.Node(LoadSeries(in_files=sources), name="load")
    moco = pe.Node(MotionCorrectSeries(ref_index=ref, seed=config.seed, num_threads=omp,
                                       mask_volume=mask_volume(series.kind, series.values)),
                   name="motion_correct", n_procs=omp)
    mask = pe.Node(BrainMask(), name="brain_mask")
    background = pe.Node(BackgroundMask(), name="background")
    ds = pe.Node(ReferenceDerivatives(
        suffix=modality.ref_suffix, title=modality.title, sources=sources, protocol=protocol.as_dict(),
        ref_description=f"mean magnitude over the motion-corrected volumes of the {modality.title} series",
        volume_column="volume", volume_description=f"volume ({symbol}) number in time order, 1-based",
        motion_description=f"rigid motion of each volume relative to volume {ref + 1} ({symbol} "
                           f"{1000 * series.values[ref]:g} ms; ANTs, Mattes mutual information)",
        ref_index=ref, **common), name="derivatives")
    wf.connect([
        (load, moco, [("out_file", "in_file")]),
        (moco, mask, [("mask_image", "in_file")]),
        (mask, background, [("out_file", "mask_file")]),
        (moco, ds, [("ref_image", "ref_image"), ("motion_file", "motion_file"), ("failed", "motion_failed")]),
        (mask, ds, [("out_file", "mask_file")]),
        (ds, outputnode, [("ref_image", "ref_image"), ("brain_mask", "brain_mask")]),
    ])
    methods = tuple(config.methods.get(modality.name, ()))
    if not methods:
        outputnode.inputs.maps = []
        return wf
    sidecar_info = {
        "MotionCorrection": f"rigid registration (ANTs, Mattes MI) of every volume to volume {ref + 1} "
                            f"({symbol} {1000 * series.values[ref]:g} ms), windowed-sinc resampling; "
                            f"parameters in the desc-motion_{modality.ref_suffix}.tsv table",
        "NumberOfVolumes": len(series.files),
    }
    options = {k: v for k, v in (getattr(config, "options", {}) or {}).items() if k.startswith("relax_")}
    data = pe.Node(niu.Merge(2), name="data_files")
    wf.connect([(moco, data, [("out_file", "in1")]), (background, data, [("out_file", "in2")])])
    merge = pe.Node(niu.Merge(len(methods), ravel_inputs=True), name="merge_maps")
    for index, method in enumerate(methods, start=1):
        est = estimate_node(modality.name, method, protocol, config, omp=omp, common=common, sources=sources,
                            sidecar_info=sidecar_info, options=options)
        wf.connect([
            (data, est, [(("out", _roles), "data_files")]),
            (mask, est, [("out_file", "mask_file")]),
            (est, merge, [("out_maps", f"in{index}")]),
        ])
    wf.connect(merge, "out", outputnode, "maps")
    return wf


def mask_volume(kind: str, times) -> int:
    """The volume the brain mask is computed from (0-based; -1: the mean over the volumes).

    IRT1: the shortest TI, where every tissue is close to full inversion, so the magnitude is
    proton-density-like and no tissue is near its null. The mean over the TIs mixes each tissue's
    null: depending on the participant's T1s it lost cortex and CSF (demo sub-02: 55 k instead of
    70 k brain voxels, Dice 0.86 against the truth; shortest TI 0.98) or took in the scalp.
    MESE: the mean (Dice 0.97-0.99 on the demo; every echo is a decay of the same contrast).
    """
    if kind == "IRT1":
        return int(min(range(len(times)), key=lambda j: times[j]))
    return -1


def _roles(files):
    return {"signal": files[0], "background": files[1]}
