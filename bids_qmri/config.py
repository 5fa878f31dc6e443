"""Run configuration shared by the CLI, the workflows and the reports.

One plain dataclass, built by ``bids_qmri.cli.run`` from the command line; workflows read it
and never parse arguments themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Mapping methods per modality (SPEC §4 `desc-<method>`); `--methods` selects among these.
ALL_METHODS: dict[str, tuple[str, ...]] = {
    "bssfp": ("miracle", "svnn", "pinn", "svnncomplex", "pinncomplex"),
}
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {
    "bssfp": ("miracle", "svnn", "pinn", "svnncomplex", "pinncomplex"),
}


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
    skip_bids_validation: bool = False
    nprocs: int = 0  # 0: all cores
    omp_nthreads: int = 0  # 0: min(nprocs, 8)
    mem_gb: float | None = None
    plugin_file: Path | None = None
    methods: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_METHODS))
    atlas: str = "AAL"  # a name, or "LABELS.nii.gz:TABLE" path pair
    template: str = "MNI152NLin2009aSym"
    model_dir: Path = field(default_factory=default_model_dir)
    seed: int = 0
    dry_run: bool = False
    stop_on_first_crash: bool = False
    verbose: int = 0
    # B1 from Siemens tfl_b1_map: famp holds 10x the achieved preparation angle (deg).
    b1_prep_angle_deg: float = 80.0
    gibbs_removal: bool = True
    # Denoising of the raw pc-bSSFP phase cycles: "mppca" or "none" (preproc.denoise).
    bssfp_denoise: str = "mppca"
    # Partial-volume handling of ROI statistics: keep voxels with tissue probability >= this.
    pv_threshold: float = 0.5
    # Bootstrap replicates for group agreement statistics (SPEC §4, seed 002).
    n_bootstrap: int = 10000

    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.output_dir).parent / "work"
