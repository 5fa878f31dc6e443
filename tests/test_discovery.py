"""Input discovery (pybids) on the BIDS project's qMRI examples and on tiny generated datasets.

Expected values are read off the example sidecars by hand (independent of our parser).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_qmri.bids.discovery import b1_for, discover, format_plan
from bids_qmri.cli.run import main
from bids_qmri.config import Config
from bids_qmri.errors import InputError, UsageError
from helpers import make_bssfp_dataset, save_img, validate_bids, write_json

EXAMPLES = ("qmri_irt1", "qmri_megre", "qmri_mese", "qmri_tb1tfl", "qmri_vfa")
# Examples with nothing this version maps (their images are empty: discovery reads sidecars only).
UNMAPPED_EXAMPLES = ("qmri_megre", "qmri_tb1tfl", "qmri_vfa")


def _config(bids_dir, tmp_path, **kw):
    return Config(bids_dir=Path(bids_dir), output_dir=tmp_path / "out", **kw)


def test_tb1tfl_pair(bids_examples, tmp_path):
    (sess,) = discover(_config(bids_examples / "qmri_tb1tfl", tmp_path))
    (b1,) = sess.b1
    assert b1.kind == "TB1TFL"
    assert {k: p.name for k, p in b1.files.items()} == {
        "anat": "sub-01_acq-anat_TB1TFL.nii.gz", "famp": "sub-01_acq-famp_TB1TFL.nii.gz"}
    assert b1.metadata["famp"]["SequenceName"] == "tfl_b1_map"
    assert b1.metadata["famp"]["FlipAngle"] == 38
    assert not sess.skipped


def test_unprocessed_kinds_are_listed_not_skipped(bids_examples, tmp_path):
    (vfa,) = discover(_config(bids_examples / "qmri_vfa", tmp_path))
    assert sorted(Path(u.path).name for u in vfa.unprocessed) == [
        "sub-01_acq-tr1_TB1AFI.nii.gz", "sub-01_acq-tr2_TB1AFI.nii.gz",
        "sub-01_flip-1_VFA.nii.gz", "sub-01_flip-2_VFA.nii.gz"]
    assert all("not processed by this version" in u.reason for u in vfa.unprocessed)
    (megre,) = discover(_config(bids_examples / "qmri_megre", tmp_path))
    assert len(megre.unprocessed) == 8 and not megre.skipped
    # The qMRLab derivatives inside the examples are not inputs.
    assert not any("derivatives" in u.path for u in vfa.unprocessed)


@pytest.mark.parametrize("name", UNMAPPED_EXAMPLES)
def test_examples_never_crash_even_with_stop_on_first_crash(bids_examples, tmp_path, name):
    sessions = discover(_config(bids_examples / name, tmp_path, stop_on_first_crash=True))
    assert len(sessions) == 1 and not sessions[0].skipped


@pytest.mark.parametrize("name", UNMAPPED_EXAMPLES)
def test_examples_dry_run(bids_examples, tmp_path, capsys, name):
    out = tmp_path / "out"
    rc = main([str(bids_examples / name), str(out), "participant", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "== sub-01" in text
    assert "planned outputs: none (no processable input)" in text
    assert not out.exists()  # a dry run writes nothing


def test_examples_pass_the_validator_with_the_bids_project_settings(bids_examples):
    for name in EXAMPLES:
        result = validate_bids(bids_examples / name, examples=True)
        assert result.ok, f"{name}: {result.summary()}"
    # Without those settings the empty images are errors: the settings are what makes it pass.
    assert not validate_bids(bids_examples / "qmri_irt1").ok


# ---------------------------------------------------------------------------- tiny datasets
def test_bssfp_pair_metadata_and_b1(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("a", "b"))
    sessions = discover(_config(root, tmp_path))
    assert [(s.subject, s.session) for s in sessions] == [("01", "a"), ("01", "b"), ("02", "a"), ("02", "b")]
    for s in sessions:
        (b,) = s.inputs["bssfp"]
        assert b.acq == "pc4" and set(b.part_files) == {"mag", "phase"}
        assert (b.repetition_time, b.echo_time, b.flip_angle) == (0.0048, 0.0024, 15.0)
        assert b.phase_increments == [45.0, 135.0, 225.0, 315.0]
        assert b1_for(s, b).kind == "TB1map"
        assert len(s.t1w) == 1 and not s.skipped and not s.notes


def test_participant_and_session_selection(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("a", "b"))
    sessions = discover(_config(root, tmp_path, participant_labels=["02"], session_labels=["b"]))
    assert [(s.subject, s.session) for s in sessions] == [("02", "b")]
    with pytest.raises(UsageError, match="not found.*: 03"):
        discover(_config(root, tmp_path, participant_labels=["03"]))


def test_default_phase_increments_and_inheritance(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", npc=6, phase_increments=False, b1=None)
    # Move the sidecar to the top level: inheritance must still find it.
    side = root / "sub-01" / "anat" / "sub-01_acq-pc6_bSSFP.json"
    write_json(root / "acq-pc6_bSSFP.json", json.loads(side.read_text()))
    side.unlink()
    (sess,) = discover(_config(root, tmp_path))
    (b,) = sess.inputs["bssfp"]
    # π(2j−1)/Npc in degrees for Npc = 6: 30, 90, ..., 330.
    np.testing.assert_allclose(b.phase_increments, [30, 90, 150, 210, 270, 330], atol=1e-9)
    assert b.repetition_time == 0.0048
    assert any("PhaseIncrements absent" in n for n in sess.notes)
    assert b1_for(sess, b) is None
    plan = format_plan([sess], _config(root, tmp_path))
    assert "PhaseIncrements absent, using the default π(2j−1)/Npc for Npc=6" in plan
    assert "no B1 map: B1 = 1 assumed" in plan


def test_real_imag_parts_and_b1_forms(tmp_path):
    root = make_bssfp_dataset(tmp_path / "a", part=("real", "imag"), b1="TB1TFL")
    (sess,) = discover(_config(root, tmp_path))
    assert set(sess.inputs["bssfp"][0].part_files) == {"real", "imag"}
    assert sess.b1[0].kind == "TB1TFL" and set(sess.b1[0].files) == {"anat", "famp"}
    root = make_bssfp_dataset(tmp_path / "b", b1="TB1DAM")
    (sess,) = discover(_config(root, tmp_path))
    b1 = sess.b1[0]
    assert b1.kind == "TB1DAM" and set(b1.files) == {"flip1", "flip2"}
    assert [b1.metadata[k]["FlipAngle"] for k in ("flip1", "flip2")] == [60.0, 120.0]


def test_intended_for_selects_the_b1_map(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", b1="TB1map")
    fmap = root / "sub-01" / "fmap"
    save_img(fmap / "sub-01_acq-second_TB1map.nii.gz", np.full((8, 8, 6), 0.9))
    write_json(fmap / "sub-01_acq-second_TB1map.json",
               {"Units": "ratio", "IntendedFor": ["bids::sub-01/anat/sub-01_acq-pc4_part-mag_bSSFP.nii.gz"]})
    (sess,) = discover(_config(root, tmp_path))
    assert len(sess.b1) == 2
    assert b1_for(sess, sess.inputs["bssfp"][0]).files["map"].name == "sub-01_acq-second_TB1map.nii.gz"


def test_mrf_and_qmt_from_generated_files(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None)
    anat = root / "sub-01" / "anat"
    frames = np.random.default_rng(0).random((4, 4, 3, 10))
    for part in ("mag", "phase"):
        save_img(anat / f"sub-01_acq-fisp_part-{part}_MRF.nii.gz", frames)
    write_json(anat / "sub-01_acq-fisp_MRF.json",
               {"FlipAngle": [10.0] * 10, "RepetitionTimeExcitation": [0.012] * 10, "EchoTime": 0.002,
                "InversionTime": 0.02, "MRFSequenceType": "FISP"})
    for part in ("real", "imag"):
        save_img(anat / f"sub-01_acq-hs_desc-svd_part-{part}_qMT.nii.gz", frames[..., :5])
    from bids_qmri.bids.basis import write_basis_tsv

    write_basis_tsv(anat / "sub-01_acq-hs_desc-svd_qMTbasis.tsv", torch.eye(10, 5, dtype=torch.complex64))
    write_json(anat / "sub-01_acq-hs_desc-svd_qMT.json",
               {"FlipAngle": [5.0] * 10, "RFPulseDuration": [0.001] * 10, "RepetitionTimeExcitation": 0.0035})
    (sess,) = discover(_config(root, tmp_path))
    (mrf,) = sess.inputs["mrf"]
    assert mrf.acq == "fisp" and set(mrf.part_files) == {"mag", "phase"} and mrf.basis_file is None
    assert mrf.metadata["MRFSequenceType"] == "FISP"
    (qmt,) = sess.inputs["qmt"]
    assert qmt.basis_file.name == "sub-01_acq-hs_desc-svd_qMTbasis.tsv"
    assert not sess.skipped


def test_bids_filters_select_inputs(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None)
    anat = root / "sub-01" / "anat"
    for p in ("mag", "phase"):
        src = anat / f"sub-01_acq-pc4_part-{p}_bSSFP.nii.gz"
        (anat / f"sub-01_acq-other_part-{p}_bSSFP.nii.gz").write_bytes(src.read_bytes())
    write_json(anat / "sub-01_acq-other_bSSFP.json",
               json.loads((anat / "sub-01_acq-pc4_bSSFP.json").read_text()))
    (sess,) = discover(_config(root, tmp_path))
    assert sorted(b.acq for b in sess.inputs["bssfp"]) == ["other", "pc4"]
    (sess,) = discover(_config(root, tmp_path, bids_filters={"bssfp": {"acquisition": "other"}}))
    assert [b.acq for b in sess.inputs["bssfp"]] == ["other"]


def test_stop_on_first_crash_raises_input_error(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids", b1=None)
    (root / "sub-01" / "anat" / "sub-01_acq-pc4_part-phase_bSSFP.nii.gz").write_bytes(b"")
    (sess,) = discover(_config(root, tmp_path))
    assert not sess.inputs["bssfp"] and "empty file" in sess.skipped[0].reason
    with pytest.raises(InputError, match="part-phase_bSSFP.nii.gz: is an empty file"):
        discover(_config(root, tmp_path, stop_on_first_crash=True))


def test_raw_bidsignore_snippet_makes_custom_suffixes_valid(tmp_path):
    root = make_bssfp_dataset(tmp_path / "bids")
    result = validate_bids(root)
    assert result.ok, result.summary()
    (root / ".bidsignore").unlink()
    result = validate_bids(root)
    assert not result.ok  # bSSFP is not a BIDS suffix: the snippet is what makes it pass


@pytest.mark.slow
def test_synthetic_dataset_all_kinds(synth_dataset, tmp_path):
    """bids_qmri-synth writes every input kind of SPEC §3; discovery finds each, nothing skipped,
    and the dataset (with its .bidsignore) passes the validator."""
    result = validate_bids(synth_dataset)
    assert result.ok, result.summary()
    sessions = discover(_config(synth_dataset, tmp_path))
    assert len(sessions) == 2
    known = {"bSSFP", "TB1TFL", "T1w", "MRF", "qMT"}
    for sess in sessions:
        assert not sess.skipped
        assert {Path(u.path).name.split("_")[-1].split(".")[0] for u in sess.unprocessed} <= {"IRT1", "MESE"} - known
        (b,) = sess.inputs["bssfp"]
        assert b.n_cycles == 12 and b.repetition_time == pytest.approx(0.0048)
        assert [x.kind for x in sess.b1] == ["TB1TFL"] and len(sess.t1w) == 1
        assert sess.inputs["mrf"][0].basis_file is not None and sess.inputs["qmt"][0].basis_file is not None
