"""Input discovery with pybids (SPEC §3): one ``SessionInputs`` per participant and session.

pybids indexes the non-BIDS suffixes (``bSSFP``, ``MRF``, ``qMT``) when the layout is built with
``validate=False``; the ``derivatives`` configuration adds the ``desc`` entity that the SVD
coefficient files carry. Sidecar metadata comes from pybids with inheritance applied.

Each registered modality (``bids_qmri.modalities``) collects the files of its suffixes; this
module collects what serves every modality (B1 maps and the T1w anatomy), lists files of other
suffixes as "not processed by this version", and prints the ``--dry-run`` plan.

Every problem with one input becomes a ``SkippedInput`` with a one-line reason naming the file
(or an ``InputError`` with ``--stop-on-first-crash``); the other inputs go on. Image content is
checked only for the inputs this run processes, and not in ``--dry-run`` (which reads sidecars,
never images: the plan of a large cohort must be quick, and the bids-examples fixtures have
empty images); a file we only list must not be rejected for its content.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from pathlib import Path

from .. import modalities as registry
from ..errors import UsageError
from .collect import (  # noqa: F401 (b1_for is part of this module's interface)
    LONG,
    SHORT,
    BadImage,
    Problems,
    check_image,
    check_images,
    files_cell,
    group_key,
    key_label,
    b1_for,
    number,
)
from .inputs import B1Input, SessionInputs, SkippedInput

LOGGER = logging.getLogger("bids_qmri.bids.discovery")

NIFTI_EXT = (".nii", ".nii.gz")
B1_SUFFIXES = ("TB1map", "TB1TFL", "TB1DAM")
# Inputs that serve every modality: B1 maps (for modalities that use them) and the T1w anatomy.
SHARED_KINDS = {"b1": B1_SUFFIXES, "t1w": ("T1w",)}
REQUIRED_B1_METADATA = {"TB1DAM": ("FlipAngle",)}


def filter_kinds() -> tuple[str, ...]:
    """``--bids-filter-file`` keys: one query per modality, plus ``b1`` and ``t1w`` (fMRIPrep style)."""
    return tuple(m.name for m in registry.modalities()) + tuple(SHARED_KINDS)


def known_suffixes() -> tuple[str, ...]:
    return tuple(registry.by_suffix()) + tuple(s for suffixes in SHARED_KINDS.values() for s in suffixes)


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
    kinds = filter_kinds()
    for kind, query in filters.items():
        if kind.lower() not in kinds:
            raise UsageError(f"{where}: unknown input kind {kind!r} (use {', '.join(kinds)})")
        if not isinstance(query, dict):
            raise UsageError(f"{where}: the query for {kind!r} must be an object of entity: value")
        for key in query:
            if entity_name(key) is None:
                raise UsageError(f"{where}: unknown BIDS entity {key!r} in the query for {kind!r} (use e.g. "
                                 "acquisition/acq, run, echo, inv, part, desc, session, reconstruction/rec)")
    return {k.lower(): v for k, v in filters.items()}


@functools.lru_cache(maxsize=1)
def _pybids_entities() -> frozenset:
    from bids.layout.models import Config as PybidsConfig

    return frozenset(e for c in ("bids", "derivatives") for e in PybidsConfig.load(c).entities)


def entity_name(key) -> str | None:
    """The pybids entity a filter key names (full or short BIDS name), or None if unknown."""
    known = _pybids_entities()
    key = str(key)
    for cand in (key, LONG.get(key), SHORT.get(key)):
        if cand and cand in known:
            return cand
    return None


def _matches(entities: dict, query: dict) -> bool:
    for key, want in query.items():
        key = entity_name(key) or key
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


def unmatched_filters(config) -> list[str]:
    """The ``--bids-filter-file`` kinds whose query selects none of the files of that kind (of the
    selected participants), as ``kind {query}`` strings, for the "no processable input" message."""
    filters = check_filters(config.bids_filters or {}, "bids filters")
    if not filters:
        return []
    layout = build_layout(config.bids_dir)
    subjects = select_subjects(layout, config)
    out = []
    for kind, query in filters.items():
        suffixes = SHARED_KINDS.get(kind) or registry.get(kind).suffixes
        files = [f for f in layout.get(subject=subjects, suffix=list(suffixes))
                 if f.entities.get("extension", "") in NIFTI_EXT]
        if not any(_matches(f.get_entities(), query) for f in files):
            out.append(f"{kind} {json.dumps(query, sort_keys=True)} (matches none of {len(files)} {kind} file(s))")
    return out


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
# Per-session collection
# --------------------------------------------------------------------------------------------
def selected_modalities(config) -> list:
    """The modalities this run maps: registered, processable, and with methods selected."""
    methods = config.methods or {}
    return [m for m in registry.modalities() if m.processes and methods.get(m.name)]


def content_checked(config) -> bool:
    """Images are read in a real run only (see the module docstring)."""
    return not getattr(config, "dry_run", False)


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

    sess = SessionInputs(subject=subject, session=session,
                         inputs={m.name: [] for m in registry.modalities()})
    problems = Problems(sess, config.stop_on_first_crash)
    files = layout.get(subject=subject, session=session if session else Query.NONE)
    by_suffix = defaultdict(list)
    for f in files:
        ext = f.entities.get("extension", "")
        if ext not in NIFTI_EXT:
            continue
        by_suffix[f.entities.get("suffix")].append(f)
    selected = {m.name for m in selected_modalities(config)}
    check = content_checked(config)

    def kept(kind, flist):
        query = filters.get(kind)
        return [f for f in flist if not query or _matches(f.get_entities(), query)]

    known = set(known_suffixes())
    for suffix in sorted(by_suffix, key=str):
        if suffix not in known:
            for f in by_suffix[suffix]:
                sess.unprocessed.append(SkippedInput(f.path, f"found {suffix}, not processed by this version"))
    for modality in registry.modalities():
        flists = {s: kept(modality.name, by_suffix.get(s, [])) for s in modality.suffixes}
        sess.inputs[modality.name] = modality.collect(
            sess, flists, layout, problems, check and modality.name in selected)
    mapped = [name for name in selected if sess.inputs[name]]
    uses_b1 = any(registry.get(name).uses_b1 for name in mapped)
    _collect_b1(sess, {s: kept("b1", by_suffix.get(s, [])) for s in B1_SUFFIXES}, problems, check and uses_b1)
    _collect_t1w(sess, kept("t1w", by_suffix.get("T1w", [])), problems, check and bool(mapped))
    if mapped and not sess.t1w:
        first = registry.get(mapped[0])
        sess.notes.append(f"no T1w: anatomy and atlas are registered to the first {first.title} reference image")
    return sess


def _collect_b1(sess, by_suffix, problems, check_content):
    roles = {"TB1map": ("map", None), "TB1TFL": ("acquisition", {"anat": "anat", "famp": "famp"}),
             "TB1DAM": ("flip", {"1": "flip1", "2": "flip2"})}
    for suffix in B1_SUFFIXES:
        entity, role_names = roles[suffix]
        groups = defaultdict(dict)
        for f in by_suffix.get(suffix, []):
            ent = f.get_entities()
            if role_names is None:
                groups[group_key(ent, set())]["map"] = f
                continue
            role = role_names.get(str(ent.get(entity)).lstrip("0") or "0") if entity == "flip" \
                else role_names.get(str(ent.get(entity)))
            if role is None:
                problems.skip(f.path, f"{suffix} with {SHORT.get(entity, entity)}-{ent.get(entity)} is not "
                              f"part of a known pair", f"name the pair {'/'.join(role_names)}")
                continue
            groups[group_key(ent, {entity})][role] = f
        for key, files in sorted(groups.items()):
            needed = ("map",) if role_names is None else tuple(role_names.values())
            first = sorted(files.values(), key=lambda f: f.path)[0]
            missing = [r for r in needed if r not in files]
            if missing:
                problems.skip(first.path, f"{suffix} {key_label(key)} lacks its {'/'.join(missing)} image",
                              "a B1 map needs the complete set of files")
                continue
            metas = {r: files[r].get_metadata() for r in needed}
            if suffix == "TB1DAM":
                bad = [r for r in needed if number(metas[r], "FlipAngle") is None]
                if bad:
                    problems.skip(files[bad[0]].path, "missing or non-numeric FlipAngle (degrees)",
                                  "the double-angle method needs each image's flip angle")
                    continue
            if check_content:
                imgs = check_images({r: files[r].path for r in needed}, problems, ndim=(3,), what="B1 image")
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


# --------------------------------------------------------------------------------------------
# B1 matching and the --dry-run plan
# --------------------------------------------------------------------------------------------
def _rel(path, root) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def anatomy_outputs(sess: SessionInputs, config) -> list[Path]:
    """Files the anatomical and ROI workflows write for a session that maps something."""
    from .derivatives import derivative_path

    kw = dict(subject=sess.subject, session=sess.session)
    atlas = atlas_label(config.atlas)
    out = []
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
    return out


def planned_outputs(sess: SessionInputs, config) -> list[str]:
    """Derivative files the participant workflow writes for this session (relative paths)."""
    from .derivatives import derivative_path

    out: list = []
    for modality in selected_modalities(config):
        for item in sess.inputs.get(modality.name, []):
            out += modality.planned_outputs(item, sess, config)
            # the ROI workflow's registration of the input's reference image to the T1w
            out.append(derivative_path("", subject=sess.subject, session=sess.session, acq=item.acq,
                                       suffix="xfm", extension=".mat", from_=modality.ref_suffix, to="T1w",
                                       mode="image"))
    if not out:
        return []
    out += anatomy_outputs(sess, config)
    import importlib.util

    if importlib.util.find_spec("bids_qmri.reports.participant") is not None:
        out.append(f"sub-{sess.subject}.html")
    return [str(p) for p in out]


def atlas_label(spec) -> str:
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
             f"output: {config.output_dir}"]
    if not content_checked(config):
        lines.append("image content is not read in a dry run: it is checked when the run starts")
    lines.append("")
    selected = {m.name for m in selected_modalities(config)}
    for sess in sessions:
        title = f"sub-{sess.subject}" + (f" ses-{sess.session}" if sess.session else "")
        lines += [f"== {title}", "  inputs:"]
        rows, idle, unselected = [], [], []
        mapped = False
        for modality in registry.modalities():
            for item in sess.inputs.get(modality.name, []):
                files, metadata = modality.plan_row(item, sess, config)
                rows.append((modality.suffixes[0], item.acq or "-", files, metadata))
                if modality.name in selected:
                    mapped = True
                elif modality.processes:
                    unselected.append(f"{modality.suffixes[0]} ({modality.name}: "
                                      f"{', '.join(modality.method_names)})")
                else:
                    idle.append(modality.suffixes[0])
        for b1 in sess.b1:
            if b1.kind == "TB1TFL":
                info = f"B1 = famp / (10 x {config.b1_prep_angle_deg:g} deg prep angle)"
            elif b1.kind == "TB1DAM":
                fas = [b1.metadata[r].get("FlipAngle") for r in ("flip1", "flip2")]
                info = f"double angle, FlipAngle {fas[0]}/{fas[1]} deg"
            else:
                units = b1.metadata["map"].get("Units", "ratio (no Units given)")
                info = f"B1 map, Units {units}"
            rows.append((b1.kind, "-", files_cell(b1.files.values()), info))
        uses_b1 = any(registry.get(n).uses_b1 and sess.inputs.get(n) for n in selected)
        support = []  # B1 and T1w serve mapped inputs: idle here, but this version uses them
        if sess.b1 and not uses_b1:
            support.append(sess.b1[0].kind)
        for i, p in enumerate(sess.t1w):
            rows.append(("T1w", "-", Path(p).name, "used for anatomy" if i == 0 and mapped
                         else "not used (only the first T1w is used)" if mapped else ""))
        if sess.t1w and not mapped:
            support.append("T1w")
        if rows:
            lines += _table(("kind", "acq", "files", "metadata used"), rows, indent=4)
        else:
            lines.append("    (none)")
        idle = sorted(set(idle))
        if idle:
            lines.append(f"  found, not processed by this version: {', '.join(idle)}")
        if unselected:
            lines.append(f"  found, not selected by --methods: {', '.join(sorted(set(unselected)))}")
        if support:
            lines.append(f"  found, used only beside a mapped input that needs it: {', '.join(sorted(set(support)))}")
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


def _table(header, rows, indent=0) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    pad = " " * indent
    out = []
    for r in (header, *rows):
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths)] + [str(r[-1])]
        out.append(pad + "  ".join(cells).rstrip())
    return out
