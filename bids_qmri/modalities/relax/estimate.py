"""Maximum-likelihood T1 (inversion recovery) and T2 (multi-echo) maps: the modality contract's
``estimate`` over ``mle`` (``bids_qmri.modalities.relax.mle``, seed 004's reference method).

Options (``bids_qmri`` command line → ``context.options``): ``relax_likelihood`` (``gaussian``, the
default as in seed 004, or ``rician``), ``relax_sigma`` (noise σ per real channel in image units;
default for the Rician likelihood: estimated from the series' background voxels) and
``relax_lambda_b`` (seed 004's Laplacian regularisation of the IR inversion efficiency, 0 = off).
"""

from __future__ import annotations

import numpy as np

from . import REFERENCE

IR_ALGORITHM = ("maximum-likelihood fit of |A(1 - B exp(-TI/T1))| per voxel: batched Levenberg-Marquardt "
                "with analytic Jacobians over all voxels, polarity restoration over the null position of "
                "the magnitude data, {likelihood} likelihood{regularised}")
T2_ALGORITHM = ("maximum-likelihood fit of |A exp(-TE/T2)| per voxel: log-linear start, batched "
                "Levenberg-Marquardt with analytic Jacobians over all voxels, {likelihood} likelihood")
LIKELIHOODS = ("gaussian", "rician")


def _noise(data: dict, context) -> tuple[str, float | None, str]:
    """(likelihood, σ or None, where σ came from)."""
    options = context.options or {}
    likelihood = str(options.get("relax_likelihood") or "gaussian")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"relax likelihood {likelihood!r}: use gaussian or rician")
    sigma = options.get("relax_sigma")
    if sigma is not None:
        return likelihood, float(sigma), "given (--relax-sigma)"
    if likelihood == "gaussian":
        return likelihood, None, "not needed (least squares)"
    from .mle import estimate_sigma_background

    background = np.asarray(data["background"]) > 0
    return likelihood, estimate_sigma_background(data["signal"], background), \
        f"background, {int(background.sum())} voxels (Rayleigh, sqrt(mean m^2 / 2))"


def _volume(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.full(mask.shape, np.nan, dtype=np.float32)
    out[mask] = values
    return out


def estimate_ir(data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """``data["signal"]`` ``[X, Y, Z, K]`` magnitudes at ``protocol.times`` (TI, s)."""
    from .mle import fit_inversion_recovery, fit_inversion_recovery_volume

    likelihood, sigma, sigma_source = _noise(data, context)
    lambda_b = float((context.options or {}).get("relax_lambda_b") or 0.0)
    signal = np.asarray(data["signal"], dtype=np.float64)
    ti = np.asarray(protocol.times, dtype=np.float64)
    if lambda_b > 0:
        fit = fit_inversion_recovery_volume(signal, mask, ti, lambda_b=lambda_b, likelihood=likelihood, sigma=sigma,
                                            device=context.device)
        maps = {"T1map": fit["T1"], "M0map": fit["A"], "IEmap": fit["B"]}
        valid, converged = fit["valid"][mask], fit["converged"][mask]
        if sigma is None and np.isfinite(fit["sigma"]):  # the joint fit's data term needed one
            sigma, sigma_source = float(fit["sigma"]), "residuals of the voxel-wise fit"
    else:
        fit = fit_inversion_recovery(signal[mask], ti, likelihood=likelihood, sigma=sigma, device=context.device)
        maps = {"T1map": _volume(fit["T1"], mask), "M0map": _volume(fit["A"], mask), "IEmap": _volume(fit["B"], mask)}
        valid, converged = fit["valid"], fit["converged"]
    regularised = f", Laplacian regularisation of B (lambda_B = {lambda_b:g})" if lambda_b > 0 else ""
    provenance = {
        "method": "mle",
        "algorithm": IR_ALGORITHM.format(likelihood=likelihood.capitalize(), regularised=regularised),
        "reference": REFERENCE,
        "settings": {"likelihood": likelihood, "noise_sigma": sigma, "noise_sigma_source": sigma_source,
                     "lambda_b": lambda_b, "inversion_times_s": [float(t) for t in ti],
                     "bounds": {"T1_s": [0.01, 10.0], "B": [0.0, 2.5], "A": [0.0, None]}},
        "voxels_not_converged": int((~np.asarray(converged, dtype=bool)).sum()),
        "voxels_invalid": int((~np.asarray(valid, dtype=bool)).sum()),
    }
    return maps, provenance


def estimate_t2(data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """``data["signal"]`` ``[X, Y, Z, K]`` magnitudes at ``protocol.times`` (TE, s)."""
    from .mle import fit_t2_decay

    likelihood, sigma, sigma_source = _noise(data, context)
    signal = np.asarray(data["signal"], dtype=np.float64)
    te = np.asarray(protocol.times, dtype=np.float64)
    fit = fit_t2_decay(signal[mask], te, likelihood=likelihood, sigma=sigma, device=context.device)
    maps = {"T2map": _volume(fit["T2"], mask), "M0map": _volume(fit["A"], mask)}
    provenance = {
        "method": "mle",
        "algorithm": T2_ALGORITHM.format(likelihood=likelihood.capitalize()),
        "reference": REFERENCE,
        "settings": {"likelihood": likelihood, "noise_sigma": sigma, "noise_sigma_source": sigma_source,
                     "echo_times_s": [float(t) for t in te], "bounds": {"T2_s": [0.001, 10.0], "A": [0.0, None]}},
        "voxels_not_converged": int((~np.asarray(fit["converged"], dtype=bool)).sum()),
        "voxels_invalid": int((~np.asarray(fit["valid"], dtype=bool)).sum()),
    }
    return maps, provenance
