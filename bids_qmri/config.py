"""Run configuration shared by the CLI, the workflows and the reports.

One plain dataclass, built by ``bids_qmri.cli.run`` from the command line; workflows read it
and never parse arguments themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")


def _default_methods() -> dict[str, tuple[str, ...]]:
    """Every registered modality's default methods (``bids_qmri.modalities``)."""
    from . import modalities

    return modalities.default_methods()


def default_model_dir() -> Path:
    """Cache for models trained on the fly: $BIDS_QMRI_MODEL_DIR, else XDG cache."""
    env = os.environ.get("BIDS_QMRI_MODEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bids_qmri" / "models"


@dataclass
class Config:
    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    work_dir: Path | None = None
    participant_labels: list[str] = field(default_factory=list)  # without "sub-"
    session_labels: list[str] = field(default_factory=list)  # without "ses-"
    bids_filters: dict = field(default_factory=dict)
    bids_filter_file: Path | None = None  # where bids_filters came from (named in messages)
    skip_bids_validation: bool = False
    nprocs: int = 0  # 0: all cores
    omp_nthreads: int = 0  # 0: min(nprocs, 8)
    mem_gb: float | None = None
    plugin_file: Path | None = None
    methods: dict[str, tuple[str, ...]] = field(default_factory=_default_methods)
    atlas: str = "AAL"  # a name, or "LABELS.nii.gz:TABLE" path pair
    template: str = "MNI152NLin2009aSym"
    model_dir: Path = field(default_factory=default_model_dir)
    seed: int = 0
    dry_run: bool = False
    stop_on_first_crash: bool = False
    verbose: int = 0
    # B1 from Siemens tfl_b1_map: famp holds 10x the achieved preparation angle (deg).
    b1_prep_angle_deg: float = 80.0
    # Where torch runs: "auto" (CUDA when present), "cpu" or "cuda" (recorded in the sidecars).
    device: str = "auto"
    # Options a modality declares (``Modality.run_options``, e.g. ``bssfp_denoise``): dest -> value.
    # Absent keys take the modality's default.
    options: dict = field(default_factory=dict)
    # Partial-volume handling of ROI statistics: keep voxels with tissue probability >= this.
    pv_threshold: float = 0.5
    # Bootstrap replicates for group agreement statistics (SPEC §4, seed 002).
    n_bootstrap: int = 10000

    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir).parent / "work"

    def omp_threads(self) -> int:
        """Threads per process: ``--omp-nthreads``, else min(``--nprocs`` or the cores, 8)."""
        if self.omp_nthreads:
            return int(self.omp_nthreads)
        nprocs = self.nprocs or available_cores()
        return max(1, min(int(nprocs), 8))

    def torch_device(self) -> str:
        """``--device`` resolved: "auto" is "cuda" when torch sees a GPU, else "cpu"."""
        from .utils.device import resolve_device

        return resolve_device(self.device)


def available_cores() -> int:
    """Cores this process may use (the affinity mask of a Slurm or container job)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
