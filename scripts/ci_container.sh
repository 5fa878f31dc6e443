#!/usr/bin/env bash
# Container check for CI: builds the bids_qmri image from the Dockerfile with buildah (chroot
# isolation, no Docker engine, no registry pull), then runs the image's entrypoint on a small
# synthetic dataset the way a user would run `docker run --read-only --network none`:
#   - base image: Debian bookworm minbase + python3 made with debootstrap, committed under the
#     name the build passes to the Dockerfile's `FROM ${BASE_IMAGE}` (tarball cached between runs);
#   - image built with `buildah build --isolation chroot` (torch from a local wheel directory when
#     there is one, else PyTorch's CPU index);
#   - runs with an OCI runtime (runc) on the image's root file system: read-only root, tmpfs /tmp, no network
#     namespace interfaces but loopback, non-root user of the image, all capabilities dropped,
#     input data bound read-only;
#   - bids_qmri-synth (inside the image) -> participant -> group -> bids-validator-deno in
#     derivative mode (inside the image, offline) and checks of the expected outputs;
#   - prints the image size and the cold-start time of `--version`.
#
# Usage: scripts/ci_container.sh [all|base|build|run]     (default: all; needs root)
# Environment:
#   QMRI_IMAGE        image name              (default localhost/bids-qmri:<version>)
#   QMRI_BASE_IMAGE   base image name         (default localhost/bids-qmri-base:bookworm)
#   QMRI_CACHE_DIR    debootstrap tarball cache (default /var/cache/bids_qmri)
#   QMRI_REFRESH_BASE=1   redo debootstrap even when the cached tarball exists
#   QMRI_PIP_CERT     CA bundle for pip during the build (default $PIP_CERT when set)
#   QMRI_CONTEXT      build context (default: the repository; .dockerignore there keeps it small)
#   QMRI_WHEEL_DIR    directory with the torch CPU wheel (default /opt/wheels if it holds one)
#   QMRI_MIRROR       Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   QMRI_RUN_ARGS     extra options for the participant run (default: see PARTICIPANT_ARGS below)
#   QMRI_OCI_RUNTIME  OCI runtime that runs the checks (default runc; crun works on pure cgroup v2)
#   QMRI_EXPORT       also write the image as an OCI archive to this file (for Apptainer)
#   QMRI_KEEP=1       keep the temporary directory (synthetic data, outputs, logs) for inspection
#   QMRI_REQUIRE=1    fail instead of skipping when not root
#   QMRI_METRICS      file to which image size and cold-start time are written (key=value)

# The whole script is one brace group: bash parses it completely before running it, so editing
# this file while it runs cannot change what runs.
{
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
STAGE=${1:-all}
case "$STAGE" in all|base|build|run) ;; *) echo "usage: $0 [all|base|build|run]" >&2; exit 2 ;; esac

VERSION=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
IMAGE=${QMRI_IMAGE:-localhost/bids-qmri:$VERSION}
BASE_IMAGE=${QMRI_BASE_IMAGE:-localhost/bids-qmri-base:bookworm}
CACHE_DIR=${QMRI_CACHE_DIR:-/var/cache/bids_qmri}
MIRROR=${QMRI_MIRROR:-http://deb.debian.org/debian}
BASE_TAR=$CACHE_DIR/debian-bookworm-minbase-python3.tar
METRICS=${QMRI_METRICS:-}
CONTEXT=${QMRI_CONTEXT:-$REPO}
# OCI runtime for the checks. runc: crun 1.8 refuses hosts with hybrid cgroups (v1 + v2).
RUNTIME=${QMRI_OCI_RUNTIME:-runc}
# Small but complete: 1 participant, 1 session, coarse grid; all default methods.
PARTICIPANT_ARGS=${QMRI_RUN_ARGS:---nprocs 2 --omp-nthreads 1 --seed 1}

T0=$(date +%s)
log() { printf '==> [%s +%4ss] %s\n' "$(date -u +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf 'ci_container: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
  # QMRI_REQUIRE=1 (CI that must run it) turns the skip into a failure.
  [ "${QMRI_REQUIRE:-0}" = 1 ] && die "needs root (buildah with chroot isolation, debootstrap, an OCI runtime)"
  echo "ci_container: SKIPPED: needs root (buildah with chroot isolation, debootstrap, an OCI runtime)"
  exit 0
fi

need_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v "$RUNTIME" >/dev/null || missing+=("$RUNTIME")
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# ---- cleanup of everything this script mounts, starts or creates ------------------------------
TMP=$(mktemp -d /var/tmp/bids_qmri-ci.XXXXXX)
CONTAINERS=()      # buildah working containers
OCI_IDS=()        # OCI runtime containers
cleanup() {
  local rc=$?
  set +e
  for id in "${OCI_IDS[@]}"; do "$RUNTIME" delete -f "$id" >/dev/null 2>&1; done
  for c in "${CONTAINERS[@]}"; do buildah umount "$c" >/dev/null 2>&1; buildah rm "$c" >/dev/null 2>&1; done
  # debootstrap mounts /proc, /sys... inside its target; an interrupted run can leave them.
  if [ -d "$TMP/rootfs" ]; then
    findmnt -R -n -o TARGET --list "$TMP/rootfs" 2>/dev/null | sort -r | xargs -r -n1 umount -l
  fi
  if [ "${QMRI_KEEP:-0}" = 1 ] || { [ $rc -ne 0 ] && [ "${QMRI_KEEP_ON_FAILURE:-0}" = 1 ]; }; then
    echo "ci_container: kept $TMP"
  else
    rm -rf "$TMP"
  fi
  if [ $rc -ne 0 ]; then echo "ci_container: FAILED (exit $rc) after $(( $(date +%s) - T0 )) s" >&2; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- 1. base image from debootstrap ----------------------------------------------------------
make_base() {
  if [ "${QMRI_REFRESH_BASE:-0}" != 1 ] && buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE already in the store"
    return
  fi
  mkdir -p "$CACHE_DIR"
  if [ "${QMRI_REFRESH_BASE:-0}" = 1 ] || [ ! -s "$BASE_TAR" ]; then
    log "debootstrap bookworm minbase + python3 from $MIRROR"
    local rootfs=$TMP/rootfs
    if ! debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$rootfs" "$MIRROR" \
         >"$TMP/debootstrap.log" 2>&1; then
      tail -n 30 "$TMP/debootstrap.log" >&2
      die "debootstrap failed (log above); check that $MIRROR is reachable"
    fi
    # Same apt sources as debian:bookworm-slim (updates and security too); no package caches.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
           "$rootfs"/debootstrap
    findmnt -R -n -o TARGET --list "$rootfs" | sort -r | xargs -r -n1 umount -l || true
    tar --numeric-owner --xattrs -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' \
        --exclude='./sys/*' -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$rootfs"
    log "cached base tarball $BASE_TAR ($(du -h "$BASE_TAR" | cut -f1))"
  else
    log "using cached base tarball $BASE_TAR (QMRI_REFRESH_BASE=1 to refresh)"
  fi
  local ctr
  ctr=$(buildah from scratch)
  CONTAINERS+=("$ctr")
  buildah add --quiet "$ctr" "$BASE_TAR" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash --os linux --arch amd64 \
    --label org.opencontainers.image.description="Debian bookworm minbase + python3 (debootstrap)" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  CONTAINERS=("${CONTAINERS[@]/$ctr}")
  log "committed base image $BASE_IMAGE"
}

# ---- 2. image from the Dockerfile ------------------------------------------------------------
build_image() {
  buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE missing: run '$0 base' first"
  local wheel_dir=${QMRI_WHEEL_DIR:-}
  if [ -z "$wheel_dir" ] && compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then wheel_dir=/opt/wheels; fi
  local torch_args=()
  if [ -n "$wheel_dir" ]; then
    compgen -G "$wheel_dir/torch-*.whl" >/dev/null || die "QMRI_WHEEL_DIR=$wheel_dir holds no torch wheel"
    log "torch from local wheels in $wheel_dir"
    torch_args=(--volume "$wheel_dir:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=)
  else
    log "torch from PyTorch's CPU index"
  fi
  # Behind a TLS-intercepting proxy pip needs the host's CA bundle; it is bound for the build
  # only and does not end up in the image.
  local cert=${QMRI_PIP_CERT:-${PIP_CERT:-}}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    log "pip uses the host CA bundle $cert during the build"
    torch_args+=(--volume "$cert:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
  fi
  log "buildah build --isolation chroot -> $IMAGE (context $CONTEXT)"
  local t old_id
  t=$(date +%s)
  old_id=$(buildah images --quiet --no-trunc "$IMAGE" 2>/dev/null | head -n 1 || true)
  if ! buildah build --isolation chroot --layers --force-rm --pull=never \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg VERSION="$VERSION" \
        --build-arg VCS_REF="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "${torch_args[@]}" \
        -f "$REPO/Dockerfile" -t "$IMAGE" "$CONTEXT" 2>&1 | tee "$TMP/build.log" | sed -u 's/^/    build| /'; then
    die "image build failed (see the build log above)"
  fi
  log "built $IMAGE in $(( $(date +%s) - t )) s"
  # The previous image of this name is now untagged: remove it (its shared layers stay).
  if [ -n "$old_id" ] && [ "$old_id" != "$(buildah images --quiet --no-trunc "$IMAGE" | head -n 1)" ]; then
    buildah rmi "$old_id" >/dev/null 2>&1 || true
  fi
  if [ -n "${QMRI_EXPORT:-}" ]; then
    # OCI archive for `apptainer build ... containers/bids_qmri.def` (Bootstrap: oci-archive).
    buildah push --quiet "$IMAGE" "oci-archive:$QMRI_EXPORT:$VERSION" \
      || die "could not write the OCI archive $QMRI_EXPORT"
    log "exported $IMAGE to $QMRI_EXPORT ($(du -h "$QMRI_EXPORT" | cut -f1))"
  fi
}

# ---- 3. run the image like `docker run --read-only --network none` ----------------------------
ROOTFS=""
IMAGE_CFG=$TMP/image-config.json
prepare_rootfs() {
  buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE missing: run '$0 build' first"
  local ctr
  ctr=$(buildah from --pull=never --quiet "$IMAGE")
  CONTAINERS+=("$ctr")
  ROOTFS=$(buildah mount "$ctr")
  buildah inspect --type image "$IMAGE" \
    | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["OCIv1"]["config"], sys.stdout)' >"$IMAGE_CFG"
}

# run_image NAME [--bind HOST:CTR[:ro]]... [--entrypoint] -- ARGS...
# Runs ARGS (after the image's ENTRYPOINT with --entrypoint) in an OCI bundle over the image's
# root file system with the OCI runtime. Output goes to the terminal and to $TMP/NAME.log.
run_image() {
  local name=$1; shift
  local binds=() use_ep=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --bind) binds+=("$2"); shift 2 ;;
      --entrypoint) use_ep=1; shift ;;
      --) shift; break ;;
      *) die "run_image: unknown option $1" ;;
    esac
  done
  local bundle=$TMP/bundle-$name id="bids-qmri-ci-$$-$name"
  mkdir -p "$bundle"
  : >"$TMP/containerenv"
  python3 - "$bundle/config.json" "$IMAGE_CFG" "$ROOTFS" "$use_ep" "${binds[@]/#/bind=}" -- "$@" <<'PY'
import json, os, sys
out, cfg_path, rootfs, use_ep = sys.argv[1:5]
rest = sys.argv[5:]
sep = rest.index("--")
binds, args = [b[5:] for b in rest[:sep]], rest[sep + 1:]
cfg = json.load(open(cfg_path))
if use_ep == "1":
    args = list(cfg.get("Entrypoint") or []) + args
user = cfg.get("User") or "0"
name, _, group = user.partition(":")
def lookup(path, key):
    for line in open(f"{rootfs}{path}"):
        f = line.split(":")
        if key in (f[0], f[2]):
            return int(f[2]), int(f[3]) if len(f) > 3 and path.endswith("passwd") else None
    raise SystemExit(f"user/group {key!r} of the image not found in {path}")
uid, gid = lookup("/etc/passwd", name)
if group:
    gid = lookup("/etc/group", group)[0]
mounts = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=1g"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    # The only writable place inside: like `docker run --read-only --tmpfs /tmp`.
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=8g"]},
]
# Like podman: an empty /run/.containerenv tells the app it runs in a container
# (GeneratedBy[].Container of the derivatives).
mounts.append({"destination": "/run/.containerenv", "type": "bind", "source": os.path.join(os.path.dirname(out), "..", "containerenv"), "options": ["rbind", "ro"]})
for b in binds:
    parts = b.split(":")
    src, dst = parts[0], parts[1]
    opts = ["rbind", "nosuid", "nodev"] + (["ro"] if len(parts) > 2 and parts[2] == "ro" else ["rw"])
    mounts.append({"destination": dst, "type": "bind", "source": src, "options": opts})
spec = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": args,
        "env": cfg.get("Env") or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": cfg.get("WorkingDir") or "/",
        "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
        "noNewPrivileges": True,
    },
    "root": {"path": rootfs, "readonly": True},
    "hostname": "bids-qmri",
    "mounts": mounts,
    "linux": {
        # A fresh network namespace: only a loopback interface, no route out.
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}
json.dump(spec, open(out, "w"), indent=1)
PY
  OCI_IDS+=("$id")
  local rc=0 pid
  # In the background and waited for, so that INT/TERM reach the trap (which deletes the
  # container) at once instead of after the container has ended.
  "$RUNTIME" run --bundle "$bundle" "$id" </dev/null > >(tee "$TMP/$name.log") 2>&1 &
  pid=$!
  wait "$pid" || rc=$?
  "$RUNTIME" delete -f "$id" >/dev/null 2>&1 || true
  return $rc
}

run_checks() {
  prepare_rootfs
  local data=$TMP/data out=$TMP/out work=$TMP/work
  mkdir -p "$data" "$out" "$work"
  # The image runs as its own non-root user: give it the directories it writes to.
  local uid
  uid=$(python3 -c "import json,sys; print((json.load(open(sys.argv[1])).get('User') or '0').split(':')[0])" "$IMAGE_CFG")
  uid=$(awk -F: -v u="$uid" '$1 == u || $3 == u { print $3 }' "$ROOTFS/etc/passwd")
  chown "$uid" "$data" "$out" "$work"

  log "isolation: user, read-only root, network"
  run_image isolation -- /bin/sh -c '
    set -e
    echo "id: $(id)"
    if touch /opt/venv/probe 2>/dev/null; then echo "root file system is writable" >&2; exit 1; fi
    echo "root file system: read-only"
    echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")"
    python3 - <<EOF
import socket, sys
for host in ("pypi.org", "deb.debian.org", "1.1.1.1"):
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        print(f"network: {host}:443 unreachable ({exc.__class__.__name__})")
    else:
        sys.exit(f"network: {host}:443 reachable, the sandbox is not offline")
EOF
    ls /usr/share/mricron/templates/aal.nii.gz >/dev/null && echo "atlas: AAL present"'
  if grep -q "uid=0(" "$TMP/isolation.log"; then die "the image runs as root; it must run as its non-root user"; fi

  log "cold start: bids_qmri --version (entrypoint), 3 runs"
  local times=() t0 t1
  for i in 1 2 3; do
    t0=$(date +%s.%N)
    run_image "version$i" --entrypoint -- --version >/dev/null
    t1=$(date +%s.%N)
    times+=("$(python3 -c "print(f'{$t1 - $t0:.2f}')")")
  done
  log "version: $(cat "$TMP/version1.log"); wall times ${times[*]} s (first after build, then warm)"
  COLD_START=${times[0]}; WARM_START=$(printf '%s\n' "${times[@]:1}" | sort -n | head -n1)

  log "synthetic dataset inside the image: bids_qmri-synth (1 participant, 1 session, 4 mm)"
  run_image synth --bind "$data:/data" -- \
    bids_qmri-synth /data/bids --participants 1 --sessions 1 --resolution 4 --seed 1

  log "validate the synthetic raw dataset (bids-validator-deno, offline)"
  run_image validate-raw --bind "$data/bids:/data:ro" -- bids-validator-deno --ignoreWarnings /data \
    || die "the synthetic dataset does not validate (see above)"

  log "participant level: bids_qmri /data /out participant $PARTICIPANT_ARGS"
  local t
  t=$(date +%s)
  # shellcheck disable=SC2086  # PARTICIPANT_ARGS is a list of options
  run_image participant --bind "$data/bids:/data:ro" --bind "$out:/out" --bind "$work:/work" --entrypoint -- \
    /data /out participant -w /work $PARTICIPANT_ARGS || die "participant level failed (log above)"
  PARTICIPANT_S=$(( $(date +%s) - t ))
  log "participant level done in $PARTICIPANT_S s"

  log "group level"
  t=$(date +%s)
  run_image group --bind "$data/bids:/data:ro" --bind "$out:/out" --bind "$work:/work" --entrypoint -- \
    /data /out group -w /work --seed 1 || die "group level failed (log above)"
  GROUP_S=$(( $(date +%s) - t ))
  log "group level done in $GROUP_S s"

  log "validate the derivatives (bids-validator-deno --datasetTypes derivative, offline)"
  run_image validate-derivatives --bind "$out:/out:ro" -- \
    bids-validator-deno --datasetTypes derivative --ignoreWarnings /out || die "the derivatives do not validate (see above)"

  log "expected outputs"
  python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
desc = json.loads((out / "dataset_description.json").read_text())
problems = []
if desc.get("DatasetType") != "derivative":
    problems.append("dataset_description.json: DatasetType is not 'derivative'")
gen = (desc.get("GeneratedBy") or [{}])[0]
if gen.get("Name") != "bids_qmri":
    problems.append("dataset_description.json: GeneratedBy[0].Name is not bids_qmri")
patterns = {
    "T1 maps": "sub-*/**/anat/*_desc-*_T1map.nii.gz",
    "T2 maps": "sub-*/**/anat/*_desc-*_T2map.nii.gz",
    "ROI tables": "sub-*/**/*_roistats.tsv",
    "participant report": "sub-*.html",
    "group ROI table": "group/atlas-*_roistats.tsv",
    "group report": "group/report.html",
}
for what, pattern in patterns.items():
    found = sorted(out.glob(pattern))
    print(f"  {what:20s} {len(found):3d}  {found[0].relative_to(out) if found else ''}")
    if not found:
        problems.append(f"no {what} ({pattern})")
print(f"  GeneratedBy: {json.dumps(gen)}")
if not (gen.get("Container") or {}).get("Tag", "").startswith("bids-qmri:"):
    problems.append("dataset_description.json: GeneratedBy[0].Container.Tag is not the image's bids-qmri:<version>")
if problems:
    sys.exit("missing outputs:\n  " + "\n  ".join(problems))
PY
}

report_metrics() {
  local size
  size=$(buildah images --format '{{.Size}}' "$IMAGE" | head -n1)
  log "image $IMAGE: size $size (uncompressed layers)"
  if [ -n "$METRICS" ]; then
    {
      echo "image=$IMAGE"
      echo "image_size=$size"
      echo "cold_start_s=${COLD_START:-}"
      echo "warm_start_s=${WARM_START:-}"
      echo "participant_s=${PARTICIPANT_S:-}"
      echo "group_s=${GROUP_S:-}"
      echo "total_s=$(( $(date +%s) - T0 ))"
    } >"$METRICS"
  fi
}

need_tools
case "$STAGE" in
  base) make_base ;;
  build) make_base; build_image ;;
  run) run_checks; report_metrics ;;
  all) make_base; build_image; run_checks; report_metrics ;;
esac
log "ci_container: OK ($STAGE) in $(( $(date +%s) - T0 )) s"
exit 0
}
