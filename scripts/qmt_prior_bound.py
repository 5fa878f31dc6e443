"""Issue 16 diagnosis: how much of the gap std/√CRB < 1 of the qMT networks the training prior explains.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/qmt_prior_bound.py [N] [--snr 50] [--widen NAME=FACTOR ...]

On the first N samples of seed 003's dataset #1 as ``bids_qmri-insilico qmt --test-samples 9056`` draws
it (``simulate.sample_parameters(9056, TR, seed 777)``; the synthetic dataset's schedule and basis),
at SNR_max 50, prints per target (m0s, T1, T2f) the quartiles of

* √(B/CRB), B = diag((F + P)⁻¹) the prior-informed bound (``simulate.prior_informed_bound``; F the
  Fisher matrix of the CRB, P the training distribution's precision, ``simulate.prior_precision``:
  Gaussian approximation, M0 flat because the nets see unit-norm coefficients);
* std/√CRB of the linearised Bayes estimator (the posterior mean of the linear-Gaussian model with
  that prior: covariance B F B), i.e. what a net that learnt the posterior mean would show;
* the attribution: median √(B_k/CRB) with the prior of one parameter k at a time (and of the
  nuisances only, the targets only).

``--widen``: also the linearised Bayes std/√CRB for a prior widened as
``simulate.widened_distributions`` (the test samples stay seed 003's). ``--known B1`` (or any nuisance):
the parameter is known exactly (e.g. B1 from a B1 map given to the net as an input), so its row and
column leave the Fisher and prior matrices; the CRB, B and every ratio are then those of the smaller
model. About 15 CPU-ms per sample.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bids_qmri.modalities.qmt import simulate
from bids_qmri.synth.dataset import qmt_basis

TARGETS = ("m0s", "T1", "T2f")


def quartiles(a) -> str:
    return "/".join(f"{v:.2f}" for v in np.quantile(np.asarray(a), [0.25, 0.5, 0.75]))


def linear_bayes_ratio(fisher: torch.Tensor, precision: torch.Tensor, crb: torch.Tensor) -> torch.Tensor:
    """std/√CRB ``[N, 3]`` of the linear-Gaussian posterior mean: covariance (F+P)⁻¹ F (F+P)⁻¹."""
    b = torch.linalg.inv(fisher + torch.diag(precision))
    v = (b @ fisher @ b).diagonal(dim1=-2, dim2=-1)[:, :3]
    return (v / crb).sqrt()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int, nargs="?", default=2048)
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--widen", nargs="+", default=[], metavar="NAME=FACTOR")
    p.add_argument("--known", nargs="+", default=[], choices=simulate.PARAMETERS[3:], metavar="NAME",
                   help="nuisance parameters known exactly (dropped from the Fisher and prior matrices)")
    a = p.parse_args()
    try:
        widen = simulate.parse_widen(a.widen)
    except ValueError as exc:
        p.error(str(exc))
    if not 1 <= a.n <= 9056:
        p.error("N must lie in [1, 9056] (dataset #1)")
    torch.set_num_threads(1)
    cpu = time.process_time()
    basis, sched = qmt_basis()
    theta = simulate.sample_parameters(9056, sched["tr"], torch.Generator().manual_seed(777))[:a.n]
    c, j = simulate.coefficient_jacobian(theta, sched, basis)
    sigma, m0 = simulate.NOISE_SIGMA, a.snr * simulate.NOISE_SIGMA
    fisher = simulate.fisher_from_jacobian(c, j, sigma, m0)
    prec = simulate.prior_precision(sched["tr"])
    keep = [i for i in range(fisher.shape[-1])
            if i >= len(simulate.PARAMETERS) or simulate.PARAMETERS[i] not in a.known]
    fisher, prec = fisher[:, keep][:, :, keep], prec[keep]  # the targets stay first: [:, :3] below
    crb = simulate.prior_informed_bound(fisher, torch.zeros_like(prec))[:, :3]  # precision 0: the CRB
    bound = simulate.prior_informed_bound(fisher, prec)[:, :3]
    names = [k for k in simulate.PARAMETERS if k not in a.known]
    print(f"dataset #1, first {a.n} samples, SNR_max {a.snr:g}, known: {a.known or 'none'}; median sqrt(CRB):",
          [f"{float(v):.4g}" for v in crb.sqrt().median(0).values], "; prior SD:",
          {k: f"{float(v):.3g}" for k, v in zip(names, 1 / prec[:len(names)].sqrt())})
    print("quartiles (25/50/75 %)     ", "  ".join(f"{k:>14s}" for k in TARGETS))
    print("sqrt(B/CRB)                ", "  ".join(f"{quartiles((bound / crb)[:, i].sqrt()):>14s}" for i in range(3)))
    lin = linear_bayes_ratio(fisher, prec, crb)
    print("linear Bayes std/sqrt(CRB) ", "  ".join(f"{quartiles(lin[:, i]):>14s}" for i in range(3)))
    if widen:
        wl = linear_bayes_ratio(fisher, simulate.prior_precision(sched["tr"], widen)[keep], crb)
        print(f"  ... prior widened {widen}", "  ".join(f"{quartiles(wl[:, i]):>14s}" for i in range(3)))
    print("attribution: median sqrt(B_k/CRB) with the prior of k only")
    groups = {**{k: [i] for i, k in enumerate(names)}, "nuisances only": list(range(3, len(names))),
              "targets only": [0, 1, 2], "all": list(range(len(names)))}
    for name, ks in groups.items():
        pk = torch.zeros(len(keep), dtype=torch.float64)
        pk[ks] = prec[ks]
        bk = simulate.prior_informed_bound(fisher, pk)[:, :3]
        print(f"  {name:15s}", "  ".join(f"{float(v):6.3f}" for v in (bk / crb).sqrt().median(0).values))
    print(f"{time.process_time() - cpu:.0f} CPU-s")


if __name__ == "__main__":
    main()
