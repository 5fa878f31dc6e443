"""Choose the knots of the synthetic dataset's hybrid-state qMT schedule (``physics.qmt.default_qmt_schedule``).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/design_qmt_schedule.py CPU_SECONDS SEED [--rank 13]
        [--objective {crb,efficiency}] [--draws 64] [--draw-seed 16] [--max-sar F] [--max-crb-growth F]
        [--hold-efficiency] [--knots FILE] [--evaluate N] [--out FILE]

A random search (multiplicative perturbations of a few knots at a time, keep if better) over the
flip-angle and pulse-duration knots of ``physics.qmt.schedule_from_knots``, minimising the mean of
``log(√CRB/value)`` of m0s (weight 2), T1 and T2f over three tissues (WM, GM and the mean of seed
003's training distribution) at SNR_max 50, from the exact Jacobian of the full 1142-frame signal
over all 8 parameters (``modalities.qmt.simulate.crb_from_jacobian``). Prints every improvement and,
at the end, the same bounds on a rank-13 SVD basis of 192 random training fingerprints.
A poor man's version of the optimal control seed 003's group uses (its ref. 38); not a substitute.

The bundled ``SCHEDULE_KNOTS`` are, since 2026-12-04, candidate C of ``--objective efficiency``
(below; issue 16, models/bundled/qmt/TRAINING.md), which started from the previous knots. Those came
from 127 iterations of this search (seed 2, ~150 CPU-s at load
~14) started from hand-drawn knots (flips 90, 40, 10, 4, 3, 20, 60, 90, 60, 30, 60, 90, 60, 20, 8°;
durations 300 ×5, 100, 100, 500, 500, 100, 100, 500, 500, 300, 300 µs): full-signal √CRB/θ at
SNR_max 50 went from m0s 0.63/1.19/0.96, T1 0.07/0.11/0.18, T2f 0.06/0.06/0.14 (WM/GM/prior mean)
to 0.18/0.34/0.24, 0.05/0.08/0.12, 0.027/0.026/0.042 (rank 13: 0.32/0.73/0.55, 0.15/0.20/0.32,
0.07/0.10/0.15); the previous six-lobe train had 0.52/1.07/0.75, 0.49/0.82/1.30, 0.03/0.04/0.07
(rank 13: 6.9/4.5/4.5, 6.6/3.1/7.8, 0.26/0.34/0.63). Rerunning it continues from the bundled knots
(now C's; ``--max-sar``, ``--max-crb-growth`` and ``--hold-efficiency`` then compare with C).
``--rank 13`` scores every candidate on that rank-13 SVD bound instead (issue 16: seed 5, 373
iterations in ~270 CPU-s took the rank-13 m0s bound from 0.32/0.72/0.54 to 0.19/0.37/0.26 and T1 from
0.15/0.19/0.31 to 0.07/0.10/0.15, T2f 0.07/0.09/0.15 to 0.05/0.05/0.07; not adopted: keeping the
schedule and choosing the basis for information, ``simulate.fisher_basis``, does as well; TRAINING.md).

``--objective efficiency`` (issue 16, "std/√CRB close to 1"): maximise instead the mean over
``--draws`` fixed draws of seed 003's training distribution (``simulate.sample_parameters``, generator
seed ``--draw-seed``) of ``log √(B_k/CRB_k)`` for m0s (weight 2), T1 and T2f, at SNR_max 50 on the
full signal: B = diag((F + P)⁻¹) the prior-informed bound (``simulate.prior_informed_bound``, P =
``simulate.prior_precision``, the training distribution's), i.e. the predicted std/√CRB of an
estimator that uses the training prior (what the nets do; TRAINING.md "Why std < √CRB"). In one
dimension B/CRB = F/(F + P), so the objective can only rise by raising the information F relative to
the prior's P: an honest target for "std/√CRB → 1" (unlike log √CRB it saturates at 1 once
F ≫ P, so each target counts by how far its data are from outweighing its prior). ``--max-sar F``:
reject candidates whose SAR-like energy Σ α²/τ over the cycle (∝ ∫ω1² dt of the rectangular pulses, without the fixed inversion)
exceeds F × that of the bundled knots; ``--max-crb-growth F``: reject candidates whose full-signal
√CRB of T1 or T2f at one of the three tissues exceeds F × the bundled knots'; ``--hold-efficiency``:
reject candidates whose mean log √(B/CRB) of T1 or T2f over the draws falls below the bundled
knots' (so that m0s cannot be bought with T1 and T2f). Flip ≤ 180° and ω1 ≤ 2π·1 kHz, pulses
100-500 µs on the 10-µs raster hold for every candidate (``physics.qmt.schedule_from_knots`` clips to them).
``--evaluate N``: after the search (0 CPU-s: only this), for the final knots and the bundled ones
on the first N draws of dataset #1 (``simulate.sample_parameters(9056, TR, seed 777)``, the insilico
CLI's test set) with each schedule's rank-13 information-keeping basis (``synth.dataset.qmt_basis_for``,
``simulate.fisher_basis``; what the nets see): quartiles of √CRB/θ, of √(B/CRB) and of the
linearised Bayes estimator's std/√CRB = √(BFB/CRB) (``scripts/qmt_prior_bound.py``), plus √CRB/θ at
the three tissues, the SAR ratio and the flip/duration ranges. ``--knots FILE`` starts from (or,
with 0 CPU-s, evaluates) knots in a JSON file ``{"flip_deg": [...], "duration_us": [...]}``, of any
number (``schedule_from_knots`` spaces them evenly); a start that the constraints reject is searched
from anyway, and the first candidate that satisfies them is kept.
Issue 16 (2026-12-03; TRAINING.md "Designing the acquisition"): 64 draws (seed 16), SAR ≤ 1.25×.
Unconstrained (1200 CPU-s, seed 16) the rank-13 predicted m0s ratio rose most but T1 and T2f lost
(tissue √CRB of T2f +42-64 %); with ``--max-crb-growth 1.15 --hold-efficiency`` (seed 17, 400 CPU-s,
then seed 18, 720 CPU-s from its knots) the candidate knots (flips 5.9, 32.7, 8.0, 4.8, 1.0, 1.2,
31.6, 180, 11.0, 44.7, 158.7, 40.2, 1.4, 11.0, 1.2°; durations 500, 500, 500, 362, 229, 441, 270,
446, 240, 500, 145, 100, 119, 100, 115 µs; SAR-like 0.70×) predict on dataset #1 (1 024 draws,
rank-13 ``fisher_basis``) medians √(B/CRB) 0.63 / 0.83 / 0.79 and linearised Bayes std/√CRB
0.50 / 0.77 / 0.73 (bundled knots: 0.395 / 0.75 / 0.73 and 0.27 / 0.67 / 0.685), tissue √CRB of T1
and T2f within −14 … +8 % of the bundled train's. Nets trained for it (32 k samples, 240 epochs):
qmtnet std/√CRB medians 0.52 / 0.75 / 0.95 on dataset #1 (bundled 0.26 / 0.62 / 0.79), brain m0s
errors lower, but held-out CRB loss 1.59 > 1.2 (T2f under-trained): not installed then. Trained from
scratch on 65 536 samples (2026-12-04) they reach 1.00 and std/√CRB medians 0.54 / 0.77 / 0.89 (9 056 × 300):
C is the bundled schedule since.

"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.modalities.qmt import simulate
from bids_qmri.physics import qmt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qmt_prior_bound import linear_bayes_ratio  # noqa: E402  (the diagnosis's linearised Bayes estimator)

#: m0s, T1, T2f, T2s, Rx, B0, B1 of the tissues the design is scored on (phantom WM/GM, seed 003 prior mean)
TISSUES = {"WM": [0.16, 0.78, 0.08, 12e-6, 30.0, 0.0, 1.0], "GM": [0.07, 1.4, 0.11, 11e-6, 35.0, 0.0, 1.0],
           "prior mean": [0.12, 1.6, 0.1, 12e-6, 44.0, 0.0, 1.0]}
WEIGHTS = torch.tensor([2.0, 1.0, 1.0])
SNR_MAX = 50.0
TARGETS = ("m0s", "T1", "T2f")


def relative_bounds(schedule: dict, rank: int = 0, basis: torch.Tensor | None = None) -> torch.Tensor:
    """``√CRB/value`` of (m0s, T1, T2f) per tissue ``[3, 3]`` at SNR_max 50 (full signal, a rank-``rank``
    SVD of 192 training fingerprints, or the given ``basis`` [Nt, R])."""
    theta = torch.tensor(list(TISSUES.values()), dtype=torch.float64)
    s, jac = qmt.hybrid_state_jacobian(*theta.T, **schedule)
    if rank and basis is None:
        p = simulate.sample_parameters(192, schedule["tr"], torch.Generator().manual_seed(0))
        dictionary = qmt.hybrid_state_signal(*p.float().T, **schedule).to(torch.complex128)
        basis = torch.linalg.svd(dictionary, full_matrices=False)[2][:rank].mH
    if basis is not None:
        u = basis.to(torch.complex128)
        s, jac = s @ u, (jac.transpose(-1, -2) @ u).transpose(-1, -2)
    crb = simulate.crb_from_jacobian(s, jac) / SNR_MAX**2
    return (crb.sqrt() / theta)[:, :3]


def bounds_at(theta: torch.Tensor, schedule: dict, basis: torch.Tensor | None = None,
              precision: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """At draws ``theta [N, 7]`` (SNR_max 50, σ = ``simulate.NOISE_SIGMA``; full signal or ``basis``):
    ``crb``, ``b`` (prior-informed bound with ``precision``, default the training prior's) and
    ``bayes`` (the linearised posterior mean's variance, diag BFB), each ``[N, 3]`` for m0s, T1, T2f."""
    sigma = simulate.NOISE_SIGMA
    c, j = simulate.coefficient_jacobian(theta, schedule, basis, dtype=torch.float64, chunk=64)
    fisher = simulate.fisher_from_jacobian(c, j, sigma, SNR_MAX * sigma)
    prec = simulate.prior_precision(schedule["tr"]) if precision is None else precision
    crb = simulate.prior_informed_bound(fisher, torch.zeros(9, dtype=torch.float64))[:, :3]  # = the CRB
    b = simulate.prior_informed_bound(fisher, prec)[:, :3]
    bayes = linear_bayes_ratio(fisher, prec, crb) ** 2 * crb
    return {"crb": crb, "b": b, "bayes": bayes}


def sar(schedule: dict) -> float:
    """SAR-like RF energy of one cycle, Σ α²/τ (rad²/s; ∝ Σ ω1² τ of rectangular pulses), inversion excluded."""
    return float((schedule["flip_rad"] ** 2 / schedule["pulse_dur"]).sum())


def load_knots(path) -> tuple[np.ndarray, np.ndarray]:
    d = json.loads(Path(path).read_text())
    return np.asarray(d["flip_deg"], float), np.asarray(d["duration_us"], float)


def quartiles(a) -> str:
    return "/".join(f"{v:.3g}" for v in np.quantile(np.asarray(a), [0.25, 0.5, 0.75]))


def evaluate(knots: dict[str, tuple], n: int) -> None:
    """Print the rank-13 (information-keeping basis) predictions of each schedule on dataset #1's first ``n`` draws."""
    from bids_qmri.synth.dataset import qmt_basis_for

    ref = qmt.default_qmt_schedule()
    for name, (f, d) in knots.items():
        t0 = time.process_time()
        sched = qmt.schedule_from_knots(f, d)
        basis, _ = qmt_basis_for(sched, 13)
        theta = simulate.sample_parameters(9056, sched["tr"], torch.Generator().manual_seed(777))[:n]
        r = bounds_at(theta, sched, basis)
        print(f"== {name}: dataset #1 first {n} draws, SNR_max {SNR_MAX:g}, rank-13 fisher_basis; quartiles 25/50/75 %")
        print("   flip %.1f-%.1f deg, pulse %.0f-%.0f us, SAR-like / bundled %.3f, max w1/2pi %.0f Hz" % (
            float(sched["flip_rad"].min().rad2deg()), float(sched["flip_rad"].max().rad2deg()),
            1e6 * float(sched["pulse_dur"].min()), 1e6 * float(sched["pulse_dur"].max()), sar(sched) / sar(ref),
            float((sched["flip_rad"] / sched["pulse_dur"]).max()) / (2 * np.pi)))
        for i, k in enumerate(TARGETS):
            print(f"   {k:4s} sqrtCRB/theta {quartiles(r['crb'][:, i].sqrt() / theta[:, i]):>20s}"
                  f"  sqrt(B/CRB) {quartiles((r['b'] / r['crb'])[:, i].sqrt()):>16s}"
                  f"  lin.Bayes std/sqrtCRB {quartiles((r['bayes'] / r['crb'])[:, i].sqrt()):>16s}"
                  f"  median sqrtCRB {float(r['crb'][:, i].sqrt().median()):.4g}")
        print("   tissues WM/GM/prior mean sqrtCRB/theta (rank 13):",
              relative_bounds(sched, basis=basis).numpy().round(4).tolist())
        print("   tissues (full signal):", relative_bounds(sched).numpy().round(4).tolist())
        print(f"   {time.process_time() - t0:.0f} CPU-s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cpu_seconds", type=float)
    p.add_argument("seed", type=int)
    p.add_argument("--rank", type=int, default=0,
                   help="score on the rank-RANK SVD basis (192 training fingerprints per candidate) instead of the full signal")
    p.add_argument("--objective", choices=("crb", "efficiency"), default="crb",
                   help="crb: mean log sqrt(CRB)/value at three tissues (minimised); efficiency: mean log "
                        "sqrt(B/CRB) over prior draws (maximised; full signal)")
    p.add_argument("--draws", type=int, default=64, help="efficiency: number of fixed prior draws")
    p.add_argument("--draw-seed", type=int, default=16, help="efficiency: generator seed of the draws")
    p.add_argument("--max-sar", type=float, default=None, metavar="F",
                   help="reject candidates with sum(flip^2/duration) above F x the bundled knots'")
    p.add_argument("--max-crb-growth", type=float, default=None, metavar="F",
                   help="efficiency: reject candidates whose full-signal sqrt(CRB) of T1 or T2f at a design tissue "
                        "exceeds F x the bundled knots'")
    p.add_argument("--hold-efficiency", action="store_true",
                   help="efficiency: reject candidates whose mean log sqrt(B/CRB) of T1 or T2f over the draws "
                        "falls below the bundled knots'")
    p.add_argument("--knots", default=None, help='start from knots in a JSON file {"flip_deg": [...], "duration_us": [...]}')
    p.add_argument("--evaluate", type=int, default=0, metavar="N",
                   help="at the end, rank-13 predictions on N dataset-#1 draws for the final and the bundled knots")
    p.add_argument("--out", default=None, help="write the final knots to this JSON file")
    a = p.parse_args()
    if a.objective == "efficiency" and a.rank:
        p.error("--objective efficiency scores the full signal; drop --rank")
    if not 8 <= a.draws <= 1024:
        p.error("--draws must lie in [8, 1024]")
    if a.max_sar is not None and not a.max_sar > 0:
        p.error("--max-sar must be > 0 (a factor of the bundled schedule's SAR-like energy)")
    if a.objective != "efficiency" and (a.max_crb_growth or a.hold_efficiency):
        p.error("--max-crb-growth and --hold-efficiency constrain --objective efficiency only")
    if a.max_crb_growth is not None and not a.max_crb_growth >= 1:
        p.error("--max-crb-growth must be >= 1 (the bundled knots must satisfy it)")
    if not 0 <= a.evaluate <= 9056:
        p.error("--evaluate N must lie in [0, 9056] (dataset #1)")
    torch.set_num_threads(1)
    rng = np.random.default_rng(a.seed)
    try:
        flips, durs = load_knots(a.knots) if a.knots else (np.array(v, dtype=float) for v in qmt.SCHEDULE_KNOTS)
    except (OSError, ValueError, KeyError) as exc:
        p.error(f"--knots {a.knots}: {exc}")
    ref_sched = qmt.default_qmt_schedule()  # the bundled knots: what every constraint compares with
    sar_limit = None if a.max_sar is None else a.max_sar * sar(ref_sched)
    tr = qmt.schedule_from_knots(flips, durs)["tr"]
    draws = simulate.sample_parameters(a.draws, tr, torch.Generator().manual_seed(a.draw_seed))
    prec = simulate.prior_precision(tr)

    ref_tissues = relative_bounds(ref_sched) if a.max_crb_growth else None
    ref_eff = None
    if a.hold_efficiency:
        r0 = bounds_at(draws, ref_sched, precision=prec)
        ref_eff = torch.log((r0["b"] / r0["crb"]).sqrt()).mean(0)

    def score(f, d, rank=0):
        """(value to minimise, what to print); +inf for a candidate the constraints reject."""
        sched = qmt.schedule_from_knots(f, d)
        if a.objective == "efficiency":
            if ref_tissues is not None and (relative_bounds(sched)[:, 1:] > a.max_crb_growth * ref_tissues[:, 1:]).any():
                return float("inf"), None
            r = bounds_at(draws, sched, precision=prec)
            eff = (r["b"] / r["crb"]).sqrt()
            if ref_eff is not None and (torch.log(eff).mean(0)[1:] < ref_eff[1:]).any():
                return float("inf"), None
            return -float((torch.log(eff) * WEIGHTS).mean()), eff.median(0).values
        r = relative_bounds(sched, rank)
        return float((torch.log(r) * WEIGHTS).mean()), r

    best, r = score(flips, durs, a.rank)
    if r is None:  # e.g. more knots resampled from the bundled curve, a hair below it in T1/T2f: search anyway
        print("start rejected by the constraints: the first candidate that satisfies them is kept", flush=True)
    else:
        print("start", round(best, 4), r.numpy().round(3).tolist(), flush=True)
    it = rejected = 0
    while time.process_time() < a.cpu_seconds:
        it += 1
        step = 0.4 if it % 3 == 0 else 0.15
        f2 = np.clip(flips * np.exp(step * rng.standard_normal(flips.size) * (rng.random(flips.size) < 0.3)), 1, 180)
        d2 = np.clip(durs * np.exp(step * rng.standard_normal(durs.size) * (rng.random(durs.size) < 0.3)), 100, 500)
        if sar_limit is not None and sar(qmt.schedule_from_knots(f2, d2)) > sar_limit:
            rejected += 1
            continue
        v, r2 = score(f2, d2, a.rank)
        rejected += v == float("inf")
        if v < best:
            best, flips, durs, r = v, f2, d2, r2
            print(it, round(best, 4), r.numpy().round(3).tolist(), f"{time.process_time():.0f} CPU-s",
                  file=sys.stdout, flush=True)
    print("flip knots (deg)", flips.round(1).tolist())
    print("duration knots (us)", durs.round(0).tolist())
    print("iterations", it, "rejected by the constraints", rejected, "score", round(best, 4))
    if a.out:
        Path(a.out).write_text(json.dumps({"flip_deg": flips.round(1).tolist(), "duration_us": durs.round(0).tolist(),
                                           "objective": a.objective, "iterations": it,
                                           # null, not the non-standard Infinity, when no knots met the constraints
                                           "score": best if math.isfinite(best) else None}, indent=1))
    if a.evaluate:
        evaluate({"bundled SCHEDULE_KNOTS": qmt.SCHEDULE_KNOTS,
                  "final knots (rounded as printed)": (flips.round(1), durs.round(0))}, a.evaluate)
    else:
        final = score(flips, durs)[1]
        print(f"full signal ({a.objective})", "rejected by the constraints" if final is None else final.numpy().round(3).tolist())
        print("rank 13", relative_bounds(qmt.schedule_from_knots(flips, durs), rank=13).numpy().round(3).tolist())


if __name__ == "__main__":
    main()
