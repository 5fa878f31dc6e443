"""The BIDS-App command line: options into Config, checks, levels, orchestration, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bids_qmri
from bids_qmri.cli import run as cli
from bids_qmri import modalities

ALL_METHODS = modalities.all_methods()
DEFAULT_METHODS = modalities.default_methods()
from bids_qmri.errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK, EXIT_USAGE, UsageError
from helpers import make_bssfp_dataset, run_cli, tree


def _config(argv):
    return cli.build_config(cli.build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def tiny(tmp_path):
    return make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), b1=None, t1w=False)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"bids_qmri {bids_qmri.__version__}"


def test_options_into_config(tiny, tmp_path):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    filt = tmp_path / "f.json"
    filt.write_text(json.dumps({"bssfp": {"acquisition": "pc4"}}))
    c = _config([tiny, tmp_path / "out", "participant", "--participant-label", "sub-01", "02",
                 "--session-label", "ses-1", "--bids-filter-file", filt, "-w", tmp_path / "w",
                 "--nprocs", "3", "--mem-gb", "2.5", "--use-plugin", plugin, "--methods", "bssfp:miracle,pinn",
                 "--atlas", "HarvardOxford", "--template", "MNI152NLin2009aSym", "--model-dir", tmp_path / "m",
                 "--seed", "7", "--stop-on-first-crash", "--b1-prep-angle", "90", "--skip-bids-validation", "-vv"])
    assert c.participant_labels == ["01", "02"] and c.session_labels == ["1"]
    assert c.bids_filters == {"bssfp": {"acquisition": "pc4"}}
    assert c.work_dir == (tmp_path / "w").resolve() and c.output_dir == (tmp_path / "out").resolve()
    assert (c.nprocs, c.omp_nthreads, c.mem_gb) == (3, 3, 2.5)
    assert c.methods == {"bssfp": ("miracle", "pinn")}
    assert (c.atlas, c.seed, c.stop_on_first_crash, c.b1_prep_angle_deg) == ("HarvardOxford", 7, True, 90.0)
    assert c.model_dir == (tmp_path / "m").resolve() and c.verbose == 2 and c.skip_bids_validation
    assert cli.plugin_settings(c) == ("Linear", {})


def test_defaults(tiny, tmp_path):
    c = _config([tiny, tmp_path / "out", "participant"])
    assert c.methods == DEFAULT_METHODS
    assert c.work_dir == (tmp_path / "work").resolve()
    assert c.nprocs >= 1 and c.omp_nthreads == min(c.nprocs, 8)
    plugin, args = cli.plugin_settings(c)
    assert plugin == "MultiProc" and args["n_procs"] == c.nprocs


def test_methods_parsing():
    assert cli.parse_methods(["bssfp:all"]) == {"bssfp": ALL_METHODS["bssfp"]}
    assert cli.parse_methods(["bssfp:miracle", "bssfp:svnn,miracle"]) == {"bssfp": ("miracle", "svnn")}
    for bad in (["bssfp"], ["mrf:dictmatch,nope"], ["bssfp:"], ["bssfp:miracle,foo"]):
        with pytest.raises(UsageError):
            cli.parse_methods(bad)


@pytest.mark.parametrize("label", ["..", "../01", "01/..", "sub-", "a b", "01;rm", "ü"])
def test_hostile_labels_are_rejected(label):
    with pytest.raises(UsageError, match="only letters and digits"):
        cli.clean_labels([label], "sub-", "participant label")


def test_multiproc_plugin_args_from_options(tiny, tmp_path):
    plugin = tmp_path / "p.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 5\n")
    c = _config([tiny, tmp_path / "out", "participant", "--use-plugin", plugin, "--mem-gb", "4"])
    assert cli.plugin_settings(c)[1] == {"n_procs": 5, "memory_gb": 4.0, "raise_insufficient": False,
                                         "maxtasksperchild": 1}


def test_group_level_calls_run_group_lazily(tiny, tmp_path, monkeypatch):
    import bids_qmri.group as group

    calls = []
    monkeypatch.setattr(group, "run_group", lambda config: calls.append(config) or [])
    out = tmp_path / "out"
    assert cli.main([str(tiny), str(out), "group"]) == EXIT_USAGE  # nothing to collect yet
    out.mkdir()
    (out / "dataset_description.json").write_text("{}")
    assert cli.main([str(tiny), str(out), "group", "--seed", "3"]) == EXIT_OK
    assert len(calls) == 1 and calls[0].analysis_level == "group" and calls[0].seed == 3


def test_participant_level_orchestration(tmp_path, monkeypatch):
    """Discovery → derivatives root → one workflow per participant → inputs record → report."""
    root = make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), b1=None, t1w=False)
    (root / "sub-02" / "anat" / "sub-02_acq-pc4_part-phase_bSSFP.nii.gz").write_bytes(b"")
    ran, reports = [], []
    monkeypatch.setattr(cli, "run_participants", lambda groups, c: ran.extend(groups.items()) or {})
    import bids_qmri.reports as reports_pkg

    class FakeReports:  # the report module is someone else's; record the call only
        @staticmethod
        def write_participant_report(output_dir, subject, sessions, config):
            reports.append((output_dir, subject, [s.key for s in sessions]))
            return Path(output_dir) / f"sub-{subject}.html"

    monkeypatch.setitem(__import__("sys").modules, "bids_qmri.reports.participant", FakeReports)
    monkeypatch.setattr(reports_pkg, "participant", FakeReports, raising=False)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = cli.main([str(root), str(out), "participant", "-w", str(work), "--skip-bids-validation"])
    assert rc == EXIT_OK
    assert [s for s, _ in ran] == ["01"]  # sub-02's only input is unusable
    assert reports == [(out.resolve(), "01", ["sub-01"])]
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    record = json.loads((work / "bids_qmri" / "sub-01_inputs.json").read_text())
    assert record["participant_id"] == "sub-01" and record["sessions"][0]["skipped"] == []


def test_workflow_failure_exit_code_and_continue(tmp_path, monkeypatch, capsys):
    root = make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), b1=None, t1w=False)
    done = []

    def fake(groups, config):
        assert sorted(groups) == ["01", "02"]
        return {"01": "crash file(s): x"}

    monkeypatch.setattr(cli, "run_participants", fake)
    monkeypatch.setattr(cli, "write_report", lambda subject, *a: done.append(subject))
    rc = cli.main([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                   "-w", str(tmp_path / "w")])
    assert rc == EXIT_FAILED and done == ["02"]
    err = capsys.readouterr().err
    assert "bids_qmri: error: sub-01: the workflow failed; crash file(s): x" in err
    assert "bids_qmri: error: 1 of 2 participant(s) failed: sub-01" in err


@pytest.mark.parametrize("name, why", [
    # a B1 map serves a mapped input; alone it is not "unprocessed" (it is used when it can be)
    ("qmri_tb1tfl", "TB1TFL (used only beside an input that is mapped)"),
    ("qmri_vfa", "TB1AFI, VFA (not processed by this version)"),
    ("qmri_megre", "MEGRE (not processed by this version)"),
])
def test_examples_run_ends_cleanly_with_nothing_to_process(bids_examples, tmp_path, name, why):
    out = tmp_path / "out"
    proc = run_cli(bids_examples / name, out, "participant", "--skip-bids-validation", "-w", tmp_path / "w")
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: error:")]
    assert "no processable input" in line and f"found {why}" in line, line
    assert tree(out) == []


def test_invalid_input_dataset_reports_where_the_full_report_is(bids_examples, tmp_path):
    proc = run_cli(bids_examples / "qmri_irt1", tmp_path / "out", "participant", "-w", tmp_path / "w")
    assert proc.returncode == EXIT_USAGE
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_qmri: error:")]
    assert "EMPTY_FILE" in line
    report = Path(line.split("full report: ")[1].split(" — ")[0])
    assert report.parent == (tmp_path / "w" / "logs").resolve()
    assert json.loads(report.read_text())["issues"]["issues"]


def test_raises_usage_error_on_missing_bids_dir(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        _config([tmp_path / "nope", tmp_path / "out", "participant"])


def test_participant_workflow_wiring_two_bssfp_inputs_without_t1w(tmp_path):
    """Two bSSFP inputs feed one ROI workflow (merged lists); without a T1w the anatomy
    workflow gets the first bSSFP reference image."""
    from bids_qmri.bids.discovery import discover
    from bids_qmri.config import Config
    from bids_qmri.workflows.base import init_participant_wf

    root = make_bssfp_dataset(tmp_path / "bids", b1="TB1map", t1w=False)
    anat = root / "sub-01" / "anat"
    for p in ("mag", "phase"):
        (anat / f"sub-01_acq-second_part-{p}_bSSFP.nii.gz").write_bytes(
            (anat / f"sub-01_acq-pc4_part-{p}_bSSFP.nii.gz").read_bytes())
    (anat / "sub-01_acq-second_bSSFP.json").write_text((anat / "sub-01_acq-pc4_bSSFP.json").read_text())
    config = Config(bids_dir=root, output_dir=tmp_path / "out", methods={"bssfp": ("miracle",)})
    (sess,) = discover(config)
    wf = init_participant_wf(sess, config)
    assert wf.name == "single_subject_01_wf"
    names = {n.fullname for n in wf._get_all_nodes()}
    assert {"bssfp_pc4_wf.load", "bssfp_second_wf.load"} <= names
    edges = [(u.fullname, v.fullname) for u, v in wf._create_flat_graph().edges()]
    refs = sorted(u for u, v in edges if v.endswith("merge_ref_images"))
    assert [r.split(".")[-2] for r in refs] == ["bssfp_pc4_wf", "bssfp_second_wf"]
    to_anat = [(u, v) for u, v in edges if ".anat_wf." in f".{v}" and "bssfp_pc4_wf" in u]
    assert to_anat, "without a T1w the anatomy workflow must receive the bSSFP reference image"
    assert not [(u, v) for u, v in edges if ".anat_wf." in f".{v}" and "bssfp_second_wf" in u]


def _one_node_wf(sess, config):
    """A one-node participant workflow that fails for sub-02: exercises the runner only."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from bids_qmri.workflows.base import participant_wf_name

    def check(label):
        if label == "02":
            raise ValueError("simulated failure of sub-02")
        return label

    wf = pe.Workflow(name=participant_wf_name(sess))
    node = pe.Node(niu.Function(function=check, input_names=["label"], output_names=["out"]), name="check")
    node.inputs.label = sess.subject
    wf.add_nodes([node])
    return wf


def test_run_participants_attributes_failures_to_participants(tmp_path, monkeypatch):
    """nipype runs both participants in one MultiProc graph; the crash is sub-02's only."""
    import bids_qmri.workflows.base as base
    from bids_qmri.bids.discovery import discover

    root = make_bssfp_dataset(tmp_path / "bids", subjects=("01", "02"), b1=None, t1w=False)
    monkeypatch.setattr(base, "init_participant_wf", _one_node_wf)
    config = _config([root, tmp_path / "out", "participant", "-w", tmp_path / "work", "--nprocs", "2"])
    groups = {}
    for sess in discover(config):
        groups.setdefault(sess.subject, []).append(sess)
    failed = cli.run_participants(groups, config)
    assert list(failed) == ["02"]
    crash = Path(failed["02"].split("crash file(s): ")[1])
    assert crash.parent == (tmp_path / "work" / "logs" / "sub-02").resolve()
    assert "simulated failure of sub-02" in crash.read_text()
    assert list((tmp_path / "work").rglob("result_check.pklz"))  # sub-01's node finished


def test_progress_lines_name_participant_session_step_and_count():
    import io
    from types import SimpleNamespace

    from bids_qmri.cli.progress import Progress, describe_node

    ticks = iter([0.0, 1.0, 61.0, 3725.0, 3726.0])
    stream = io.StringIO()
    progress = Progress(3, verbose=1, stream=stream, clock=lambda: next(ticks))
    node = SimpleNamespace(fullname="bids_qmri_wf.sub_01_wf.single_subject_01_ses_02_wf.bssfp_pc12_wf.estimate_miracle")
    progress(node, "start")
    progress(node, "end")
    progress(SimpleNamespace(fullname="bids_qmri_wf.sub_01_wf.single_subject_01_wf.anat_wf.segment"), "exception")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "bids_qmri: [00:00:01] 0/3 started sub-01 ses-02 · bssfp_pc12 · estimate_miracle",
        "bids_qmri: [00:01:01] 1/3 sub-01 ses-02 · bssfp_pc12 · estimate_miracle done",
        "bids_qmri: [01:02:05] 2/3 sub-01 · anat · segment FAILED (details in the crash file)",
    ]
    assert progress.summary() == "2 of 3 steps run in 01:02:06, 1 failed"
    assert describe_node("bids_qmri_wf.sub_03_wf.single_subject_03_wf.roi_wf.roi_stats") == "sub-03 · roi · roi_stats"


def test_device_option(tiny, tmp_path, monkeypatch):
    import torch

    c = _config([tiny, tmp_path / "out", "participant", "--device", "cpu"])
    assert c.device == "cpu" and c.torch_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _config([tiny, tmp_path / "out", "participant"]).torch_device() == "cpu"  # auto without a GPU
    with pytest.raises(UsageError, match="--device cuda: torch sees no CUDA GPU"):
        _config([tiny, tmp_path / "out", "participant", "--device", "cuda"])
