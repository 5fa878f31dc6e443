"""``bids_qmri-slurm BIDS_DIR OUTPUT_DIR``: a Slurm submission script for a cohort.

It prints (or writes with ``-o``) a bash script that, run on a login node, submits one job array
with one participant per task and a ``group`` job that starts when the array has finished.
The participants are the ``sub-*`` folders of BIDS_DIR (or ``--participant-label``), fixed when
the script is generated. Each task runs the BIDS-App on its host (``bids_qmri`` of this Python)
or inside a Singularity/Apptainer image (``--container IMAGE.sif``, run with ``--containall``
and only the BIDS, output, work and model directories bound). Options after ``--`` go to
``bids_qmri`` at both levels (e.g. ``-- --methods bssfp:miracle,pinn --seed 1``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import sys
from pathlib import Path

from .. import __version__
from ..errors import EXIT_OK, UsageError
from .run import _LABEL_RE

PROG = "bids_qmri-slurm"
_TIME_RE = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a Slurm submission script: one bids_qmri participant per array task, "
                    "then a dependent group job. Run the script with bash on a login node. "
                    "Options after '--' are passed to bids_qmri.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset (on a file system the nodes share)")
    p.add_argument("output_dir", type=Path, help="the derivatives directory (shared file system)")
    p.add_argument("-w", "--work-dir", type=Path, required=True,
                   help="work directory on a shared file system (all tasks share it, as bids_qmri expects)")
    p.add_argument("--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
                   help="participants to submit (with or without 'sub-'); default: every sub-* folder")
    p.add_argument("--container", type=Path, metavar="IMAGE.sif",
                   help="run each task in this Singularity/Apptainer image instead of this host's bids_qmri")
    p.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="shared cache of models trained on the fly (bound into the container); "
                        "default: the app's default ($BIDS_QMRI_MODEL_DIR)")
    s = p.add_argument_group("Slurm resources")
    s.add_argument("--cpus", type=int, default=4, help="CPUs per participant task (--nprocs of bids_qmri)")
    s.add_argument("--mem-gb", type=float, default=16.0, help="memory per participant task in GB")
    s.add_argument("--time", default="24:00:00", help="time limit per participant task ([D-]HH:MM:SS)")
    s.add_argument("--group-cpus", type=int, default=1, help="CPUs of the group job")
    s.add_argument("--group-mem-gb", type=float, default=8.0, help="memory of the group job in GB")
    s.add_argument("--group-time", default="04:00:00", help="time limit of the group job")
    s.add_argument("--group-after", choices=["ok", "any"], default="ok",
                   help="start the group job after every task succeeded ('ok') or after they all ended ('any')")
    s.add_argument("--max-parallel", type=int, default=0, metavar="N",
                   help="at most N tasks at once (array throttle %%N); 0: no limit")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--log-dir", type=Path, help="Slurm output files (default: WORK_DIR/slurm-logs)")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra sbatch option for both jobs, e.g. --sbatch-option=--qos=long (repeatable)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the script here (default: stdout)")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def find_participants(bids_dir: Path, labels: list[str]) -> list[str]:
    """Participant labels (without ``sub-``): the requested ones, checked, or every sub-* folder."""
    if not (bids_dir / "dataset_description.json").is_file():
        raise UsageError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json) — "
                         "give the root of the BIDS dataset")
    present = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    if not labels:
        if not present:
            raise UsageError(f"{bids_dir}: no sub-* folders — nothing to submit")
        return present
    wanted = []
    for raw in labels:
        label = raw[4:] if raw.startswith("sub-") else raw
        if not _LABEL_RE.match(label):
            raise UsageError(f"--participant-label {raw!r}: labels are alphanumeric (e.g. 01 or sub-01)")
        if label not in present:
            raise UsageError(f"--participant-label {raw!r}: {bids_dir}/sub-{label} does not exist")
        if label not in wanted:
            wanted.append(label)
    return wanted


def _check(args) -> None:
    for name in ("time", "group_time"):
        if not _TIME_RE.match(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: use [D-]HH:MM:SS, e.g. 24:00:00")
    for name in ("cpus", "group_cpus"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("mem_gb", "group_mem_gb"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.max_parallel < 0:
        raise UsageError("--max-parallel must be 0 (no limit) or positive")
    if args.container is not None and not args.container.is_file():
        raise UsageError(f"--container {args.container}: no such image file — build it with "
                         "'apptainer build bids_qmri.sif containers/bids_qmri.def'")
    out, bids = args.output_dir.absolute(), args.bids_dir.absolute()
    if out == bids or bids in out.parents:
        raise UsageError(f"{args.output_dir}: the output directory must be outside the BIDS dataset")


def _mem_mb(gb: float) -> int:
    return max(1, int(round(gb * 1024)))


def _sbatch_header(args, *, job_name: str, cpus: int, mem_gb: float, time: str, log_dir: Path) -> list[str]:
    opts = [f"--job-name={job_name}", f"--cpus-per-task={cpus}", f"--mem={_mem_mb(mem_gb)}M",
            f"--time={time}", "--nodes=1", "--ntasks=1"]
    if args.partition:
        opts.append(f"--partition={args.partition}")
    if args.account:
        opts.append(f"--account={args.account}")
    opts += args.sbatch_option
    # %x job name, %A array job id, %a task index, %j job id
    suffix = "%x_%A_%a.out" if job_name.endswith("participant") else "%x_%j.out"
    opts.append(f"--output={log_dir / suffix}")
    return opts


def _runner(args, *, level: str, work: str, cpus_var: str, mem_gb: float) -> str:
    """The command line of one task (bash, evaluated on the node; ``$label`` is the participant)."""
    q = shlex.quote
    bids, out = args.bids_dir.absolute(), args.output_dir.absolute()
    opts = ["-w", work, "--nprocs", cpus_var, "--omp-nthreads", cpus_var, "--mem-gb", f"{mem_gb:g}"]
    if level == "participant":
        opts[:0] = ["--participant-label", '"$label"']
    extra = " ".join(q(a) for a in args.bids_qmri_args)
    if args.container is None:
        app = f"{q(sys.executable)} -m bids_qmri.cli.run {q(str(bids))} {q(str(out))} {level}"
        if args.model_dir is not None:
            opts += ["--model-dir", q(str(args.model_dir.absolute()))]
        return " ".join([app, *opts, extra]).strip()
    # Container: bind only what the task needs; the image keeps its caches under /tmp, which
    # --containall makes private, on a host directory given by --workdir (not RAM-limited).
    binds = [f"--bind {q(f'{bids}:/data:ro')}", f"--bind {q(f'{out}:/out')}",
             f"--bind {q(str(args.work_dir.absolute()))}:/work"]
    if args.model_dir is not None:
        binds.append(f"--bind {q(str(args.model_dir.absolute()))}:/models")
        opts += ["--model-dir", "/models"]
    return " ".join([
        '"$APPTAINER"', "run", "--containall", "--cleanenv", "--workdir", '"$TASK_TMP"', *binds,
        q(str(args.container.absolute())), "/data", "/out", level, *opts, extra]).strip()


def _job_body(args, *, level: str, labels: list[str], cpus: int, mem_gb: float) -> str:
    # All tasks share one work directory: the app names its workflows and crash logs per
    # participant there, and the group level looks for those crash logs.
    lines = ["#!/usr/bin/env bash", "set -euo pipefail"]
    if level == "participant":
        lines += [f"LABELS=({' '.join(labels)})", 'label=${LABELS[$SLURM_ARRAY_TASK_ID]}']
    who = " sub-$label" if level == "participant" else ""
    lines.append(f'echo "bids_qmri {level}{who} on $(hostname) (job ${{SLURM_JOB_ID:-?}}, '
                 f'{cpus} CPUs, {mem_gb:g} GB) at $(date -u +%FT%TZ)"')
    cpus_var = "${SLURM_CPUS_PER_TASK:-%d}" % cpus
    if args.container is not None:
        tmp = shlex.quote(str(args.work_dir.absolute() / "tmp")) + "/" + (
            '"sub-$label"' if level == "participant" else "group")
        lines += [
            'APPTAINER=${APPTAINER:-$(command -v apptainer || command -v singularity || true)}',
            '[ -n "$APPTAINER" ] || { echo "neither apptainer nor singularity on PATH of $(hostname)" >&2; exit 2; }',
            f'TASK_TMP={tmp}',
            'mkdir -p "$TASK_TMP"',
        ]
        work = "/work"
    else:
        work = shlex.quote(str(args.work_dir.absolute()))
    lines.append(_runner(args, level=level, work=work, cpus_var=cpus_var, mem_gb=mem_gb))
    return "\n".join(lines) + "\n"


def render_script(args, labels: list[str]) -> str:
    q = shlex.quote
    log_dir = (args.log_dir or args.work_dir / "slurm-logs").absolute()
    n = len(labels)
    array = f"0-{n - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    part_opts = _sbatch_header(args, job_name="bids_qmri-participant", cpus=args.cpus,
                               mem_gb=args.mem_gb, time=args.time, log_dir=log_dir)
    group_opts = _sbatch_header(args, job_name="bids_qmri-group", cpus=args.group_cpus,
                                mem_gb=args.group_mem_gb, time=args.group_time, log_dir=log_dir)
    dirs = " ".join(q(str(p)) for p in (args.output_dir.absolute(), args.work_dir.absolute(), log_dir))
    part_body = _job_body(args, level="participant", labels=labels, cpus=args.cpus, mem_gb=args.mem_gb)
    group_body = _job_body(args, level="group", labels=labels, cpus=args.group_cpus, mem_gb=args.group_mem_gb)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"""#!/usr/bin/env bash
# Generated by {PROG} {__version__} at {now}.
# Submits {n} participant(s) of {args.bids_dir.absolute()} as one Slurm job array (one participant
# per task), then the group level after the array (dependency after{args.group_after}).
# Run it on a login node:  bash THIS_FILE      Logs: {log_dir}
set -euo pipefail
command -v sbatch >/dev/null || {{ echo "sbatch not found: run this script where Slurm's commands are" >&2; exit 2; }}
mkdir -p {dirs}

array_id=$(sbatch --parsable --array={array} {" ".join(q(o) for o in part_opts)} <<'BIDS_QMRI_PARTICIPANT'
{part_body}BIDS_QMRI_PARTICIPANT
)
array_id=${{array_id%%;*}}

group_id=$(sbatch --parsable --dependency=after{args.group_after}:"$array_id" --kill-on-invalid-dep=yes {" ".join(q(o) for o in group_opts)} <<'BIDS_QMRI_GROUP'
{group_body}BIDS_QMRI_GROUP
)
group_id=${{group_id%%;*}}

echo "participant array: job $array_id ({n} task(s): {' '.join('sub-' + lb for lb in labels)})"
echo "group: job $group_id (after{args.group_after}:$array_id)"
echo "$array_id $group_id"
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, app_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.bids_qmri_args = app_args
    try:
        _check(args)
        labels = find_participants(args.bids_dir, args.participant_label)
        script = render_script(args, labels)
        if args.output is None:
            sys.stdout.write(script)
        else:
            args.output.write_text(script)
            args.output.chmod(0o755)
            print(f"{PROG}: wrote {args.output} ({len(labels)} participant(s)); submit with: bash {args.output}",
                  file=sys.stderr)
    except UsageError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
