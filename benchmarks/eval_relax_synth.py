"""rim, resnet and mle on a synthetic dataset's IRT1 and MESE series against its ground truth
(issue 17 "Show": median |relative error| in GM+WM at the dataset's SNR).

Make the dataset without motion (so that no registration enters the comparison):
``bids_qmri-synth DIR --participants 1 --sessions 0 --kinds irt1 mese --no-motion`` (default
SNR 25, 2 mm). Every method runs through its modality's ``estimate`` (the code a run uses) on the
ground-truth brain mask of the series' grid; errors are over the GM and WM voxels of the
ground-truth segmentation (partial-volume voxels included). Learned models: bundled, or from
``--model-dir`` (trained on the fly when missing).

Run: ``nice -n 10 python benchmarks/eval_relax_synth.py DIR [--model-dir M] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def load_series(bids: Path, acq: str, suffix: str, key: str):
    files = sorted((bids / "sub-01" / "anat").glob(f"sub-01_acq-{acq}_*_{suffix}.nii.gz"),
                   key=lambda p: int(re.search(r"_(?:inv|echo)-(\d+)_", p.name).group(1)))
    meta = [json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text()) for p in files]
    top = json.loads((bids / f"acq-{acq}_{suffix}.json").read_text()) if (bids / f"acq-{acq}_{suffix}.json").exists() else {}
    times = [m.get(key, top.get(key)) for m in meta]
    data = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float64) for p in files], -1)
    return data, tuple(float(t) for t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bids_dir", type=Path)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=["mle", "rim", "resnet"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from bids_qmri.modalities.base import EstimateContext
    from bids_qmri.modalities.relax import IRT1, MESE
    from bids_qmri.modalities.relax.inputs import SeriesProtocol

    torch.set_num_threads(1)
    gt = args.bids_dir / "derivatives" / "groundtruth" / "sub-01" / "anat"
    context = EstimateContext(model_dir=args.model_dir, seed=0)
    results = {}
    for modality, acq, suffix, key, quantity in ((IRT1, "ir", "IRT1", "InversionTime", "T1map"),
                                                 (MESE, "se", "MESE", "EchoTime", "T2map")):
        signal, times = load_series(args.bids_dir, acq, suffix, key)
        mask = np.asarray(nib.load(gt / f"sub-01_acq-{acq}_desc-brain_mask.nii.gz").dataobj) > 0
        dseg = np.asarray(nib.load(gt / f"sub-01_acq-{acq}_dseg.nii.gz").dataobj)
        truth = np.asarray(nib.load(gt / f"sub-01_acq-{acq}_{quantity}.nii.gz").dataobj, dtype=np.float64)
        tissue = mask & np.isin(dseg, (1, 2))
        protocol = SeriesProtocol(key, times)
        print(f"\n{suffix}: {len(times)} times {list(times)} s, grid {signal.shape[:3]}, {int(mask.sum())} brain voxels, "
              f"{int(tissue.sum())} GM+WM")
        for method in args.methods:
            t0 = time.perf_counter()
            maps, prov = modality.method(method).estimate({"signal": signal}, mask, protocol, context)
            wall = time.perf_counter() - t0
            est = maps[quantity][tissue]
            rel = np.abs(est / truth[tissue] - 1)
            ok = np.isfinite(rel)
            gm, wm = dseg[tissue] == 1, dseg[tissue] == 2
            row = {"median_abs_rel_error": float(np.median(rel[ok])),
                   "median_abs_rel_error_GM": float(np.median(rel[ok & gm])),
                   "median_abs_rel_error_WM": float(np.median(rel[ok & wm])),
                   "finite_fraction": float(ok.mean()), "wall_s": wall,
                   "model": (prov.get("model_card") or {}).get("path")}
            results[f"{suffix}_{method}"] = row
            print(f"  {method:<7} median |rel err| {quantity} GM+WM {row['median_abs_rel_error']:.2%} "
                  f"(GM {row['median_abs_rel_error_GM']:.2%}, WM {row['median_abs_rel_error_WM']:.2%}), finite "
                  f"{row['finite_fraction']:.1%}, {wall:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
