"""BIDS validation with ``bids-validator-deno`` (the current validator, offline).

Our custom suffixes (bSSFP, MRF, qMT) are ignored through the dataset's ``.bidsignore``, as the
BIDS specification documents; ``ignore`` codes go through the validator's JSON ``--config``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

VALIDATOR = "bids-validator-deno"
# The BIDS project's own settings for bids-examples (images are empty files).
EXAMPLES_IGNORE = ({"code": "EMPTY_FILE"},)


@dataclass
class ValidationResult:
    returncode: int
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self, limit: int = 3) -> str:
        """One line: error count and the first codes with an example file each."""
        if self.ok:
            return "no errors"
        codes = Counter(e.get("code", "?") for e in self.errors)
        parts = []
        for code, n in codes.most_common(limit):
            where = next((e.get("location") for e in self.errors if e.get("code") == code and e.get("location")), "")
            parts.append(f"{code} x{n}" + (f" (e.g. {where})" if where else ""))
        more = f", and {len(codes) - limit} more kinds" if len(codes) > limit else ""
        return f"{len(self.errors)} error(s): " + "; ".join(parts) + more


def validator_executable() -> str:
    """Path to bids-validator-deno: on PATH, or beside the running Python (venv not activated)."""
    import sys

    found = shutil.which(VALIDATOR)
    if found:
        return found
    beside = Path(sys.executable).parent / VALIDATOR
    if beside.exists():
        return str(beside)
    raise UsageError(f"{VALIDATOR} not found: install it (pip install bids-validator-deno) or use --skip-bids-validation")


def run_validator(path, *, derivative: bool = False, ignore_warnings: bool = True,
                  ignore_codes=(), ignore_nifti_headers: bool = False, timeout: float = 600) -> ValidationResult:
    """Run the validator on ``path``; return parsed errors and warnings.

    ``derivative`` restricts the accepted dataset type to ``derivative`` (the dataset must then
    declare ``DatasetType: derivative``).
    """
    exe = validator_executable()
    cmd = [exe, str(path), "--format", "json"]
    if ignore_warnings:
        cmd.append("--ignoreWarnings")
    if ignore_nifti_headers:
        cmd.append("--ignoreNiftiHeaders")
    if derivative:
        cmd += ["--datasetTypes", "derivative"]
    cfg_file = None
    if ignore_codes:
        fd, cfg_file = tempfile.mkstemp(prefix="bids_qmri-validator-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({"ignore": [dict(c) if isinstance(c, dict) else {"code": c} for c in ignore_codes]}, fh)
        cmd += ["--config", cfg_file]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "NO_COLOR": "1"})
    except subprocess.TimeoutExpired as exc:
        raise UsageError(f"{VALIDATOR} did not finish within {timeout:.0f} s on {path}; use --skip-bids-validation") from exc
    finally:
        if cfg_file:
            os.unlink(cfg_file)
    try:
        report = json.loads(proc.stdout)
    except ValueError as exc:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"{VALIDATOR} failed on {path}: {tail[0][:200]}; use --skip-bids-validation to skip it") from exc
    issues = report.get("issues", {}).get("issues", [])
    return ValidationResult(
        returncode=proc.returncode,
        errors=[i for i in issues if i.get("severity") == "error"],
        warnings=[i for i in issues if i.get("severity") == "warning"],
        report=report,
    )


def validate_input(bids_dir, report_path) -> ValidationResult:
    """Validate the input dataset; on errors raise ``UsageError`` with a one-line summary that
    names the file holding the full JSON report (written to ``report_path``)."""
    result = run_validator(bids_dir, ignore_warnings=True)
    if not result.ok:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        from ..utils.atomic import write_json_atomic

        write_json_atomic(report_path, result.report)
        raise UsageError(
            f"BIDS validation of {bids_dir} failed with {result.summary()}; full report: {report_path} "
            "— fix the dataset or use --skip-bids-validation")
    return result
