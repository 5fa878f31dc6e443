# bids_qmri BIDS-App image: Debian bookworm, Python 3.11, CPU-only PyTorch, everything the app
# needs at run time inside (no download at run time). Runs as a non-root user with a read-only
# root file system: every cache points under /tmp (a tmpfs or a volume).
#
#   docker build -t bids-qmri .
#   docker run --rm --read-only --tmpfs /tmp:exec --network none -v /data/bids:/data:ro \
#       -v /data/out:/out -v /scratch/work:/work bids-qmri /data /out participant -w /work
#
# BASE_IMAGE: any bookworm image with apt (scripts/ci_container.sh passes one made by debootstrap).
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# ---- system: Python 3.11 and the atlases ------------------------------------------------------
FROM ${BASE_IMAGE} AS system
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
# mricron-data ships the AAL / Harvard-Oxford / JHU atlases (/usr/share/mricron/templates).
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates mricron-data \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log

# ---- requirements: the dependency list of pyproject.toml alone, so that the dependency layer
# below is rebuilt only when the dependencies change (not the version, scripts or metadata).
FROM system AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /requirements.txt

# ---- the app -----------------------------------------------------------------------------------
FROM system
# Where the CPU build of torch comes from. Default: PyTorch's CPU index (PyPI's torch wheel pulls
# several GB of CUDA packages). Offline or air-gapped builds bind-mount a directory of wheels and
# point PIP_FIND_LINKS at it (buildah build -v /opt/wheels:/wheels:ro --build-arg
# PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=); a local "+cpu" wheel outranks PyPI's.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
# CA bundle for pip behind a TLS-intercepting proxy (bind-mounted at build time, not kept).
ARG PIP_CERT=
ARG TORCH_VERSION=2.13.0

# Dependencies first (own layer, reused while only the package source changes).
COPY --from=requirements /requirements.txt /opt/requirements.txt
RUN set -eu; \
    python3 -m venv /opt/venv; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_INDEX_URL="${PIP_INDEX_URL}"; \
    if [ -n "${PIP_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${PIP_FIND_LINKS}"; fi; \
    if [ -n "${PIP_CERT}" ]; then export PIP_CERT="${PIP_CERT}"; fi; \
    if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
    /opt/venv/bin/pip install -q --upgrade pip "setuptools>=68" wheel; \
    /opt/venv/bin/pip install -q "torch==${TORCH_VERSION}"; \
    /opt/venv/bin/pip install -q -r /opt/requirements.txt; \
    /opt/venv/bin/python3 -c "import torch, sys; v = torch.__version__; sys.exit(0 if torch.version.cuda is None else f'torch {v} is a CUDA build: use the CPU index or wheel')"

# The package itself (context filtered by .dockerignore: pyproject, README, bids_qmri/).
COPY . /src
RUN set -eu; \
    export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1; \
    /opt/venv/bin/pip install -q --no-deps --no-build-isolation /src; \
    rm -rf /src /root/.cache

# Caches and config that libraries write at run time all go under /tmp, so that the root file
# system can be read-only and $HOME does not matter (Singularity binds the host's). TemplateFlow
# gets a skeleton made at build time (read-only is fine); nothing is fetched at run time.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    BIDS_QMRI_MODEL_DIR=/tmp/.cache/bids_qmri/models \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    MPLBACKEND=Agg \
    NIPYPE_CONFIG_DIR=/tmp/.config/nipype \
    NIPYPE_NO_ET=1 \
    NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    NUMBA_CACHE_DIR=/tmp/.cache/numba \
    TORCH_HOME=/tmp/.cache/torch \
    DENO_DIR=/tmp/.cache/deno \
    DENO_NO_UPDATE_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN set -eu; \
    python3 -c "from templateflow import api"; \
    chmod -R a+rX /opt/templateflow; \
    python3 -c "import bids_qmri; print('bids_qmri', bids_qmri.__version__)"; \
    useradd --uid 1000 --user-group --home-dir /home/bidsqmri --create-home --shell /bin/bash bidsqmri

# Last, so that a new date or commit does not invalidate the layers above.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="bids_qmri" \
      org.opencontainers.image.description="BIDS-App for quantitative MRI: pc-bSSFP relaxometry (MIRACLE, SVNN, PINN), anatomy, ROI statistics and cohort reports" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/bids-qmri/bids_qmri" \
      org.opencontainers.image.url="https://github.com/bids-qmri/bids_qmri" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="bids_qmri developers"
# Recorded in the derivatives' dataset_description.json (GeneratedBy[].Container.Tag).
ENV BIDS_QMRI_CONTAINER_TAG=bids-qmri:${VERSION}

USER bidsqmri
WORKDIR /tmp
ENTRYPOINT ["bids_qmri"]
CMD ["--help"]
