"""Group level (SPEC §4): cohort ROI tables, agreement between methods, repeatability, report.

``run_group(config)`` reads the participant ROI tables of ``config.output_dir`` and writes,
under ``OUTPUT_DIR/group/`` (covered by the derivative dataset's ``.bidsignore``):

- ``atlas-<A>_roistats.tsv``: all participants' ROI tables of atlas A, concatenated;
- ``atlas-<A>_summary.tsv``: per region × map × method × acq, N participants, mean and SD
  across participants of the regional mean, mean of the regional SD (sessions averaged per
  participant first);
- ``agreement.tsv``: Lin's CCC with clustered-bootstrap CI, mean difference with CI,
  Bland–Altman limits, for every pair of methods mapping the same quantity;
- ``repeatability.tsv`` (when a participant has repeated sessions): within-subject CV
  (seed 004 Eq. 8), ICC(1,1), ICC(2,1);
- ``participants_status.tsv``: every expected participant/session and whether it was used;
- ``report.html`` and ``figures/``.

Definitions are in ``bids_qmri.group.stats`` and ``bids_qmri.group.tables``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..bids.derivatives import save_tsv
from ..utils.atomic import write_text_atomic
from ..errors import InputError, UsageError
from .collect import collect
from .report import write_report
from .tables import agreement_table, has_repeats, repeatability_table, summary_table

LOGGER = logging.getLogger("bids_qmri.group")

__all__ = ["run_group"]


# bids-validator-deno matches ``group`` but not ``group/`` against the folder itself.
BIDSIGNORE_RULE = "group"


def ensure_bidsignore(output_dir) -> None:
    """Keep the derivative dataset valid: its ``.bidsignore`` must cover ``group/``.

    Other lines are kept; the file is replaced atomically and only when the rule is missing.
    """
    path = Path(output_dir) / ".bidsignore"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    if BIDSIGNORE_RULE in (ln.strip() for ln in text.splitlines()):
        return
    if text and not text.endswith("\n"):
        text += "\n"
    write_text_atomic(path, text + "# group-level outputs (bids_qmri group)\n" + BIDSIGNORE_RULE + "\n")


def run_group(config) -> list[Path]:
    """Write the group outputs for ``config.output_dir``; return the paths written.

    Raises ``UsageError`` when the output directory does not exist and ``InputError`` when it
    holds no usable ROI table at all. Missing or failed participants are reported, not fatal.
    """
    output_dir = Path(config.output_dir)
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: output directory does not exist — run the participant "
                         "level first (bids_qmri BIDS_DIR OUTPUT_DIR participant)")
    if config.n_bootstrap < 0:
        raise UsageError(f"n_bootstrap must be >= 0, got {config.n_bootstrap}")
    coll = collect(config)
    group_dir = output_dir / "group"
    ensure_bidsignore(output_dir)
    written: list[Path] = []
    written.append(save_tsv(group_dir / "participants_status.tsv", coll.status_frame()))
    if not coll.tables:
        raise InputError(output_dir, "no usable ROI table (sub-X[/ses-Y]/anat/"
                         "*_atlas-<A>_roistats.tsv) for any participant",
                         "run the participant level first; see "
                         f"{group_dir / 'participants_status.tsv'}")

    summaries, repeat = {}, {}
    for atlas, df in sorted(coll.tables.items()):
        written.append(save_tsv(group_dir / f"atlas-{atlas}_roistats.tsv", df))
        summaries[atlas] = summary_table(df)
        written.append(save_tsv(group_dir / f"atlas-{atlas}_summary.tsv", summaries[atlas]))
        if has_repeats(df):
            repeat[atlas] = repeatability_table(df)
    agreement = agreement_table(coll.tables, n_bootstrap=config.n_bootstrap, seed=config.seed)
    written.append(save_tsv(group_dir / "agreement.tsv", agreement))
    rep_path = group_dir / "repeatability.tsv"
    if repeat:
        written.append(save_tsv(rep_path, pd.concat(repeat.values(), ignore_index=True)))
    elif rep_path.exists():
        rep_path.unlink()  # from an earlier run with repeated sessions; no longer true
    # Cohort tables of an earlier run for atlases no longer present would be misleading.
    for old in [*group_dir.glob("atlas-*_roistats.tsv"), *group_dir.glob("atlas-*_summary.tsv")]:
        if old not in written:
            old.unlink()
    written += write_report(group_dir, collection=coll, summaries=summaries,
                            agreement=agreement, repeatability=repeat, config=config)

    missing = coll.participants("missing")
    failed = coll.participants("failed")
    if missing or failed:
        LOGGER.warning("group: %d participant(s) included; missing: %s; failed: %s (see %s)",
                       len(coll.participants("ok")), ", ".join(missing) or "none",
                       ", ".join(failed) or "none", group_dir / "participants_status.tsv")
    return written
