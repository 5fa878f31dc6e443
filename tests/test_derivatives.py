"""The derivatives writer: names, sidecars, atomic writes, concurrent dataset roots, validity."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_qmri import __version__
from bids_qmri.bids import derivatives as D
from bids_qmri.modalities import bidsignore_lines
from bids_qmri.utils.atomic import leftover_temporaries
from helpers import make_bssfp_dataset, validate_bids


def test_derivative_path_entity_order(tmp_path):
    p = D.derivative_path(tmp_path, subject="sub-01", session="ses-2", suffix="T1map",
                          desc="miracle", acquisition="pc12")
    assert p == tmp_path / "sub-01/ses-2/anat/sub-01_ses-2_acq-pc12_desc-miracle_T1map.nii.gz"
    p = D.derivative_path(tmp_path, subject="01", datatype="fmap", suffix="fieldmap", desc="pinncomplex", acq="pc6")
    assert p.name == "sub-01_acq-pc6_desc-pinncomplex_fieldmap.nii.gz" and p.parent.name == "fmap"
    p = D.derivative_path(tmp_path, subject="01", suffix="xfm", extension=".mat", acq="pc6",
                          from_="bSSFP", to="T1w", mode="image")
    assert p.name == "sub-01_acq-pc6_from-bSSFP_to-T1w_mode-image_xfm.mat"
    p = D.derivative_path(tmp_path, subject="01", suffix="probseg", label="GM", space="MNI152NLin2009aSym")
    assert p.name == "sub-01_space-MNI152NLin2009aSym_label-GM_probseg.nii.gz"
    p = D.derivative_path(tmp_path, subject="01", suffix="roistats", extension=".tsv", atlas="AAL")
    assert p.name == "sub-01_atlas-AAL_roistats.tsv"


@pytest.mark.parametrize("bad", [dict(subject="../x"), dict(subject="01", session="a/b"),
                                 dict(subject="01", desc="x_y"), dict(subject="01", acq="..")])
def test_labels_cannot_escape_the_output_tree(tmp_path, bad):
    with pytest.raises(ValueError, match="letters and digits"):
        D.derivative_path(tmp_path, suffix="T1map", **bad)


def test_bids_uri(tmp_path):
    raw = tmp_path / "raw"
    assert D.bids_uri(raw, raw / "sub-01/anat/a.nii.gz") == "bids:raw:sub-01/anat/a.nii.gz"
    assert D.bids_uri(tmp_path / "out", tmp_path / "out/sub-01/x.nii.gz", dataset="") == "bids::sub-01/x.nii.gz"


def test_save_nifti_with_sidecar_round_trip(tmp_path):
    path = D.derivative_path(tmp_path, subject="01", suffix="T1map", desc="miracle")
    data = np.random.default_rng(0).random((4, 5, 6)) * 2
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    sidecar = D.map_sidecar(units="s", sources=["bids:raw:sub-01/anat/x.nii.gz"], algorithm="MIRACLE",
                            reference="Nguyen & Bieri 2017", acquisition={"FlipAngle": 15.0, "RepetitionTimeExcitation": 0.0048},
                            model_card={"name": "m", "sha256": "abc"})
    D.save_nifti(path, data, affine, sidecar=sidecar)
    img = nb.load(str(path))
    np.testing.assert_allclose(img.get_fdata(), data.astype(np.float32))
    np.testing.assert_allclose(img.affine, affine)
    side = json.loads(path.with_name("sub-01_desc-miracle_T1map.json").read_text())
    assert side["Units"] == "s" and side["SkullStripped"] is False
    assert side["FlipAngle"] == 15.0 and side["ModelCard"]["sha256"] == "abc"
    assert side["EstimationAlgorithm"] == "MIRACLE"
    assert leftover_temporaries(tmp_path) == []


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub-01/anat/sub-01_T1map.nii.gz"
    D.save_nifti(path, np.ones((2, 2, 2)), np.eye(4))
    before = path.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half")  # a partial write, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(D.nb, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        D.save_nifti(path, np.zeros((2, 2, 2)), np.eye(4))
    assert path.read_bytes() == before
    assert leftover_temporaries(tmp_path) == []


def test_save_tsv_uses_na(tmp_path):
    path = tmp_path / "t.tsv"
    D.save_tsv(path, pd.DataFrame({"a": [1.0, None], "b": ["x", "y"]}))
    assert path.read_text() == "a\tb\n1.0\tx\nn/a\ty\n"


def test_dataset_description_and_container(tmp_path, monkeypatch):
    raw = make_bssfp_dataset(tmp_path / "raw", b1=None, t1w=False)
    monkeypatch.setenv("APPTAINER_NAME", "bids_qmri_0.1.0.sif")
    out = D.init_derivatives(tmp_path / "out", raw, extra_ignore=bidsignore_lines())
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "bids_qmri" and gen["Version"] == __version__ and gen["CodeURL"].startswith("https://")
    assert gen["Container"] == {"Type": "apptainer", "Tag": "bids_qmri_0.1.0.sif"}
    assert desc["SourceDatasets"][0]["URL"] == raw.absolute().as_uri()
    assert desc["DatasetLinks"]["raw"] == raw.absolute().as_uri()
    ignore = (out / ".bidsignore").read_text().splitlines()
    for pattern in ("*_bSSFP.*", "*_MRF.*", "*_qMT.*", "*_roistats.tsv", "figures", "*.html", "logs", "group"):
        assert pattern in ignore


def test_init_derivatives_is_idempotent_and_keeps_user_lines(tmp_path):
    raw = make_bssfp_dataset(tmp_path / "raw", b1=None, t1w=False)
    out = D.init_derivatives(tmp_path / "out", raw, extra_ignore=bidsignore_lines())
    (out / ".bidsignore").write_text((out / ".bidsignore").read_text() + "extra/\n")
    stamp = (out / "dataset_description.json").stat().st_mtime_ns
    D.init_derivatives(out, raw, extra_ignore=bidsignore_lines())
    assert (out / "dataset_description.json").stat().st_mtime_ns == stamp  # not rewritten
    lines = (out / ".bidsignore").read_text().splitlines()
    assert "extra/" in lines and lines.count("*_bSSFP.*") == 1


def _init_many(args):
    out, raw, n = args
    for _ in range(n):
        D.init_derivatives(out, raw, extra_ignore=bidsignore_lines())
        json.loads((Path(out) / "dataset_description.json").read_text())  # always complete
    return True


def test_concurrent_init_derivatives(tmp_path):
    raw = make_bssfp_dataset(tmp_path / "raw", b1=None, t1w=False)
    out = tmp_path / "out"
    with mp.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_init_many, [(str(out), str(raw), 25)] * 8))
    json.loads((out / "dataset_description.json").read_text())
    assert (out / ".bidsignore").read_text() == D.bidsignore_text(bidsignore_lines())
    assert leftover_temporaries(out) == []


def test_written_derivatives_pass_the_validator(tmp_path):
    """Every kind of file the app writes, named by the writer, passes bids-validator-deno."""
    raw = make_bssfp_dataset(tmp_path / "raw", sessions=("1",))
    out = D.init_derivatives(tmp_path / "out", raw, extra_ignore=bidsignore_lines())
    kw = dict(subject="01", session="1")
    src = [D.bids_uri(raw, raw / "sub-01/ses-1/anat/sub-01_ses-1_acq-pc4_part-mag_bSSFP.nii.gz")]
    vol = np.random.default_rng(1).random((4, 4, 4))
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    for method in ("miracle", "pinncomplex"):
        for suffix, units in (("T1map", "s"), ("T2map", "s"), ("M0map", "arbitrary")):
            D.save_nifti(D.derivative_path(out, **kw, suffix=suffix, acq="pc4", desc=method), vol, aff,
                         sidecar=D.map_sidecar(units=units, sources=src, algorithm=method, reference="seed 000",
                                               acquisition={"FlipAngle": 15.0}))
    D.save_nifti(D.derivative_path(out, **kw, datatype="fmap", suffix="fieldmap", acq="pc4", desc="pinncomplex"),
                 vol, aff, sidecar=D.map_sidecar(units="Hz", sources=src, algorithm="pinncomplex",
                                                 reference="seed 001", acquisition={}))
    # BIDS wants a magnitude image beside every fieldmap: the bSSFP workflow writes its mean
    # magnitude there.
    D.save_nifti(D.derivative_path(out, **kw, datatype="fmap", suffix="magnitude", acq="pc4", desc="pinncomplex"),
                 vol, aff, sidecar={"SkullStripped": False})
    D.save_nifti(D.derivative_path(out, **kw, datatype="fmap", suffix="TB1map", desc="tb1tfl"), vol, aff,
                 sidecar=D.map_sidecar(units="1", sources=src, algorithm="famp/800", reference="SPEC", acquisition={}))
    D.save_nifti(D.derivative_path(out, **kw, suffix="bSSFP", acq="pc4", desc="ref"), vol, aff, sidecar={})
    D.save_nifti(D.derivative_path(out, **kw, suffix="mask", acq="pc4", desc="brain"), vol > 0.5, aff,
                 sidecar={"Type": "Brain", "Sources": src})
    D.save_nifti(D.derivative_path(out, **kw, suffix="dseg"), (vol * 3).astype(np.uint8), aff, sidecar={})
    (D.derivative_path(out, **kw, suffix="dseg", extension=".tsv")).write_text(D.tissue_dseg_table().read_text())
    for lab in ("GM", "WM", "CSF"):
        D.save_nifti(D.derivative_path(out, **kw, suffix="probseg", label=lab), vol, aff, sidecar={})
    D.save_nifti(D.derivative_path(out, **kw, suffix="dseg", atlas="AAL"), (vol * 9).astype(np.int16), aff, sidecar={})
    D.save_tsv(D.derivative_path(out, **kw, suffix="roistats", extension=".tsv", atlas="AAL"),
               pd.DataFrame({"participant_id": ["sub-01"], "mean": [1.0]}))
    xfm = D.derivative_path(out, **kw, suffix="xfm", extension=".mat", acq="pc4", from_="bSSFP", to="T1w", mode="image")
    xfm.write_bytes(b"\0" * 16)
    (out / "sub-01.html").write_text("<html></html>")
    (out / "sub-01" / "figures").mkdir()
    (out / "sub-01" / "figures" / "sub-01_ses-1_desc-maps.svg").write_text("<svg/>")
    (out / "logs").mkdir()
    (out / "logs" / "crash.txt").write_text("x")
    (out / "group").mkdir()
    (out / "group" / "atlas-AAL_roistats.tsv").write_text("a\n1\n")
    (out / "group" / "agreement.tsv").write_text("a\n1\n")
    result = validate_bids(out, derivative=True)
    assert result.ok, result.summary(10)
    # And the .bidsignore is what makes the custom names pass.
    (out / ".bidsignore").unlink()
    assert not validate_bids(out, derivative=True).ok


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys

    from bids_qmri.utils.atomic import TMP_PREFIX, _owner_tag

    raw = make_bssfp_dataset(tmp_path / "raw", b1=None, t1w=False)
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = _owner_tag().split("-")[0]
    (out / "sub-01" / "anat").mkdir(parents=True)
    stale = out / "sub-01" / "anat" / f"{TMP_PREFIX}{host}-{dead}-abc.nii.gz"
    live = out / "sub-01" / "anat" / f"{TMP_PREFIX}{_owner_tag()}def.nii.gz"
    other_host = out / "sub-01" / "anat" / f"{TMP_PREFIX}otherhost-{dead}-ghi.nii.gz"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    D.init_derivatives(out, raw, extra_ignore=bidsignore_lines())
    assert not stale.exists() and live.exists() and other_host.exists()
