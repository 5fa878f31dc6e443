"""T1/T2 (and ΔB0) maps from pc-bSSFP configurations with any of the five methods (SPEC §7).

``estimate_bssfp`` takes the configurations of the masked voxels, normalises them, and runs
MIRACLE or a network (bundled, cached or trained on the fly). ``estimate`` is the modality
contract's form of it (volumes in, volumes out), which the generic estimation node calls.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from bids_qmri.fitting.miracle import MIRACLE_DEFAULTS, miracle
from bids_qmri.modalities.bssfp.net import bssfp_features
from bids_qmri.physics.bssfp import BSSFPProtocol, normalise_configurations

__all__ = ["ALGORITHMS", "BSSFP_METHODS", "REFERENCES", "estimate", "estimate_bssfp", "predict"]

log = logging.getLogger("bids_qmri.modalities.bssfp.estimate")

from bids_qmri.modalities.bssfp import METHODS  # noqa: E402 (the declaration holds the texts)

BSSFP_METHODS = tuple(m.name for m in METHODS)
REFERENCES = {m.name: m.reference for m in METHODS}
ALGORITHMS = {m.name: m.algorithm for m in METHODS}


def predict(net, features: torch.Tensor, batch: int = 1 << 18, device: str = "cpu") -> np.ndarray:
    """Run a network over ``[N, n_in]`` features in batches on ``device``; returns ``[N, n_out]`` float32."""
    out = np.empty((features.shape[0], len(net.outputs)), dtype=np.float32)
    net.eval()
    net.to(device)
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch):
            out[start : start + batch] = net(features[start : start + batch].to(device)).cpu().numpy()
    net.to("cpu")
    return out


#: Share of the estimated voxels at one end of a network's training range above which the map
#: is flagged: a sigmoid output cannot leave the range, so such voxels are clipped, not measured.
RANGE_LIMIT_WARNING_FRACTION = 0.05


def _range_limits(method: str, maps: dict, ranges: dict) -> tuple[dict, list[str]]:
    """Voxels within 1 % of each end of the training range, per map, and warnings where more than
    ``RANGE_LIMIT_WARNING_FRACTION`` of the estimates sit at one end."""
    counts, warnings = {}, []
    for suffix, key in (("T1map", "T1"), ("T2map", "T2")):
        if key not in ranges or suffix not in maps:
            continue
        lo, hi = (float(v) for v in ranges[key])
        values = np.asarray(maps[suffix], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = int((values <= lo * 1.01).sum()), int((values >= hi * 0.99).sum())
        counts[suffix] = {"low": low, "high": high}
        for n, end, limit in ((low, "lower", lo), (high, "upper", hi)):
            if values.size and n / values.size > RANGE_LIMIT_WARNING_FRACTION:
                warnings.append(f"{method}: {100 * n / values.size:.0f} % of the {key} estimates sit at the {end} "
                                f"end of the network's training range ({1000 * limit:.0f} ms) and are clipped "
                                "there; compare with MIRACLE, or train a model on a wider distribution "
                                f"(bids_qmri-train --method {method} --distribution uniform_extended --model-dir DIR, "
                                "then run with --model-dir DIR)")
    return counts, warnings


def estimate_bssfp(
    method: str,
    F,
    b1,
    protocol: BSSFPProtocol,
    *,
    model_dir=None,
    seed: int = 0,
    allow_training: bool = True,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], dict]:
    """Parameter maps for ``N`` voxels.

    ``F``: complex ``[N, 3]`` configurations (F−1, F0, F1) after receiver-phase removal, not
    normalised. ``b1``: ``[N]`` (1 = nominal; NaN/non-positive values are treated as 1 and counted
    in the provenance). Returns ``({"T1map": s, "T2map": s[, "fieldmap": Hz]}, provenance)``;
    voxels that cannot be estimated are NaN. ``provenance`` has ``algorithm`` and ``reference``
    (text for the sidecar), ``model_card`` (dict for the networks, None for MIRACLE) and counts.
    """
    if method not in BSSFP_METHODS:
        raise ValueError(f"unknown bSSFP method {method!r}; use one of {', '.join(BSSFP_METHODS)}")
    F = np.asarray(F)
    b1 = np.asarray(b1, dtype=np.float64).reshape(-1)
    if F.ndim != 2 or F.shape[1] != 3 or F.shape[0] != b1.shape[0]:
        raise ValueError(
            f"estimate_bssfp: expected F [N, 3] complex and b1 [N], got {F.shape} and {b1.shape}"
        )
    bad_b1 = ~np.isfinite(b1) | (b1 <= 0)
    if bad_b1.any():
        b1 = np.where(bad_b1, 1.0, b1)
    t0 = time.perf_counter()
    provenance: dict = {
        "method": method,
        "algorithm": ALGORITHMS[method],
        "reference": REFERENCES[method],
        "model_card": None,
        "protocol_key": protocol.key(),
        "voxels_without_b1": int(bad_b1.sum()),
    }
    f = normalise_configurations(torch.as_tensor(F).to(torch.complex128))
    ok = torch.isfinite(f.real).all(1) & torch.isfinite(f.imag).all(1) & (f.abs().sum(1) > 0)
    n = F.shape[0]

    if method == "miracle":
        t1, t2, rounds = miracle(
            f.abs().numpy(), b1, tr=protocol.tr, te=protocol.te, flip_rad=protocol.flip_rad
        )
        maps = {"T1map": t1, "T2map": t2}
        provenance["device"] = "cpu"  # MIRACLE's search runs on the CPU whatever --device says
        provenance["settings"] = {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in MIRACLE_DEFAULTS.items()},
            "units": "s",
            "median_rounds": float(np.median(rounds)) if n else 0.0,
            "voxels_at_max_rounds": int((rounds >= MIRACLE_DEFAULTS["max_rounds"]).sum()),
        }
    else:
        from bids_qmri.modalities.bssfp.models import get_model

        net, card = get_model(method, protocol, model_dir=model_dir, seed=seed, allow_training=allow_training,
                              device=device)
        x = bssfp_features(f.to(torch.complex64), torch.as_tensor(b1, dtype=torch.float32), net.kind)
        x[~ok] = 0.0
        y = predict(net, x, device=device)
        y[~ok.numpy()] = math.nan
        maps = {"T1map": y[:, 0], "T2map": y[:, 1]}
        if net.kind == "complex":
            maps["fieldmap"] = y[:, 2]
        provenance["model_card"] = {k: v for k, v in card.items() if k != "history"}
        lo, hi = card["b1_range"]
        outside = int(((b1 < lo) | (b1 > hi)).sum())
        if outside:
            provenance["voxels_outside_trained_b1_range"] = outside
        limits, warnings = _range_limits(method, maps, card.get("parameter_ranges", {}))
        provenance["voxels_at_range_limits"] = limits
        if warnings:
            provenance["warnings"] = warnings
    for warning in provenance.get("warnings", []):
        log.warning(warning)
    maps = {k: np.asarray(v, dtype=np.float32) for k, v in maps.items()}
    provenance["elapsed_s"] = round(time.perf_counter() - t0, 3)
    provenance["voxels_estimated"] = int(np.isfinite(maps["T1map"]).sum())
    return maps, provenance


def estimate(method: str, data: dict, mask: np.ndarray, protocol: BSSFPProtocol, context) -> tuple[dict, dict]:
    """The modality contract's estimate (bound to ``method`` in the declaration):
    ``data["configurations"]`` complex ``[X, Y, Z, 3]`` and ``data["b1"]`` ``[X, Y, Z]`` on one
    grid, ``mask`` the voxels to map; returns volumes (NaN where not estimated)."""
    F = np.asarray(data["configurations"])[mask].astype(np.complex128)
    b1 = np.asarray(data["b1"], dtype=np.float64)[mask]
    maps, provenance = estimate_bssfp(method, F, b1, protocol, model_dir=context.model_dir, seed=context.seed,
                                      allow_training=context.allow_training, device=context.device)
    volumes = {}
    for suffix, values in maps.items():
        volume = np.full(mask.shape, np.nan, dtype=np.float32)
        volume[mask] = values
        volumes[suffix] = volume
    return volumes, provenance
