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


def _anat_dice(tmp_path: Path, options, name: str) -> tuple[Path, Path, dict, float]:
    """Write the synthetic dataset ``options``, run ``init_anat_wf`` on its T1w -> (BIDS root, our
    anat folder, Dice per tissue of our dseg against the truth's, brain Dice)."""
    from nipype.pipeline import engine as pe

    from bids_qmri.anatomy.segmentation import dice
    from bids_qmri.bids.derivatives import init_derivatives
    from bids_qmri.config import Config
    from bids_qmri.synth.dataset import write_dataset
    from bids_qmri.workflows.anat import init_anat_wf

    bids = tmp_path / "bids"
    write_dataset(bids, options, progress=False)
    out = tmp_path / "out"
    config = Config(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", omp_nthreads=2, nprocs=2, seed=0)
    init_derivatives(out, bids, extra_ignore=bidsignore_lines())
    t1w = bids / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-mprage_T1w.nii.gz"
    wf = pe.Workflow(name=name, base_dir=str(tmp_path / "work"))
    wf.add_nodes([init_anat_wf(t1w, SUB, None, config)])
    wf.run(plugin="Linear")
    anat = out / f"sub-{SUB}" / "anat"

    def load(path: Path) -> np.ndarray:
        return np.asanyarray(nb.load(path).dataobj)

    truth = load(bids / "derivatives" / "groundtruth" / f"sub-{SUB}" / "anat" / f"sub-{SUB}_acq-mprage_dseg.nii.gz")
    ours = load(anat / f"sub-{SUB}_dseg.nii.gz")
    assert truth.shape == ours.shape
    scores = {t: dice(truth == i, ours == i) for i, t in ((1, "GM"), (2, "WM"), (3, "CSF"))}
    return bids, anat, scores, dice(truth > 0, ours > 0)


def test_tissue_dice_at_1mm(tmp_path):
    from bids_qmri.synth.dataset import SynthOptions

    _, _, scores, brain = _anat_dice(
        tmp_path, SynthOptions(participants=1, sessions=0, resolution=1.0, seed=3, kinds=("t1w",)), "test_anat_1mm")
    print("1 mm Dice", scores, "brain", brain)
    # Issue 5: >= 0.8 for every class. Measured (seed 3): GM 0.937, WM 0.971, CSF 0.830, brain
    # mask 0.985 (seed 2: 0.892 / 0.876 / 0.884). Noise-free T1w with the true brain mask and the
    # best intensity threshold gives CSF 0.90: thin sulcal CSF is partial volume even at 1 mm.
    assert scores["GM"] >= 0.9 and scores["WM"] >= 0.9 and scores["CSF"] >= 0.8
    assert brain >= 0.97


# The phantom the pipeline has never seen (bids_qmri-synth --anatomy colin27): Colin27's head with
# its own Gaussian-mixture tissue classes; neither a registration target, a prior nor the
# initialiser of the pipeline (the MNI152 phantom above is its own template, optimistic by
# construction). 3 mm keeps the test cheap; other seeds are measured with
# benchmarks/bench_anat.py --anatomy colin27 --roi and listed in the README.
UNSEEN_SEED = 2


def test_unseen_head_dice_and_roi_bias_at_3mm(tmp_path):
    from bids_qmri.anatomy.roistats import roi_analysis
    from bids_qmri.synth.dataset import SynthOptions
    from bids_qmri.modalities.bssfp.evaluate import tissue_roi_biases, truth_as_maps
    from bids_qmri.synth.phantom import COLIN27_BRAIN

    if not COLIN27_BRAIN.is_file():
        pytest.skip("mricron-data (Colin27) not installed")
    options = SynthOptions(participants=1, sessions=0, resolution=3.0, seed=UNSEEN_SEED, kinds=("t1w", "bssfp"),
                           anatomy="colin27")
    bids, anat, scores, brain = _anat_dice(tmp_path, options, "test_anat_unseen")

    ref, maps = truth_as_maps(bids, tmp_path / "maps")
    tsv = roi_analysis(subject=SUB, session=None, output_dir=tmp_path / "roi", work_dir=tmp_path / "roiwork",
                       t1w=str(anat / f"sub-{SUB}_desc-preproc_T1w.nii.gz"),
                       mask=str(anat / f"sub-{SUB}_desc-brain_mask.nii.gz"),
                       probseg=[str(anat / f"sub-{SUB}_label-{t}_probseg.nii.gz") for t in ("GM", "WM", "CSF")],
                       atlas_dseg=str(anat / f"sub-{SUB}_atlas-AAL_dseg.nii.gz"),
                       atlas_table=str(anat / f"sub-{SUB}_atlas-AAL_dseg.tsv"), atlas_name="AAL",
                       ref_images=[ref], maps=maps, nthreads=2)
    bias = tissue_roi_biases(bids, tsv)
    print("unseen head, 3 mm, seed", UNSEEN_SEED, "Dice", scores, "brain", brain, "ROI bias %", bias)
    # Measured: this test GM 0.752, WM 0.701-0.703, CSF 0.635, brain 0.961 (two runs); benchmarks/bench_anat.py
    # --resolution 3 --anatomy colin27 --seeds 2 3 4 --roi: this seed 0.754 / 0.716 / 0.633 / 0.960,
    # seeds 3 and 4 in the README's table (seed 2 draws the weakest GM/WM T1 contrast of the three).
    # Same participant on the MNI152 phantom: GM 0.815, WM 0.795, CSF 0.692, brain 0.975. Bounds:
    # the lowest of seeds 2-4 minus ~0.02.
    assert scores["GM"] >= 0.73 and scores["WM"] >= 0.68 and scores["CSF"] >= 0.44
    assert brain >= 0.95
    # ROI biases (%), this test: T1 GM -6.3 (our GM takes in WM voxels), WM -1.9, WholeBrain -1.6;
    # T2 GM -1.6, WM +0.6, WholeBrain -1.0 (MNI152 phantom, same participant: T1 within 1.3 %,
    # T2 within 0.9 %); seeds 3 / 4 (README): T1 GM -7.4 / -7.2, WM -6.0 / -5.7, WholeBrain -4.0 / -2.9,
    # T2 within 3.6 %. Bounds: seeds 2-4 pass with 1.0-1.6 % to spare.
    assert abs(bias["T1 GM"]) <= 9.0 and abs(bias["T1 WM"]) <= 7.5 and abs(bias["T1 WholeBrain"]) <= 5.0
    assert max(abs(bias[f"T2 {t}"]) for t in ("GM", "WM", "WholeBrain")) <= 5.0
