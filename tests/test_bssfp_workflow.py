"""The pc-bSSFP workflow end to end on the synthetic phantom against its ground truth
(``derivatives/groundtruth`` on the bSSFP grid), under MultiProc, with the BIDS validator.

Accuracy is measured in brain tissue (GM and WM of the ground truth inside the workflow's brain
mask) against a no-processing noise floor, as defined in ``bids_qmri.modalities.bssfp.evaluate``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_qmri.bids.discovery import b1_for, discover
from bids_qmri.bids.derivatives import init_derivatives
from bids_qmri.config import Config
from bids_qmri.modalities import bidsignore_lines
from bids_qmri.physics.bssfp import BSSFPProtocol
from bids_qmri.modalities.bssfp.evaluate import error_table, noise_floor, tissue_masks, workflow_errors
from bids_qmri.modalities.bssfp.workflow import init_bssfp_wf

pytestmark = pytest.mark.slow

METHODS = ("miracle", "svnn", "pinn", "svnncomplex", "pinncomplex")
COMPLEX = ("svnncomplex", "pinncomplex")


def _synth(out: Path, *extra) -> Path:
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    cmd = [str(exe), str(out), "--participants", "1", "--sessions", "0", "--resolution", "4",
           "--seed", "1", "--kinds", "bssfp", "tb1tfl", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _run(bids: Path, out: Path, methods, model_dir: Path, *, work: Path | None = None) -> dict:
    config = Config(bids_dir=bids, output_dir=out, work_dir=work or out.parent / f"{out.name}_work",
                    methods={"bssfp": tuple(methods)}, nprocs=2, omp_nthreads=1, model_dir=model_dir, seed=1)
    sessions = discover(config)
    assert len(sessions) == 1 and len(sessions[0].inputs["bssfp"]) == 1
    sess = sessions[0]
    init_derivatives(out, bids, extra_ignore=bidsignore_lines())
    wf = init_bssfp_wf(sess.inputs["bssfp"][0], b1_for(sess, sess.inputs["bssfp"][0]), sess.subject, sess.session, config,
                       name="bssfp_wf")
    wf.base_dir = str(config.resolved_work_dir())
    graph = wf.run(plugin="MultiProc", plugin_args={"n_procs": 2, "maxtasksperchild": 1})
    # nipype drops identity nodes from the executed graph: read what feeds the outputnode.
    nodes = {n.name: n for n in graph.nodes()}
    derivatives = nodes["derivatives"].result.outputs
    return {"ref_image": derivatives.ref_image, "brain_mask": derivatives.brain_mask,
            "maps": list(nodes["merge_maps"].result.outputs.out), "acq": sess.inputs["bssfp"][0].acq}


SYNTH_SNR = 25.0  # bids_qmri-synth default, the seed's in vivo SNR


@pytest.fixture(scope="module")
def seed_protocol_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bssfp_wf")
    bids = _synth(root / "bids")
    result = _run(bids, root / "out", METHODS, root / "models")
    return bids, root / "out", result


def test_all_maps_and_sidecars(seed_protocol_run):
    bids, out, result = seed_protocol_run
    acq = result["acq"]
    assert acq == "pc12"
    stem = f"sub-01_acq-{acq}"
    expected = {out / "sub-01" / "anat" / f"{stem}_desc-{m}_{s}.nii.gz" for m in METHODS for s in ("T1map", "T2map")}
    expected |= {out / "sub-01" / "fmap" / f"{stem}_desc-{m}_fieldmap.nii.gz" for m in COMPLEX}
    assert {Path(p) for p in result["maps"]} == expected
    assert Path(result["ref_image"]).name == f"{stem}_desc-ref_bSSFP.nii.gz"
    assert Path(result["brain_mask"]).name == f"{stem}_desc-brain_mask.nii.gz"
    for extra in (f"fmap/{stem}_desc-bssfp_TB1map.nii.gz", f"fmap/{stem}_magnitude.nii.gz",
                  f"anat/{stem}_desc-motion_bSSFP.tsv"):
        assert (out / "sub-01" / extra).exists(), extra
    for path in expected:
        side = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert side["Units"] == ("Hz" if path.name.endswith("fieldmap.nii.gz") else "s")
        assert f"bids:raw:sub-01/anat/{stem}_part-mag_bSSFP.nii.gz" in side["Sources"]
        assert "bids:raw:sub-01/fmap/sub-01_acq-famp_TB1TFL.nii.gz" in side["Sources"]
        assert side["EstimationAlgorithm"] and side["EstimationReference"]
        assert side["RepetitionTimeExcitation"] == pytest.approx(0.0048)
        assert side["FlipAngle"] == pytest.approx(15.0) and len(side["PhaseIncrements"]) == 12
        assert side["B1Source"] == "TB1TFL" and "B1Warning" not in side
        assert side["Denoising"]["Method"].startswith("MP-PCA") and side["Denoising"]["PatchSize"] == [3, 3, 3]
        # The Marchenko-Pastur estimate of the noise level finds the synthetic data's sigma.
        assert side["Denoising"]["NoiseSigmaMedian"] == pytest.approx(0.074 / (2**0.5 * SYNTH_SNR), rel=0.25)
        method = path.name.split("desc-")[1].split("_")[0]
        if method != "miracle":
            assert side["ModelCard"]["origin"] == "bundled"
    # Every map lies on the bSSFP grid, inside the mask, in plausible physical ranges.
    mask = nib.load(result["brain_mask"]).get_fdata() > 0
    # Many voxels lie above the seed range's 120 ms (CSF and GM with CSF partial volume). The default
    # networks cover them (issue 18): no range warning in any sidecar, and where the truth is above
    # 130 ms their T2 is not pinned at a ceiling (the seed nets put all of them at 120 ms).
    gt_t2 = nib.load(bids / "derivatives" / "groundtruth" / "sub-01" / "anat" / f"{stem}_T2map.nii.gz").get_fdata()
    assert np.mean(gt_t2[mask] > 0.13) > 0.1
    above = mask & (gt_t2 > 0.13)
    for method in METHODS:
        side = json.loads((out / "sub-01" / "anat" / f"{stem}_desc-{method}_T2map.json").read_text())
        assert "Warnings" not in side, (method, side.get("Warnings"))
        if method != "miracle":
            assert side["ModelCard"]["distribution"] == "brain"
            t2 = nib.load(out / "sub-01" / "anat" / f"{stem}_desc-{method}_T2map.nii.gz").get_fdata()
            assert np.median(t2[above]) > 0.5 * np.median(gt_t2[above]), method
            assert np.mean(np.isclose(t2[above], 0.12, rtol=0.01)) < 0.05, method
    t1 = nib.load(out / "sub-01" / "anat" / f"{stem}_desc-pinn_T1map.nii.gz")
    assert t1.shape == mask.shape
    assert np.all(t1.get_fdata()[~mask] == 0)
    motion = np.genfromtxt(out / "sub-01" / "anat" / f"{stem}_desc-motion_bSSFP.tsv", names=True, delimiter="\t")
    assert len(motion) == 12 and np.all(np.isfinite(motion["trans_x"]))
    assert motion["trans_x"][5] == 0 and motion["rot_z"][5] == 0  # the 6th cycle is the reference


def test_accuracy_against_ground_truth(seed_protocol_run):
    """Median |relative error| in GM+WM against the ground truth at the default SNR (25).

    The noise floor is the same voxels simulated from the ground truth with the same noise and
    estimated directly (true B1, no image processing, no denoising): 6-12 % here, the per-voxel
    CRB at this SNR. The workflow denoises the phase cycles (MP-PCA) and corrects the phantom's
    within-scan motion (~0.3 mm) with the receiver phase kept in the scanner frame, and lands
    below that floor for every method (measured 0.6-2.4 points below; with the noise-conditioned set 1.3-3.0, 2026-12-03).
    Issue 4's target, ≤ 5 % for MIRACLE and PINN, holds where the networks are defined (their
    training range, SPEC §7): measured MIRACLE 4.96 / 4.75 %, PINN 4.75 / 4.06 % (T1 / T2).
    Over all GM+WM MIRACLE is at 6.0 / 6.1 %: at 4 mm, 53 % of this participant's GM+WM voxels
    have T2 > 120 ms (CSF partial volume: sulcal CSF in most 4-mm cortical voxels), where the
    networks saturate and MIRACLE's CRB is higher (2 mm, the synthetic data's default: every
    method 3.6-3.9 % over all GM+WM, ``benchmarks/bench_bssfp_accuracy.py``)."""
    from bids_qmri.physics.bssfp import seed_protocol

    bids, out, result = seed_protocol_run
    errors = workflow_errors(bids, out, result["acq"], METHODS)
    floor = noise_floor(bids, out, result["acq"], METHODS, seed_protocol(12), bids.parent / "models", snr=SYNTH_SNR)
    print("\nseed protocol, median |relative error| (%), workflow vs noise floor:\n" + error_table(errors, floor))
    for key, value in errors.items():
        assert value <= floor[key], (key, value, floor[key])
    # Issue 4's target (≤ 5 % inside the training range) for MIRACLE; the default (brain-range)
    # PINN within 0.3 points of MIRACLE there (measured 5.02 / 4.75 % vs 4.96 / 4.75 %, the noise-conditioned set 4.93 / 4.76 % (2026-12-03); the
    # seed-range PINN this target was first set on measured 4.75 / 4.06 %).
    for suffix in ("T1map", "T2map"):
        assert errors["miracle", suffix, "trained"] <= 5.0, (suffix, errors["miracle", suffix, "trained"])
        assert errors["pinn", suffix, "trained"] <= errors["miracle", suffix, "trained"] + 0.3, (
            suffix, errors["pinn", suffix, "trained"], errors["miracle", suffix, "trained"])
    for suffix in ("T1map", "T2map"):
        assert errors["miracle", suffix, "all"] <= 6.5, (suffix, errors["miracle", suffix, "all"])


def test_fieldmap_of_complex_networks(seed_protocol_run):
    """The complex networks' ΔB0 against the ground-truth field (θ0 is 2π-periodic: compare
    modulo 1/TR)."""
    bids, out, result = seed_protocol_run
    acq = result["acq"]
    gt = nib.load(bids / "derivatives" / "groundtruth" / "sub-01" / "fmap" / f"sub-01_acq-{acq}_fieldmap.nii.gz").get_fdata()
    _, tissue, _ = tissue_masks(bids, out, acq)
    period = 1 / 0.0048
    for method in COMPLEX:
        est = nib.load(out / "sub-01" / "fmap" / f"sub-01_acq-{acq}_desc-{method}_fieldmap.nii.gz").get_fdata()
        diff = (est[tissue] - gt[tissue] + period / 2) % period - period / 2
        assert np.median(np.abs(diff)) < 10.0, method  # Hz; the field spans about ±30 Hz


def test_outputs_pass_the_validator(seed_protocol_run):
    from helpers import validate_bids

    _, out, _ = seed_protocol_run
    result = validate_bids(out, derivative=True)
    assert result.ok, result.summary()


def _other_protocol_dataset(src: Path, dst: Path, *, tr=5.0e-3, te=2.5e-3, flip=20.0, npc=8, snr=25.0) -> Path:
    """A bSSFP series at a non-bundled protocol simulated from the phantom's ground truth on the
    bSSFP grid (real/imag parts, constant receiver phase, seed-SNR noise), with the TB1TFL
    files of the source dataset."""
    from bids_qmri.physics.bssfp import BSSFPProtocol, bssfp_signal
    from bids_qmri.physics.noise import add_complex_noise

    gt = src / "derivatives" / "groundtruth" / "sub-01"
    load = lambda p: torch.as_tensor(nib.load(gt / p).get_fdata())  # noqa: E731
    t1, t2, m0 = (load(f"anat/sub-01_acq-pc12_{s}.nii.gz") for s in ("T1map", "T2map", "M0map"))
    b1, b0 = (load(f"fmap/sub-01_acq-pc12_{s}.nii.gz") for s in ("TB1map", "fieldmap"))
    protocol = BSSFPProtocol.with_default_increments(tr, te, flip, npc)
    valid = (t1 > 0) & (t2 > 0)
    S = bssfp_signal(torch.where(valid, t1, 1.0), torch.where(valid, t2, 0.1), m0 * valid, b1, b0, tr=tr, te=te,
                     flip_rad=protocol.flip_rad, phase_increments_rad=protocol.phase_increments_rad())
    S = add_complex_noise(S * np.exp(1j * 0.9), snr, torch.Generator().manual_seed(7)).numpy()
    affine = nib.load(gt / "anat" / "sub-01_acq-pc12_T1map.nii.gz").affine
    shutil.copytree(src / "sub-01" / "fmap", dst / "sub-01" / "fmap")
    for name in ("dataset_description.json", "participants.tsv", "README", ".bidsignore"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    anat = dst / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for part, values in (("real", S.real), ("imag", S.imag)):
        nib.save(nib.Nifti1Image(values.astype(np.float32), affine), anat / f"sub-01_acq-pc{npc}_part-{part}_bSSFP.nii.gz")
    (anat / f"sub-01_acq-pc{npc}_bSSFP.json").write_text(json.dumps(protocol.as_dict()))
    gt_dst = dst / "derivatives" / "groundtruth" / "sub-01"
    for d, s in (("anat", "T1map"), ("anat", "T2map"), ("anat", "M0map"), ("anat", "dseg"),
                 ("fmap", "TB1map"), ("fmap", "fieldmap")):
        (gt_dst / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(gt / d / f"sub-01_acq-pc12_{s}.nii.gz", gt_dst / d / f"sub-01_acq-pc{npc}_{s}.nii.gz")
    return dst


def test_other_protocol_trains_on_the_fly(seed_protocol_run, tmp_path):
    src, _, _ = seed_protocol_run
    bids = _other_protocol_dataset(src, tmp_path / "bids")
    methods = ("miracle", "pinn")
    result = _run(bids, tmp_path / "out", methods, tmp_path / "models")
    assert result["acq"] == "pc8"
    side = json.loads((tmp_path / "out" / "sub-01" / "anat" / "sub-01_acq-pc8_desc-pinn_T1map.json").read_text())
    assert side["ModelCard"]["origin"] == "trained on the fly"
    assert side["RepetitionTimeExcitation"] == pytest.approx(5.0e-3) and side["FlipAngle"] == pytest.approx(20.0)
    assert len(side["PhaseIncrements"]) == 8
    assert list((tmp_path / "models").rglob("pinn_npc8_*.safetensors"))
    errors = workflow_errors(bids, tmp_path / "out", "pc8", methods)
    protocol = BSSFPProtocol.with_default_increments(5.0e-3, 2.5e-3, 20.0, 8)
    floor = noise_floor(bids, tmp_path / "out", "pc8", methods, protocol, tmp_path / "models", snr=SYNTH_SNR)
    print("\nTR 5 ms, FA 20 deg, Npc 8 (trained on the fly), median |relative error| (%):\n" + error_table(errors, floor))
    # Measured: every entry 2.9-5.1 points below its floor; inside the seed training range MIRACLE
    # 5.76 / 5.36 %, the PINN trained on the fly on the brain distribution, starting from the SVNN
    # trained on the fly before it (models.WARM_START), 5.64 / 5.31 % (from scratch it was 7.0 / 7.1 %).
    # Looser than the seed protocol: 8 cycles, no bundled model. PINN bounds ~1.3× those, and within
    # a point of MIRACLE.
    for key, value in errors.items():
        assert value <= floor[key], (key, value, floor[key])
    for suffix, pinn_bound in (("T1map", 7.3), ("T2map", 6.9)):
        miracle_error = errors["miracle", suffix, "trained"]
        assert miracle_error <= 6.5, (suffix, miracle_error)
        assert errors["pinn", suffix, "trained"] <= min(pinn_bound, miracle_error + 1.0), (
            suffix, errors["pinn", suffix, "trained"], miracle_error)


def test_without_b1_map_warns_in_every_sidecar(tmp_path):
    """Tiny dataset without any B1 input: B1 = 1, a warning in the sidecars, no TB1map."""
    from helpers import make_bssfp_dataset

    bids = make_bssfp_dataset(tmp_path / "bids", b1=None, shape=(12, 12, 10), npc=6)
    result = _run(bids, tmp_path / "out", ("miracle",), tmp_path / "models")
    assert len(result["maps"]) == 2
    for path in result["maps"]:
        side = json.loads(Path(path).with_name(Path(path).name.replace(".nii.gz", ".json")).read_text())
        assert "B1 = 1" in side["B1Warning"]
    assert not list((tmp_path / "out").rglob("*_TB1map.nii.gz"))
