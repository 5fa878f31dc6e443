"""Why the default pc-bSSFP nets' T2 CoD at SNR 10 is below MIRACLE's (README): per noise draw, the
T1/T2 estimates on the seed's grid (seed protocol, B1 = 1, on resonance), the CoD of the Monte Carlo
mean (seed 001's definition, ``insilico.cod``) and median, how many draws land far above tissue, and
where MIRACLE puts those draws' T1; plus the noise-free mean |relative error| on the grid.

``--nets PATH ...`` evaluates candidate networks (``.safetensors``, e.g. from ``bids_qmri-train
--snr 50 --init-from <bundled net>``) on the same draws, beside MIRACLE and the bundled nets.

    nice -n 10 python benchmarks/bench_bssfp_lowsnr_tails.py --snr 15 10 --nets /tmp/svnn.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bids_qmri.modalities.bssfp.estimate import estimate_bssfp, predict
from bids_qmri.modalities.bssfp.insilico import cod, linear_grid
from bids_qmri.modalities.bssfp.training import simulate_signal
from bids_qmri.physics.bssfp import configurations, normalise_configurations, remove_receiver_phase, seed_protocol
from bids_qmri.modalities.bssfp.net import (
    NOISE_INPUT_SCALE,
    add_noise_input,
    bssfp_features,
    configuration_noise_sigma,
    noise_level,
)
from bids_qmri.physics.noise import add_complex_noise, noise_sigma

CASES = (("miracle", "default"), ("svnn", "default"), ("pinn", "default"), ("svnncomplex", "default"),
         ("pinncomplex", "default"), ("svnn", "seed"), ("pinn", "seed"))


def _estimate(case, features, protocol, snr=float("inf")):
    """(T1, T2) per row of ``features`` for a (method, model set) pair or a network file; a
    noise-conditioned net is told the test noise (``snr``; inf = noise-free), as ``estimate_bssfp`` does."""
    sigma = configuration_noise_sigma(noise_sigma(snr), protocol.npc) if np.isfinite(snr) else 0.0
    if isinstance(case, Path):
        from bids_qmri.nets.io import load_net

        net = load_net(case).eval()
        f = normalise_configurations(torch.as_tensor(features).to(torch.complex128)).to(torch.complex64)
        x = bssfp_features(f, torch.ones(len(features)), net.kind)
        if getattr(net, "noise_input", False):
            eta = noise_level(torch.as_tensor(features).to(torch.complex128), sigma)
            x = add_noise_input(x, (NOISE_INPUT_SCALE * eta).float())
        y = predict(net, x)
        return y[:, 0].astype(float), y[:, 1].astype(float)
    method, model_set = case
    maps, _ = estimate_bssfp(method, features, np.ones(len(features)), protocol, model_set=model_set,
                             range_check=False, allow_training=False, noise_sigma=sigma)
    return maps["T1map"].astype(float), maps["T2map"].astype(float)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0])
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--grid", type=int, default=50, help="grid points per axis")
    ap.add_argument("--nets", type=Path, nargs="*", default=[], help="candidate network files")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    protocol = seed_protocol(12)
    grid = linear_grid(args.grid)
    n = grid["T1"].numel()
    truth = {"T1": grid["T1"].numpy(), "T2": grid["T2"].numpy()}
    signal = simulate_signal(grid, protocol)
    clean = configurations(remove_receiver_phase(signal), protocol.phase_increments_rad()).numpy()
    noisy = {}
    for snr in args.snr:
        s = signal.unsqueeze(0).expand(args.draws, n, -1).reshape(-1, protocol.npc)
        s = add_complex_noise(s, snr, torch.Generator().manual_seed(1))
        noisy[snr] = configurations(remove_receiver_phase(s), protocol.phase_increments_rad()).numpy()
    print(f"seed protocol, {args.grid}×{args.grid} seed grid, {args.draws} draws per SNR; CoD of the MC mean "
          "(MC median) T1 / T2; draws with T2 > 0.3 s and the median T1 estimate of those draws")
    for case in [*CASES, *args.nets]:
        label = f"{case.parent.name}/{case.name}" if isinstance(case, Path) else f"{case[0]} ({case[1]})"
        t1, t2 = _estimate(case, clean, protocol)
        row = (f"{label:44s} noise-free |rel err| {100 * np.mean(np.abs(t1 / truth['T1'] - 1)):.2f} / "
               f"{100 * np.mean(np.abs(t2 / truth['T2'] - 1)):.2f} %")
        for snr, features in noisy.items():
            est = dict(zip(("T1", "T2"), (v.reshape(args.draws, n) for v in _estimate(case, features, protocol, snr))))
            far = est["T2"] > 0.3
            row += (f" | SNR {snr:g}: " + " / ".join(f"{cod(truth[k], np.nanmean(est[k], 0)):.4f} "
                                                      f"({cod(truth[k], np.nanmedian(est[k], 0)):.4f})" for k in ("T1", "T2"))
                    + f", T2 > 0.3 s {100 * far.mean():.2f} % (T1 there {np.median(est['T1'][far]) if far.any() else np.nan:.2f} s)")
        print(row, flush=True)


if __name__ == "__main__":
    main()
