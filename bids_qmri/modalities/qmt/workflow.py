"""Hybrid-state qMT workflow (seed 003; SPEC §3, §4): the MRF plug-in's fingerprint workflow
(``mrf.workflow.init_fingerprint_wf``) with the qMT methods.

::

    load (part pair → complex, receiver phase removed; basis TSV checked) → brain_mask (RMS magnitude)
        → b1 (convert, register, resample, median; B1 = 1 without a B1 map) ─┐
                                                      estimate_<method> (one per method)
                                                      derivatives (reference image, mask, B1 as used)

Outputs (``acq-<label>`` the qMT acquisition's label): ``anat/..._acq-<label>_desc-<method>_{m0smap,
T1map,T2map}.nii.gz`` (networks; qmtnls adds ``T2smap``, ``Rxmap``, ``M0map``, ``fmap/..._fieldmap``
with its magnitude and, without a B1 map, ``fmap/..._TB1map``) with the schedule summary, the basis
hash and rank and the model card in the sidecars; ``anat/..._acq-<label>_desc-ref_qMT.nii.gz`` (RMS
magnitude of the coefficients or frames: the image registered to the T1w for the ROI tables),
``anat/..._acq-<label>_desc-brain_mask.nii.gz`` and, with a B1 map,
``fmap/..._acq-<label>_desc-qmt_TB1map.nii.gz``. One volume: no motion table.
"""

from __future__ import annotations

from bids_qmri.bids.inputs import B1Input, FingerprintInput
from bids_qmri.modalities.mrf.workflow import init_fingerprint_wf


def init_qmt_wf(item: FingerprintInput, b1: B1Input | None, subject: str, session: str | None, config,
                name: str = "qmt_wf"):
    """Map one qMT acquisition with every method of ``config.methods["qmt"]``.

    outputnode: ``ref_image`` (written reference), ``brain_mask``, ``maps``.
    """
    from . import MODALITY, _protocol

    protocol = _protocol(item)
    kind = "SVD coefficients" if item.basis_file else "frames"

    def fieldmap_magnitude(wf, method, est, nodes):
        wf.connect(nodes["load"], "ref_image", est, "fieldmap_magnitude")

    return init_fingerprint_wf(
        MODALITY, item, b1, protocol, protocol.n_tr, subject, session, config, name=name,
        sidecar_info={**protocol.summary(), "qMTInput": kind},
        estimate_inputs={"fieldmap_magnitude_description": f"RMS magnitude over the qMT {kind} (the magnitude "
                                                           "image of the qmtnls off-resonance fieldmap)"},
        per_method=fieldmap_magnitude)
