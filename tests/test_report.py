"""Participant report on a small hand-made output directory: renders, parses, links resolve."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest

from bids_qmri.bids.inputs import SessionInputs, SkippedInput
from bids_qmri.reports.participant import write_participant_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.urls, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src"))
        for key in ("src", "href"):
            if attrs.get(key):
                self.urls.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


def _write(path: Path, data, affine, sidecar=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nb.save(nb.Nifti1Image(np.asarray(data), affine), path)
    if sidecar is not None:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))


@pytest.fixture
def output_dir(tmp_path):
    import ants

    out = tmp_path / "out"
    anat = out / "sub-01" / "ses-1" / "anat"
    shape = (24, 28, 22)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    ii = np.indices(shape).astype(float)
    r = np.sqrt(((ii - np.array(shape)[:, None, None, None] / 2) ** 2).sum(0))
    wm, gm, csf = r < 5, (r >= 5) & (r < 8), (r >= 8) & (r < 10)
    t1w = (100 * wm + 70 * gm + 20 * csf).astype(np.float32)
    dseg = (1 * gm + 2 * wm + 3 * csf).astype(np.uint8)
    p = "sub-01_ses-1"
    _write(anat / f"{p}_desc-preproc_T1w.nii.gz", t1w, affine, {})
    _write(anat / f"{p}_dseg.nii.gz", dseg, affine, {"Warnings": ["example anatomy warning"]})
    _write(anat / f"{p}_atlas-Toy_dseg.nii.gz", (((ii[0] > 12) + 1) * (dseg > 0)).astype(np.int16), affine, {})
    _write(anat / f"{p}_acq-fast_desc-ref_bSSFP.nii.gz", t1w[::-1].copy(), affine, {})
    mask = (dseg > 0).astype(np.uint8)
    _write(anat / f"{p}_acq-fast_desc-brain_mask.nii.gz", mask, affine, {})
    t1 = (1.4 * gm + 0.8 * wm + 3.5 * csf).astype(np.float32)
    card = {"Name": "svnn-pc12", "Version": "1", "Origin": "bundled", "Checksum": "sha256:abc"}
    _write(anat / f"{p}_acq-fast_desc-miracle_T1map.nii.gz", t1, affine,
           {"Units": "s", "EstimationAlgorithm": "MIRACLE", "EstimationReference": "Birk 2025",
            "RepetitionTimeExcitation": 0.0048, "FlipAngle": 15})
    _write(anat / f"{p}_acq-fast_desc-svnn_T1map.nii.gz", t1 * 1.02, affine,
           {"Units": "s", "EstimationAlgorithm": "SVNN", "ModelCard": card})
    _write(out / "sub-01" / "ses-1" / "fmap" / f"{p}_acq-fast_desc-pinn_fieldmap.nii.gz", r.astype(np.float32), affine,
           {"Units": "Hz", "EstimationAlgorithm": "PINN"})
    xfm = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(xfm, str(anat / f"{p}_acq-fast_from-bSSFP_to-T1w_mode-image_xfm.mat"))
    rows = [{"participant_id": "sub-01", "session_id": "ses-1", "atlas": "Toy", "region_index": i, "region": n,
             "suffix": "T1map", "method": m, "acq": "fast", "n_voxels": 10, "mean": 1.0 + i / 10, "std": 0.1,
             "median": 1.0, "q1": 0.9, "q3": 1.1, "units": "s"}
            for i, n in ((-1, "GM"), (1, "Left"), (2, "Right")) for m in ("miracle", "svnn")]
    pd.DataFrame(rows).to_csv(anat / f"{p}_atlas-Toy_roistats.tsv", sep="\t", index=False)
    return out


def test_report_renders_and_links_resolve(output_dir, tmp_path):
    sess = SessionInputs(subject="01", session="1", t1w=[tmp_path / "bids/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"],
                         skipped=[SkippedInput(path="/bids/sub-01/ses-1/anat/sub-01_ses-1_acq-bad_part-mag_bSSFP.nii.gz",
                                               reason="EchoTime missing in the sidecar — add it")])
    html_path = write_participant_report(output_dir, "sub-01", [sess], None)
    assert html_path == output_dir / "sub-01.html"
    html = html_path.read_text()
    parser = _Collector()
    parser.feed(html)
    parser.close()
    assert parser.imgs, "no figures in the report"
    for src in parser.imgs:
        assert (output_dir / src).is_file(), src
        assert src.startswith("sub-01/figures/")
    # Offline: no external URL anywhere in links or sources.
    assert not [u for u in parser.urls if u.startswith(("http:", "https:", "//"))]
    assert "http://" not in html and "https://" not in html
    text = " ".join(parser.text)
    for needle in ("EchoTime missing", "example anatomy warning", "svnn-pc12", "bundled", "Lin", "ANTs",
                   "Nipype", "PyBIDS", "PyTorch", "Birk", "Sci Rep"):
        assert needle.lower() in text.lower(), needle
    # Every map has a montage, the two T1 methods a difference map, the reference a registration check.
    figs = {p.name for p in (output_dir / "sub-01" / "figures").iterdir()}
    assert "sub-01_ses-1_acq-fast_desc-miracle_T1map.png" in figs
    assert "sub-01_ses-1_acq-fast_desc-pinn_fieldmap.png" in figs
    assert "sub-01_ses-1_acq-fast_desc-svnnminusmiracle_T1map.png" in figs
    assert "sub-01_ses-1_acq-fast_desc-reg_bSSFP.png" in figs
    assert "sub-01_ses-1_desc-seg_dseg.png" in figs
    # The ROI table is in the page with all its rows, sortable.
    assert html.count("<tr>") >= 6 and 'class="sortable"' in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_screenshot(output_dir, tmp_path):
    html_path = write_participant_report(output_dir, "01", None, None)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2400", html_path.as_uri()], check=True, capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10000
