"""Which training distribution and output scaling for the default pc-bSSFP networks (issue 18)?

Trains the same network (method, protocol, samples, epochs, seed) on each candidate
(distribution, target scaling) and reports its noise-free |relative error| on two test sets
drawn independently of any training sample: *tissue* (uniform over the seed's range, T1
0.36–2.08 s, T2 20–120 ms, B1 0.7–1.3) and *extended* (log-uniform T1 0.36–5 s, T2 20 ms–2.5 s,
T2 < T1, B1 0.6–1.4: brain with CSF partial volume). One CPU thread.

    nice -n 10 python benchmarks/bench_bssfp_distribution.py --method svnn --npc 12 --epochs 10
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bids_qmri.modalities.bssfp.training import TrainConfig, simulate_features, train_bssfp_net
from bids_qmri.physics.bssfp import BSSFPProtocol

CANDIDATES = (("uniform", "linear"), ("uniform_extended", "linear"), ("uniform_extended", "log"),
              ("loguniform", "log"), ("brain", "log"))


def test_set(name: str, n: int, seed: int, with_b0: bool, tr: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "tissue":
        t1 = torch.empty(n, dtype=torch.float64).uniform_(0.36, 2.08, generator=g)
        t2 = torch.empty(n, dtype=torch.float64).uniform_(0.02, 0.12, generator=g)
        b1 = torch.empty(n, dtype=torch.float64).uniform_(0.7, 1.3, generator=g)
    else:
        t1 = torch.empty(4 * n, dtype=torch.float64).uniform_(math.log(0.36), math.log(5.0), generator=g).exp()
        t2 = torch.empty(4 * n, dtype=torch.float64).uniform_(math.log(0.02), math.log(2.5), generator=g).exp()
        keep = t2 < t1
        t1, t2 = t1[keep][:n], t2[keep][:n]
        b1 = torch.empty(n, dtype=torch.float64).uniform_(0.6, 1.4, generator=g)
    theta = torch.empty(n, dtype=torch.float64).uniform_(-0.9 * math.pi, 0.9 * math.pi, generator=g)
    b0 = theta / (2 * math.pi * tr) if with_b0 else torch.zeros(n, dtype=torch.float64)
    return {"T1": t1, "T2": t2, "B1": b1, "B0": b0}


def errors(net, params, protocol) -> dict[str, float]:
    x = simulate_features(params, protocol, net.kind).float()
    with torch.inference_mode():
        y = net(x).double()
    out = {}
    for i, key in enumerate(("T1", "T2")):
        rel = (y[:, i] - params[key]).abs() / params[key]
        out[key] = (100 * float(rel.median()), 100 * float(rel.mean()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="svnn")
    ap.add_argument("--npc", type=int, default=12)
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test", type=int, default=20_000)
    ap.add_argument("--candidates", nargs="+", default=[f"{d}:{t}" for d, t in CANDIDATES])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    protocol = BSSFPProtocol.with_default_increments(0.0048, 0.0024, 15.0, args.npc)
    complex_net = args.method.endswith("complex")
    sets = {name: test_set(name, args.test, 1234 + i, complex_net, protocol.tr) for i, name in enumerate(("tissue", "extended"))}
    print(f"{args.method} Npc {args.npc}: {args.samples} samples, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr} cosine; noise-free |rel err| % median (mean)")
    print("| distribution | targets | tissue T1 | tissue T2 | extended T1 | extended T2 | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for cand in args.candidates:
        dist, targets = cand.split(":")
        cfg = TrainConfig(method=args.method, distribution=dist, targets=targets, n_samples=args.samples,
                          max_epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          lr_schedule="cosine", keep="last", seed=1, threads=1, progress=False,
                          pinn_feature_scale="input_std" if args.method == "pinncomplex" else "none")
        t0 = time.process_time()
        net, _ = train_bssfp_net(protocol, cfg)
        cpu = time.process_time() - t0
        e = {name: errors(net, p, protocol) for name, p in sets.items()}
        cells = [f"{e[s][k][0]:.2f} ({e[s][k][1]:.2f})" for s in ("tissue", "extended") for k in ("T1", "T2")]
        print(f"| {dist} | {targets} | " + " | ".join(cells) + f" | {cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
