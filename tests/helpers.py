"""Shared test helpers: the BIDS validator and a tiny pc-bSSFP dataset maker.

``make_bssfp_dataset`` writes the smallest dataset the app accepts (a few voxels, a few phase
cycles), with signals from ``bids_qmri.physics.bssfp`` so that the workflows have plausible
data; tests corrupt single files of it to build malformed datasets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np

from bids_qmri.bids.validation import EXAMPLES_IGNORE, run_validator

TR, TE, FA = 0.0048, 0.0024, 15.0


def validate_bids(path, derivative: bool = False, *, examples: bool = False, ignore_warnings: bool = True):
    """Run bids-validator-deno on ``path``; return the ``ValidationResult`` (``.ok``, ``.summary()``).

    ``derivative=True`` accepts only a derivative dataset. ``examples=True`` applies the BIDS
    project's settings for bids-examples, whose images are empty files: ignore ``EMPTY_FILE``
    and the NIfTI headers.
    """
    return run_validator(path, derivative=derivative, ignore_warnings=ignore_warnings,
                         ignore_codes=EXAMPLES_IGNORE if examples else (),
                         ignore_nifti_headers=examples)


def run_cli(*args, env=None, timeout=900, cwd=None):
    """Run ``bids_qmri`` in a fresh interpreter; return the CompletedProcess (text)."""
    cmd = [sys.executable, "-m", "bids_qmri.cli.run", *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def _phantom(shape, rng):
    """Two tissues in an ellipsoid, background zero-ish: T1, T2 (s), M0, B1, off-resonance (Hz)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    inside = r < 0.95
    wm = r < 0.5
    t1 = np.where(wm, 0.83, 1.33)
    t2 = np.where(wm, 0.08, 0.11)
    m0 = np.where(inside, 1.0, 0.0)
    b1 = 1.0 + 0.1 * grid[0]
    b0 = 20.0 * grid[1]
    return t1, t2, m0, b1, b0, inside


def bssfp_series(shape=(8, 8, 6), npc=4, seed=0, snr=50.0):
    """Complex pc-bSSFP series [x, y, z, npc] of the phantom (physics.bssfp), plus noise."""
    import torch

    from bids_qmri.physics.bssfp import bssfp_signal, default_phase_increments

    rng = np.random.default_rng(seed)
    t1, t2, m0, b1, b0, _ = _phantom(shape, rng)
    tt = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    sig = bssfp_signal(tt(t1), tt(t2), tt(m0), tt(b1), tt(b0), tr=TR, te=TE,
                       flip_rad=np.deg2rad(FA), phase_increments_rad=default_phase_increments(npc))
    sig = sig.numpy()
    sigma = 0.074 / (np.sqrt(2) * snr)
    sig = sig + sigma * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    return sig


def save_img(path, data, zooms=(3.0, 3.0, 3.0)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0])
    shape3 = (tuple(np.shape(data)) + (1, 1, 1))[:3]
    affine[:3, 3] = -np.array(shape3) * np.array(zooms) / 2
    nb.save(nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def make_bssfp_dataset(root, subjects=("01",), sessions=(None,), *, shape=(8, 8, 6), npc=4,
                       t1w=True, b1="TB1map", phase_increments=True, part=("mag", "phase"),
                       bidsignore=True, seed=0) -> Path:
    """A minimal valid dataset: per participant/session a pc-bSSFP mag/phase pair (acq-pc<Npc>),
    a T1w and a B1 map (``TB1map``, ``TB1TFL``, ``TB1DAM`` or None)."""
    root = Path(root)
    write_json(root / "dataset_description.json",
               {"Name": "tiny pc-bSSFP test dataset", "BIDSVersion": "1.10.0", "DatasetType": "raw",
                "License": "CC0", "Authors": ["bids_qmri tests", "second author"]})
    (root / "README").write_text("A tiny pc-bSSFP dataset written by the bids_qmri tests.\n" * 5)
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    write_json(root / "participants.json", {"participant_id": {"Description": "participant"}})
    if bidsignore:
        (root / ".bidsignore").write_text(
            resources.files("bids_qmri.data").joinpath("bidsignore_raw").read_text())
    sidecar = {"RepetitionTimeExcitation": TR, "EchoTime": TE, "FlipAngle": FA,
               "MagneticFieldStrength": 3, "PulseSequenceType": "bSSFP"}
    if phase_increments:
        sidecar["PhaseIncrements"] = [180.0 * (2 * j - 1) / npc for j in range(1, npc + 1)]
    for i, sub in enumerate(subjects):
        for k, ses in enumerate(sessions):
            base = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "")
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            sig = bssfp_series(shape, npc, seed=seed + 17 * i + k)
            data = {"mag": np.abs(sig), "phase": np.angle(sig), "real": sig.real, "imag": sig.imag}
            for p in part:
                save_img(base / "anat" / f"{stem}_acq-pc{npc}_part-{p}_bSSFP.nii.gz", data[p])
            write_json(base / "anat" / f"{stem}_acq-pc{npc}_bSSFP.json", sidecar)
            t1, t2, m0, b1map, b0, inside = _phantom(shape, None)
            if t1w:
                anat = np.where(inside, 1000 * (1 - 0.4 * (t1 - 0.8)), 0.0)
                save_img(base / "anat" / f"{stem}_T1w.nii.gz", anat.astype(np.float32))
                write_json(base / "anat" / f"{stem}_T1w.json", {"RepetitionTime": 2.3, "EchoTime": 0.003})
            _write_b1(base / "fmap", stem, b1, b1map)
    return root


def _write_b1(fmap, stem, kind, b1map):
    if kind is None:
        return
    if kind == "TB1map":
        save_img(fmap / f"{stem}_TB1map.nii.gz", b1map)
        write_json(fmap / f"{stem}_TB1map.json", {"Units": "ratio", "IntendedFor": []})
    elif kind == "TB1TFL":
        save_img(fmap / f"{stem}_acq-anat_TB1TFL.nii.gz", 500 * np.ones_like(b1map))
        save_img(fmap / f"{stem}_acq-famp_TB1TFL.nii.gz", 800 * b1map)
        for acq in ("anat", "famp"):
            write_json(fmap / f"{stem}_acq-{acq}_TB1TFL.json",
                       {"FlipAngle": 8, "RepetitionTimeExcitation": 0.0068, "EchoTime": 0.002})
    elif kind == "TB1DAM":
        for flip, fa in ((1, 60.0), (2, 120.0)):
            save_img(fmap / f"{stem}_flip-{flip}_TB1DAM.nii.gz", np.abs(np.sin(np.deg2rad(fa) * b1map)))
            write_json(fmap / f"{stem}_flip-{flip}_TB1DAM.json", {"FlipAngle": fa, "RepetitionTime": 5.0})
    else:
        raise ValueError(kind)


def tree(root) -> list[str]:
    """Relative paths of all files under ``root`` (sorted), for 'nothing was written' checks."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
