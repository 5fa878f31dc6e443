"""Tissue segmentation at the T1w resolution researchers acquire (1 mm), against the phantom.

``init_anat_wf`` on a 1 mm ``bids_qmri-synth`` MPRAGE (SNR 25, the phantom's pose): Dice of our
dseg against the phantom's hard labels (largest tissue fraction on the T1w grid). The 3 mm
workflow test (test_anat_workflow.py) is cheaper but cannot show CSF ≥ 0.8: at 3 mm most CSF
voxels are partial volume (noise-free T1w, true brain mask, best intensity threshold: 0.70).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_qmri.modalities import bidsignore_lines

pytestmark = pytest.mark.slow

SUB = "01"


def test_tissue_dice_at_1mm(tmp_path):
    from nipype.pipeline import engine as pe

    from bids_qmri.anatomy.segmentation import dice
    from bids_qmri.bids.derivatives import init_derivatives
    from bids_qmri.config import Config
    from bids_qmri.synth.dataset import SynthOptions, write_dataset
    from bids_qmri.workflows.anat import init_anat_wf

    bids = tmp_path / "bids"
    write_dataset(bids, SynthOptions(participants=1, sessions=0, resolution=1.0, seed=3, kinds=("t1w",)),
                  progress=False)
    out = tmp_path / "out"
    config = Config(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", omp_nthreads=2, nprocs=2, seed=0)
    init_derivatives(out, bids, extra_ignore=bidsignore_lines())
    t1w = bids / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-mprage_T1w.nii.gz"
    wf = pe.Workflow(name="test_anat_1mm", base_dir=str(tmp_path / "work"))
    wf.add_nodes([init_anat_wf(t1w, SUB, None, config)])
    wf.run(plugin="Linear")

    def load(path: Path) -> np.ndarray:
        return np.asanyarray(nb.load(path).dataobj)

    truth = load(bids / "derivatives" / "groundtruth" / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-mprage_dseg.nii.gz")
    ours = load(out / f"sub-{SUB}" / "anat" / f"sub-{SUB}_dseg.nii.gz")
    assert truth.shape == ours.shape
    scores = {t: dice(truth == i, ours == i) for i, t in ((1, "GM"), (2, "WM"), (3, "CSF"))}
    brain = dice(truth > 0, ours > 0)
    print("1 mm Dice", scores, "brain", brain)
    # Issue 5: >= 0.8 for every class. Measured (seed 3): GM 0.937, WM 0.971, CSF 0.830, brain
    # mask 0.985 (seed 2: 0.892 / 0.876 / 0.884). Noise-free T1w with the true brain mask and the
    # best intensity threshold gives CSF 0.90: thin sulcal CSF is partial volume even at 1 mm.
    assert scores["GM"] >= 0.9 and scores["WM"] >= 0.9 and scores["CSF"] >= 0.8
    assert brain >= 0.97
