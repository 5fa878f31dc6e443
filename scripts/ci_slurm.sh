#!/usr/bin/env bash
# Slurm check for CI: starts a real single-node Slurm cluster (Debian slurm-wlm + munge) as root,
# private to this run (own munge socket and key, own ports, own state directories, SLURM_CONF),
# then:
#   1. harness: a trivial 3-task job array and a dependent job through sbatch;
#   2. cohort: bids_qmri-synth (2 participants) -> bids_qmri-slurm writes the submission script ->
#      `bash job.sh` submits one participant per array task and the dependent group job -> every
#      task and the group job must end COMPLETED, the outputs must be there and validate;
#   3. nipype's SLURM plugin: `bids_qmri ... participant --use-plugin containers/slurm-plugin.yml`
#      for one participant (every nipype node becomes an sbatch job).
# Everything started here is stopped on exit (trap); nothing outside $TMP is left behind.
#
# Usage: scripts/ci_slurm.sh [harness|cohort|plugin|all]   (default all; needs root)
# Environment:
#   QMRI_BIN          directory with bids_qmri, bids_qmri-synth, bids_qmri-slurm (default .venv/bin)
#   QMRI_SLURM_ARGS   bids_qmri options for the cohort (default: --methods bssfp:miracle,svnn --seed 1)
#   QMRI_REQUIRE=1    fail instead of skipping when not root
#   QMRI_KEEP=1       keep the temporary directory (configs, logs, data, outputs)
#   QMRI_TIMEOUT      seconds to wait for the cohort jobs (default 1500)

# The whole script is one brace group: bash parses it completely before running it, so editing
# this file while it runs cannot change what runs.
{
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
STAGE=${1:-all}
case "$STAGE" in all|harness|cohort|plugin) ;; *) echo "usage: $0 [harness|cohort|plugin|all]" >&2; exit 2 ;; esac

T0=$(date +%s)
log() { printf '==> [%s +%4ss] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'ci_slurm: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
  [ "${QMRI_REQUIRE:-0}" = 1 ] && die "starting slurmctld/slurmd/munged needs root"
  echo "ci_slurm: SKIPPED: starting slurmctld/slurmd/munged needs root (run as root in CI)"
  exit 0
fi
for tool in munged slurmctld slurmd sbatch squeue scontrol sinfo; do
  command -v "$tool" >/dev/null || {
    command -v apt-get >/dev/null || die "$tool missing and no apt-get: install slurm-wlm and munge"
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
    break
  }
done
BIN=${QMRI_BIN:-$REPO/.venv/bin}
APP_ARGS=${QMRI_SLURM_ARGS:---methods bssfp:miracle,svnn --seed 1}
TIMEOUT=${QMRI_TIMEOUT:-1500}

TMP=$(mktemp -d /var/tmp/bids_qmri-slurm.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local rc=$?
  set +e
  if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ]; then
    scancel --quiet --full "--user=$(id -un)" >/dev/null 2>&1
  fi
  # Stop the daemons this script started (by pid), slurmd first; then anything left of the jobs.
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill "${PIDS[$i]}" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  if [ $rc -ne 0 ]; then
    for f in "$TMP"/log/*.log; do [ -f "$f" ] && { echo "--- $f (tail)"; tail -n 15 "$f"; }; done >&2
    echo "ci_slurm: FAILED (exit $rc) after $(( $(date +%s) - T0 )) s" >&2
  fi
  if [ "${QMRI_KEEP:-0}" = 1 ]; then echo "ci_slurm: kept $TMP"; else rm -rf "$TMP"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- a private single-node cluster -----------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
start_cluster() {
  mkdir -p "$TMP"/{munge,log,state,spool,run}
  # munged wants its socket directory searchable by all, its key readable by munge only.
  chown munge:munge "$TMP/munge"; chmod 755 "$TMP/munge"
  # A fresh key for this cluster only.
  dd if=/dev/urandom of="$TMP/munge/munge.key" bs=1 count=1024 status=none
  chown munge:munge "$TMP/munge/munge.key"; chmod 400 "$TMP/munge/munge.key"
  local sock=$TMP/munge/munge.socket
  runuser -u munge -- munged --foreground --key-file="$TMP/munge/munge.key" --socket="$sock" \
    --pid-file="$TMP/munge/munged.pid" --seed-file="$TMP/munge/munge.seed" \
    --log-file="$TMP/log/munged.log" --num-threads=2 >>"$TMP/log/munged.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || die "munged did not start (see $TMP/log/munged.log)"
  echo test | munge --socket="$sock" | unmunge --socket="$sock" >/dev/null || die "munge round trip failed"

  local node cpus mem_mb
  node=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ { print $2 }' /proc/meminfo) / 1024 * 9 / 10 ))
  local ctld_port slurmd_port
  ctld_port=$(free_port); slurmd_port=$(free_port)
  export SLURM_CONF=$TMP/slurm.conf
  cat >"$SLURM_CONF" <<EOF
# Single-node test cluster written by scripts/ci_slurm.sh
ClusterName=bidsqmri-ci
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/run/slurmctld.pid
SlurmdPidFile=$TMP/run/slurmd.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -D -i -f "$SLURM_CONF" >>"$TMP/log/slurmctld.log" 2>&1 &
  PIDS+=($!)
  slurmd -D -f "$SLURM_CONF" -N "$node" >>"$TMP/log/slurmd.log" 2>&1 &
  PIDS+=($!)
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case "$state" in idle*|mixed*|allocated*) break ;; esac
    sleep 0.5
  done
  case "$state" in idle*|mixed*|allocated*) ;; *) die "node $node not up (state '${state:-none}'); see $TMP/log" ;; esac
  log "Slurm $(sinfo -V | awk '{print $2}') up: node $node, $cpus CPUs, $mem_mb MB, partition ci, ports $ctld_port/$slurmd_port"
}

# wait_jobs SECONDS JOBID...: wait until the jobs (and all their array tasks) have ended.
wait_jobs() {
  local limit=$1; shift
  local deadline=$(( $(date +%s) + limit )) left
  while :; do
    left=$(squeue -h -j "$(IFS=,; echo "$*")" -o %i 2>/dev/null | wc -l)
    [ "$left" -eq 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || { squeue; die "jobs $* still running after $limit s"; }
    sleep 3
  done
}

# job_states JOBID: "<jobid> <state> <exit>" for the job and each of its array tasks.
job_states() {
  scontrol show job -o "$1" | tr ' ' '\n' | awk -F= '
    /^JobId=/ { id = $2 } /^ArrayJobId=/ { aj = $2 } /^ArrayTaskId=/ { id = aj "_" $2 }
    /^JobState=/ { st = $2 } /^ExitCode=/ { print id, st, $2 }'
}

# show_failure DIR: the end of the jobs' logs and the first crash file under DIR.
show_failure() {
  local f crash
  for f in "$1"/work/slurm-logs/*.out; do
    [ -f "$f" ] && { echo "--- $(basename "$f") (tail)"; tail -n 8 "$f"; }
  done >&2
  crash=$(find "$1/work" -name 'crash-*' -type f 2>/dev/null | head -n 1)
  [ -n "$crash" ] && { echo "--- $crash (tail)"; tail -n 25 "$crash"; } >&2
  return 0
}

expect_completed() {
  local id=$1 what=$2 dir=${3:-} bad
  job_states "$id" | sed 's/^/    /'
  bad=$(job_states "$id" | awk '$2 != "COMPLETED" { printf "%s %s (exit %s); ", $1, $2, $3 }' || true)
  if [ -n "$bad" ]; then
    [ -n "$dir" ] && show_failure "$dir"
    die "$what: not every job COMPLETED: $bad"
  fi
}

# ---- 1. the harness on a trivial job ---------------------------------------------------------
harness() {
  log "harness: 3-task array + dependent job through sbatch"
  local out=$TMP/harness
  mkdir -p "$out"
  local aid gid
  aid=$(sbatch --parsable --array=0-2 --cpus-per-task=1 --mem=100M --output="$out/task_%a.out" \
        --wrap 'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID on $(hostname)"; sleep 1')
  gid=$(sbatch --parsable --dependency=afterok:"$aid" --output="$out/after.out" \
        --wrap "cat $out/task_*.out | wc -l")
  wait_jobs 120 "$aid" "$gid"
  expect_completed "$aid" "harness array"
  expect_completed "$gid" "harness dependent job"
  [ "$(cat "$out/after.out")" = 3 ] || die "harness: the dependent job did not see the 3 task outputs"
  log "harness OK: array $aid (3 tasks) then job $gid after it"
}

# ---- 2. a cohort: one participant per array task, then group ----------------------------------
cohort() {
  for exe in bids_qmri bids_qmri-synth bids_qmri-slurm; do
    [ -x "$BIN/$exe" ] || die "$BIN/$exe missing: 'make install' (or set QMRI_BIN)"
  done
  local d=$TMP/cohort
  mkdir -p "$d"
  log "cohort: bids_qmri-synth, 2 participants, 1 session, 4 mm"
  OMP_NUM_THREADS=1 "$BIN/bids_qmri-synth" "$d/bids" --participants 2 --sessions 1 --resolution 4 --seed 1 \
    >"$TMP/log/synth.log" 2>&1 || { tail -n 20 "$TMP/log/synth.log" >&2; die "bids_qmri-synth failed"; }
  # One CPU per task: on a 2-CPU node both participants run at once.
  # shellcheck disable=SC2086  # APP_ARGS is a list of options
  "$BIN/bids_qmri-slurm" "$d/bids" "$d/out" -w "$d/work" --cpus 1 --mem-gb 4 --time 00:40:00 \
    --group-mem-gb 4 --group-time 00:20:00 --model-dir "$d/models" -o "$d/job.sh" -- $APP_ARGS
  log "submission script: $d/job.sh"
  sed 's/^/    job.sh| /' "$d/job.sh"
  local ids aid gid
  bash "$d/job.sh" >"$d/submit.out" || die "job.sh failed to submit"
  sed 's/^/    submit| /' "$d/submit.out"
  ids=$(tail -n 1 "$d/submit.out")
  read -r aid gid <<<"$ids"
  [ -n "$aid" ] && [ -n "$gid" ] || die "job.sh did not print the job ids"
  squeue -o '%i %j %T %M %R'
  wait_jobs "$TIMEOUT" "$aid" "$gid"
  expect_completed "$aid" "participant array" "$d"
  expect_completed "$gid" "group job" "$d"
  for f in "$d"/work/slurm-logs/*.out; do echo "    --- $(basename "$f"): $(tail -n 1 "$f")"; done
  local n_tasks
  n_tasks=$(job_states "$aid" | wc -l)
  [ "$n_tasks" -eq 2 ] || die "expected 2 array tasks, Slurm ran $n_tasks"
  for s in 01 02; do
    [ -n "$(find "$d/out/sub-$s" -name '*_roistats.tsv' 2>/dev/null)" ] || die "no ROI table for sub-$s"
    [ -f "$d/out/sub-$s.html" ] || die "no report sub-$s.html"
  done
  [ -f "$d/out/group/report.html" ] || die "no group/report.html"
  python3 - "$d/out/group" <<'PY'
import csv, glob, sys
rows = [r for f in glob.glob(f"{sys.argv[1]}/atlas-*_roistats.tsv") for r in csv.DictReader(open(f), delimiter="\t")]
subs = sorted({r["participant_id"] for r in rows})
print(f"    group ROI table: {len(rows)} rows, participants {subs}")
sys.exit(0 if subs == ["sub-01", "sub-02"] else "group table does not hold both participants")
PY
  "$BIN/bids-validator-deno" --datasetTypes derivative --ignoreWarnings "$d/out" >"$TMP/log/validator.log" 2>&1 \
    || { cat "$TMP/log/validator.log" >&2; die "cohort derivatives do not validate"; }
  log "cohort OK: 2 participants as array tasks of job $aid, group job $gid; derivatives validate"
}

# ---- 3. nipype's SLURM plugin (one sbatch job per workflow node) ------------------------------
plugin() {
  local d=$TMP/plugin
  mkdir -p "$d"
  if [ ! -d "$TMP/cohort/bids" ]; then
    OMP_NUM_THREADS=1 "$BIN/bids_qmri-synth" "$d/bids" --participants 1 --sessions 1 --resolution 4 --seed 1 \
      >"$TMP/log/synth-plugin.log" 2>&1 || die "bids_qmri-synth failed"
  else
    ln -s "$TMP/cohort/bids" "$d/bids"
  fi
  # The plugin polls squeue and writes batch scripts under the work dir (shared file system).
  log "nipype SLURM plugin: bids_qmri participant --use-plugin containers/slurm-plugin.yml"
  export LOGNAME=${LOGNAME:-$(id -un)}  # nipype names the jobs after it
  local t
  t=$(date +%s)
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 "$BIN/bids_qmri" "$d/bids" "$d/out" participant --participant-label 01 -w "$d/work" \
    --use-plugin "$REPO/containers/slurm-plugin.yml" --model-dir "$TMP/cohort/models" $APP_ARGS \
    >"$TMP/log/plugin.log" 2>&1 || { tail -n 30 "$TMP/log/plugin.log" >&2; die "participant run with the SLURM plugin failed"; }
  local n_jobs
  n_jobs=$(find "$d/work" -name 'batchscript_*.sh' -o -name 'batch_*.sh' 2>/dev/null | wc -l)
  [ "$n_jobs" -gt 0 ] || die "the SLURM plugin submitted no batch job (see $TMP/log/plugin.log)"
  [ -n "$(find "$d/out/sub-01" -name '*_roistats.tsv' 2>/dev/null)" ] || die "no ROI table from the SLURM-plugin run"
  log "plugin OK: $n_jobs nipype nodes ran as sbatch jobs in $(( $(date +%s) - t )) s"
}

start_cluster
case "$STAGE" in
  harness) harness ;;
  cohort) harness; cohort ;;
  plugin) harness; plugin ;;
  all) harness; cohort; plugin ;;
esac
log "ci_slurm: OK ($STAGE) in $(( $(date +%s) - T0 )) s"
exit 0
}
