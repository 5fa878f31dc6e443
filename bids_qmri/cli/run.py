"""``bids_qmri BIDS_DIR OUTPUT_DIR {participant,group}``: the BIDS-App entry point (SPEC §2).

Thin: parse and check the command line into a ``Config``, then discovery, the participant
workflows (nipype) and the reports, or the group level. User errors end with one line
``bids_qmri: error: ...`` and an exit code from ``bids_qmri.errors``; anything else is a bug and
gets a crash report file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import os
import platform
import re
import sys
import tempfile
import traceback
from pathlib import Path

# No telemetry, ever: nipype's version check must be off before nipype is imported.
os.environ.setdefault("NIPYPE_NO_ET", "1")

from .. import __version__  # noqa: E402
from .. import modalities as registry  # noqa: E402
from ..config import DEVICES, Config, available_cores, default_model_dir  # noqa: E402
from ..errors import (  # noqa: E402
    EXIT_INTERNAL, EXIT_OK, BidsQmriError, InputError, UsageError, WorkflowError,
)

LOGGER = logging.getLogger("bids_qmri.cli")
PROG = "bids_qmri"
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ..bids.discovery import filter_kinds

    methods_help = "; ".join(f"{k}: {','.join(v)}" for k, v in registry.all_methods().items() if v)
    example = _methods_example()
    mapped = ", ".join(m.title for m in registry.modalities() if m.processes)
    p = argparse.ArgumentParser(
        prog=PROG,
        description=f"Quantitative MRI maps ({mapped}), anatomy and ROI statistics from a "
                    "BIDS dataset, written as BIDS derivatives.",
        epilog="Exit codes: 0 success; 1 internal error (crash report written); 2 unusable command "
               "line or directories; 3 no usable input; 4 a participant's workflow failed.",
    )
    p.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where the derivatives go (outside the BIDS dataset)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="'participant': maps, ROI tables and reports per participant; "
                        "'group': cohort tables and report from existing participant outputs")
    g = p.add_argument_group("selecting inputs")
    g.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="participants to process (with or without 'sub-'); default: all")
    g.add_argument("--session-label", nargs="+", default=[], metavar="LABEL",
                   help="sessions to process (with or without 'ses-'); default: all")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help="JSON {kind: {entity: value}} to select inputs; kinds: " + ", ".join(filter_kinds()))
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run bids-validator-deno on the input")
    g = p.add_argument_group("processing")
    g.add_argument("--methods", nargs="+", default=None, metavar="MODALITY:M1,M2",
                   help=f"mapping methods per modality, e.g. '{example}' (available: {methods_help}); "
                        "modalities not named are not mapped; default: every modality's default methods")
    g.add_argument("--atlas", default="AAL",
                   help="atlas for ROI statistics: AAL (default), AICHA, JHU, or LABELS.nii.gz:TABLE for your own")
    g.add_argument("--template", default="MNI152NLin2009aSym", help="template space for registration (default: MNI152NLin2009aSym)")
    g.add_argument("--model-dir", type=Path, default=None,
                   help="models trained on the fly, or your own from `bids_qmri-train --model-dir`, which "
                        "replace the bundled ones (default: $BIDS_QMRI_MODEL_DIR or ~/.cache/bids_qmri/models)")
    g.add_argument("--b1-prep-angle", type=float, default=80.0, metavar="DEG",
                   help="nominal preparation flip angle of Siemens tfl_b1_map (TB1TFL): B1 = famp/(10*DEG) "
                        "(default: 80)")
    g.add_argument("--seed", type=int, default=0, help="random seed, identical outputs on CPU (default: 0)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="where torch runs: auto (CUDA when present, the default), cpu or cuda; recorded in "
                        "the sidecars (outputs are bit-identical for a --seed on CPU)")
    for modality in registry.modalities():
        if not modality.run_options:
            continue
        mg = p.add_argument_group(f"{modality.title} ({modality.name})")
        for opt in modality.run_options:
            mg.add_argument(opt.flag, dest=opt.dest, default=opt.default, choices=opt.choices,
                            type=opt.type, help=f"{opt.help} (default: {opt.default})")
    g = p.add_argument_group("resources and execution")
    g.add_argument("-w", "--work-dir", type=Path, default=None,
                   help="nipype working directory; a re-run with the same one resumes "
                        "(default: OUTPUT_DIR/../work)")
    g.add_argument("--nprocs", "--n-cpus", type=int, default=0, help="processes in parallel (0: all cores)")
    g.add_argument("--omp-nthreads", type=int, default=0, help="threads per process (0: min(nprocs, 8))")
    g.add_argument("--mem-gb", "--mem", type=float, default=None, help="memory limit for the scheduler in GB (default: no limit)")
    g.add_argument("--use-plugin", type=Path, default=None, metavar="FILE",
                   help="nipype plugin YAML ('plugin: MultiProc|Linear|SLURM|...', 'plugin_args: {...}')")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop at the first unusable input or failed step instead of skipping it")
    g.add_argument("--dry-run", action="store_true",
                   help="print the discovered inputs and the plan, run nothing")
    g = p.add_argument_group("other")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages (-vv: debug) and tracebacks on errors")
    return p


# --------------------------------------------------------------------------------------------
# Checks: arguments -> Config
# --------------------------------------------------------------------------------------------
def clean_labels(values, prefix: str, what: str) -> list[str]:
    """Strip ``sub-``/``ses-``; only letters and digits survive (nothing can escape a path)."""
    out = []
    for value in values:
        label = str(value).strip()
        label = label[len(prefix):] if label.startswith(prefix) else label
        if not _LABEL_RE.match(label):
            raise UsageError(f"invalid {what} {value!r}: BIDS labels contain only letters and digits")
        out.append(label)
    return list(dict.fromkeys(out))


def parse_methods(values) -> dict[str, tuple[str, ...]]:
    all_methods = {k: v for k, v in registry.all_methods().items() if v}
    if not values:
        return registry.default_methods()
    chosen: dict[str, tuple[str, ...]] = {}
    for token in values:
        for item in filter(None, token.split(";")):
            modality, sep, names = item.partition(":")
            modality = modality.strip().lower()
            if not sep or modality not in all_methods:
                known = {m.name for m in registry.modalities()}
                why = (f"{modality} has no mapping method in this version" if sep and modality in known
                       else f"expected MODALITY:METHOD[,METHOD] with MODALITY in {', '.join(all_methods)}")
                raise UsageError(f"--methods {item!r}: {why} (e.g. {_methods_example()})")
            wanted = [n.strip().lower() for n in names.split(",") if n.strip()]
            if wanted == ["all"]:
                wanted = list(all_methods[modality])
            unknown = [n for n in wanted if n not in all_methods[modality]]
            if unknown or not wanted:
                raise UsageError(f"--methods {item!r}: unknown method(s) {', '.join(unknown) or '(none given)'} "
                                 f"for {modality} (available: {', '.join(all_methods[modality])})")
            chosen[modality] = tuple(dict.fromkeys(chosen.get(modality, ()) + tuple(wanted)))
    # Modalities not named keep no methods: `--methods MODALITY:M` runs M on that modality only.
    return chosen


def _methods_example() -> str:
    """``MODALITY:M1,M2`` for help and errors, from the first registered modality with methods."""
    modality, methods = next((k, v) for k, v in registry.all_methods().items() if v)
    return f"{modality}:{','.join(methods[:2])}"


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _resolve(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def check_writable(path: Path, what: str) -> None:
    """Probe by creating (and removing) a file: catches read-only mounts, not just mode bits."""
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(f"{what} {path}: {probe_dir} exists and is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bids_qmri-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"{what} {path} is not writable ({exc.strerror}): choose a writable directory") from exc


def load_plugin(path: Path) -> tuple[str, dict]:
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--use-plugin {path} cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"--use-plugin {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("plugin"), str):
        raise UsageError(f"--use-plugin {path}: expected a mapping with 'plugin: <name>' and optional 'plugin_args'")
    args = spec.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise UsageError(f"--use-plugin {path}: 'plugin_args' must be a mapping")
    return spec["plugin"], args


def build_config(args) -> Config:
    bids_dir = _resolve(args.bids_dir)
    output_dir = _resolve(args.output_dir)
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS directory {args.bids_dir} does not exist or is not a directory")
    if output_dir == bids_dir:
        raise UsageError("OUTPUT_DIR is the BIDS directory: choose a separate directory for the derivatives")
    if _is_within(output_dir, bids_dir):
        raise UsageError(f"OUTPUT_DIR {output_dir} is inside the BIDS directory {bids_dir}: "
                         "choose a directory outside the input dataset")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"OUTPUT_DIR {output_dir} exists and is not a directory")
    work_dir = _resolve(args.work_dir) if args.work_dir else output_dir.parent / "work"
    if work_dir == bids_dir or _is_within(work_dir, bids_dir):
        raise UsageError(f"work directory {work_dir} is inside the BIDS directory {bids_dir}: "
                         "pass -w/--work-dir outside the input dataset")
    if work_dir == output_dir or _is_within(work_dir, output_dir):
        raise UsageError(f"work directory {work_dir} is inside OUTPUT_DIR: pass -w/--work-dir elsewhere")
    config = Config(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_labels=clean_labels(args.participant_label, "sub-", "participant label"),
        session_labels=clean_labels(args.session_label, "ses-", "session label"),
        skip_bids_validation=args.skip_bids_validation,
        methods=parse_methods(args.methods),
        atlas=args.atlas,
        template=args.template,
        model_dir=_resolve(args.model_dir) if args.model_dir else default_model_dir(),
        seed=args.seed,
        dry_run=args.dry_run,
        stop_on_first_crash=args.stop_on_first_crash,
        verbose=args.verbose,
        b1_prep_angle_deg=args.b1_prep_angle,
        device=args.device,
        options={opt.dest: getattr(args, opt.dest) for m in registry.modalities() for opt in m.run_options},
    )
    if args.bids_filter_file is not None:
        from ..bids.discovery import load_filters

        config.bids_filters = load_filters(args.bids_filter_file)
        config.bids_filter_file = _resolve(args.bids_filter_file)
    if args.nprocs < 0 or args.omp_nthreads < 0:
        raise UsageError("--nprocs and --omp-nthreads must be >= 0 (0: automatic)")
    if args.mem_gb is not None and args.mem_gb <= 0:
        raise UsageError("--mem-gb must be positive")
    if not 0 < args.b1_prep_angle <= 180:
        raise UsageError("--b1-prep-angle must be in (0, 180] degrees")
    config.nprocs = args.nprocs or available_cores()
    config.omp_nthreads = args.omp_nthreads or min(config.nprocs, 8)
    config.mem_gb = args.mem_gb
    config.torch_device()  # --device cuda without a GPU fails now, with one line
    if args.use_plugin is not None:
        config.plugin_file = _resolve(args.use_plugin)
        load_plugin(config.plugin_file)
    if not args.dry_run:
        check_writable(output_dir, "OUTPUT_DIR")
        check_writable(work_dir, "work directory")
    return config


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def plugin_settings(config: Config) -> tuple[str, dict]:
    """nipype plugin and its arguments: the --use-plugin YAML, else MultiProc from the options."""
    if config.plugin_file:
        plugin, args = load_plugin(config.plugin_file)
    else:
        plugin, args = "MultiProc", {}
    if plugin == "MultiProc":
        args.setdefault("n_procs", config.nprocs)
        if config.mem_gb:
            args.setdefault("memory_gb", config.mem_gb)
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1)
    return plugin, args


def inputs_record_path(config: Config, subject: str) -> Path:
    """Where the skipped inputs, notes and unprocessed files of a participant are recorded."""
    return Path(config.resolved_work_dir()) / "bids_qmri" / f"sub-{subject}_inputs.json"


def write_inputs_record(config: Config, subject: str, sessions) -> Path:
    from ..utils.atomic import write_json_atomic

    record = {
        "participant_id": f"sub-{subject}",
        "sessions": [
            {
                "session_id": f"ses-{s.session}" if s.session else None,
                "skipped": [{"path": k.path, "reason": k.reason} for k in s.skipped],
                "unprocessed": [{"path": k.path, "reason": k.reason} for k in s.unprocessed],
                "notes": list(s.notes),
            }
            for s in sessions
        ],
    }
    return write_json_atomic(inputs_record_path(config, subject), record)


def _processable(sess, config) -> bool:
    from ..bids.discovery import selected_modalities

    return any(sess.inputs.get(m.name) for m in selected_modalities(config))


def _nothing_to_do(sessions, config) -> InputError:
    """One line saying why nothing can be mapped: what was found and why each kind is idle."""
    from ..bids.discovery import selected_modalities

    selected = {m.name for m in selected_modalities(config)}
    by_version, unselected, support = set(), set(), set()
    for s in sessions:
        for m in registry.modalities():
            if s.inputs.get(m.name) and m.name not in selected:
                (unselected if m.processes else by_version).add(m.suffixes[0])
        by_version |= {Path(u.path).name.split("_")[-1].split(".")[0] for u in s.unprocessed}
        support |= {b.kind for b in s.b1} | ({"T1w"} if s.t1w else set())
    parts = [f"{', '.join(sorted(kinds))} ({why})" for kinds, why in (
        (by_version, "not processed by this version"), (unselected, "not selected by --methods"),
        (support, "used only beside an input that is mapped")) if kinds]
    what = f"found {'; '.join(parts)}" if parts else "found no image data"
    if config.bids_filters:
        from ..bids.discovery import unmatched_filters

        source = config.bids_filter_file or "bids filters"
        misses = unmatched_filters(config)
        if misses:
            what += f"; --bids-filter-file {source} selects nothing for {'; '.join(misses)}"
        else:
            what += f"; --bids-filter-file {source} selects {', '.join(sorted(config.bids_filters))} inputs only"
    skipped = [k for s in sessions for k in s.skipped]
    detail = f"; {len(skipped)} input(s) skipped, first: {Path(skipped[0].path).name}: {skipped[0].reason}" \
        if skipped else ""
    wanted = ", ".join(m.title for m in selected_modalities(config)) or "no modality selected by --methods"
    return InputError(config.bids_dir, f"no processable input ({wanted}) for the selected "
                      f"participants: {what}{detail}", "see --dry-run for the full list")


def run_participant_level(config: Config) -> int:
    from ..bids.discovery import check_bids_dir, check_participants, discover, format_plan

    check_bids_dir(config.bids_dir)
    check_participants(config.bids_dir, config.participant_labels)
    if not config.skip_bids_validation and not config.dry_run:
        from ..bids.validation import validate_input

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        validate_input(config.bids_dir, Path(config.resolved_work_dir()) / "logs" / f"bids-validator-{stamp}.json")
    sessions = discover(config)
    if config.dry_run:
        print(format_plan(sessions, config))
        return EXIT_OK
    for s in sessions:
        for k in s.skipped:
            print(f"{PROG}: skipped {k.path}: {k.reason}", file=sys.stderr)
    runnable = [s for s in sessions if _processable(s, config)]
    if not runnable:
        raise _nothing_to_do(sessions, config)
    from ..anatomy.atlases import resolve_atlas

    resolve_atlas(config.atlas)  # an unknown or broken --atlas fails now, not hours later
    from ..bids.derivatives import check_output_tree

    check_output_tree(config.output_dir)  # a symlink planted at OUTPUT_DIR/sub-* fails now
    from ..utils.tempdirs import private_tempdir, remove_stale_tempdirs

    # Every dependency's temporary files go to WORK_DIR/tmp/<this run> (TMPDIR and tempfile,
    # inherited by nipype's workers), removed when the run ends; a killed run's folder is removed
    # by the next run.
    tmp_parent = Path(config.resolved_work_dir()) / "tmp"
    remove_stale_tempdirs(tmp_parent)
    try:
        with private_tempdir(tmp_parent):
            return _run_runnable(sessions, runnable, config)
    finally:
        with contextlib.suppress(OSError):
            tmp_parent.rmdir()  # only when empty: other runs may share the work directory


def _run_runnable(sessions, runnable, config: Config) -> int:
    from ..bids.derivatives import init_derivatives
    from ..utils.seeding import seed_everything

    seed_everything(config.seed)
    init_derivatives(config.output_dir, config.bids_dir, extra_ignore=registry.bidsignore_lines())
    subjects = list(dict.fromkeys(s.subject for s in runnable))
    for subject in subjects:
        write_inputs_record(config, subject, [s for s in sessions if s.subject == subject])
    failures = run_participants({sub: [s for s in runnable if s.subject == sub] for sub in subjects}, config)
    for subject in subjects:
        if subject in failures:
            print(f"{PROG}: error: sub-{subject}: the workflow failed; {failures[subject]}", file=sys.stderr)
            continue
        write_report(subject, [s for s in sessions if s.subject == subject], config)
    if failures:
        raise WorkflowError(f"{len(failures)} of {len(subjects)} participant(s) failed: "
                            f"{', '.join('sub-' + f for f in failures)}; see the crash files named above")
    return EXIT_OK


def run_participants(groups: dict, config: Config) -> dict[str, str]:
    """Run every participant's sessions in one nipype graph, so that MultiProc works on several
    participants at once; return ``{subject: where to look}`` for the participants that failed.

    Each participant's nodes write their crash files to ``WORK_DIR/logs/sub-<label>/``, which
    is how a failure is attributed to its participant. Node results are cached under
    ``WORK_DIR/bids_qmri_wf/sub_<label>_wf/``: a re-run skips every finished node.
    """
    import time

    from nipype import config as ncfg
    from nipype.pipeline import engine as pe

    from ..workflows.base import init_participant_wf

    from nipype import logging as nlogging

    work_dir = Path(config.resolved_work_dir())
    level = "DEBUG" if config.verbose >= 3 else "INFO" if config.verbose >= 1 else "WARNING"
    ncfg.update_config({
        "logging": {"log_directory": str(work_dir / "logs"), "log_to_file": False,
                    "workflow_level": level, "interface_level": level, "utils_level": level},
        "execution": {"crashdump_dir": str(work_dir / "logs"), "crashfile_format": "txt",
                      "stop_on_first_crash": config.stop_on_first_crash,
                      "remove_unnecessary_outputs": False, "check_version": False},
        "monitoring": {"enabled": False},
    })
    nlogging.update_logging(ncfg)  # nipype set its levels from its defaults when imported
    from ..utils.logs import quiet_nipype_crashes

    quiet_nipype_crashes(config.verbose)  # one line per failed node below; tracebacks in the crash files
    wf = pe.Workflow(name="bids_qmri_wf", base_dir=str(work_dir))
    crash_dirs = {}
    for subject, sessions in groups.items():
        crash_dirs[subject] = work_dir / "logs" / f"sub-{subject}"
        crash_dirs[subject].mkdir(parents=True, exist_ok=True)
        sub_wf = pe.Workflow(name=f"sub_{subject}_wf")
        for sess in sessions:
            sub_wf.add_nodes([init_participant_wf(sess, config)])
        for node in sub_wf._get_all_nodes():
            node.config = node.config or {}
            node.config.setdefault("execution", {})["crashdump_dir"] = str(crash_dirs[subject])
        wf.add_nodes([sub_wf])
    plugin, plugin_args = plugin_settings(config)
    from .progress import Progress, count_steps

    progress = Progress(count_steps(wf), verbose=config.verbose)
    if not plugin.endswith("Graph"):  # graph plugins submit everything at once and take no callback
        plugin_args.setdefault("status_callback", progress)
    for subject, sessions in groups.items():
        print(f"{PROG}: sub-{subject}: " + "; ".join(_what_runs(s, config) for s in sessions), file=sys.stderr)
    print(f"{PROG}: running {progress.total} steps with {plugin} (work directory {work_dir})", file=sys.stderr)
    started = time.time()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:  # nipype raises RuntimeError (or the node's exception when Linear)
        from ..utils.logs import crash_summary

        failed = {}
        for subject, crash_dir in crash_dirs.items():
            crashes = sorted(p for p in crash_dir.glob("crash-*") if p.stat().st_mtime >= started - 1)
            for crash in crashes:
                print(f"{PROG}: sub-{subject}: failed step {crash_summary(crash)} (traceback: {crash})",
                      file=sys.stderr)
            if crashes:
                failed[subject] = f"crash file(s): {', '.join(map(str, crashes[:3]))}"
        if not failed:
            failed = {s: f"nipype: {' '.join(str(exc).split())[:300]}" for s in groups}
        print(f"{PROG}: {progress.summary()}", file=sys.stderr)
        if config.stop_on_first_crash:
            subject, where = next(iter(failed.items()))
            raise WorkflowError(f"sub-{subject}: the workflow failed (--stop-on-first-crash); {where}") from exc
        return failed
    print(f"{PROG}: {progress.summary()}", file=sys.stderr)
    return {}


def _what_runs(sess, config) -> str:
    """``ses-1: <modality> <acq>, <modality> <acq>`` (the mapped inputs of a session, by modality and acq)."""
    from ..workflows.base import mapped_inputs

    mapped = ", ".join(f"{m.name} {item.acq}" if item.acq else m.name for m, item in mapped_inputs(sess, config))
    return (f"ses-{sess.session}: " if sess.session else "") + (mapped or "anatomy only")


def write_report(subject: str, sessions, config: Config):
    """The participant's HTML report (bids_qmri.reports); skipped inputs are passed along."""
    try:
        from ..reports.participant import write_participant_report
    except ImportError as exc:
        LOGGER.warning("participant report not written: %s", exc)
        return None
    return write_participant_report(config.output_dir, subject, sessions, config)


def run_group_level(config: Config):
    if not (config.output_dir / "dataset_description.json").is_file():
        raise UsageError(f"{config.output_dir} holds no bids_qmri outputs: run the participant level first")
    from ..group import run_group

    return run_group(config)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def write_crash_report(config: Config | None, argv, exc: BaseException) -> Path:
    """Write the traceback and context of an internal error; return the file."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"crash-{stamp}-{os.getpid()}.txt"
    text = "\n".join([
        f"{PROG} {__version__} internal error",
        f"command: {PROG} {' '.join(map(str, argv))}",
        f"python: {sys.version.split()[0]} on {platform.platform()}",
        "",
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    ])
    candidates = []
    if config is not None:
        candidates += [Path(config.output_dir) / "logs", Path(config.resolved_work_dir()) / "logs"]
    candidates.append(Path(tempfile.gettempdir()))
    from ..utils.atomic import write_text_atomic

    for folder in candidates:
        try:
            return write_text_atomic(folder / name, text)
        except OSError:
            continue
    raise exc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ..utils.logs import setup_logging

    setup_logging(args.verbose)
    config = None
    try:
        config = build_config(args)
        if config.analysis_level == "group":
            run_group_level(config)
            return EXIT_OK
        return run_participant_level(config)
    except BidsQmriError as exc:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run with the same work directory to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: crash report, exit 1
        report = write_crash_report(config, argv, exc)
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
              f"crash report: {report} — please report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
