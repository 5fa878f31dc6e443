"""The pc-bSSFP networks on the demo's phantom (issue 18 acceptance), side by side with MIRACLE.

Runs what ``make demo`` runs, for the bSSFP methods only (``bids_qmri-synth --participants 2
--sessions 2 --resolution 3 --seed 1`` with the kinds bSSFP, TB1TFL and T1w; ``bids_qmri …
participant --methods bssfp:all`` and ``group``), then prints

- per participant and session, the median |relative error| of T1 and T2 in GM+WM (ground-truth
  segmentation on the bSSFP grid, inside the workflow's brain mask) of every method against the
  phantom's ground truth, and each network's difference to MIRACLE in points;
- the group report's Lin CCC (``group/agreement.tsv``) of T1 and T2 between MIRACLE and every
  network, per atlas;
- the range warnings in the maps' sidecars.

``--bssfp-models seed`` runs the seed-range networks instead of the default ones; ``--bids`` reuses
a simulated dataset. One run at 3 mm on the shared 2-core machine: ~15–30 min wall (59 min
measured at load 9–16, 1171 CPU-s). ``--direct`` skips the app: the GM+WM voxels of sub-01 ses-01 are simulated from
the ground truth (its B1, ΔB0 and M0) with the dataset's noise (SNR 25) and estimated by every
method of both model sets directly (no image processing; noise-conditioned nets are told the known
noise level), printing the same errors and the range warnings; seconds, not minutes.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_bssfp_demo.py --work /tmp/demo
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

METHODS = ("miracle", "svnn", "pinn", "svnncomplex", "pinncomplex")


def _exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def session_errors(bids: Path, out: Path, sub: str, ses: str | None, acq: str = "pc12") -> dict:
    """{(method, suffix): median |rel err| %} in GM+WM of the truth inside the brain mask, for the
    methods whose maps the run wrote."""
    from bids_qmri.modalities.bssfp.evaluate import workflow_errors

    anat = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    written = [m for m in METHODS if list(anat.glob(f"*_acq-{acq}_desc-{m}_T1map.nii.gz"))]
    errors = workflow_errors(bids, out, acq, written, sub=sub, ses=ses)
    return {(method, suffix): value for (method, suffix, part), value in errors.items() if part == "all"}


def warnings_of(out: Path) -> list[str]:
    found = []
    for side in sorted(out.glob("sub-*/**/*_desc-*_T?map.json")):
        for w in json.loads(side.read_text()).get("Warnings", []):
            found.append(f"{side.name}: {w}")
    return found


def direct(bids: Path, sub: str = "01", ses: str | None = "01", snr: float = 25.0, seed: int = 11) -> None:
    """Per-voxel comparison without the app (see the module docstring)."""
    import torch

    from bids_qmri.modalities.bssfp.estimate import estimate_bssfp
    from bids_qmri.modalities.bssfp.net import configuration_noise_sigma
    from bids_qmri.physics.bssfp import bssfp_signal, seed_protocol
    from bids_qmri.physics.noise import add_complex_noise, noise_sigma
    from bids_qmri.preproc.configurations import compute_configurations

    torch.set_num_threads(1)
    p = seed_protocol(12)
    gt = bids / "derivatives" / "groundtruth" / f"sub-{sub}" / (f"ses-{ses}" if ses else "")
    stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_acq-pc12"

    def load(datatype, suffix):
        return nib.load(gt / datatype / f"{stem}_{suffix}.nii.gz").get_fdata()

    tissue = (load("anat", "desc-brain_mask") > 0) & np.isin(load("anat", "dseg"), (1, 2))
    t1, t2, m0 = (load("anat", s)[tissue] for s in ("T1map", "T2map", "M0map"))
    b1, b0 = load("fmap", "TB1map")[tissue], load("fmap", "fieldmap")[tissue]
    tt = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    S = bssfp_signal(tt(t1), tt(t2), tt(m0), tt(b1), tt(b0), tr=p.tr, te=p.te, flip_rad=p.flip_rad,
                     phase_increments_rad=p.phase_increments_rad())
    F = compute_configurations(add_complex_noise(S, snr, torch.Generator().manual_seed(seed)).numpy(),
                               p.phase_increments_deg)
    print(f"sub-{sub} ses-{ses}: {tissue.sum()} GM+WM voxels simulated at SNR {snr:g}, truth T2 > 120 ms in "
          f"{100 * np.mean(t2 > 0.12):.0f} %; median |relative error| (%), T1 / T2, (points vs MIRACLE)")
    ref = None
    for model_set in ("default", "seed"):
        for m in METHODS:
            if m == "miracle" and ref is not None:
                continue
            # the known noise, as the workflow's background estimate gives it to noise-conditioned nets
            maps, prov = estimate_bssfp(m, F, b1, p, allow_training=False, model_set=model_set,
                                        noise_sigma=configuration_noise_sigma(noise_sigma(snr), p.npc))
            e = [100 * float(np.median(np.abs(maps[k] / v - 1))) for k, v in (("T1map", t1), ("T2map", t2))]
            ref = ref or e
            label = "miracle" if m == "miracle" else f"{m} ({model_set})"
            print(f"  {label:22s} {e[0]:5.2f} / {e[1]:5.2f}  ({e[0] - ref[0]:+.2f} / {e[1] - ref[1]:+.2f})  "
                  f"range warnings: {len(prov.get('warnings', []))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the dataset, outputs and work")
    ap.add_argument("--bids", type=Path, default=None, help="reuse this simulated dataset")
    ap.add_argument("--bssfp-models", default="default", choices=("default", "seed"))
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--skip-run", action="store_true", help="only evaluate outputs already under --work")
    ap.add_argument("--direct", action="store_true", help="per-voxel comparison without the app (seconds)")
    args = ap.parse_args(argv)
    work = args.work
    bids = args.bids or work / "bids"
    if args.direct:
        if not bids.exists():
            _run([_exe("bids_qmri-synth"), str(bids), "--participants", "2", "--sessions", "2", "--resolution", "3",
                  "--seed", "1", "--kinds", "bssfp", "tb1tfl", "t1w"])
        direct(bids)
        return 0
    out = work / f"out-{args.bssfp_models}"
    if not args.skip_run:
        if args.bids is None and not bids.exists():
            _run([_exe("bids_qmri-synth"), str(bids), "--participants", "2", "--sessions", "2", "--resolution", "3",
                  "--seed", "1", "--kinds", "bssfp", "tb1tfl", "t1w"])
        wall = _run([_exe("bids_qmri"), str(bids), str(out), "participant", "-w", str(work / f"work-{args.bssfp_models}"),
                     "--nprocs", str(args.nprocs), "--seed", "1", "--methods", "bssfp:all",
                     "--bssfp-models", args.bssfp_models, "--skip-bids-validation"])
        wall += _run([_exe("bids_qmri"), str(bids), str(out), "group", "-w", str(work / f"work-{args.bssfp_models}"),
                      "--seed", "1"])
        print(f"participant + group wall time: {wall:.0f} s")
    print(f"\nmodels: {args.bssfp_models}; median |relative error| in GM+WM (%), T1 / T2; (points vs MIRACLE)")
    for sub_dir in sorted(out.glob("sub-*")):
        if not sub_dir.is_dir():
            continue
        sub = sub_dir.name[4:]
        sessions = sorted(d.name[4:] for d in sub_dir.glob("ses-*")) or [None]
        for ses in sessions:
            e = session_errors(bids, out, sub, ses)
            row = [f"sub-{sub}" + (f" ses-{ses}" if ses else "")]
            for m in METHODS:
                if (m, "T1map") in e:
                    cell = f"{m} {e[m, 'T1map']:.2f} / {e[m, 'T2map']:.2f}"
                    if m != "miracle":
                        cell += (f" ({e[m, 'T1map'] - e['miracle', 'T1map']:+.2f} / "
                                 f"{e[m, 'T2map'] - e['miracle', 'T2map']:+.2f})")
                    row.append(cell)
            print(" | ".join(row))
    agreement = out / "group" / "agreement.tsv"
    if agreement.exists():
        df = pd.read_csv(agreement, sep="\t")
        df = df[(df.method_a == "miracle") | (df.method_b == "miracle")]
        print("\ngroup CCC with MIRACLE (atlas, map, network: CCC [95 % CI])")
        for _, r in df.sort_values(["atlas", "suffix"]).iterrows():
            other = r.method_b if r.method_a == "miracle" else r.method_a
            print(f"{r.atlas} {r.suffix} {other}: {r.ccc:.3f} [{r.ccc_ci_low:.3f}, {r.ccc_ci_high:.3f}] "
                  f"({r.n_regions} regions, {r.n_sessions} sessions)")
    found = warnings_of(out)
    print(f"\nrange warnings in the sidecars: {len(found)}")
    for w in found:
        print("  " + w[:200])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
