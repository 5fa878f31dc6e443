"""MP-PCA denoising speed, ours vs dipy, measured side by side in one run on one thread.

Series: the synthetic pc-bSSFP acquisition of ``bids_qmri-synth`` (one participant, 12 phase
cycles → 24 real channels, SNR 25, with motion), read from its ``part-mag``/``part-phase``
NIfTIs as the workflow reads them. Default 2 mm (95×113×100, ~420k head-support voxels): the
whole run took 2.2 minutes on the shared machine (synthesis ~30 s, dipy 77 s, ours 22 s);
``--resolution 3`` is a ~40 s check. Ours and dipy both compute in float64; the eigen-
decomposition (LAPACK, ~37 µs per 24×24 patch covariance) bounds our time, dipy adds its
per-voxel Python loop.

Compared on the same lifted channels, head-support mask and 3×3×3 patches:
  1. ``bids_qmri.preproc.denoise.mppca_complex`` (our batched implementation)
  2. dipy ``localpca.mppca`` (``pca_method="eig"``, return_sigma), post-processed as the old
     ``mppca_complex`` did (input kept and σ = NaN where dipy's output is not covered)
Why this reference: the claim is "ours vs dipy", the established implementation of the same
algorithm (the one a user would otherwise run, and the one the tests check our output against),
in the same float64 precision and on the same single thread, on identical inputs. dipy visits
the patch centres in an interpreted Python loop and calls LAPACK's ``eigh`` per patch; the ratio
therefore includes that loop's overhead and is *not* a claim against a compiled voxel loop (none
is measured here: a compiled loop would still pay one 24×24 eigen-decomposition per patch).

Printed: CPU and wall seconds of each, the speed ratio, the max/median |difference| of the
denoised complex series relative to the signal scale (99th percentile of |data| in the mask), the
same for σ, and whether the covered voxels (finite σ) are identical.

Run: ``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_denoise.py [--resolution 2]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_bssfp import Timer  # benchmarks/ is on sys.path when this script runs

from bids_qmri.preproc.complexdata import complex_from_lifted, lifted_channels, load_complex
from bids_qmri.preproc.denoise import head_support, mppca_complex, patch_radius_for
from bids_qmri.synth.dataset import SynthOptions, write_dataset


def synthetic_series(resolution: float, workdir: Path) -> np.ndarray:
    """Complex [X, Y, Z, 12] series of the synthetic dataset at ``resolution`` mm."""
    root = write_dataset(workdir / "ds", SynthOptions(participants=1, sessions=0, resolution=resolution,
                                                      kinds=("bssfp",)), progress=False)
    anat = Path(root) / "sub-01" / "anat"
    parts = {part: next(anat.glob(f"*_part-{part}_bSSFP.nii.gz")) for part in ("mag", "phase")}
    data, _, _, _ = load_complex(parts)
    return data


def dipy_reference(data: np.ndarray, mask: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """dipy's ``mppca`` on the lifted channels, covered voxels as ``mppca_complex`` defines them."""
    from dipy.denoise.localpca import mppca

    stacked, offsets = lifted_channels(data)
    with np.errstate(invalid="ignore", divide="ignore"):  # voxels in no patch: 0/0
        cleaned, sigma = mppca(stacked, mask=mask, patch_radius=radius, return_sigma=True,
                               suppress_warning=True)
    covered = mask & np.all(np.isfinite(cleaned), axis=-1) & np.isfinite(sigma)
    cleaned[~covered] = stacked[~covered]
    return complex_from_lifted(cleaned, offsets), np.where(covered, sigma, np.nan).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_series(args.resolution, Path(tmp))
    mask = head_support(data)
    radius = patch_radius_for(2 * data.shape[-1])
    print(f"series {data.shape} ({args.resolution:g} mm), {int(mask.sum())} head-support voxels, "
          f"patch {2 * radius + 1}^3, {2 * data.shape[-1]} real channels")

    with Timer() as ours_t:
        ours, ours_sigma, _ = mppca_complex(data, mask=mask, patch_radius=radius)
    print(f"ours: {ours_t.cpu:.1f} s CPU, {ours_t.wall:.1f} s wall")
    with Timer() as dipy_t:
        ref, ref_sigma = dipy_reference(data, mask, radius)
    print(f"dipy: {dipy_t.cpu:.1f} s CPU, {dipy_t.wall:.1f} s wall")

    scale = float(np.percentile(np.abs(data[mask]), 99))
    diff = np.abs(ours - ref)[mask].ravel() / scale
    same_coverage = bool(np.array_equal(np.isfinite(ours_sigma), np.isfinite(ref_sigma)))
    both = np.isfinite(ours_sigma) & np.isfinite(ref_sigma)
    sigma_diff = np.abs(ours_sigma - ref_sigma)[both] / np.median(ref_sigma[both])
    result = {
        "resolution_mm": args.resolution,
        "shape": list(data.shape),
        "mask_voxels": int(mask.sum()),
        "ours_cpu_s": round(ours_t.cpu, 2), "ours_wall_s": round(ours_t.wall, 2),
        "dipy_cpu_s": round(dipy_t.cpu, 2), "dipy_wall_s": round(dipy_t.wall, 2),
        "speed_ratio_cpu": round(dipy_t.cpu / ours_t.cpu, 1),
        "speed_ratio_wall": round(dipy_t.wall / ours_t.wall, 1),
        "signal_scale": scale,
        "denoised_max_abs_diff_rel": float(diff.max()),
        "denoised_median_abs_diff_rel": float(np.median(diff)),
        "sigma_max_abs_diff_rel": float(sigma_diff.max()),
        "sigma_median_abs_diff_rel": float(np.median(sigma_diff)),
        "same_coverage": same_coverage,
    }
    print(f"speed ratio dipy/ours: {result['speed_ratio_cpu']}x CPU, {result['speed_ratio_wall']}x wall")
    print(f"|ours - dipy| / signal scale: max {result['denoised_max_abs_diff_rel']:.2e}, "
          f"median {result['denoised_median_abs_diff_rel']:.2e} (complex64 outputs); "
          f"sigma max {result['sigma_max_abs_diff_rel']:.2e} of its median; "
          f"same coverage: {same_coverage}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
