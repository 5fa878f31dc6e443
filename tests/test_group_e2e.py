"""End to end: synthetic dataset -> participant level -> group level, through the CLI.

Slow (whole workflows). It fails, never skips, when the participant level does not produce the
ROI tables the group level needs, so a broken pipeline cannot hide behind a green suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_cli, validate_bids
from test_group_level import parse_report

pytestmark = pytest.mark.slow

METHODS = ("miracle", "pinn")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """2 participants × 2 sessions at low resolution, participant level with MIRACLE and PINN."""
    root = tmp_path_factory.mktemp("group_e2e")
    bids, out, work = root / "bids", root / "out", root / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "bids_qmri.cli.synth", str(bids), "--participants", "2",
         "--sessions", "2", "--resolution", "4", "--seed", "1"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"bids_qmri-synth failed ({proc.returncode}): {proc.stderr[-2000:]}"
    part = run_cli(bids, out, "participant", "-w", work, "--methods",
                   "bssfp:" + ",".join(METHODS), "--seed", "1", "--nprocs", "1",
                   "--skip-bids-validation", timeout=3600)
    tables = sorted(out.glob("sub-*/ses-*/anat/*_roistats.tsv"))
    assert part.returncode == 0 and len(tables) == 4, (
        f"participant level did not produce the 4 ROI tables the group level needs "
        f"(exit {part.returncode}, found {[t.name for t in tables]}): {part.stderr[-3000:]}")
    group = run_cli(bids, out, "group", "-w", work, "--seed", "1")
    assert group.returncode == 0, f"group level failed ({group.returncode}): {group.stderr[-3000:]}"
    return bids, out


def _tsv(path: Path) -> pd.DataFrame:
    assert path.is_file(), f"missing {path}"
    df = pd.read_csv(path, sep="\t", keep_default_na=False)
    text = path.read_text()
    assert text.endswith("\n") and "\r" not in text
    n_cols = len(text.splitlines()[0].split("\t"))
    assert all(len(line.split("\t")) == n_cols for line in text.splitlines()), path
    return df


def test_group_tables(pipeline):
    bids, out = pipeline
    sessions = {p.name for p in bids.glob("sub-01/ses-*")}
    assert len(sessions) == 2, sessions
    g = out / "group"
    atlases = sorted(p.name.split("_")[0] for p in g.glob("atlas-*_roistats.tsv"))
    assert atlases, "no group ROI table"
    for a in atlases:
        allrows = _tsv(g / f"{a}_roistats.tsv")
        assert set(allrows.participant_id) == {"sub-01", "sub-02"}
        assert set(allrows.session_id) == sessions
        assert set(METHODS) <= set(allrows.method)
        summ = _tsv(g / f"{a}_summary.tsv")
        assert set(summ.n_participants.astype(int)) <= {1, 2} and len(summ) > 0
    st = _tsv(g / "participants_status.tsv")
    assert set(st.status) == {"ok"} and len(st) == 4

    agr = _tsv(g / "agreement.tsv")
    t1 = agr[(agr.suffix == "T1map") & (agr.method_a == "miracle") & (agr.method_b == "pinn")]
    assert len(t1) >= 1, agr[["suffix", "method_a", "method_b"]]
    row = t1.iloc[0]
    assert int(row.n_participants) == 2 and int(row.n_sessions) == 4
    ccc, lo, hi = (float(row[c]) for c in ("ccc", "ccc_ci_low", "ccc_ci_high"))
    # Two participants: the percentile interval is degenerate (a bound can be the estimate
    # itself, up to rounding); only its range is checked here.
    assert -1 <= lo <= hi <= 1 and -1 <= ccc <= 1
    assert int(row.n_bootstrap) == 10000  # the default of config.n_bootstrap

    rep = _tsv(g / "repeatability.tsv")
    assert set(METHODS) <= set(rep.method)
    cv = pd.to_numeric(rep.cv_mean_percent, errors="coerce")
    assert cv.notna().any() and (cv.dropna() >= 0).all()


def test_group_report(pipeline):
    _, out = pipeline
    g = out / "group"
    p = parse_report(g / "report.html")
    assert not p.external and p.imgs
    for src in p.imgs:
        assert (g / src).is_file() and (g / src).read_bytes()[:4] == b"\x89PNG"
    assert any("agreement" in s for s in p.imgs)
    assert any("repeatability" in s for s in p.imgs)


def test_derivative_dataset_still_valid(pipeline):
    _, out = pipeline
    res = validate_bids(out, derivative=True)
    assert res.ok, res.summary()
