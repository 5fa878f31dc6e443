"""pc-bSSFP accuracy of the whole app on the synthetic phantom, side by side with the noise floor.

Simulates one participant (``bids_qmri-synth``: pc-bSSFP with its within-scan motion and a TB1TFL
B1 map, SNR 25 by default), runs ``bids_qmri DATA OUT participant`` on it with every bSSFP method,
and prints, per method and map, the median |relative error| in GM+WM against the ground truth
beside the same voxels simulated and fitted without any image processing (the per-voxel noise
floor; ``bids_qmri.modalities.bssfp.evaluate``). Also prints the wall and CPU time of the app.

``tests/test_bssfp_workflow.py`` runs the same comparison at 4 mm; the default resolution of the
synthetic data and of this script is 2 mm, where fewer voxels are tissue mixtures.

``--anatomy colin27`` uses the phantom whose head the pipeline has never seen
(``bids_qmri.synth.phantom``); ``--methods`` runs a subset.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_bssfp_accuracy.py [--resolution 2]
[--anatomy colin27] [--methods miracle]``
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bids_qmri.physics.bssfp import seed_protocol
from bids_qmri.modalities.bssfp.evaluate import error_table, noise_floor, workflow_errors

METHODS = ("miracle", "svnn", "pinn", "svnncomplex", "pinncomplex")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--snr", type=float, default=25.0, help="SNR of the synthetic data (default 25)")
    parser.add_argument("--seed", type=int, default=1, help="phantom and app seed (default 1)")
    parser.add_argument("--nprocs", type=int, default=2, help="processes for the app (default 2)")
    parser.add_argument("--anatomy", default="mni152", help="phantom anatomy (bids_qmri-synth --anatomy)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="bSSFP methods (default all)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_bssfp_accuracy_"))
    bids, out, models = root / "bids", root / "out", root / "models"
    bin_dir = Path(sys.executable).parent
    methods = tuple(args.methods)
    print(f"simulating one participant ({args.anatomy}) at {args.resolution:g} mm, SNR {args.snr:g} into {bids}",
          flush=True)
    _run([str(bin_dir / "bids_qmri-synth"), str(bids), "--participants", "1", "--sessions", "0",
          "--resolution", str(args.resolution), "--snr", str(args.snr), "--seed", str(args.seed),
          "--kinds", "bssfp", "tb1tfl", "--anatomy", args.anatomy])
    print(f"running bids_qmri participant ({', '.join(methods)})", flush=True)
    wall, cpu = time.perf_counter(), _children_cpu()
    _run([str(bin_dir / "bids_qmri"), str(bids), str(out), "participant", "--skip-bids-validation",
          "--methods", "bssfp:" + ",".join(methods), "--model-dir", str(models), "--seed", str(args.seed),
          "--nprocs", str(args.nprocs), "--omp-nthreads", "1", "-w", str(root / "work")])
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu

    acq = "pc12"
    errors = workflow_errors(bids, out, acq, methods)
    floor = noise_floor(bids, out, acq, methods, seed_protocol(12), models, snr=args.snr)
    print(f"\nmedian |relative error| (%) in GM+WM at {args.resolution:g} mm, SNR {args.snr:g}: "
          "the app vs the noise floor (same voxels, no processing)")
    print(error_table(errors, floor))
    print(f"\napp: {wall:.0f} s wall, {cpu:.0f} CPU-s (all processes)")


if __name__ == "__main__":
    main()
