"""Input discovery with pybids (SPEC §3): one ``SessionInputs`` per participant and session.

pybids indexes the non-BIDS suffixes (``bSSFP``, ``MRF``, ``qMT``) when the layout is built with
``validate=False``; the ``derivatives`` configuration adds the ``desc`` entity that the SVD
coefficient files carry. Sidecar metadata comes from pybids with inheritance applied.

Every problem with one input becomes a ``SkippedInput`` with a one-line reason naming the file
(or an ``InputError`` with ``--stop-on-first-crash``); the other inputs go on. Image content is
checked only for the kinds this run processes: the bids-examples fixtures have empty images, and
a file we only list must not be rejected for its content.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections import defaultdict
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import InputError, UsageError
from .inputs import B1Input, BSSFPInput, FingerprintInput, SeriesInput, SessionInputs, SkippedInput

LOGGER = logging.getLogger("bids_qmri.bids.discovery")

NIFTI_EXT = (".nii", ".nii.gz")
# --bids-filter-file keys: one query per input kind (fMRIPrep style).
FILTER_KINDS = ("bssfp", "b1", "t1w", "mrf", "qmt", "irt1", "mese")
B1_SUFFIXES = ("TB1map", "TB1TFL", "TB1DAM")
KNOWN_SUFFIXES = ("bSSFP", "T1w", "MRF", "qMT", "IRT1", "MESE") + B1_SUFFIXES
PART_PAIRS = ({"mag", "phase"}, {"real", "imag"})
# Entities that carry the role of a file inside a group rather than identify the group.
_NON_KEY = {"subject", "session", "suffix", "extension", "datatype"}
_SHORT = {"acquisition": "acq", "reconstruction": "rec", "direction": "dir", "ceagent": "ce",
          "inversion": "inv", "mtransfer": "mt", "processing": "proc", "description": "desc"}
_LONG = {v: k for k, v in _SHORT.items()}

REQUIRED_METADATA = {
    "bSSFP": ("RepetitionTimeExcitation", "EchoTime", "FlipAngle"),
    "MRF": ("FlipAngle", "RepetitionTimeExcitation", "EchoTime", "InversionTime", "MRFSequenceType"),
    "qMT": ("FlipAngle", "RFPulseDuration", "RepetitionTimeExcitation"),
    "IRT1": ("InversionTime",),
    "MESE": ("EchoTime",),
    "TB1DAM": ("FlipAngle",),
}


# --------------------------------------------------------------------------------------------
# Dataset-level checks
# --------------------------------------------------------------------------------------------
def check_bids_dir(bids_dir) -> Path:
    """Raise ``UsageError`` unless ``bids_dir`` looks like a BIDS dataset with participants."""
    bids_dir = Path(bids_dir)
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS directory {bids_dir} does not exist or is not a directory")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise UsageError(
            f"{desc} is missing: {bids_dir} is not a BIDS dataset — add a dataset_description.json "
            "with at least Name and BIDSVersion")
    try:
        content = json.loads(desc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{desc} cannot be read: {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"{desc} is not valid JSON ({exc}) — fix the file") from exc
    if not isinstance(content, dict):
        raise UsageError(f"{desc} must hold a JSON object with Name and BIDSVersion")
    if not any(p.is_dir() for p in bids_dir.glob("sub-*")):
        raise UsageError(f"no participants found in {bids_dir}: expected sub-<label>/ folders")
    return bids_dir


def load_filters(path) -> dict:
    """Read and check a ``--bids-filter-file``: ``{kind: {entity: value|[values]|null}}``."""
    path = Path(path)
    try:
        filters = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--bids-filter-file {path} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {exc}") from exc
    return check_filters(filters, str(path))


def check_filters(filters, where: str = "--bids-filter-file") -> dict:
    if not isinstance(filters, dict):
        raise UsageError(f"{where}: expected a JSON object such as {{\"bssfp\": {{\"acquisition\": \"pc12\"}}}}")
    for kind, query in filters.items():
        if kind.lower() not in FILTER_KINDS:
            raise UsageError(f"{where}: unknown input kind {kind!r} (use {', '.join(FILTER_KINDS)})")
        if not isinstance(query, dict):
            raise UsageError(f"{where}: the query for {kind!r} must be an object of entity: value")
    return {k.lower(): v for k, v in filters.items()}


def _matches(entities: dict, query: dict) -> bool:
    for key, want in query.items():
        key = _LONG.get(key, key)
        have = entities.get(key)
        wants = want if isinstance(want, list) else [want]
        ok = False
        for w in wants:
            if w is None:
                ok = ok or have is None
            elif have is not None:
                sw, sh = str(w), str(have)
                ok = ok or sw == sh or (sw.isdigit() and sh.isdigit() and int(sw) == int(sh))
        if not ok:
            return False
    return True


def build_layout(bids_dir):
    """pybids layout that indexes our non-BIDS suffixes and the ``desc`` entity."""
    from bids import BIDSLayout

    try:
        return BIDSLayout(str(bids_dir), validate=False, config=["bids", "derivatives"],
                          derivatives=False)
    except Exception as exc:  # pybids raises many types on broken datasets; keep it one line
        raise UsageError(f"cannot index {bids_dir} with pybids: {str(exc).splitlines()[0]} — fix that file") from exc


def check_participants(bids_dir, labels) -> None:
    """Fail early (before validation and indexing) on participant labels with no sub-<label>/."""
    available = sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())
    wanted = [str(p).removeprefix("sub-") for p in labels]
    unknown = [p for p in wanted if p not in available]
    if unknown:
        shown = ", ".join(available[:20]) + (" …" if len(available) > 20 else "")
        raise UsageError(
            f"participant label(s) not found in {bids_dir}: {', '.join(unknown)} (available: {shown})")


def select_subjects(layout, config) -> list[str]:
    available = sorted(layout.get_subjects())
    if not available:
        raise UsageError(f"no participants with data files found in {layout.root}")
    if not config.participant_labels:
        return available
    wanted = [str(p).removeprefix("sub-") for p in config.participant_labels]
    unknown = [p for p in wanted if p not in available]
    if unknown:
        shown = ", ".join(available[:20]) + (" …" if len(available) > 20 else "")
        raise UsageError(
            f"participant label(s) not found in {layout.root}: {', '.join(unknown)} (available: {shown})")
    return sorted(dict.fromkeys(wanted))


# --------------------------------------------------------------------------------------------
# Problems: recorded as SkippedInput, or raised with --stop-on-first-crash
# --------------------------------------------------------------------------------------------
class _Problems:
    def __init__(self, session: SessionInputs, stop: bool):
        self.session = session
        self.stop = stop

    def skip(self, path, problem: str, fix: str = "") -> None:
        err = InputError(path, problem, fix)
        if self.stop:
            raise err
        LOGGER.info("skipping %s", err)
        self.session.skipped.append(SkippedInput(path=str(path), reason=str(err).split(": ", 1)[1]))


class BadImage(Exception):
    """One-line reason why an image cannot be used."""


def check_image(path, *, ndim: tuple[int, ...], what: str = "image") -> nb.Nifti1Image:
    """Load ``path`` and read all its voxels; raise ``BadImage`` with a one-line reason.

    Checks: not empty, readable NIfTI header, dimensionality in ``ndim`` (trailing singleton
    dimensions ignored), complete (not truncated) data, finite values, not all zero. Data are
    read volume by volume to bound memory.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"cannot be read ({exc.strerror})") from exc
    if size == 0:
        raise BadImage("is an empty file (0 bytes)")
    try:
        img = nb.load(str(path))
        shape = img.shape
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, gzip errors, ...
        raise BadImage(f"is not a readable NIfTI image ({_one_line(exc)})") from exc
    eff = len(shape)
    while eff > 3 and shape[eff - 1] == 1:
        eff -= 1
    if eff not in ndim:
        want = " or ".join(f"{n}D" for n in ndim)
        raise BadImage(f"has {eff}D shape {tuple(shape)} but a {want} {what} is expected")
    if any(s == 0 for s in shape):
        raise BadImage(f"has an empty dimension (shape {tuple(shape)})")
    n_bad = 0
    nonzero = False
    try:
        if len(shape) >= 4:
            for k in range(int(np.prod(shape[3:]))):
                idx = np.unravel_index(k, shape[3:])
                vol = np.asanyarray(img.dataobj[(slice(None),) * 3 + tuple(int(i) for i in idx)])
                n_bad += int(np.size(vol) - np.count_nonzero(np.isfinite(vol)))
                nonzero = nonzero or bool(np.any(vol))
        else:
            vol = np.asanyarray(img.dataobj)
            n_bad = int(np.size(vol) - np.count_nonzero(np.isfinite(vol)))
            nonzero = bool(np.any(vol))
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise BadImage(f"is truncated or corrupt ({_one_line(exc)})") from exc
    if n_bad:
        raise BadImage(f"contains {n_bad} NaN/Inf voxel(s)")
    if not nonzero:
        raise BadImage("contains only zeros")
    return img


def _check_images(paths: dict, problems, *, ndim, what):
    """``check_image`` on each file of a group; on the first failure skip it (naming that file)
    and return None, else return ``{role: image}``."""
    images = {}
    for role, path in paths.items():
        try:
            images[role] = check_image(path, ndim=ndim, what=what)
        except BadImage as exc:
            problems.skip(path, str(exc))
            return None
    return images


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _number(meta: dict, key: str):
    """A finite number from the sidecar, or None."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _number_list(meta: dict, key: str):
    value = meta.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def _group_key(entities: dict, drop: set[str]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in entities.items() if k not in _NON_KEY | drop))


def _label(key: tuple) -> str:
    return "_".join(f"{_SHORT.get(k, k)}-{v}" for k, v in key) or "(no entities)"


def default_phase_increments_deg(npc: int) -> list[float]:
    """π(2j−1)/Npc in degrees, j = 1…Npc (SPEC §6), from the physics module."""
    from ..physics.bssfp import default_phase_increments

    return [float(v) for v in np.rad2deg(default_phase_increments(npc).numpy())]


# --------------------------------------------------------------------------------------------
# Per-session collection
# --------------------------------------------------------------------------------------------
def processed_kinds(config) -> set[str]:
    """Input kinds (filter-kind names) that this run processes (content gets checked)."""
    kinds = {k for k, methods in (config.methods or {}).items() if methods}
    if "bssfp" in kinds:
        kinds |= {"b1", "t1w"}
    return kinds


def discover(config) -> list[SessionInputs]:
    """All participants' and sessions' inputs, after --participant-label/--session-label."""
    bids_dir = check_bids_dir(config.bids_dir)
    layout = build_layout(bids_dir)
    filters = check_filters(config.bids_filters or {}, "bids filters")
    subjects = select_subjects(layout, config)
    wanted_ses = [str(s).removeprefix("ses-") for s in config.session_labels]
    out = []
    for sub in subjects:
        sessions = sorted(layout.get_sessions(subject=sub)) or [None]
        if wanted_ses:
            sessions = [s for s in sessions if s in wanted_ses]
        for ses in sessions:
            out.append(collect_session(layout, sub, ses, config, filters))
    if wanted_ses and not out:
        raise UsageError(f"session label(s) {', '.join(wanted_ses)} not found for the selected participants")
    return out


def collect_session(layout, subject: str, session: str | None, config, filters: dict) -> SessionInputs:
    from bids.layout import Query

    sess = SessionInputs(subject=subject, session=session)
    problems = _Problems(sess, config.stop_on_first_crash)
    files = layout.get(subject=subject, session=session if session else Query.NONE)
    by_suffix = defaultdict(list)
    for f in files:
        ext = f.entities.get("extension", "")
        if ext not in NIFTI_EXT:
            continue
        by_suffix[f.entities.get("suffix")].append(f)
    kinds = processed_kinds(config)

    def kept(kind, flist):
        query = filters.get(kind)
        return [f for f in flist if not query or _matches(f.get_entities(), query)]

    for suffix in sorted(by_suffix, key=str):
        if suffix not in KNOWN_SUFFIXES:
            for f in by_suffix[suffix]:
                sess.unprocessed.append(SkippedInput(f.path, f"found {suffix}, not processed by this version"))
    _collect_bssfp(sess, kept("bssfp", by_suffix.get("bSSFP", [])), problems, "bssfp" in kinds)
    check_b1 = "b1" in kinds and bool(sess.bssfp)
    _collect_b1(sess, {s: kept("b1", by_suffix.get(s, [])) for s in B1_SUFFIXES}, problems, check_b1)
    _collect_t1w(sess, kept("t1w", by_suffix.get("T1w", [])), problems, "t1w" in kinds and bool(sess.bssfp))
    for kind, target in (("MRF", sess.mrf), ("qMT", sess.qmt)):
        _collect_fingerprint(layout, sess, kind, target, kept(kind.lower(), by_suffix.get(kind, [])),
                             problems, kind.lower() in kinds)
    _collect_series(sess, "IRT1", "inv", "InversionTime", sess.irt1,
                    kept("irt1", by_suffix.get("IRT1", [])), problems, "irt1" in kinds)
    _collect_series(sess, "MESE", "echo", "EchoTime", sess.mese,
                    kept("mese", by_suffix.get("MESE", [])), problems, "mese" in kinds)
    if sess.bssfp and not sess.t1w:
        sess.notes.append("no T1w: anatomy and atlas are registered to the first bSSFP reference image")
    return sess


def _missing_metadata(meta: dict, kind: str) -> list[str]:
    return [k for k in REQUIRED_METADATA.get(kind, ()) if k not in meta]


def _part_pairs(flist, kind, problems):
    """Group files by entities other than ``part``; yield ``(key, parts, pair, metadata)`` for
    each complete mag/phase or real/imag pair with its required metadata, skipping the rest."""
    groups = defaultdict(dict)
    for f in flist:
        ent = f.get_entities()
        groups[_group_key(ent, {"part"})][ent.get("part")] = f
    for key, parts in sorted(groups.items()):
        first = sorted(parts.values(), key=lambda f: f.path)[0]
        names = set(parts)
        if names not in PART_PAIRS:
            have = ", ".join(f"part-{p}" for p in sorted(map(str, names)))
            problems.skip(first.path, f"{kind} {_label(key)} has {have}",
                          "provide a part-mag/part-phase or part-real/part-imag pair")
            continue
        pair = ("mag", "phase") if names == {"mag", "phase"} else ("real", "imag")
        meta = parts[pair[0]].get_metadata()
        missing = _missing_metadata(meta, kind)
        if missing:
            problems.skip(parts[pair[0]].path, f"missing sidecar metadata {', '.join(missing)}",
                          f"add it to the JSON sidecar ({kind} needs {', '.join(REQUIRED_METADATA[kind])})")
            continue
        yield key, parts, pair, meta


def _collect_bssfp(sess, flist, problems, check_content):
    for key, parts, pair, meta in _part_pairs(flist, "bSSFP", problems):
        tr, te, fa = (_number(meta, k) for k in REQUIRED_METADATA["bSSFP"])
        if tr is None or te is None or fa is None:
            bad = [k for k in REQUIRED_METADATA["bSSFP"] if _number(meta, k) is None]
            problems.skip(parts[pair[0]].path, f"metadata {', '.join(bad)} must be numbers")
            continue
        if tr <= 0 or tr > 1.0 or te <= 0 or te >= tr:
            problems.skip(parts[pair[0]].path,
                          f"implausible timing RepetitionTimeExcitation={tr:g}, EchoTime={te:g}",
                          "BIDS times are in seconds and EchoTime must be shorter than the TR")
            continue
        if not 0 < fa <= 180:
            problems.skip(parts[pair[0]].path, f"FlipAngle {fa:g} is not in (0, 180] degrees")
            continue
        increments = _number_list(meta, "PhaseIncrements") if "PhaseIncrements" in meta else None
        if "PhaseIncrements" in meta and increments is None:
            problems.skip(parts[pair[0]].path, "PhaseIncrements must be a list of numbers (degrees)")
            continue
        n_vol = None
        if check_content:
            imgs = _check_images({p: parts[p].path for p in pair}, problems, ndim=(4,),
                                 what="phase-cycled bSSFP series")
            if imgs is None:
                continue
            a, b = (imgs[p] for p in pair)
            if a.shape != b.shape:
                problems.skip(parts[pair[1]].path,
                              f"part-{pair[1]} shape {b.shape} differs from "
                              f"part-{pair[0]} shape {a.shape}", "both parts must come from one series")
                continue
            if not np.allclose(a.affine, b.affine, atol=1e-3):
                problems.skip(parts[pair[1]].path, f"part-{pair[1]} and part-{pair[0]} have different affines")
                continue
            n_vol = int(a.shape[3])
            if n_vol < 3:
                problems.skip(parts[pair[0]].path, f"only {n_vol} phase cycle(s); at least 3 are needed")
                continue
        if increments is not None and n_vol is not None and len(increments) != n_vol:
            problems.skip(parts[pair[0]].path,
                          f"{n_vol} volumes but {len(increments)} PhaseIncrements in the sidecar",
                          "the last axis must hold one volume per phase increment")
            continue
        if increments is None:
            if n_vol is None:
                n_vol = _header_volumes(parts[pair[0]].path)
            if n_vol is None:
                problems.skip(parts[pair[0]].path, "no PhaseIncrements and the image header is unreadable")
                continue
            increments = default_phase_increments_deg(n_vol)
            sess.notes.append(
                f"{Path(parts[pair[0]].path).name}: PhaseIncrements absent, using the default "
                f"π(2j−1)/Npc for Npc={n_vol}")
        acq = dict(key).get("acquisition")
        sess.bssfp.append(BSSFPInput(
            acq=acq, part_files={p: Path(parts[p].path) for p in pair}, repetition_time=tr,
            echo_time=te, flip_angle=fa, phase_increments=increments, metadata=dict(meta)))


def _header_volumes(path):
    try:
        shape = nb.load(str(path)).shape
    except Exception:  # any unreadable header: the caller reports it
        return None
    return int(shape[3]) if len(shape) >= 4 else None


def _collect_b1(sess, by_suffix, problems, check_content):
    roles = {"TB1map": ("map", None), "TB1TFL": ("acquisition", {"anat": "anat", "famp": "famp"}),
             "TB1DAM": ("flip", {"1": "flip1", "2": "flip2"})}
    for suffix in B1_SUFFIXES:
        entity, role_names = roles[suffix]
        groups = defaultdict(dict)
        for f in by_suffix.get(suffix, []):
            ent = f.get_entities()
            if role_names is None:
                groups[_group_key(ent, set())]["map"] = f
                continue
            role = role_names.get(str(ent.get(entity)).lstrip("0") or "0") if entity == "flip" \
                else role_names.get(str(ent.get(entity)))
            if role is None:
                problems.skip(f.path, f"{suffix} with {_SHORT.get(entity, entity)}-{ent.get(entity)} is not "
                              f"part of a known pair", f"name the pair {'/'.join(role_names)}")
                continue
            groups[_group_key(ent, {entity})][role] = f
        for key, files in sorted(groups.items()):
            needed = ("map",) if role_names is None else tuple(role_names.values())
            first = sorted(files.values(), key=lambda f: f.path)[0]
            missing = [r for r in needed if r not in files]
            if missing:
                problems.skip(first.path, f"{suffix} {_label(key)} lacks its {'/'.join(missing)} image",
                              "a B1 map needs the complete set of files")
                continue
            metas = {r: files[r].get_metadata() for r in needed}
            if suffix == "TB1DAM":
                bad = [r for r in needed if _number(metas[r], "FlipAngle") is None]
                if bad:
                    problems.skip(files[bad[0]].path, "missing or non-numeric FlipAngle (degrees)",
                                  "the double-angle method needs each image's flip angle")
                    continue
            if check_content:
                imgs = _check_images({r: files[r].path for r in needed}, problems, ndim=(3,), what="B1 image")
                if imgs is None:
                    continue
                shapes = {imgs[r].shape for r in needed}
                if len(shapes) > 1:
                    problems.skip(first.path, f"{suffix} images differ in shape {sorted(shapes)}")
                    continue
            sess.b1.append(B1Input(kind=suffix, files={r: Path(files[r].path) for r in needed},
                                   metadata=metas))


def _collect_t1w(sess, flist, problems, check_content):
    for f in sorted(flist, key=lambda f: f.path):
        if check_content and not sess.t1w:
            # Only the first usable T1w is processed; check it (and fall back to the next).
            try:
                check_image(f.path, ndim=(3,), what="T1w image")
            except BadImage as exc:
                problems.skip(f.path, str(exc))
                continue
        sess.t1w.append(Path(f.path))


def _find_basis(layout, data_file, kind):
    """The SVD basis TSV of ``data_file``: the most specific ``<kind>basis.tsv`` whose entities
    are a subset of the data file's (BIDS inheritance principle)."""
    ent = {k: str(v) for k, v in data_file.get_entities().items() if k not in _NON_KEY | {"part"}}
    best, best_score = None, -1
    for cand in layout.get(suffix=f"{kind}basis", extension=".tsv"):
        cent = cand.get_entities()
        if cent.get("subject") not in (None, data_file.entities.get("subject")):
            continue
        if cent.get("session") not in (None, data_file.entities.get("session")):
            continue
        cent = {k: str(v) for k, v in cent.items() if k not in _NON_KEY}
        if any(ent.get(k) != v for k, v in cent.items()):
            continue
        score = len(cent) + ("subject" in cand.get_entities()) + ("session" in cand.get_entities())
        if score > best_score:
            best, best_score = cand, score
    return Path(best.path) if best else None


def _collect_fingerprint(layout, sess, kind, target, flist, problems, check_content):
    for key, parts, pair, meta in _part_pairs(flist, kind, problems):
        basis = None
        if dict(key).get("desc") == "svd":
            basis = _find_basis(layout, parts[pair[0]], kind)
            if basis is None:
                problems.skip(parts[pair[0]].path, f"SVD coefficients without a {kind}basis TSV",
                              f"add ..._desc-svd_{kind}basis.tsv beside the images")
                continue
        if check_content and _check_images({p: parts[p].path for p in pair}, problems, ndim=(4,),
                                           what=f"{kind} series") is None:
            continue
        target.append(FingerprintInput(kind=kind, acq=dict(key).get("acquisition"),
                                       part_files={p: Path(parts[p].path) for p in pair},
                                       basis_file=basis, metadata=dict(meta)))


def _collect_series(sess, kind, index_entity, value_key, target, flist, problems, check_content):
    groups = defaultdict(list)
    for f in flist:
        groups[_group_key(f.get_entities(), {index_entity})].append(f)
    for key, members in sorted(groups.items()):
        items, bad = [], False
        for f in members:
            meta = f.get_metadata()
            value = _number(meta, value_key)
            if value is None:
                problems.skip(f.path, f"missing or non-numeric {value_key} in the sidecar",
                              f"every {kind} file needs its {value_key} in seconds")
                bad = True
                break
            if check_content:
                try:
                    check_image(f.path, ndim=(3,), what=f"{kind} image")
                except BadImage as exc:
                    problems.skip(f.path, str(exc))
                    bad = True
                    break
            items.append((value, Path(f.path), dict(meta)))
        if bad:
            continue
        items.sort(key=lambda t: (t[0], str(t[1])))
        target.append(SeriesInput(kind=kind, acq=dict(key).get("acquisition"),
                                  files=[t[1] for t in items], values=[t[0] for t in items],
                                  metadata=[t[2] for t in items]))


# --------------------------------------------------------------------------------------------
# B1 matching and the --dry-run plan
# --------------------------------------------------------------------------------------------
def b1_for(sess: SessionInputs, bssfp: BSSFPInput) -> B1Input | None:
    """The B1 input to use with ``bssfp``: one whose ``IntendedFor`` names it, else the first."""
    if not sess.b1:
        return None
    names = {p.name for p in bssfp.part_files.values()}
    for b1 in sess.b1:
        for meta in b1.metadata.values():
            intended = meta.get("IntendedFor") or []
            intended = [intended] if isinstance(intended, str) else intended
            if any(str(i).rsplit("/", 1)[-1] in names for i in intended):
                return b1
    return sess.b1[0]


def _files_cell(paths) -> str:
    """File names of a group, collapsed to ``..._part-{mag,phase}_bSSFP.nii.gz`` style."""
    names = [Path(p).name for p in paths]
    if len(names) < 2:
        return names[0] if names else ""
    import os.path

    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    head = head[: head.rfind("-") + 1] if "-" in head else head
    tail = tail[tail.find("_"):] if "_" in tail else tail
    middles = [n[len(head): len(n) - len(tail)] for n in names]
    inner = ",".join(middles) if len(middles) <= 6 else f"{middles[0]}..{middles[-1]}"
    return f"{head}{{{inner}}}{tail}"


def _fmt(v, scale=1.0, unit=""):
    return f"{v * scale:.4g}{unit}"


def _rel(path, root) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def planned_outputs(sess: SessionInputs, config) -> list[str]:
    """Derivative files the participant workflow writes for this session (relative paths)."""
    from .derivatives import derivative_path

    if not sess.bssfp:
        return []
    methods = tuple((config.methods or {}).get("bssfp", ()))
    kw = dict(subject=sess.subject, session=sess.session)
    atlas = _atlas_label(config.atlas)
    out = []
    for b in sess.bssfp:
        out.append(derivative_path("", **kw, suffix="bSSFP", acq=b.acq, desc="ref"))
        out.append(derivative_path("", **kw, suffix="mask", acq=b.acq, desc="brain"))
        out.append(derivative_path("", **kw, suffix="bSSFP", extension=".tsv", acq=b.acq, desc="motion"))
        if b1_for(sess, b) is not None:
            out.append(derivative_path("", **kw, datatype="fmap", suffix="TB1map", acq=b.acq, desc="bssfp"))
        for m in methods:
            for suffix in ("T1map", "T2map"):
                out.append(derivative_path("", **kw, suffix=suffix, acq=b.acq, desc=m))
            if m.endswith("complex"):
                out.append(derivative_path("", **kw, datatype="fmap", suffix="fieldmap", acq=b.acq, desc=m))
        if any(m.endswith("complex") for m in methods):
            out.append(derivative_path("", **kw, datatype="fmap", suffix="magnitude", acq=b.acq))
        out.append(derivative_path("", **kw, suffix="xfm", extension=".mat", acq=b.acq,
                                   from_="bSSFP", to="T1w", mode="image"))
    if sess.t1w:
        out.append(derivative_path("", **kw, suffix="T1w", desc="preproc"))
    out.append(derivative_path("", **kw, suffix="mask", desc="brain"))
    out.append(derivative_path("", **kw, suffix="dseg"))
    for lab in ("GM", "WM", "CSF"):
        out.append(derivative_path("", **kw, suffix="probseg", label=lab))
    tpl = "".join(c for c in str(config.template) if c.isalnum())
    out.append(derivative_path("", **kw, suffix="xfm", extension=".h5", from_="T1w", to=tpl, mode="image"))
    out.append(derivative_path("", **kw, suffix="xfm", extension=".h5", from_=tpl, to="T1w", mode="image"))
    out.append(derivative_path("", **kw, suffix="dseg", atlas=atlas))
    out.append(derivative_path("", **kw, suffix="roistats", extension=".tsv", atlas=atlas))
    import importlib.util

    if importlib.util.find_spec("bids_qmri.reports.participant") is not None:
        out.append(f"sub-{sess.subject}.html")
    return [str(p) for p in out]


def _atlas_label(spec) -> str:
    """The atlas entity label: the name, or the label image's stem for LABELS[:TABLE]."""
    spec = str(spec or "AAL")
    if ":" in spec or spec.endswith((".nii", ".nii.gz")):
        spec = Path(spec.split(":")[0]).name.removesuffix(".gz").removesuffix(".nii")
    return "".join(c for c in spec if c.isalnum()) or "custom"


def format_plan(sessions: list[SessionInputs], config) -> str:
    """The --dry-run report: inputs, metadata each method uses, planned outputs, skipped inputs."""
    root = Path(config.bids_dir)
    methods = {k: v for k, v in (config.methods or {}).items() if v}
    lines = [f"bids_qmri plan for {root}",
             "methods: " + ("; ".join(f"{k}: {', '.join(v)}" for k, v in methods.items()) or "none"),
             f"output: {config.output_dir}", ""]
    for sess in sessions:
        title = f"sub-{sess.subject}" + (f" ses-{sess.session}" if sess.session else "")
        lines += [f"== {title}", "  inputs:"]
        rows = []
        for b in sess.bssfp:
            npc = b.n_cycles
            inc = ", ".join(f"{v:g}" for v in b.phase_increments)
            b1 = b1_for(sess, b)
            rows.append(("bSSFP", b.acq or "-", _files_cell(b.part_files.values()),
                         f"TR={_fmt(b.repetition_time, 1e3, ' ms')} TE={_fmt(b.echo_time, 1e3, ' ms')} "
                         f"FA={b.flip_angle:g} deg Npc={npc} PhaseIncrements=[{inc}] deg"
                         + (f"; B1 from {b1.kind}" if b1 else "; no B1 map: B1 = 1 assumed")))
        for b1 in sess.b1:
            if b1.kind == "TB1TFL":
                info = f"B1 = famp / (10 x {config.b1_prep_angle_deg:g} deg prep angle)"
            elif b1.kind == "TB1DAM":
                fas = [b1.metadata[r].get("FlipAngle") for r in ("flip1", "flip2")]
                info = f"double angle, FlipAngle {fas[0]}/{fas[1]} deg"
            else:
                units = b1.metadata["map"].get("Units", "ratio (no Units given)")
                info = f"B1 map, Units {units}"
            rows.append((b1.kind, "-", _files_cell(b1.files.values()), info))
        for i, p in enumerate(sess.t1w):
            rows.append(("T1w", "-", Path(p).name, "used for anatomy" if i == 0 and sess.bssfp
                         else "not used (only the first T1w is used)" if sess.bssfp else ""))
        for f in sess.mrf + sess.qmt:
            keys = REQUIRED_METADATA[f.kind]
            rows.append((f.kind, f.acq or "-", _files_cell(f.part_files.values())
                         + (f" + {Path(f.basis_file).name}" if f.basis_file else ""),
                         ", ".join(f"{k}={_short_value(f.metadata.get(k))}" for k in keys)))
        for s in sess.irt1 + sess.mese:
            key = "InversionTime" if s.kind == "IRT1" else "EchoTime"
            rows.append((s.kind, s.acq or "-", f"{len(s.files)} files: {_files_cell(s.files)}",
                         f"{key} = [{', '.join(f'{v:g}' for v in s.values)}] s"))
        if rows:
            lines += _table(("kind", "acq", "files", "metadata used"), rows, indent=4)
        else:
            lines.append("    (none)")
        processed = processed_kinds(config)
        if not sess.bssfp:  # B1 and T1w serve the bSSFP mapping only
            processed = processed - {"b1", "t1w"}

        idle = sorted({r[0] for r in rows if _kind_key(r[0]) not in processed})
        if idle:
            lines.append(f"  found, not processed by this version: {', '.join(idle)}")
        for note in sess.notes:
            lines.append(f"  note: {note}")
        outputs = planned_outputs(sess, config)
        lines.append("  planned outputs:" if outputs else "  planned outputs: none (no processable input)")
        lines += [f"    {o}" for o in outputs]
        if sess.skipped:
            lines.append("  skipped inputs:")
            lines += [f"    {_rel(s.path, root)}: {s.reason}" for s in sess.skipped]
        if sess.unprocessed:
            lines.append("  other files (not processed by this version):")
            lines += [f"    {_rel(s.path, root)}" for s in sess.unprocessed]
        lines.append("")
    return "\n".join(lines)


def _kind_key(kind: str) -> str:
    return "b1" if kind in B1_SUFFIXES else kind.lower()


def _short_value(v):
    if isinstance(v, list):
        return f"[{len(v)} values]" if len(v) > 4 else str(v)
    return str(v)


def _table(header, rows, indent=0) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    pad = " " * indent
    out = []
    for r in (header, *rows):
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)] + [str(r[-1])]
        out.append(pad + "  ".join(cells).rstrip())
    return out
