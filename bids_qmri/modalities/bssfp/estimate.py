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
from bids_qmri.modalities.bssfp.net import NOISE_INPUT_SCALE, add_noise_input, bssfp_features, noise_level
from bids_qmri.physics.bssfp import BSSFPProtocol, normalise_configurations

__all__ = ["ALGORITHMS", "BSSFP_METHODS", "REFERENCES", "estimate", "estimate_bssfp", "estimate_noise_sigma", "predict"]

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


#: Share of the tissue voxels clipped at one end of a network's training range above which the map
#: is flagged: a sigmoid output cannot leave the range, so such voxels are clipped, not measured.
RANGE_LIMIT_WARNING_FRACTION = 0.05
#: What counts as tissue for the range warning (s): 3 T grey and white matter, including their
#: partial volume with up to ~10 % CSF (5 % CSF already raises GM's apparent T2 from ~0.11 to ~0.2 s).
#: Voxels beyond either limit are CSF-dominated: a network whose range ends below CSF is not
#: flagged for them. The anatomy's GM/WM is not on the map grid when the maps are estimated (the
#: ROI step registers it afterwards), so the data decide: the network's estimate, and MIRACLE's (no
#: range) for the voxels the network puts at a range limit.
TISSUE_RANGE = {"T1": 2.5, "T2": 0.3}
#: A voxel at a limit whose MIRACLE estimate lies within this fraction of that limit is not clipped:
#: the data themselves put it there.
RANGE_LIMIT_MARGIN = 0.1


def _range_limits(method: str, maps: dict, ranges: dict, reference=None, *, seed_set: bool = False
                  ) -> tuple[dict, list[str]]:
    """Tissue voxels within 1 % of each end of the training range, per map, and warnings where more
    than ``RANGE_LIMIT_WARNING_FRACTION`` of the tissue voxels are clipped at one end.

    ``reference(index) -> {"T1map": s, "T2map": s}`` estimates the voxels ``index`` (those at a
    limit) independently of the network (MIRACLE on the same data); elsewhere the network's own
    estimate stands. A voxel is tissue when that estimate lies inside ``TISSUE_RANGE`` for T1 and
    T2; a tissue voxel at a limit is clipped unless the estimate lies within ``RANGE_LIMIT_MARGIN``
    of the limit. So CSF that a network clips at its ceiling does not
    count, and tissue (or tissue partial volume) that it clips does, whatever the network's range.
    Without ``reference`` every voxel is tissue and every voxel at a limit counts as clipped.
    """
    key_of = {"T1map": "T1", "T2map": "T2"}
    present = [s for s in ("T1map", "T2map") if s in maps and key_of[s] in ranges]
    if not present:
        return {}, []
    shape = np.asarray(maps[present[0]]).shape
    finite = np.logical_and.reduce([np.isfinite(np.asarray(maps[s], dtype=np.float64)) for s in present])
    limits = {}
    for suffix in present:
        lo, hi = (float(v) for v in ranges[key_of[suffix]])
        values = np.asarray(maps[suffix], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            limits[suffix] = (lo, hi, finite & (values <= lo * 1.01), finite & (values >= hi * 0.99))
    ref = None
    if reference is not None:
        # away from the limits the network's own estimate is a measurement; at a limit it is not,
        # so those voxels get MIRACLE's
        ref = {s: np.asarray(maps[s], dtype=np.float64).copy() if s in maps else np.full(shape, np.nan)
               for s in ("T1map", "T2map")}
        index = np.flatnonzero(np.logical_or.reduce([low | high for _, _, low, high in limits.values()]))
        if index.size:
            estimated = reference(index)
            for s in ref:
                ref[s][index] = np.asarray(estimated[s], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            tissue = finite & (ref["T1map"] <= TISSUE_RANGE["T1"]) & (ref["T2map"] <= TISSUE_RANGE["T2"])
    else:
        tissue = finite
    n_tissue = int(tissue.sum())
    counts, warnings = {}, []
    for suffix in present:
        key = key_of[suffix]
        lo, hi, low, high = limits[suffix]
        with np.errstate(invalid="ignore"):
            if ref is not None:
                r = ref[suffix]
                low_clipped = tissue & low & ~(np.abs(r - lo) <= RANGE_LIMIT_MARGIN * lo)
                high_clipped = tissue & high & ~(np.abs(r - hi) <= RANGE_LIMIT_MARGIN * hi)
            else:
                low_clipped, high_clipped = low, high
        counts[suffix] = {"low": int(low.sum()), "high": int(high.sum()), "tissue": n_tissue,
                          "tissue_clipped_low": int(low_clipped.sum()),
                          "tissue_clipped_high": int(high_clipped.sum())}
        for clipped, end, limit in ((low_clipped, "lower", lo), (high_clipped, "upper", hi)):
            n = int(clipped.sum())
            if n_tissue and n / n_tissue > RANGE_LIMIT_WARNING_FRACTION:
                warnings.append(
                    f"{method}: {100 * n / n_tissue:.0f} % of the tissue voxels' {key} estimates are clipped at the "
                    f"{end} end of the network's training range ({1000 * limit:.0f} ms) where MIRACLE puts them "
                    "elsewhere; compare with MIRACLE, "
                    + ("use the default models (--bssfp-models default), " if seed_set else "")
                    + f"or train one on a wider distribution (bids_qmri-train --method {method} --distribution brain "
                    "--model-dir DIR, then run with --model-dir DIR)")
    return counts, warnings


#: Fewest background voxels from which the noise level is estimated (``estimate_noise_sigma``).
MIN_BACKGROUND_VOXELS = 200


def estimate_noise_sigma(F: np.ndarray, mask: np.ndarray, *, dilate: int = 2, rounds: int = 4
                         ) -> tuple[float | None, dict]:
    """Per-channel noise σ of the configurations ``F [X, Y, Z, 3]`` (F−1, F0, F1, receiver phase
    removed) from the background: the voxels outside ``mask`` dilated by ``dilate``.

    Seed 001 takes the standard deviation in a background mask. Here F±1 are used: after the
    receiver-phase removal F0 is real and non-negative (its phase defines the rotation), while the
    rotation leaves F±1's complex noise circular, so in pure noise |F±1|² = 2σ²·Exp(1) and
    σ² = median(|F±1|²)/(2 ln 2). Head tissue outside the brain mask (skull, skin) carries signal, so
    the estimate is repeated on the voxels whose |F0| and |F±1| stay below 4σ (a Rayleigh or circular
    Gaussian amplitude exceeds 4σ with probability 3e-4). The estimate is on the configurations the
    networks read: Gibbs removal interpolates and lowers the per-voxel noise in the background and the
    brain alike, which the estimate sees (0.64× on the 4-mm phantom); MP-PCA leaves most of the
    background as acquired and denoises the brain more, so with it σ is an upper bound for the brain.
    Returns ``(σ or None, info)``; None with a reason when fewer than ``MIN_BACKGROUND_VOXELS`` voxels
    are left."""
    from scipy import ndimage

    F = np.asarray(F)
    mask = np.asarray(mask, dtype=bool)
    outside = ~ndimage.binary_dilation(mask, iterations=dilate) if mask.any() else np.ones(mask.shape, bool)
    values = F[outside].reshape(-1, 3).astype(np.complex128)
    values = values[np.isfinite(values.real).all(1) & np.isfinite(values.imag).all(1) & (np.abs(values).sum(1) > 0)]
    info = {"method": "median of |F-1|^2 and |F+1|^2 over the background (outside the brain mask dilated by "
                      f"{dilate} voxels; voxels with |F| > 4 sigma left out, {rounds} rounds) / (2 ln 2)",
            "background_voxels": int(values.shape[0])}
    keep = np.ones(values.shape[0], bool)
    sigma = None
    for _ in range(rounds):
        if keep.sum() < MIN_BACKGROUND_VOXELS:
            info["reason"] = f"only {int(keep.sum())} background voxels (need {MIN_BACKGROUND_VOXELS})"
            return None, info
        power = np.concatenate([np.abs(values[keep, 0]) ** 2, np.abs(values[keep, 2]) ** 2])
        sigma = float(np.sqrt(np.median(power) / (2 * math.log(2))))
        if not sigma > 0:
            info["reason"] = "the background is exactly zero (no noise to measure)"
            return None, info
        keep = (np.abs(values) < 4 * sigma).all(1)
    info["voxels_used"] = int(keep.sum())
    return sigma, info


def estimate_bssfp(
    method: str,
    F,
    b1,
    protocol: BSSFPProtocol,
    *,
    noise_sigma: float | None = None,
    model_dir=None,
    seed: int = 0,
    allow_training: bool = True,
    device: str = "cpu",
    model_set: str | None = None,
    range_check: bool = True,
) -> tuple[dict[str, np.ndarray], dict]:
    """Parameter maps for ``N`` voxels.

    ``F``: complex ``[N, 3]`` configurations (F−1, F0, F1) after receiver-phase removal, not
    normalised. ``b1``: ``[N]`` (1 = nominal; NaN/non-positive values are treated as 1 and counted
    in the provenance). ``model_set``: the networks' bundled set (``models.MODEL_SETS``; None:
    ``default``). ``range_check``: count (and warn about) network estimates clipped at the training
    range (``_range_limits``; off for simulations that do not need it). ``noise_sigma``: the per-channel
    noise σ of ``F`` (its units; 0 = noise-free), which a noise-conditioned net reads as η = σ/‖F‖ per
    voxel (``net.noise_level``); None: not given, a noise-conditioned net is then run at η = 0 (noise-free
    data) and the provenance's σ is None (other methods ignore it). Returns ``({"T1map": s, "T2map": s[, "fieldmap": Hz]}, provenance)``;
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
                              device=device, model_set=model_set)
        x = bssfp_features(f.to(torch.complex64), torch.as_tensor(b1, dtype=torch.float32), net.kind)
        if getattr(net, "noise_input", False):
            known = noise_sigma is not None and math.isfinite(noise_sigma) and noise_sigma >= 0
            sigma = float(noise_sigma) if known else 0.0  # unknown: as for noise-free data (η = 0)
            eta = noise_level(torch.as_tensor(F).to(torch.complex128), sigma)
            x = add_noise_input(x, (NOISE_INPUT_SCALE * eta).to(torch.float32))
            provenance["noise_input"] = {"sigma_configurations": sigma if known else None, "scale": NOISE_INPUT_SCALE,
                                         "eta_median": float(np.median(eta[ok].numpy())) if bool(ok.any()) else None}
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
        mag = f.abs().numpy()

        def reference(index):  # MIRACLE on the voxels a network puts at a range limit
            t1_ref, t2_ref, _ = miracle(mag[index], b1[index], tr=protocol.tr, te=protocol.te,
                                        flip_rad=protocol.flip_rad)
            return {"T1map": t1_ref, "T2map": t2_ref}

        if range_check:
            limits, warnings = _range_limits(method, maps, card.get("parameter_ranges", {}), reference,
                                             seed_set=model_set == "seed")
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
    volume_f = np.asarray(data["configurations"])
    F = volume_f[mask].astype(np.complex128)
    b1 = np.asarray(data["b1"], dtype=np.float64)[mask]
    sigma, noise_info = (None, {}) if method == "miracle" else estimate_noise_sigma(volume_f, mask)
    maps, provenance = estimate_bssfp(method, F, b1, protocol, model_dir=context.model_dir, seed=context.seed,
                                      allow_training=context.allow_training, device=context.device,
                                      model_set=(context.options or {}).get("bssfp_models"), noise_sigma=sigma)
    if "noise_input" in provenance:  # a noise-conditioned net: how its noise level was measured
        provenance["noise_input"]["estimate"] = noise_info
        if sigma is None:
            warning = (f"{method}: the noise level could not be measured ({noise_info.get('reason', 'no background')}): "
                       "the noise-conditioned network ran as for noise-free data; give the series a background "
                       "(field of view beyond the head) or compare with MIRACLE")
            log.warning(warning)
            provenance.setdefault("warnings", []).append(warning)
    volumes = {}
    for suffix, values in maps.items():
        volume = np.full(mask.shape, np.nan, dtype=np.float32)
        volume[mask] = values
        volumes[suffix] = volume
    return volumes, provenance
