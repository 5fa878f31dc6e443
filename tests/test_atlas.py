"""Atlas resolution and label-table dialects; TemplateFlow lookup offline."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bids_qmri.anatomy.atlases import atlas_label, read_label_table, resolve_atlas
from bids_qmri.anatomy.templates import NILEARN_TEMPLATE, load_template
from bids_qmri.errors import UsageError

MRICRON = Path("/usr/share/mricron/templates")


def _labels_image(path: Path, values=(1, 2, 5, 7)) -> Path:
    data = np.zeros((10, 10, 10), np.int16)
    for k, v in enumerate(values):
        data[k * 2: k * 2 + 2, 2:8, 2:8] = v
    nb.save(nb.Nifti1Image(data, np.diag([2, 2, 2, 1])), path)
    return path


@pytest.mark.parametrize(
    "text, suffix",
    [
        # mricron style: index, name, original code
        ("1 Precentral_L 2001\n2 Precentral_R 2002\n5 Frontal_Sup_L 2101\n7 Vermis_10 9170\n", ".txt"),
        # MCALT_ADIR122.txt style, read by MATLAB readtable as Var1/Var2 (comma-separated, no header)
        ("1,Precentral_L\n2,Precentral_R\n5,Frontal_Sup_L\n7,Vermis_10\n", ".txt"),
        # BIDS dseg.tsv
        ("index\tname\tabbreviation\n1\tPrecentral_L\tPreL\n2\tPrecentral_R\tPreR\n5\tFrontal_Sup_L\tFS\n7\tVermis_10\tV\n",
         ".tsv"),
        # Clinica-style TSV with an unnamed index column and padded numbers
        ("\troi_name\n0\tUnknown\n1\tPrecentral_L\n2 \tPrecentral_R\n5 \tFrontal_Sup_L\n7 \tVermis_10\n", ".tsv"),
        # FreeSurfer colour LUT with comments
        ("# label LUT\n0 Unknown 0 0 0 0\n1 Precentral_L 10 20 30 0\n2 Precentral_R 1 2 3 0\n"
         "5 Frontal_Sup_L 4 5 6 0\n7 Vermis_10 7 8 9 0\n", ".txt"),
        # ITK-SNAP label description
        ('    0     0    0    0        0  0  0    "Clear Label"\n    1   255    0    0        1  1  1    "Precentral_L"\n'
         '    2     0  255    0        1  1  1    "Precentral_R"\n    5     0    0  255        1  1  1    "Frontal_Sup_L"\n'
         '    7   255  255    0        1  1  1    "Vermis_10"\n', ".label"),
        # FSL XML: 0-based indices, image value = index + 1
        ('<?xml version="1.0"?><atlas><header><name>Test</name></header><data>'
         '<label index="0" x="1" y="1" z="1">Precentral_L</label><label index="1" x="1" y="1" z="1">Precentral_R</label>'
         '<label index="4" x="1" y="1" z="1">Frontal_Sup_L</label><label index="6" x="1" y="1" z="1">Vermis_10</label>'
         '</data></atlas>', ".xml"),
    ],
)
def test_label_table_dialects(tmp_path, text, suffix):
    path = tmp_path / f"table{suffix}"
    path.write_text(text)
    df = read_label_table(path)
    assert df["index"].tolist() == [1, 2, 5, 7]
    assert df["name"].tolist() == ["Precentral_L", "Precentral_R", "Frontal_Sup_L", "Vermis_10"]


def test_names_with_spaces_are_kept(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 Left Hippocampus\n2 Right Hippocampus 12 200 3\n")
    assert read_label_table(path)["name"].tolist() == ["Left Hippocampus", "Right Hippocampus"]


def test_user_atlas_path_pair_and_sibling_table(tmp_path):
    labels = _labels_image(tmp_path / "MCALT_ADIR122.nii.gz")
    table = tmp_path / "MCALT_ADIR122.txt"
    # MCALT lists retired indices (e.g. 39/40 "Unknown") that never occur in the image.
    table.write_text("1,Precentral_L\n2,Precentral_R\n5,Frontal_Sup_L\n7,Vermis_10\n39,Unknown\n40,Unknown\n")
    atlas = resolve_atlas(f"{labels}:{table}")
    assert atlas.name == "MCALTADIR122"
    assert atlas.table["index"].tolist() == [1, 2, 5, 7]
    # The table beside the image is found without naming it.
    assert resolve_atlas(str(labels)).table["index"].tolist() == [1, 2, 5, 7]


def test_user_atlas_errors_are_one_line(tmp_path):
    labels = _labels_image(tmp_path / "a.nii.gz")
    bad = tmp_path / "other.txt"
    bad.write_text("100 Somewhere\n101 Elsewhere\n")
    for spec in (f"{labels}:{bad}", f"{tmp_path / 'missing.nii.gz'}:{bad}", "NoSuchAtlas"):
        with pytest.raises(UsageError) as err:
            resolve_atlas(spec)
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not (MRICRON / "aal.nii.gz").is_file(), reason="mricron-data not installed")
def test_default_aal_atlas():
    atlas = resolve_atlas("AAL")
    assert atlas.name == "AAL"
    assert len(atlas.table) == 116
    row = atlas.table.set_index("index").loc[1, "name"]
    assert row == "Precentral_L"


def test_atlas_label_is_bids_safe():
    assert atlas_label("MCALT_ADIR122") == "MCALTADIR122"
    with pytest.raises(UsageError):
        atlas_label("__")


def _fake_templateflow(home: Path, name: str) -> None:
    """A tiny template in the TemplateFlow layout, plus a zero-byte placeholder (not downloaded)."""
    tdir = home / f"tpl-{name}"
    tdir.mkdir(parents=True)
    shape, affine = (12, 14, 12), np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-22, -26, -22]
    ii = np.indices(shape).astype(float)
    r = np.sqrt(((ii - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0))
    gm = np.clip(1 - np.abs(r - 4), 0, 1)
    wm = (r < 3.5).astype(np.float32) * (1 - gm)
    csf = ((r >= 4.5) & (r < 5.5)).astype(np.float32)
    t1 = 100 * wm + 60 * gm + 20 * csf
    for suffix, arr in {"T1w": t1, "label-GM_probseg": gm, "label-WM_probseg": wm, "label-CSF_probseg": csf,
                        "desc-brain_mask": (r < 5.5).astype(np.uint8)}.items():
        nb.save(nb.Nifti1Image(np.asarray(arr, np.float32), affine), tdir / f"tpl-{name}_res-04_{suffix}.nii.gz")
    (tdir / f"tpl-{name}_res-01_T1w.nii.gz").write_bytes(b"")  # placeholder: must be ignored


def test_templateflow_home_offline(tmp_path, monkeypatch):
    home = tmp_path / "templateflow"
    _fake_templateflow(home, "TestTpl")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    tpl = load_template("TestTpl")
    assert tpl.name == "TestTpl" and tpl.source.endswith("tpl-TestTpl")
    assert tpl.zooms == (4.0, 4.0, 4.0)
    gm = nb.load(home / "tpl-TestTpl" / "tpl-TestTpl_res-04_label-GM_probseg.nii.gz").get_fdata()
    np.testing.assert_allclose(tpl.priors["GM"].get_fdata(), gm, atol=1e-6)
    assert tpl.mask.get_fdata().sum() > 0
    # Not in the home and not the bundled default: a one-line error, no download attempt.
    with pytest.raises(UsageError) as err:
        load_template("MNI152NLin6Asym")
    assert "TEMPLATEFLOW_HOME" in str(err.value) and "\n" not in str(err.value)


def test_templateflow_placeholders_only(tmp_path, monkeypatch):
    home = tmp_path / "tf"
    (home / "tpl-Empty").mkdir(parents=True)
    (home / "tpl-Empty" / "tpl-Empty_res-01_T1w.nii.gz").write_bytes(b"")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    with pytest.raises(UsageError):
        load_template("Empty")


def test_nilearn_default_template(monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME", raising=False)
    tpl = load_template(None)
    assert tpl.name == NILEARN_TEMPLATE and tpl.source == "nilearn"
    gm, wm, csf = (tpl.priors[k].get_fdata() for k in ("GM", "WM", "CSF"))
    mask = tpl.mask.get_fdata() > 0
    # Priors are probabilities that sum to at most one and live inside the mask.
    assert gm.max() <= 1 and wm.max() <= 1 and csf.min() >= 0
    assert np.all(gm + wm + csf <= 1 + 1e-5)
    assert not np.any((gm + wm + csf)[~mask] > 0)
    # MNI152 brain volume is about 1.5-1.9 litres at 1 mm.
    assert 1.3e6 < mask.sum() < 2.2e6


def test_anat_wf_rejects_missing_template_and_atlas_early(tmp_path, monkeypatch):
    from bids_qmri.config import Config
    from bids_qmri.workflows.anat import init_anat_wf

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty_tf"))
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "out", template="MNI152NLin6Asym")
    with pytest.raises(UsageError) as err:
        init_anat_wf(tmp_path / "t1w.nii.gz", "01", None, cfg)
    assert "MNI152NLin6Asym" in str(err.value) and "\n" not in str(err.value)
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "out", atlas=f"{tmp_path / 'none.nii.gz'}:x.txt")
    with pytest.raises(UsageError):
        init_anat_wf(tmp_path / "t1w.nii.gz", "01", None, cfg)
    # A TemplateFlow home that holds the template is accepted.
    home = tmp_path / "tf"
    _fake_templateflow(home, "TestTpl")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    cfg = Config(bids_dir=tmp_path, output_dir=tmp_path / "out", template="TestTpl")
    wf = init_anat_wf(tmp_path / "t1w.nii.gz", "01", None, cfg)
    assert wf.get_node("register_template").inputs.template == "TestTpl"
