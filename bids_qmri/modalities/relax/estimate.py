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


LEARNED_ALGORITHM = {
    "rim": ("recurrent inference machine (seed 004): {steps} steps of a convolutional GRU cell on the current "
            "estimate and the autograd gradient of the Gaussian log-likelihood of {model}{gradient}, applied slice "
            "by slice (2D, as trained) to the series divided by the median over the brain mask of its maximum"),
    "resnet": ("ResNet (seed 004 baseline): {blocks} residual blocks of zero-padded 3x3 convolutions mapping the "
               "{n} images of the series to the maps of {model}, slice by slice (2D), series divided by the median "
               "over the brain mask of its maximum"),
}
GRADIENT_TEXT = {"raw": "", "gauss_newton": " divided per voxel and parameter by its Gauss-Newton curvature"}
MODEL_TEXT = {"ir": "|A(1 - B exp(-TI/T1))|", "t2": "|A exp(-TE/T2)|"}


def infer_volume(net, signal: np.ndarray, mask: np.ndarray, times, kind: str, *, slices_per_batch: int = 4,
                 scale_mask: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Maps of a learned network over a volume ``signal`` ``[X, Y, Z, N]``, slice by slice along
    the third axis (slices without mask voxels are skipped) -> (``{parameter: [X, Y, Z]}`` NaN
    outside ``mask``, the signal scale: median over ``scale_mask``, default ``mask``, of the
    maximum over the series). A comes back in the units of ``signal``."""
    import torch

    from . import rim

    mask = np.asarray(mask, dtype=bool)
    x = torch.as_tensor(np.asarray(signal, dtype=np.float32))
    x = torch.nan_to_num(x, nan=0.0).clamp_min(0.0)
    mip = x.amax(-1)[torch.as_tensor(mask if scale_mask is None else np.asarray(scale_mask, dtype=bool))]
    scale = float(mip.median()) if mip.numel() and float(mip.median()) > 0 else 1.0
    x = (x / scale).permute(2, 3, 0, 1)  # [Z, N, X, Y]
    times_t = torch.as_tensor(np.asarray(times, dtype=np.float32))
    names = rim.PARAMETERS[kind]
    out = {n: np.full(mask.shape, np.nan, dtype=np.float32) for n in names}
    slices = [z for z in range(mask.shape[2]) if mask[..., z].any()]
    net.eval()
    with torch.no_grad():
        for start in range(0, len(slices), slices_per_batch):
            zs = slices[start:start + slices_per_batch]
            est = rim.to_physical(net(x[zs], times_t)[-1], kind).numpy()  # [b, Q, X, Y]
            for i, z in enumerate(zs):
                m = mask[..., z]
                for q, n in enumerate(names):
                    out[n][..., z][m] = est[i, q][m]
    out["A"] *= scale
    return out, scale


def estimate_learned(method: str, data: dict, mask: np.ndarray, protocol, context) -> tuple[dict, dict]:
    """The contract's ``estimate`` for ``rim`` and ``resnet`` (IRT1 and MESE series)."""
    import torch

    from .models import get_model

    kind = "ir" if protocol.time_key == "InversionTime" else "t2"
    options = context.options or {}
    overrides = {}
    if options.get("relax_train_iterations"):
        overrides["iterations"] = int(options["relax_train_iterations"])
    threads = max(1, int(context.num_threads or 1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net, card = get_model(method, protocol, model_dir=context.model_dir, seed=context.seed,
                              allow_training=context.allow_training, threads=threads, train_overrides=overrides)
        maps, scale = infer_volume(net, data["signal"], mask, protocol.times, kind)
    finally:
        torch.set_num_threads(old)
    cfg = net.config()
    algorithm = LEARNED_ALGORITHM[method].format(steps=cfg.get("steps"), blocks=len(cfg.get("channels", ())),
                                                 n=cfg.get("n_times"), model=MODEL_TEXT[kind],
                                                 gradient=GRADIENT_TEXT.get(cfg.get("gradient", "raw"), ""))
    out = {"M0map": maps["A"]}
    if kind == "ir":
        out.update({"T1map": maps["T1"], "IEmap": maps["B"]})
    else:
        out["T2map"] = maps["T2"]
    provenance = {
        "method": method,
        "algorithm": algorithm,
        "reference": REFERENCE,
        "model_card": card,
        "settings": {"signal_scale": scale, "times_s": [float(t) for t in protocol.times],
                     "model_times_s": card.get("times_s"), "architecture": cfg},
    }
    return out, provenance
