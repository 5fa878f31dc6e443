"""Anatomical workflow: wall time and peak memory on a synthetic T1w, ours vs antspyx defaults.

Side by side in one run, each variant in its own subprocess (clean peak RSS):
- ours: ``bids_qmri.anatomy.pipeline`` steps (N4 with a shrink factor sized to the grid, head
  template affine, brain affine (the brain mask), SyN (mutual information) of the template brain
  onto the brain cut out at that mask with reduced, resolution-dependent iterations,
  Parzen-window Atropos 10 iters);
- reference: the same steps with antspyx's default iteration schedules (affine
  2100x1200x1200x10, SyN 40x20x0; N4 defaults; Atropos 25 iters).
Why this reference: the claim is about our schedules, so the reference is the same antspyx/ITK
code, same float32 images, same thread count and same steps, with the library's default
iteration counts; Dice beside the times shows what the shorter schedules cost in accuracy.
Prints wall time, CPU time, peak RSS and GM/WM/CSF Dice against the phantom's truth for both,
and the ratios. ``--anatomy colin27`` runs on the phantom whose head the pipeline has never
seen (``bids_qmri.synth.phantom``); ``--seeds`` measures several participants in turn; ``--roi``
adds the ROI biases: the ground-truth T1/T2 maps on the bSSFP grid through the ROI step
(``anatomy.roistats.roi_analysis``, rigid bSSFP->T1w, our segmentation) against the same tissue
means computed on the truth (tissue fraction >= 0.5 on both sides), as
``tests/test_anat_workflow.py`` does. Peak RSS is the child's own high-water mark (``VmHWM``): ``ru_maxrss`` of a
child started by ``subprocess`` also counts the parent's RSS before the exec (here the 1 mm
phantom's generation, ~7.5 GB), which is how an earlier version of this script reported 7.5 GB.

    python benchmarks/bench_anat.py --resolution 1 --threads 2
    python benchmarks/bench_anat.py --resolution 3 --anatomy colin27 --seeds 1 2 3 --skip-reference --roi
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(args) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import nibabel as nb
    import numpy as np

    from bids_qmri.anatomy import pipeline as P
    from bids_qmri.anatomy import registration as reg
    from bids_qmri.anatomy.segmentation import dice

    out = Path(args.work) / args.variant
    t0 = time.perf_counter()
    if args.variant == "reference":
        import ants

        # antspyx defaults everywhere: registration schedules, N4 and Atropos iteration counts.
        reg.schedules = lambda spacing: dict(aff_iterations=(2100, 1200, 1200, 10), aff_shrink_factors=(6, 4, 2, 1),
                                             aff_smoothing_sigmas=(3, 2, 1, 0), reg_iterations=(40, 20, 0),
                                             grad_step=0.2)
        orig_n4 = ants.n4_bias_field_correction

        def n4_default(img, mask=None, shrink_factor=4, convergence=None, **kw):
            return orig_n4(img, mask=mask)

        ants.n4_bias_field_correction = n4_default
    n4 = P.bias_correct(args.t1w, out, nthreads=args.threads)
    regd = P.register_template(n4, "MNI152NLin2009aSym", out / "reg", nthreads=args.threads)
    seg = P.segment(n4, regd, out / "seg", nthreads=args.threads, iterations=10 if args.variant == "ours" else 25)
    atlas = P.atlas_to_native("AAL", n4, regd["to_native"], out / "atlas", mask=seg["mask"], nthreads=args.threads)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    truth = np.asarray(nb.load(args.truth).dataobj)
    ours = np.asarray(nb.load(seg["dseg"]).dataobj)
    result = {
        "variant": args.variant, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": _peak_rss_mb(),
        "dice": {t: dice(truth == i, ours == i) for i, t in ((1, "GM"), (2, "WM"), (3, "CSF"))},
        "brain_dice": dice(truth > 0, ours > 0),
    }
    if args.roi:
        result["roi_bias_pct"] = _roi_biases(Path(args.bids), n4, seg, atlas, out / "roi", args.threads)
    print(json.dumps(result))


def _roi_biases(bids: Path, t1w: str, seg: dict, atlas: dict, work: Path, threads: int) -> dict:
    """ROI biases of the truth maps through the ROI step with our segmentation (percent)."""
    from bids_qmri.anatomy.roistats import roi_analysis
    from bids_qmri.modalities.bssfp.evaluate import tissue_roi_biases, truth_as_maps

    ref, maps = truth_as_maps(bids, work / "maps")
    tsv = roi_analysis(subject="01", session=None, output_dir=work / "out", work_dir=work / "work", t1w=t1w,
                       mask=seg["mask"], probseg=[seg[t] for t in ("GM", "WM", "CSF")],
                       atlas_dseg=atlas["atlas_dseg"], atlas_table=atlas["atlas_table"],
                       atlas_name=atlas["atlas_name"], ref_images=[ref], maps=maps, nthreads=threads)
    return tissue_roi_biases(bids, tsv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=float, default=1.0, help="T1w voxel size, mm (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true", help="time ours only")
    ap.add_argument("--anatomy", default="mni152", help="phantom anatomy (bids_qmri-synth --anatomy; default mni152)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3], help="phantom seeds, one participant each (default 3)")
    ap.add_argument("--roi", action="store_true", help="also the ROI biases (adds a bSSFP series to the phantom)")
    ap.add_argument("--bids", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--t1w", help=argparse.SUPPRESS)
    ap.add_argument("--truth", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        _child(args)
        return
    from bids_qmri.synth.dataset import SynthOptions, write_dataset

    for seed in args.seeds:
        _one_seed(args, seed, SynthOptions, write_dataset)


def _one_seed(args, seed: int, SynthOptions, write_dataset) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bids = Path(tmp) / "bids"
        kinds = ("t1w", "bssfp") if args.roi else ("t1w",)
        write_dataset(bids, SynthOptions(participants=1, sessions=0, resolution=args.resolution, seed=seed,
                                         kinds=kinds, anatomy=args.anatomy), progress=False)
        t1w = bids / "sub-01" / "anat" / "sub-01_acq-mprage_T1w.nii.gz"
        truth = bids / "derivatives" / "groundtruth" / "sub-01" / "anat" / "sub-01_acq-mprage_dseg.nii.gz"
        results = {}
        for variant in ("ours",) + (() if args.skip_reference else ("reference",)):
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--t1w", str(t1w), "--truth",
                                   str(truth), "--work", tmp, "--threads", str(args.threads), "--bids", str(bids)]
                                  + (["--roi"] if args.roi else []),
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{variant} failed")
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        shape = tuple(int(s) for s in __import__("nibabel").load(t1w).shape)
        print(f"anatomy {args.anatomy}, seed {seed}: T1w {shape} at {args.resolution:g} mm, {args.threads} threads")
        print(f"{'variant':10s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>8s}  Dice GM/WM/CSF  brain")
        for v, r in results.items():
            d = r["dice"]
            print(f"{v:10s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_mb']:8.0f}  "
                  f"{d['GM']:.3f}/{d['WM']:.3f}/{d['CSF']:.3f}  {r['brain_dice']:.3f}")
            if "roi_bias_pct" in r:
                print("           ROI bias (%): " + ", ".join(f"{k} {b:+.2f}" for k, b in r["roi_bias_pct"].items()))
        if "reference" in results:
            o, r = results["ours"], results["reference"]
            print(f"ratio reference/ours: wall {r['wall_s'] / o['wall_s']:.2f}x, cpu {r['cpu_s'] / o['cpu_s']:.2f}x, "
                  f"peak memory {r['peak_rss_mb'] / o['peak_rss_mb']:.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
