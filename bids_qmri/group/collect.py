"""Collect the participant ROI tables of an output directory (SPEC §4) for the group level.

Every participant the group level expects is accounted for: it is *expected* when it is named
by ``--participant-label``, or (without labels) when it appears in the BIDS dataset
(``participants.tsv`` or a ``sub-*`` folder) or has a ``sub-*`` folder in the output directory.
Expected sessions are the ``ses-*`` folders of the participant in the BIDS dataset (filtered by
``--session-label``) plus those found in the output. Each expected participant/session gets a
status: ``ok`` (a readable ROI table), ``missing`` (no table), or ``failed`` (an unreadable or
malformed table, or a crash report and no table). Nothing is dropped silently.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

LOGGER = logging.getLogger("bids_qmri.group.collect")

ROI_COLUMNS = [
    "participant_id", "session_id", "atlas", "region_index", "region", "suffix", "method",
    "acq", "n_voxels", "mean", "std", "median", "q1", "q3", "units",
]
NUMERIC_COLUMNS = ["region_index", "n_voxels", "mean", "std", "median", "q1", "q3"]
TEXT_COLUMNS = [c for c in ROI_COLUMNS if c not in NUMERIC_COLUMNS]
# Written since the ROI statistics count only a map's estimated voxels; tables of older versions lack it.
OPTIONAL_NUMERIC_COLUMNS = ["coverage"]
NA = "n/a"

_TABLE_RE = re.compile(
    r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_atlas-(?P<atlas>[A-Za-z0-9]+)"
    r"_roistats\.tsv$"
)


@dataclass
class RoiTable:
    path: Path
    subject: str  # label without "sub-"
    session: str | None  # label without "ses-"
    atlas: str


@dataclass
class SessionStatus:
    participant_id: str  # "sub-X"
    session_id: str  # "ses-Y" or "n/a"
    status: str  # ok | missing | failed
    atlases: list[str] = field(default_factory=list)
    n_rows: int = 0
    message: str = ""


@dataclass
class Collection:
    tables: dict[str, pd.DataFrame]  # atlas -> combined long table
    status: list[SessionStatus]

    def status_frame(self) -> pd.DataFrame:
        rows = [
            {
                "participant_id": s.participant_id,
                "session_id": s.session_id,
                "status": s.status,
                "atlases": ",".join(s.atlases) if s.atlases else NA,
                "n_rows": s.n_rows,
                "message": s.message or NA,
            }
            for s in self.status
        ]
        cols = ["participant_id", "session_id", "status", "atlases", "n_rows", "message"]
        return pd.DataFrame(rows, columns=cols)

    def participants(self, status: str) -> list[str]:
        """Participants with at least one session of ``status`` (``ok``), or none ok."""
        ok = {s.participant_id for s in self.status if s.status == "ok"}
        if status == "ok":
            return sorted(ok)
        return sorted({s.participant_id for s in self.status if s.status == status} - ok)


def find_roi_tables(output_dir) -> list[RoiTable]:
    """ROI tables at the SPEC §4 places: ``sub-X/[ses-Y/]anat/sub-X[_ses-Y]_atlas-A_roistats.tsv``."""
    output_dir = Path(output_dir)
    found = []
    for pattern in ("sub-*/anat/*_roistats.tsv", "sub-*/ses-*/anat/*_roistats.tsv"):
        for path in sorted(output_dir.glob(pattern)):
            m = _TABLE_RE.match(path.name)
            if not m:
                LOGGER.warning("%s: not a ROI table name (sub-X[_ses-Y]_atlas-A_roistats.tsv); "
                               "ignored", path)
                continue
            sub_dir = path.parents[2] if m["ses"] else path.parents[1]
            ses_dir = path.parents[1] if m["ses"] else None
            if sub_dir.name != f"sub-{m['sub']}" or (
                ses_dir is not None and ses_dir.name != f"ses-{m['ses']}"
            ):
                LOGGER.warning("%s: file name does not match its folder; ignored", path)
                continue
            found.append(RoiTable(path, m["sub"], m["ses"], m["atlas"]))
    return found


def read_roi_table(path, subject: str | None = None, session: str | None = None,
                   atlas: str | None = None) -> pd.DataFrame:
    """Read and check one participant ROI table; raise ``InputError`` (one line) if malformed.

    Text columns are kept as strings with ``n/a`` for missing; ``participant_id`` and
    ``session_id`` are normalised to ``sub-X`` / ``ses-Y`` (or ``n/a``) and must agree with the
    file name when ``subject``/``session``/``atlas`` are given.
    """
    path = Path(path)
    fix = "re-run the participant level for this participant or remove the file"
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(path, f"unreadable ROI table ({problem})", fix) from None
    except OSError as exc:
        raise InputError(path, f"cannot read ROI table ({exc.strerror})", fix) from None
    missing = [c for c in ROI_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, f"malformed ROI table: missing column(s) {', '.join(missing)}", fix)
    if df.empty:
        raise InputError(path, "ROI table has no rows (no map was measured for this session)", fix)
    df = df[ROI_COLUMNS + [c for c in df.columns if c not in ROI_COLUMNS]].copy()
    for col in TEXT_COLUMNS:
        df[col] = df[col].str.strip().replace("", NA)
    for col in NUMERIC_COLUMNS + [c for c in OPTIONAL_NUMERIC_COLUMNS if c in df.columns]:
        raw = df[col].str.strip()
        values = pd.to_numeric(raw.where(~raw.isin([NA, ""])), errors="coerce")
        bad = values.isna() & ~raw.isin([NA, ""])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(
                path, f"malformed ROI table: column {col!r} has non-numeric value "
                f"{raw.iloc[row]!r} (data row {row + 1})", fix)
        df[col] = values
    if df["region_index"].isna().any():
        raise InputError(path, "malformed ROI table: empty region_index", fix)
    df["region_index"] = df["region_index"].astype(int)
    df["participant_id"] = df["participant_id"].map(
        lambda v: v if v == NA or v.startswith("sub-") else f"sub-{v}")
    df["session_id"] = df["session_id"].map(
        lambda v: v if v == NA or v.startswith("ses-") else f"ses-{v}")
    if subject is not None:
        want = f"sub-{subject}"
        other = sorted(set(df["participant_id"]) - {want})
        if other:
            raise InputError(path, f"malformed ROI table: participant_id {other[0]!r} does not "
                             f"match the file name ({want})", fix)
        want_ses = f"ses-{session}" if session else NA
        other = sorted(set(df["session_id"]) - {want_ses})
        if other:
            raise InputError(path, f"malformed ROI table: session_id {other[0]!r} does not "
                             f"match the file name ({want_ses})", fix)
    if atlas is not None:
        other = sorted(set(df["atlas"]) - {atlas})
        if other:
            raise InputError(path, f"malformed ROI table: atlas {other[0]!r} does not match "
                             f"the file name ({atlas})", fix)
    dup = df.duplicated(["region_index", "suffix", "method", "acq"])
    if dup.any():
        r = df[dup].iloc[0]
        raise InputError(path, "malformed ROI table: duplicate row for region "
                         f"{r['region_index']} {r['suffix']} {r['method']} acq {r['acq']}", fix)
    return df


def _labels_from_bids(bids_dir) -> list[str]:
    if bids_dir is None:
        return []
    bids_dir = Path(bids_dir)
    labels = set()
    tsv = bids_dir / "participants.tsv"
    if tsv.is_file():
        try:
            ids = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)["participant_id"]
            labels.update(str(v).strip().removeprefix("sub-") for v in ids if str(v).strip())
        except (OSError, KeyError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
            LOGGER.warning("%s: cannot read participant_id; using the sub-* folders", tsv)
    labels.update(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    return sorted(labels)


def expected_participants(config) -> list[str]:
    """Labels (without ``sub-``) the group level accounts for (see module docstring)."""
    if config.participant_labels:
        return sorted({str(p).removeprefix("sub-") for p in config.participant_labels})
    labels = set(_labels_from_bids(config.bids_dir))
    labels.update(p.name[4:] for p in Path(config.output_dir).glob("sub-*") if p.is_dir())
    return sorted(labels)


def _expected_sessions(config, subject: str) -> list[str | None]:
    sessions = set()
    if config.bids_dir is not None:
        sessions.update(p.name[4:] for p in (Path(config.bids_dir) / f"sub-{subject}").glob("ses-*")
                        if p.is_dir())
    if config.session_labels:
        wanted = {str(s).removeprefix("ses-") for s in config.session_labels}
        sessions &= wanted
    return sorted(sessions) or [None]


def crash_reports(output_dir, subject: str, work_dir=None) -> list[Path]:
    """Crash files of a participant: ``crash*`` under ``OUTPUT_DIR/sub-X/``, naming it in
    ``OUTPUT_DIR/logs/``, or in ``WORK_DIR/logs/sub-X/`` (where the participant level points
    nipype's crash dumps)."""
    output_dir = Path(output_dir)
    found = [p for p in (output_dir / f"sub-{subject}").rglob("crash*") if p.is_file()]
    logs = output_dir / "logs"
    if logs.is_dir():
        found += [p for p in logs.rglob("crash*") if p.is_file() and f"sub-{subject}" in p.name]
    if work_dir is not None:
        found += [p for p in (Path(work_dir) / "logs" / f"sub-{subject}").glob("crash*")
                  if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, str(p)))


def collect(config) -> Collection:
    """Read every ROI table in ``config.output_dir`` and account for every expected participant.

    Malformed tables are logged (one line naming the file) and mark their session ``failed``;
    with ``config.stop_on_first_crash`` the first one is raised instead.
    """
    output_dir = Path(config.output_dir)
    tables = find_roi_tables(output_dir)
    expected = expected_participants(config)
    if config.participant_labels:
        tables = [t for t in tables if t.subject in expected]
    if config.session_labels:
        wanted = {str(s).removeprefix("ses-") for s in config.session_labels}
        tables = [t for t in tables if t.session is None or t.session in wanted]

    by_session: dict[tuple[str, str | None], list[RoiTable]] = {}
    for t in tables:
        by_session.setdefault((t.subject, t.session), []).append(t)
    keys = set(by_session)
    for sub in expected:
        for ses in _expected_sessions(config, sub):
            # A session-less expectation is met by any session table of that participant.
            if ses is None and any(k[0] == sub for k in keys):
                continue
            keys.add((sub, ses))

    frames: dict[str, list[pd.DataFrame]] = {}
    status = []
    for sub, ses in sorted(keys, key=lambda k: (k[0], k[1] or "")):
        st = SessionStatus(f"sub-{sub}", f"ses-{ses}" if ses else NA, "missing")
        errors = []
        for t in by_session.get((sub, ses), []):
            try:
                df = read_roi_table(t.path, t.subject, t.session, t.atlas)
            except InputError as exc:
                if getattr(config, "stop_on_first_crash", False):
                    raise
                LOGGER.error("%s", exc)
                errors.append(str(exc))
                continue
            frames.setdefault(t.atlas, []).append(df)
            st.atlases.append(t.atlas)
            st.n_rows += len(df)
        crashes = crash_reports(output_dir, sub, config.resolved_work_dir())
        if st.atlases:
            st.status = "ok"
        elif errors:
            st.status = "failed"
        elif crashes:
            st.status = "failed"
            errors.append(f"no ROI table; crash report {crashes[-1]}")
        else:
            errors.append("no ROI table (participant level not run, or it failed before the "
                          "ROI statistics)")
        st.message = "; ".join(errors)
        status.append(st)

    combined = {}
    for atlas, dfs in frames.items():
        df = pd.concat(dfs, ignore_index=True)
        df = df.sort_values(["participant_id", "session_id", "suffix", "method", "acq",
                             "region_index"], kind="stable", ignore_index=True)
        combined[atlas] = df
    return Collection(combined, status)
