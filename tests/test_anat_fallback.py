"""No T1w: the anatomical workflow registers the template to the bSSFP reference image."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from bids_qmri.modalities import bidsignore_lines

pytestmark = pytest.mark.slow


def test_anat_without_t1w_uses_reference(tmp_path):
    from nipype.pipeline import engine as pe

    from bids_qmri.anatomy.segmentation import dice
    from bids_qmri.bids.derivatives import init_derivatives
    from bids_qmri.config import Config
    from bids_qmri.synth.dataset import SynthOptions, write_dataset
    from bids_qmri.workflows.anat import init_anat_wf

    bids = tmp_path / "bids"
    write_dataset(bids, SynthOptions(participants=1, sessions=0, resolution=4.0, seed=5, kinds=("bssfp",)),
                  progress=False)
    out = tmp_path / "out"
    init_derivatives(out, bids, extra_ignore=bidsignore_lines())
    mag = nb.load(bids / "sub-01" / "anat" / "sub-01_acq-pc12_part-mag_bSSFP.nii.gz")
    ref = out / "sub-01" / "anat" / "sub-01_acq-pc12_desc-ref_bSSFP.nii.gz"
    ref.parent.mkdir(parents=True)
    nb.save(nb.Nifti1Image(mag.get_fdata(dtype=np.float32).mean(-1), mag.affine), ref)
    config = Config(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", omp_nthreads=2, seed=0)
    wf = pe.Workflow(name="fallback", base_dir=str(tmp_path / "work"))
    anat = init_anat_wf(None, "01", None, config)
    anat.inputs.inputnode.ref_image = str(ref)
    wf.add_nodes([anat])
    wf.run(plugin="Linear")

    a = out / "sub-01" / "anat"
    assert (a / "sub-01_acq-pc12_desc-preproc_bSSFP.nii.gz").is_file()
    assert not list(a.glob("*_desc-preproc_T1w.nii.gz"))
    assert (a / "sub-01_acq-pc12_from-bSSFP_to-MNI152NLin2009aSym_mode-image_xfm.h5").is_file()
    side = json.loads((a / "sub-01_dseg.json").read_text())
    assert any("No T1w" in w for w in side["Warnings"])
    assert "no T1w" in side["AnatomicalReference"]
    # The warped template brain matches the phantom's brain on the bSSFP grid.
    truth = np.asarray(nb.load(bids / "derivatives" / "groundtruth" / "sub-01" / "anat"
                               / "sub-01_acq-pc12_desc-brain_mask.nii.gz").dataobj) > 0
    ours = np.asarray(nb.load(a / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    assert ours.shape == truth.shape
    score = dice(truth, ours)
    print("brain mask Dice without T1w", score)
    assert score >= 0.85
    assert (np.asarray(nb.load(a / "sub-01_atlas-AAL_dseg.nii.gz").dataobj) > 0).sum() > 0
