"""mprage2mrf inference: skull-stripped T1w -> seven U-Nets slice by slice -> four complex SVD
coefficients -> the MRF plug-in's dictionary matching (``mrf.estimate.estimate_dictmatch``) at
B1 = 1 -> T1map, T2map on the T1w grid.

The model is the one for the T1w's MPRAGE protocol (the user's ``--model-dir`` model, or a bundled
one); when none was trained for that protocol the bundled model of the synthetic dataset's
protocol is used and the sidecars' ``Warnings`` say which parameters differ.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .simulate import normalise_mprage, pad_to
from .unet import MPRAGE2MRFNet, channels_to_coefficients

__all__ = ["estimate_mprage2mrf", "load_model_for", "match_coefficients", "synthesise"]

log = logging.getLogger("bids_qmri.modalities.mprage2mrf.estimate")

ALGORITHM = ("mprage2mrf (seed 002): skull-stripped MPRAGE divided by its brain maximum, axial slices through seven "
             "2D U-Nets (SV1 real; SV2-4 real and imaginary), tanh outputs rescaled with the training min/max table "
             "into the first four MRF SVD coefficients; then {matching}")
SLICE_BATCH = 8


def synthesise(net: MPRAGE2MRFNet, t1w: np.ndarray, brain: np.ndarray, *, batch: int = SLICE_BATCH) -> np.ndarray:
    """Complex64 ``[X, Y, Z, 4]`` coefficients (zero outside ``brain``) from the T1w volume."""
    x = normalise_mprage(t1w, brain)
    shape = x.shape
    xs = pad_to(x, net.multiple)
    out = np.zeros(shape + (4,), dtype=np.complex64)
    zs = [z for z in range(shape[2]) if brain[..., z].any()]
    net.eval()
    with torch.no_grad():
        for lo in range(0, len(zs), batch):
            idx = zs[lo:lo + batch]
            inp = torch.from_numpy(np.ascontiguousarray(xs[..., idx].transpose(2, 0, 1)[:, None]))
            y = net.to_coefficients(net(inp))[:, :, :shape[0], :shape[1]]  # [b, 7, X, Y]
            c = channels_to_coefficients(y.permute(0, 2, 3, 1)).numpy()  # [b, X, Y, 4]
            out[..., idx, :] = c.transpose(1, 2, 0, 3)
    out[~brain] = 0
    return out


def load_model_for(protocol, context):
    """``(net, card, warnings)`` for the T1w ``protocol``: an exact model, else the bundled one of
    the synthetic dataset's MPRAGE with a warning per differing parameter."""
    from bids_qmri.models.registry import get_model

    from .protocol import synthetic_protocol

    warnings = []
    try:
        net, card = get_model("mprage2mrf", "mprage2mrf", protocol, model_dir=context.model_dir, trainer=None,
                              seed=context.seed, allow_training=False)
    except (FileNotFoundError, ValueError) as exc:
        if getattr(exc, "path", None):  # a ModelFileError: a broken file is not silently replaced
            raise
        fallback = synthetic_protocol()
        net, card = get_model("mprage2mrf", "mprage2mrf", fallback, model_dir=context.model_dir, trainer=None,
                              seed=context.seed, allow_training=False)
        diffs = fallback.differences(protocol)
        warnings.append("the T1w protocol differs from the mprage2mrf model's (" + "; ".join(diffs) + "): the bundled "
                        "model of the synthetic MPRAGE was used; train one for this protocol with bids_qmri-train "
                        "--method mprage2mrf --sidecar <T1w.json>")
    return net, card, warnings


def match_coefficients(coeffs: np.ndarray, mask: np.ndarray, basis: torch.Tensor, mrf_protocol, context):
    """The MRF plug-in's ``dictmatch`` on synthesised coefficients ``[X, Y, Z, 4]`` of ``basis``
    (no B1 map: B1 = 1) -> ``(maps, provenance)``; options ``mprage2mrf_refine`` (default off) and
    ``mprage2mrf_grid_steps``."""
    from bids_qmri.modalities.base import EstimateContext
    from bids_qmri.modalities.mrf.estimate import estimate_dictmatch

    options = dict(context.options or {})
    match_options = {"mrf_refine": options.get("mprage2mrf_refine", "off"),
                     "mrf_grid_steps": options.get("mprage2mrf_grid_steps") or options.get("mrf_grid_steps") or 80}
    mctx = EstimateContext(model_dir=context.model_dir, seed=context.seed, device="cpu",
                           num_threads=context.num_threads, allow_training=False, options=match_options)
    return estimate_dictmatch({"signal": coeffs, "basis": np.asarray(basis)}, mask, mrf_protocol, mctx)


def estimate_mprage2mrf(data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """T1map and T2map (s) of the masked voxels from ``data["T1w"]``."""
    from bids_qmri.modalities.mrf.protocol import MRFProtocol

    mask = np.asarray(mask, dtype=bool)
    net, card, warnings = load_model_for(protocol, context)
    options = context.options or {}
    cohort = {}
    if options.get("mprage2mrf_train_on_cohort") == "on":
        from .cohort import cohort_model

        participant = options["mprage2mrf_participant"]
        net, card = cohort_model(net, card, participant, options["mprage2mrf_output_dir"], context,
                                 epochs=int(options.get("mprage2mrf_cohort_epochs") or 10))
        cohort = {"CohortTrainingParticipants": card["training"]["cohort_participants"],
                  "LeaveOneOut": f"{participant} is not among the participants the model was fine-tuned on"}
    torch.set_num_threads(max(1, int(context.num_threads)))
    coeffs = synthesise(net, np.asarray(data["T1w"], dtype=np.float32), mask)
    mrf = MRFProtocol.from_dict(card["mrf_protocol"])
    maps, mprov = match_coefficients(coeffs, mask, net.basis(), mrf, context)
    card = {k: v for k, v in card.items() if k not in ("history",)}
    provenance = {
        "method": "mprage2mrf",
        "algorithm": ALGORITHM.format(matching=mprov["algorithm"] + " (no B1 map: B1 = 1)"),
        "reference": card.get("reference", ""),
        "model_card": card,
        "warnings": warnings,
        "SynthesisedSVDComponents": card.get("components"),
        "RescaleTable": card.get("rescale_table"),
        "ModelTrainedOn": card.get("training_data"),
        "MRFProtocolKey": mrf.key(),
        **cohort,
        **{k: v for k, v in mprov.items() if k.startswith("Dictionary") or k in ("MedianMatchScore", "VoxelsNotMatched",
                                                                                  "Refinement", "SVDRank")},
    }
    return {"T1map": maps["T1map"], "T2map": maps["T2map"]}, provenance
