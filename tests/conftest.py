"""Shared pytest fixtures (see docs/ARCHITECTURE.md, Tests)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from any test module


def _shared() -> Path:
    env = os.environ.get("BIDS_QMRI_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared()
    if not path.is_dir():
        pytest.fail(f"shared resources not found at {path} (CI clones ../shared beside the repo)")
    return path


def _copy_writable(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))
    return dst


@pytest.fixture
def bids_examples(shared_dir, tmp_path) -> Path:
    """A writable copy of ../shared/fixtures/bids-examples (real qMRI examples, empty images)."""
    return _copy_writable(shared_dir / "fixtures" / "bids-examples", tmp_path / "bids-examples")


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset (2 participants, low resolution) from ``bids_qmri-synth``."""
    out = tmp_path_factory.mktemp("synth") / "bids"
    exe = Path(sys.executable).parent / "bids_qmri-synth"
    cmd = [str(exe) if exe.exists() else "bids_qmri-synth", str(out), "--participants", "2",
           "--sessions", "1", "--resolution", "4", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        pytest.fail(f"bids_qmri-synth failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out
