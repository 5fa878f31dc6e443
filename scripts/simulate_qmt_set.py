"""Simulate one shard of the bundled qMT networks' training set (synthetic dataset's schedule and basis).

    OMP_NUM_THREADS=1 nice -n 10 python scripts/simulate_qmt_set.py N SEED OUT_DIR [--parts K] [--start K0] \
        [--widen NAME=FACTOR ...]

K parts (k = K0 .. K0 + K - 1; ``--start`` regenerates one lost part, e.g. the held-out ``set_2_3``) ``modalities.qmt.simulate.simulate_set(N, schedule, basis, seed=SEED·1000 + k)``, each
saved as ``OUT_DIR/set_<SEED>_<k>.pt`` when done (so a shared machine's partial progress is kept):
parameters from seed 003's distributions, exact fingerprints on ``synth.dataset.qmt_basis()``, the
CRB of every sample over all 8 parameters (``physics.qmt.hybrid_state_jacobian``). Parts are
independent draws; ``scripts/train_qmt_bundled.py`` concatenates them. ``--widen m0s=2 T1=2 T2s=2 Rx=2``:
draw from ``simulate.widened_distributions`` instead (issue 16; recorded in each part as ``widen``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from bids_qmri.modalities.qmt import simulate
from bids_qmri.synth.dataset import qmt_basis


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first part index k (default 0)")
    p.add_argument("--widen", nargs="+", default=[], metavar="NAME=FACTOR",
                   help="widen these training distributions (simulate.widened_distributions), e.g. m0s=2 Rx=2")
    a = p.parse_args()
    try:
        widen = simulate.parse_widen(a.widen)
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    basis, sched = qmt_basis()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(a.start, a.start + a.parts):
        cpu = time.process_time()
        data = simulate.simulate_set(a.n, sched, basis, seed=1000 * a.seed + k, widen=widen)
        data["cpu_seconds"] = torch.tensor(time.process_time() - cpu, dtype=torch.float64)
        torch.save(data, a.out_dir / f"set_{a.seed}_{k}.pt")
        print(f"part {k}: {a.n} samples: {float(data['seconds']):.0f} s wall, {float(data['cpu_seconds']):.0f} s CPU "
              f"({1e3 * float(data['cpu_seconds']) / a.n:.1f} CPU-ms per sample)", flush=True)


if __name__ == "__main__":
    main()
