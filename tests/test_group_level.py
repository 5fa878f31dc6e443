"""Group level on constructed ROI tables of known properties (no participant pipeline needed)."""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_qmri.config import Config
from bids_qmri.errors import InputError
from bids_qmri.group import run_group, stats
from bids_qmri.group.collect import ROI_COLUMNS, read_roi_table
from bids_qmri.modalities import bidsignore_lines

REGIONS = [(1, "Precentral_L"), (2, "Precentral_R"), (3, "Thalamus_L"), (4, "Thalamus_R")]
BASE_T1 = {1: 1.20, 2: 1.25, 3: 0.90, 4: 0.95}  # seconds
BASE_T2 = {1: 0.060, 2: 0.062, 3: 0.045, 4: 0.047}


def roi_rows(sub, ses, values: dict, atlas="AAL", acq="pcbssfp"):
    """values: {(suffix, method): {region_index: mean}} -> long ROI table rows (SPEC §4)."""
    rows = []
    for (suffix, method), per_region in values.items():
        for idx, name in REGIONS:
            m = per_region[idx]
            rows.append({
                "participant_id": f"sub-{sub}", "session_id": f"ses-{ses}" if ses else "n/a",
                "atlas": atlas, "region_index": idx, "region": name, "suffix": suffix,
                "method": method, "acq": acq, "n_voxels": 100, "mean": m, "std": 0.1 * m,
                "median": m, "q1": 0.9 * m, "q3": 1.1 * m,
                "units": "s",
            })
    return pd.DataFrame(rows, columns=ROI_COLUMNS)


def write_table(out: Path, sub, ses, df: pd.DataFrame, atlas="AAL") -> Path:
    d = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
    d.mkdir(parents=True, exist_ok=True)
    name = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + f"_atlas-{atlas}_roistats.tsv"
    path = d / name
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return path


def make_bids(root: Path, subjects, sessions=()):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "test", "BIDSVersion": "1.10.0"}))
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects]}).to_csv(
        root / "participants.tsv", sep="\t", index=False)
    for s in subjects:
        for ses in sessions or [None]:
            (root / f"sub-{s}" / (f"ses-{ses}" if ses else "") / "anat").mkdir(
                parents=True, exist_ok=True)
    return root


def cohort_values(rng, sub_effect, session_noise):
    """Known cohort: miracle = base + participant effect + session noise; pinn = 0.97·miracle."""
    t1 = {i: BASE_T1[i] + sub_effect + session_noise * rng.normal() for i in BASE_T1}
    t2 = {i: BASE_T2[i] * (1 + sub_effect) for i in BASE_T2}
    return {
        ("T1map", "miracle"): t1,
        ("T1map", "pinn"): {i: 0.97 * v for i, v in t1.items()},
        ("T2map", "miracle"): t2,
        ("T2map", "pinn"): {i: v + 0.001 for i, v in t2.items()},
    }


@pytest.fixture
def cohort(tmp_path):
    """4 participants × 2 sessions in BIDS; sub-04 has no output, sub-03 only ses-1."""
    subjects = ["01", "02", "03", "04"]
    bids = make_bids(tmp_path / "bids", subjects, sessions=["1", "2"])
    out = tmp_path / "out"
    rng = np.random.default_rng(7)
    truth = {}
    for k, sub in enumerate(subjects[:3]):
        for ses in ("1", "2"):
            if sub == "03" and ses == "2":
                continue
            vals = cohort_values(rng, 0.05 * k, 0.01)
            truth[(sub, ses)] = vals
            write_table(out, sub, ses, roi_rows(sub, ses, vals))
    cfg = Config(bids_dir=bids, output_dir=out, analysis_level="group", n_bootstrap=300, seed=3)
    return cfg, truth


def test_run_group_outputs_and_values(cohort):
    cfg, truth = cohort
    written = run_group(cfg)
    g = Path(cfg.output_dir) / "group"
    for name in ("atlas-AAL_roistats.tsv", "atlas-AAL_summary.tsv", "agreement.tsv",
                 "repeatability.tsv", "participants_status.tsv", "report.html"):
        assert g / name in written and (g / name).is_file(), name

    allrows = pd.read_csv(g / "atlas-AAL_roistats.tsv", sep="\t")
    assert list(allrows.columns) == ROI_COLUMNS
    assert len(allrows) == 5 * len(REGIONS) * 4  # 5 sessions × regions × 4 maps

    # Summary: sessions averaged per participant, then mean/SD across participants.
    summ = pd.read_csv(g / "atlas-AAL_summary.tsv", sep="\t")
    row = summ[(summ.suffix == "T1map") & (summ.method == "miracle") & (summ.region_index == 3)]
    per_sub = [np.mean([truth[(s, ses)][("T1map", "miracle")][3] for ses in ("1", "2")
                        if (s, ses) in truth]) for s in ("01", "02", "03")]
    assert int(row.n_participants.iloc[0]) == 3 and int(row.n_sessions.iloc[0]) == 5
    assert row["mean"].iloc[0] == pytest.approx(np.mean(per_sub), rel=1e-9)
    assert row["sd"].iloc[0] == pytest.approx(np.std(per_sub, ddof=1), rel=1e-9)
    assert row["mean_std"].iloc[0] == pytest.approx(0.1 * np.mean(per_sub), rel=1e-9)

    # Agreement: one row per (suffix, acq) with miracle as method_a; CCC equals the direct one.
    agr = pd.read_csv(g / "agreement.tsv", sep="\t")
    assert len(agr) == 2 and set(agr.method_a) == {"miracle"} and set(agr.method_b) == {"pinn"}
    t1 = agr[agr.suffix == "T1map"].iloc[0]
    x = np.array([truth[k][("T1map", "miracle")][i] for k in sorted(truth) for i in BASE_T1])
    y = 0.97 * x
    assert t1.ccc == pytest.approx(stats.ccc(x, y), rel=1e-9)
    assert t1.mean_diff == pytest.approx(np.mean(x - y), rel=1e-9)
    assert t1.n_participants == 3 and t1.n_regions == 4 and t1.n_pairs == 20
    assert t1.n_sessions == 5 and t1.n_bootstrap == 300
    assert t1.ccc_ci_low - 1e-12 <= t1.ccc <= t1.ccc_ci_high + 1e-12
    assert t1.loa_low == pytest.approx(np.mean(x - y) - 1.96 * np.std(x - y, ddof=1))

    # Repeatability: participants with 2 sessions only (01, 02); CV as numpy computes it.
    rep = pd.read_csv(g / "repeatability.tsv", sep="\t")
    r = rep[(rep.suffix == "T1map") & (rep.method == "pinn") & (rep.region_index == 1)].iloc[0]
    cvs = []
    for s in ("01", "02"):
        v = np.array([truth[(s, ses)][("T1map", "pinn")][1] for ses in ("1", "2")])
        cvs.append(np.std(v, ddof=1) / np.mean(v) * 100)
    assert r.n_participants == 2 and r.n_sessions == 4
    assert r.cv_mean_percent == pytest.approx(np.mean(cvs), rel=1e-9)
    assert r.cv_rms_percent == pytest.approx(np.sqrt(np.mean(np.square(cvs))), rel=1e-9)
    v = [truth[(s, ses)][("T1map", "pinn")][1] for s in ("01", "02") for ses in ("1", "2")]
    assert r.icc_1_1 == pytest.approx(stats.icc_1_1(v, ["01", "01", "02", "02"]))
    assert r.icc_2_1 == pytest.approx(stats.icc_2_1(np.reshape(v, (2, 2))))


def test_missing_participants_and_sessions_are_listed(cohort):
    cfg, _ = cohort
    run_group(cfg)
    g = Path(cfg.output_dir) / "group"
    st = pd.read_csv(g / "participants_status.tsv", sep="\t", keep_default_na=False)
    got = {(r.participant_id, r.session_id): r.status for r in st.itertuples()}
    assert got[("sub-04", "ses-1")] == "missing" and got[("sub-04", "ses-2")] == "missing"
    assert got[("sub-03", "ses-2")] == "missing" and got[("sub-03", "ses-1")] == "ok"
    assert got[("sub-01", "ses-1")] == "ok"
    html = (g / "report.html").read_text()
    missing_para = html[html.index("Missing (no ROI table)"):]
    assert "sub-04" in missing_para.split("</p>")[0]
    assert "sub-03" not in missing_para.split("</p>")[0]  # partly included, listed per session


def test_participant_labels_restrict_and_expect(cohort):
    cfg, _ = cohort
    cfg.participant_labels = ["sub-01", "05"]
    run_group(cfg)
    st = pd.read_csv(Path(cfg.output_dir) / "group" / "participants_status.tsv", sep="\t")
    assert set(st.participant_id) == {"sub-01", "sub-05"}
    assert set(st[st.participant_id == "sub-05"].status) == {"missing"}
    allrows = pd.read_csv(Path(cfg.output_dir) / "group" / "atlas-AAL_roistats.tsv", sep="\t")
    assert set(allrows.participant_id) == {"sub-01"}


@pytest.mark.parametrize("where", ["output", "work"])
def test_crash_report_marks_participant_failed(cohort, where):
    cfg, _ = cohort
    if where == "output":
        crash = Path(cfg.output_dir) / "sub-04" / "log" / "crash-20261121-sub-04.txt"
    else:  # where the participant level points nipype's crash dumps
        crash = Path(cfg.resolved_work_dir()) / "logs" / "sub-04" / "crash-20261121-node.txt"
    crash.parent.mkdir(parents=True)
    crash.write_text("Traceback ...")
    run_group(cfg)
    st = pd.read_csv(Path(cfg.output_dir) / "group" / "participants_status.tsv", sep="\t")
    s4 = st[st.participant_id == "sub-04"]
    assert set(s4.status) == {"failed"}
    assert all(str(crash) in m for m in s4.message)
    html = (Path(cfg.output_dir) / "group" / "report.html").read_text()
    failed_para = html[html.index("Failed (crash report"):].split("</p>")[0]
    assert "sub-04" in failed_para


@pytest.mark.parametrize("damage, expect", [
    (lambda df: df.drop(columns=["mean"]), "missing column(s) mean"),
    (lambda df: df.assign(mean=df["mean"].astype(object).where(df.index != 2, "abc")),
     "column 'mean' has non-numeric value 'abc' (data row 3)"),
    (lambda df: df.assign(participant_id="sub-99"), "does not match the file name"),
    (lambda df: df.iloc[0:0], "ROI table has no rows"),
])
def test_malformed_table_one_line_error(tmp_path, damage, expect):
    df = roi_rows("01", "1", cohort_values(np.random.default_rng(0), 0.0, 0.0))
    path = write_table(tmp_path, "01", "1", damage(df))
    with pytest.raises(InputError) as exc:
        read_roi_table(path, "01", "1", "AAL")
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and expect in msg


def test_unreadable_table_one_line_error(tmp_path):
    path = write_table(tmp_path, "01", None, roi_rows("01", None, cohort_values(
        np.random.default_rng(0), 0.0, 0.0)))
    path.write_bytes(b"participant_id\tsession_id\n\xff\xfe\x00bad\t\"unterminated\n")
    with pytest.raises(InputError) as exc:
        read_roi_table(path, "01", None, "AAL")
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_malformed_table_is_reported_not_fatal(cohort, caplog):
    cfg, _ = cohort
    bad = Path(cfg.output_dir) / "sub-02" / "ses-2" / "anat" / "sub-02_ses-2_atlas-AAL_roistats.tsv"
    bad.write_text("participant_id\tmean\nsub-02\t1.0\n")
    with caplog.at_level(logging.ERROR, logger="bids_qmri.group"):
        run_group(cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(bad) in errors[0] and "\n" not in errors[0]
    st = pd.read_csv(Path(cfg.output_dir) / "group" / "participants_status.tsv", sep="\t")
    row = st[(st.participant_id == "sub-02") & (st.session_id == "ses-2")].iloc[0]
    assert row.status == "failed" and str(bad) in row.message
    # With --stop-on-first-crash the same table stops the group level.
    cfg.stop_on_first_crash = True
    with pytest.raises(InputError, match="missing column"):
        run_group(cfg)


def test_no_tables_is_an_input_error(tmp_path):
    bids = make_bids(tmp_path / "bids", ["01"])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as exc:
        run_group(Config(bids_dir=bids, output_dir=out, analysis_level="group"))
    assert "no usable ROI table" in str(exc.value) and "\n" not in str(exc.value)
    st = pd.read_csv(out / "group" / "participants_status.tsv", sep="\t")
    assert list(st.status) == ["missing"]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.stack, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])
        if tag not in ("img", "meta", "br", "hr", "link", "input"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def parse_report(path: Path) -> _Collector:
    p = _Collector()
    p.feed(path.read_text())
    p.close()
    assert not p.stack, p.stack
    return p


def test_report_renders_offline_with_figures(cohort):
    cfg, _ = cohort
    run_group(cfg)
    g = Path(cfg.output_dir) / "group"
    p = parse_report(g / "report.html")
    assert not p.external
    # 2 agreement + 2 regional + 2 repeatability figures, all present and PNG.
    assert len(p.imgs) == 6
    for src in p.imgs:
        f = g / src
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(f"figures/{f.name}" for f in (g / "figures").iterdir()) == sorted(p.imgs)


def test_group_outputs_keep_a_valid_derivative_dataset(cohort):
    from helpers import validate_bids

    from bids_qmri.bids.derivatives import init_derivatives

    cfg, _ = cohort
    init_derivatives(cfg.output_dir, cfg.bids_dir, extra_ignore=bidsignore_lines())
    run_group(cfg)
    res = validate_bids(cfg.output_dir, derivative=True)
    assert res.ok, res.summary()


def test_rerun_is_reproducible_and_removes_stale_outputs(cohort):
    cfg, _ = cohort
    run_group(cfg)
    g = Path(cfg.output_dir) / "group"
    first = (g / "agreement.tsv").read_bytes()
    run_group(cfg)
    assert (g / "agreement.tsv").read_bytes() == first
    # Drop every second session: no repeats any more, so no repeatability outputs.
    for p in Path(cfg.output_dir).glob("sub-*/ses-2"):
        for f in p.rglob("*.tsv"):
            f.unlink()
    run_group(cfg)
    assert not (g / "repeatability.tsv").exists()
    assert not list((g / "figures").glob("*_repeatability.png"))


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def test_cli_group_without_tables_fails_with_one_line(tmp_path):
    from helpers import run_cli

    from bids_qmri.bids.derivatives import init_derivatives

    bids = make_bids(tmp_path / "bids", ["01"])
    out = init_derivatives(tmp_path / "out", bids, extra_ignore=bidsignore_lines())
    proc = run_cli(bids, out, "group")
    assert proc.returncode == 3, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "no usable ROI table" in lines[0] and "Traceback" not in proc.stderr


def test_cli_group_malformed_table(cohort):
    from helpers import run_cli

    from bids_qmri.bids.derivatives import init_derivatives

    cfg, _ = cohort
    init_derivatives(cfg.output_dir, cfg.bids_dir, extra_ignore=bidsignore_lines())
    bad = Path(cfg.output_dir) / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_atlas-AAL_roistats.tsv"
    bad.write_text("participant_id\tsession_id\nsub-01\tses-1\n")
    proc = run_cli(cfg.bids_dir, cfg.output_dir, "group", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    named = [ln for ln in _error_lines(proc.stderr) if str(bad) in ln]
    assert len(named) == 1 and "missing column(s)" in named[0] and "Traceback" not in proc.stderr
    proc = run_cli(cfg.bids_dir, cfg.output_dir, "group", "--stop-on-first-crash")
    assert proc.returncode == 3
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr


def test_repeatability_matches_direct_computation_unbalanced(tmp_path):
    """Every repeatability row against numpy / stats on the raw values, with 3 participants ×
    3 sessions, one participant missing a session (ICC(2,1) undefined) and one with a single
    session (left out)."""
    from bids_qmri.group.tables import repeatability_table

    rng = np.random.default_rng(42)
    frames = []
    layout = {"01": ["1", "2", "3"], "02": ["1", "2", "3"], "03": ["1", "3"], "04": ["2"]}
    for sub, sessions in layout.items():
        effect = rng.normal(0, 0.05)
        for ses in sessions:
            frames.append(roi_rows(sub, ses, cohort_values(rng, effect, 0.02)))
    df = pd.concat(frames, ignore_index=True)
    # Region 4 of pinn T1: sub-03 misses it entirely -> balanced over 01, 02 only.
    df = df[~((df.participant_id == "sub-03") & (df.region_index == 4) & (df.method == "pinn")
              & (df.suffix == "T1map"))]
    rep = repeatability_table(df)
    assert len(rep) == len(REGIONS) * 4
    for r in rep.itertuples():
        sel = df[(df.suffix == r.suffix) & (df.method == r.method)
                 & (df.region_index == r.region_index) & (df.participant_id != "sub-04")]
        groups = [g["mean"].to_numpy() for _, g in sel.groupby("participant_id")]
        cvs = [np.std(v, ddof=1) / np.mean(v) * 100 for v in groups]
        assert r.n_participants == len(groups) and r.n_sessions == len(sel)
        assert r.cv_mean_percent == pytest.approx(np.mean(cvs), rel=1e-9)
        assert r.cv_rms_percent == pytest.approx(np.sqrt(np.mean(np.square(cvs))), rel=1e-9)
        assert r.icc_1_1 == pytest.approx(
            stats.icc_1_1(sel["mean"].to_numpy(), sel["participant_id"].to_numpy()), rel=1e-9)
        if len(groups) == 3:  # sub-03 lacks ses-2
            assert np.isnan(r.icc_2_1)
        else:
            assert r.icc_2_1 == pytest.approx(stats.icc_2_1(np.vstack(groups)), rel=1e-9)


def test_report_template_is_packaged():
    """A non-editable install (the container) must ship the report template: it has to match
    a ``[tool.setuptools.package-data]`` pattern of pyproject.toml."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["bids_qmri"]
    templates = sorted((root / "bids_qmri" / "group" / "templates").iterdir())
    assert templates
    for t in templates:
        rel = t.relative_to(root / "bids_qmri").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (
            f"{rel} is not in pyproject.toml package-data {patterns}: add 'group/templates/*'")


def test_tissue_rows_summarised_but_not_paired(cohort):
    """Tissue rows (negative region_index) overlap the atlas regions: in the summary, not in
    the agreement pairs (which would count the same voxels twice)."""
    cfg, truth = cohort
    for path in Path(cfg.output_dir).glob("sub-*/ses-*/anat/*_roistats.tsv"):
        df = pd.read_csv(path, sep="\t")
        tissue = df[df.region_index == 1].assign(region_index=-1, region="GM", mean=5.0)
        pd.concat([tissue, df]).to_csv(path, sep="\t", index=False)
    run_group(cfg)
    g = Path(cfg.output_dir) / "group"
    agr = pd.read_csv(g / "agreement.tsv", sep="\t")
    t1 = agr[agr.suffix == "T1map"].iloc[0]
    x = np.array([truth[k][("T1map", "miracle")][i] for k in sorted(truth) for i in BASE_T1])
    assert t1.n_regions == 4 and t1.ccc == pytest.approx(stats.ccc(x, 0.97 * x), rel=1e-9)
    summ = pd.read_csv(g / "atlas-AAL_summary.tsv", sep="\t")
    assert (summ[summ.region_index == -1]["mean"] == 5.0).all()


def test_agreement_pairs_maps_of_one_quantity_across_acquisitions():
    """Methods pair within an acquisition and, for maps in physical units, across acquisitions
    (T1 of inversion recovery vs T1 of pc-bSSFP); maps in arbitrary units (M0) only within one."""
    from bids_qmri.group.tables import agreement_table, method_pairs, paired_values

    frames = []
    rng = np.random.default_rng(4)
    truth = {}
    for sub in ("01", "02", "03"):
        t1 = {i: BASE_T1[i] * rng.uniform(0.9, 1.1) for i in BASE_T1}
        truth[sub] = t1
        frames.append(roi_rows(sub, None, {("T1map", "miracle"): t1,
                                           ("T1map", "svnn"): {i: 1.02 * v for i, v in t1.items()}}, acq="pc12"))
        frames.append(roi_rows(sub, None, {("T1map", "mle"): {i: 1.1 * v for i, v in t1.items()}}, acq="ir"))
        for acq in ("ir", "se"):
            m0 = roi_rows(sub, None, {("M0map", "mle"): {i: 500.0 for i in BASE_T1}}, acq=acq)
            m0["units"] = "arbitrary"
            frames.append(m0)
    df = pd.concat(frames, ignore_index=True)
    pairs = method_pairs(df)
    assert ("AAL", "T1map", "pc12", "miracle", "pc12", "svnn") in pairs
    assert ("AAL", "T1map", "ir", "mle", "pc12", "miracle") in pairs
    assert ("AAL", "T1map", "ir", "mle", "pc12", "svnn") in pairs
    assert not [p for p in pairs if p[1] == "M0map"], "arbitrary units are not compared across acquisitions"
    assert len(pairs) == 3
    p = paired_values(df, "AAL", "T1map", "ir", "mle", "svnn", "pc12")
    assert len(p) == 12 and np.allclose(p["x"] / p["y"], 1.1 / 1.02)
    agr = agreement_table({"AAL": df}, n_bootstrap=50, seed=1)
    row = agr[(agr.acq == "ir") & (agr.acq_b == "pc12") & (agr.method_b == "miracle")].iloc[0]
    x = np.array([1.1 * truth[s][i] for s in sorted(truth) for i in BASE_T1])
    assert row.method_a == "mle" and row.ccc == pytest.approx(stats.ccc(x, x / 1.1), rel=1e-9)
    assert set(agr.acq_b[agr.acq == "pc12"]) == {"pc12"}
