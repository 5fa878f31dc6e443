"""qMT maps on a synthetic dataset against the phantom's truth (README, qMT section).

    python benchmarks/eval_qmt.py BIDS_DIR [--subject 01] [--nls-voxels 4] [--seed 0]

Reads the raw qMT coefficients (``acq-hybrid``) and the ground truth on the qMT grid
(``derivatives/groundtruth``), runs ``qmtnet`` and ``qmtnetmse`` on every brain voxel (ground-truth
mask) through the methods' ``estimate`` and ``qmtnls`` on ``--nls-voxels`` random voxels per tissue
(GM, WM; B1 held at the true B1, as with a B1 map), and prints per tissue the median |relative
error| of m0s, T1 and T2f, beside the per-voxel CRB floor (``√CRB/θ`` at the voxel's true
parameters, M0 and the noise σ measured in the background) on the NLLS voxels. Times are CPU
seconds (``time.process_time``) and wall seconds, one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bids_qmri import modalities
from bids_qmri.bids.basis import read_basis_tsv
from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.qmt import estimate
from bids_qmri.modalities.qmt.protocol import QMTProtocol

TRUTH = {"m0smap": "m0s", "T1map": "T1", "T2map": "T2f"}


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bids", type=Path)
    p.add_argument("--subject", default="01")
    p.add_argument("--nls-voxels", type=int, default=4, help="qmtnls voxels per tissue (0: skip)")
    p.add_argument("--crb-voxels", type=int, default=16,
                   help="voxels per tissue for the CRB floor (the qmtnls voxels are the first of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bids_qmri-eval-qmt-models"))
    a = p.parse_args()
    torch.set_num_threads(1)
    sub = f"sub-{a.subject}"
    raw = a.bids / sub / "anat"
    gt = a.bids / "derivatives" / "groundtruth" / sub
    stem = f"{sub}_acq-hybrid_desc-svd"
    coeffs = _load(raw / f"{stem}_part-real_qMT.nii.gz") + 1j * _load(raw / f"{stem}_part-imag_qMT.nii.gz")
    meta = json.loads((raw / f"{stem}_part-real_qMT.json").read_text())
    basis = read_basis_tsv(raw / f"{stem}_qMTbasis.tsv")
    proto = QMTProtocol.from_dict(meta, basis=basis)
    truth = {k: _load(gt / "anat" / f"{sub}_acq-hybrid_{k}.nii.gz").astype(np.float64)
             for k in ("m0smap", "T1map", "T2map", "T2smap", "Rxmap", "M0map", "dseg", "desc-brain_mask")}
    truth["B0"] = _load(gt / "fmap" / f"{sub}_acq-hybrid_fieldmap.nii.gz").astype(np.float64)
    truth["B1"] = _load(gt / "fmap" / f"{sub}_acq-hybrid_TB1map.nii.gz").astype(np.float64)
    mask = truth["desc-brain_mask"] > 0
    background = truth["M0map"] <= 0
    sigma = float(np.concatenate([coeffs[background].real.ravel(), coeffs[background].imag.ravel()]).std())
    data = {"signal": coeffs, "basis": basis.numpy(), "b1": truth["B1"]}
    ctx = EstimateContext(model_dir=a.model_dir, seed=a.seed, options={"qmt_b1_from_map": True})
    tissues = {"GM": mask & (truth["dseg"] == 1), "WM": mask & (truth["dseg"] == 2)}
    print(f"{sub}: {int(mask.sum())} brain voxels on the qMT grid, GM {int(tissues['GM'].sum())}, "
          f"WM {int(tissues['WM'].sum())}; noise sigma {sigma:.3g} per channel (background)")
    mod = modalities.get("qmt")
    results = {}
    for method in ("qmtnet", "qmtnetmse"):
        mod.method(method).estimate(data, np.zeros_like(mask), proto, ctx)  # load the model first
        t, c = time.perf_counter(), time.process_time()
        maps, _ = mod.method(method).estimate(data, mask, proto, ctx)
        print(f"{method}: whole volume ({int(mask.sum())} voxels) in {time.process_time() - c:.2f} CPU-s, "
              f"{time.perf_counter() - t:.2f} wall-s")
        results[method] = maps
    rng = np.random.default_rng(a.seed)
    n_pick = max(a.nls_voxels, a.crb_voxels)
    drawn = {name: np.argwhere(sel)[rng.choice(int(sel.sum()), n_pick, replace=False)]
             for name, sel in tissues.items()}
    picks = {name: tuple(v[:a.nls_voxels].T) for name, v in drawn.items()}
    floor = {}
    for name, v in drawn.items():
        idx = tuple(v[:a.crb_voxels].T)
        theta = torch.tensor(np.stack([truth["m0smap"][idx], truth["T1map"][idx], truth["T2map"][idx],
                                       truth["T2smap"][idx], truth["Rxmap"][idx], truth["B0"][idx],
                                       truth["B1"][idx]], 1), dtype=torch.float64)
        m0 = torch.tensor(truth["M0map"][idx], dtype=torch.float64)
        floor[name] = estimate.relative_error_floor(theta, proto, basis, m0, sigma).median(0).values.numpy()
    if a.nls_voxels:
        sub_mask = np.zeros(mask.shape, bool)
        for idx in picks.values():
            sub_mask[idx] = True
        t, c = time.perf_counter(), time.process_time()
        maps, prov = mod.method("qmtnls").estimate(data, sub_mask, proto, ctx)
        n = int(sub_mask.sum())
        print(f"qmtnls: {n} voxels in {time.process_time() - c:.1f} CPU-s, {time.perf_counter() - t:.1f} wall-s "
              f"({(time.process_time() - c) / n:.1f} CPU-s per voxel; grid starts {prov['GridStarts']}, "
              f"{prov['Iterations']} iterations)")
        results["qmtnls"] = maps
    print(f"\nmedian |relative error| (qmtnls: {a.nls_voxels} voxels per tissue; CRB floor: {a.crb_voxels})")
    print(f"{'method':10s} {'tissue':6s} " + " ".join(f"{k:>8s}" for k in ("m0s", "T1", "T2f")))
    for method, maps in results.items():
        for name, sel in tissues.items():
            if method == "qmtnls":
                sel = np.zeros(mask.shape, bool)
                sel[picks[name]] = True
            row = [np.nanmedian(np.abs(maps[k][sel] / truth[k][sel] - 1)) for k in TRUTH]
            print(f"{method:10s} {name:6s} " + " ".join(f"{v:8.3f}" for v in row))
    for name, values in floor.items():
        print(f"{'CRB floor':10s} {name:6s} " + " ".join(f"{v:8.3f}" for v in values))
    if "qmtnls" in results:
        # Seed 003 Fig. 9: do qmtnet and qmtnls agree within their interquartile ranges? (same voxels)
        print("\nqmtnet vs qmtnls on the qmtnls voxels: median [IQR]; agree = each median inside the other's IQR")
        for name in tissues:
            sel = np.zeros(mask.shape, bool)
            sel[picks[name]] = True
            for k, label in zip(TRUTH, ("m0s", "T1", "T2f")):
                q = {m: np.nanpercentile(results[m][k][sel], [25, 50, 75]) for m in ("qmtnet", "qmtnetmse", "qmtnls")}
                inside = lambda a, b: b[0] <= a[1] <= b[2]  # noqa: E731
                agree = {m: inside(q[m], q["qmtnls"]) and inside(q["qmtnls"], q[m]) for m in ("qmtnet", "qmtnetmse")}
                print(f"  {name:3s} {label:4s} truth {np.median(truth[k][sel]):.4g}  " + "  ".join(
                    f"{m} {q[m][1]:.4g} [{q[m][0]:.4g}, {q[m][2]:.4g}]" for m in q)
                    + f"  agree: qmtnet {'yes' if agree['qmtnet'] else 'no'}, qmtnetmse {'yes' if agree['qmtnetmse'] else 'no'}")


if __name__ == "__main__":
    main()
