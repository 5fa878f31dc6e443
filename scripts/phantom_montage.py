#!/usr/bin/env python
"""PNG montage of the digital brain phantom: ground-truth maps and every simulated input kind.

    python scripts/phantom_montage.py OUT.png [--bids DIR] [--resolution MM] [--seed S]

Without ``--bids`` a one-participant dataset is simulated into a temporary directory first.
Each panel shows an axial and a sagittal slice through the middle of the brain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402


def _first(root: Path, pattern: str) -> Path | None:
    hits = sorted(root.rglob(pattern))
    return hits[0] if hits else None


def _slices(data: np.ndarray, affine: np.ndarray, centre_mm: np.ndarray):
    """Axial and sagittal slices through ``centre_mm`` (RAS, axis-aligned grids)."""
    ijk = np.round(np.linalg.inv(affine) @ np.r_[centre_mm, 1.0])[:3].astype(int)
    ijk = np.clip(ijk, 0, np.array(data.shape[:3]) - 1)
    return data[:, :, ijk[2]].T, data[ijk[0], :, :].T


PANELS = [
    # title, glob (relative to the dataset), volume index, colour map, (vmin, vmax) or None
    ("GT T1 (s)", "derivatives/groundtruth/sub-*/**/anat/*_acq-pc*_T1map.nii.gz", None, "magma", (0, 4)),
    ("GT T2 (s)", "derivatives/groundtruth/sub-*/**/anat/*_acq-pc*_T2map.nii.gz", None, "magma", (0, 0.25)),
    ("GT PD", "derivatives/groundtruth/sub-*/**/anat/*_acq-pc*_M0map.nii.gz", None, "gray", (0, 1.2)),
    ("GT B1", "derivatives/groundtruth/sub-*/**/fmap/*_acq-pc*_TB1map.nii.gz", None, "viridis", (0.7, 1.3)),
    ("GT ΔB0 (Hz)", "derivatives/groundtruth/sub-*/**/fmap/*_acq-pc*_fieldmap.nii.gz", None, "RdBu_r", (-100, 100)),
    ("GT dseg", "derivatives/groundtruth/sub-*/**/anat/*_acq-pc*_dseg.nii.gz", None, "viridis", (0, 3)),
    ("bSSFP |S| cycle 1", "sub-*/**/anat/*_part-mag_bSSFP.nii.gz", 0, "gray", None),
    ("bSSFP |S| mid cycle", "sub-*/**/anat/*_part-mag_bSSFP.nii.gz", "mid", "gray", None),
    ("bSSFP phase", "sub-*/**/anat/*_part-phase_bSSFP.nii.gz", 0, "twilight", (-np.pi, np.pi)),
    ("MPRAGE T1w", "sub-*/**/anat/*_T1w.nii.gz", None, "gray", None),
    ("TB1TFL famp", "sub-*/**/fmap/*_acq-famp_TB1TFL.nii.gz", None, "viridis", (560, 1040)),
    ("TB1TFL anat", "sub-*/**/fmap/*_acq-anat_TB1TFL.nii.gz", None, "gray", None),
    ("MRF SV1 (real)", "sub-*/**/anat/*_part-real_MRF.nii.gz", 0, "gray", None),
    ("qMT SV1 (real)", "sub-*/**/anat/*_part-real_qMT.nii.gz", 0, "gray", None),
    ("IRT1 first TI", "sub-*/**/anat/*_inv-1_IRT1.nii.gz", None, "gray", None),
    ("IRT1 last TI", "sub-*/**/anat/*_inv-6_IRT1.nii.gz", None, "gray", None),
    ("MESE first TE", "sub-*/**/anat/*_echo-1_MESE.nii.gz", None, "gray", None),
    ("MESE last TE", "sub-*/**/anat/*_echo-6_MESE.nii.gz", None, "gray", None),
]


def montage(bids: Path, out: Path) -> Path:
    bids = Path(bids)
    centre = np.array([0.0, -18.0, 12.0])
    panels = []
    for title, pattern, vol, cmap, lim in PANELS:
        path = _first(bids, pattern)
        if path is None:
            continue
        img = nb.load(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        if data.ndim == 4:
            data = data[..., data.shape[-1] // 2 if vol == "mid" else int(vol or 0)]
        if title.startswith("MRF") or title.startswith("qMT"):
            imag = nb.load(str(path).replace("part-real", "part-imag"))
            data = np.abs(data + 1j * np.asanyarray(imag.dataobj)[..., int(vol or 0)])
            title = title.replace("(real)", "|c1|")
        panels.append((title, *_slices(data, img.affine, centre), cmap, lim))
    ncol = 6
    nrow = 2 * int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (title, axial, sagittal, cmap, lim) in enumerate(panels):
        r, c = 2 * (k // ncol), k % ncol
        if lim is None:
            lim = (0.0, float(np.percentile(axial, 99.5)) or 1.0)
        for row, sl in ((r, axial), (r + 1, sagittal)):
            axes[row, c].imshow(sl, origin="lower", cmap=cmap, vmin=lim[0], vmax=lim[1],
                                interpolation="nearest")
        axes[r, c].set_title(title, fontsize=10)
    fig.suptitle(f"bids_qmri-synth phantom: {bids.name}", fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="PNG file to write")
    p.add_argument("--bids", type=Path, help="existing bids_qmri-synth dataset (default: simulate one)")
    p.add_argument("--resolution", type=float, default=3.0, help="voxel size when simulating (mm)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.bids is not None:
        if not (args.bids / "derivatives" / "groundtruth").is_dir():
            print(f"phantom_montage: error: {args.bids} is not a bids_qmri-synth dataset "
                  "(no derivatives/groundtruth) — pass the OUT_DIR of bids_qmri-synth", file=sys.stderr)
            return 2
        montage(args.bids, args.out)
    else:
        from bids_qmri.synth.dataset import SynthOptions, write_dataset

        with tempfile.TemporaryDirectory() as tmp:
            bids = write_dataset(Path(tmp) / "phantom", SynthOptions(
                participants=1, sessions=0, resolution=args.resolution, seed=args.seed), progress=False)
            montage(bids, args.out)
    print(f"phantom_montage: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
