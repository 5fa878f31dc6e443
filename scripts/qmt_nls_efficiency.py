"""How close does NLLS come to std/√CRB = 1 on the synthetic qMT schedule, beside qmtnet?

Seed 003's gold standard, NLLS over all 8 parameters (``nls.fit_nls``), fitted to the *same* noisy
coefficients as the bundled ``qmtnet`` (``insilico.noise_realisations``' draws: test dataset #1 =
``simulate_set(n, seed=777)``, SNR_max = |M0|/σ, random M0 phase), so that the two estimators'
std/√CRB, bias and CRB-normalised loss are compared draw for draw.

``--start truth`` starts LM at the true 7 parameters and M0 (the local MLE: the gold standard at
its best, with no multi-start error); ``--start workflow`` uses the starts ``qmtnls`` uses in the
workflow (the network's estimate and the best coarse-grid point, ``estimate.NLS_STARTS``). The
physics runs in float32 here (the workflow: float64), ~2× faster and far below the noise.

Split the samples over processes with ``--part K/N`` (each writes ``OUT/part_K.npz``), then
``OUT --report`` prints the table. Example (2 cores, ~0.6 CPU-s per fit with ``--start truth``)::

    for k in 0 1; do OMP_NUM_THREADS=1 python scripts/qmt_nls_efficiency.py OUT --samples 64 \\
        --noise 50 --part $k/2 & done; wait; python scripts/qmt_nls_efficiency.py OUT --report
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bids_qmri.modalities.qmt import estimate, simulate
from bids_qmri.modalities.qmt.insilico import crb_at, decompose, noise_realisations, noisy_coefficients
from bids_qmri.modalities.qmt.net import OUTPUTS
from bids_qmri.modalities.qmt.nls import fit_nls
from bids_qmri.modalities.qmt.protocol import synthetic_protocol
from bids_qmri.modalities.qmt.training import OUT_INDEX
from bids_qmri.models.registry import get_model


def _test_set(n: int):
    """Dataset #1 as ``bids_qmri-insilico qmt --test-samples n`` draws it, with the synthetic protocol."""
    from bids_qmri.synth.dataset import qmt_basis

    basis, sched = qmt_basis()  # as the insilico command simulates (the protocol only finds the nets)
    proto, _ = synthetic_protocol()
    return simulate.simulate_set(n, sched, basis, seed=777, with_fisher=True, log=None), basis, sched, proto


def _bundled_qmtnet(proto):
    return get_model("qmt", "qmtnet", proto, model_dir=None, trainer=None, allow_training=False)[0]


def fit_part(out: Path, n: int, n_noise: int, snr: float, part: int, parts: int, start: str, iterations: int):
    torch.set_num_threads(1)
    data, basis, sched, proto = _test_set(n)
    y = torch.stack(list(noisy_coefficients(data, snr, n_noise, seed=0)))
    rows = torch.arange(n)[part::parts]
    theta = data["theta"][rows]
    est = np.full((n_noise, len(rows), 7), np.nan)
    conv = np.zeros((n_noise, len(rows)), bool)
    net = _bundled_qmtnet(proto) if start == "workflow" else None
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(n_noise):
        yk = y[k, rows]
        if start == "truth":
            o = fit_nls(yk, sched, basis, x_net=theta, n_grid_starts=0, max_iter=iterations)
        else:
            o = fit_nls(yk, sched, basis, x_net=estimate.predict(net, yk), n_grid_starts=estimate.NLS_STARTS,
                        max_iter=iterations)
        est[k] = torch.stack([o[p] for p in simulate.PARAMETERS], 1).double().numpy()
        conv[k] = o["converged"].numpy()
        print(f"part {part}/{parts} draw {k + 1}/{n_noise}: {time.process_time() - c0:.0f} CPU-s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"part_{part}.npz", rows=rows.numpy(), est=est, converged=conv,
             cpu_s=time.process_time() - c0, wall_s=time.perf_counter() - t0, n=n, n_noise=n_noise, snr=snr,
             start=start, iterations=iterations)


def _quart(x):
    return "{:.2f} / {:.2f} / {:.2f}".format(*np.quantile(x, [0.25, 0.5, 0.75]))


def report(out: Path):
    parts = [np.load(p) for p in sorted(out.glob("part_*.npz"))]
    n, n_noise, snr = int(parts[0]["n"]), int(parts[0]["n_noise"]), float(parts[0]["snr"])
    data, _, _, proto = _test_set(n)
    est = np.full((n_noise, n, 7), np.nan)
    conv = np.zeros((n_noise, n), bool)
    for p in parts:
        est[:, p["rows"]] = p["est"]
        conv[:, p["rows"]] = p["converged"]
    done = ~np.isnan(est[0, :, 0])
    truth = data["theta"][done][:, OUT_INDEX]
    crb = crb_at(data, snr)[done]
    net = _bundled_qmtnet(proto)
    # the net sees every sample's draws (the generator runs over all samples), then the fitted ones are kept
    est_of = {"qmtnls": torch.from_numpy(est[:, done][:, :, OUT_INDEX]),
              "qmtnet": noise_realisations(net, data, snr, n_noise, seed=0)[:, done]}
    nets = decompose(est_of["qmtnet"], truth, crb)
    print(f"{int(done.sum())} samples x {n_noise} draws, SNR_max {snr:g}, start {parts[0]['start']}, "
          f"{int(parts[0]['iterations'])} LM iterations; NLLS {sum(float(p['cpu_s']) for p in parts):.0f} CPU-s "
          f"({sum(float(p['cpu_s']) for p in parts) / (done.sum() * n_noise):.2f} per fit); "
          f"converged {conv[:, done].mean():.1%}")
    print("| | " + " | ".join(OUTPUTS) + " |")
    print("|---|" + "---|" * len(OUTPUTS))
    nls = decompose(est_of["qmtnls"], truth, crb)
    low = [crb[:, i] <= torch.quantile(crb[:, i], 0.25) for i in range(3)]
    for name, o in (("qmtnls", nls), ("qmtnet", nets)):
        r = o["std_over_sqrt_crb"].numpy()
        print(f"| {name} std/√CRB quartiles | " + " | ".join(_quart(r[:, i]) for i in range(3)) + " |")
        print(f"| {name} lowest-CRB quarter median | "
              + " | ".join(f"{np.median(r[low[i].numpy(), i]):.2f}" for i in range(3)) + " |")
        b = (o["bias"] / crb.sqrt()).numpy()
        print(f"| {name} bias/√CRB quartiles | " + " | ".join(_quart(b[:, i]) for i in range(3)) + " |")
        err = est_of[name] - truth
        print(f"| {name} RMSE (SI) | " + " | ".join(f"{float(err[..., i].pow(2).mean().sqrt()):.3g}" for i in range(3))
              + " |")
        print(f"| {name} loss = bias + variance | " + " | ".join(
            f"{float(o['loss'][:, i].mean()):.2f} = {float(o['loss_bias'][:, i].mean()):.2f} + "
            f"{float(o['loss_variance'][:, i].mean()):.2f}" for i in range(3)) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--noise", type=int, default=50)
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--part", default="0/1", help="K/N: fit every N-th sample from K")
    ap.add_argument("--start", choices=("truth", "workflow"), default="truth")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--report", action="store_true", help="combine OUT/part_*.npz and print the table")
    a = ap.parse_args(argv)
    if a.report:
        report(a.out)
        return
    k, n = (int(v) for v in a.part.split("/"))
    fit_part(a.out, a.samples, a.noise, a.snr, k, n, a.start, a.iterations)


if __name__ == "__main__":
    main()
