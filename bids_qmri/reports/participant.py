"""Participant report: ``OUTPUT_DIR/sub-X.html`` with figures under ``OUTPUT_DIR/sub-X/figures/``.

Built from what is on disk in the output directory (maps and their sidecars, anatomy, ROI
tables, transforms) plus the discovered inputs (``sessions``: ``SessionInputs`` records, or the
``sub-X_inputs.json`` record that the CLI writes to the work directory). Self-contained: inline
CSS and JavaScript, figures as relative PNG links, no external URL.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import jinja2
import nibabel as nb
import numpy as np
import pandas as pd

from bids_qmri import __version__
from bids_qmri.anatomy.roistats import parse_entities
from bids_qmri.utils.atomic import write_text_atomic

from . import figures

LOGGER = logging.getLogger("bids_qmri.reports.participant")

# BIDS qMRI map suffixes; the modalities' own map suffixes are added from the registry.
MAP_SUFFIXES = ("T1map", "T2map", "M0map", "PDmap", "R1map", "R2map", "T2starmap", "TB1map", "fieldmap", "MTsat",
                "MTRmap")


def map_suffixes() -> tuple[str, ...]:
    from bids_qmri import modalities

    return tuple(dict.fromkeys(MAP_SUFFIXES + tuple(modalities.map_specs())))
SOFTWARE = ("bids_qmri", "nipype", "antspyx", "nibabel", "numpy", "scipy", "torch", "pybids", "nilearn",
            "templateflow", "pandas", "matplotlib", "jinja2")


@dataclass
class SessionView:
    label: str | None
    title: str
    inputs: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    unprocessed: list[dict] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)  # section, title, src, caption
    maps: list[dict] = field(default_factory=list)
    provenance: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    roi_columns: list[str] = field(default_factory=list)
    roi_rows: list[list] = field(default_factory=list)
    roi_file: str = ""


def _sidecar(path: Path) -> dict:
    side = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(path)))
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError):
        return {}


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _session_inputs(sess, config=None) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """(inputs, skipped, unprocessed, notes) from a SessionInputs record or a JSON dict."""
    from bids_qmri import modalities

    if isinstance(sess, dict):
        return ([], [dict(s) for s in sess.get("skipped", [])], [dict(s) for s in sess.get("unprocessed", [])],
                list(sess.get("notes", [])))
    inputs = []
    for t in getattr(sess, "t1w", []) or []:
        inputs.append({"kind": "T1w", "files": [str(t)], "detail": ""})
    for modality in modalities.modalities():
        for item in (getattr(sess, "inputs", {}) or {}).get(modality.name, []):
            _, detail = modality.plan_row(item, sess, config)
            files = item.files.values() if isinstance(item.files, dict) else item.files
            inputs.append({"kind": f"{modality.title} (acq-{item.acq})" if item.acq else modality.title,
                           "files": [str(p) for p in files], "detail": detail})
    for b in getattr(sess, "b1", []) or []:
        inputs.append({"kind": b.kind, "files": [str(p) for p in b.files.values()], "detail": ""})
    skipped = [{"path": k.path, "reason": k.reason} for k in getattr(sess, "skipped", []) or []]
    unprocessed = [{"path": k.path, "reason": k.reason} for k in getattr(sess, "unprocessed", []) or []]
    return inputs, skipped, unprocessed, list(getattr(sess, "notes", []) or [])


def _inputs_record(config, subject: str) -> dict:
    try:
        work = Path(config.resolved_work_dir())
        return json.loads((work / "bids_qmri" / f"sub-{subject}_inputs.json").read_text())
    except (AttributeError, OSError, ValueError):
        return {}


def _label(path: Path) -> str:
    e = parse_entities(path)
    bits = [f"acq-{e['acq']}" if "acq" in e else "", f"desc-{e['desc']}" if "desc" in e else "", e["suffix"]]
    return " ".join(b for b in bits if b)


def _find_maps(sdir: Path) -> list[Path]:
    suffixes = map_suffixes()
    maps = []
    for dt in ("anat", "fmap"):
        for p in sorted((sdir / dt).glob("*.nii.gz")) if (sdir / dt).is_dir() else []:
            e = parse_entities(p)
            if e["suffix"] in suffixes and "desc" in e and e.get("desc") not in ("ref", "brain", "preproc"):
                maps.append(p)
            elif "EstimationAlgorithm" in _sidecar(p) and p not in maps:
                maps.append(p)
    return maps


def _brain_mask_for(sdir: Path, grid: nb.spatialimages.SpatialImage, acq: str | None) -> np.ndarray | None:
    """A brain mask on the map's grid: the acquisition's own mask if one exists."""
    cands = sorted((sdir / "anat").glob(f"*acq-{acq}_desc-brain_mask.nii.gz")) if acq else []
    for c in cands:
        img = nb.load(c)
        if img.shape[:3] == grid.shape[:3]:
            return figures.load_ras(img)[0] > 0.5
    return None


def _build_session(out_root: Path, sdir: Path, prefix: str, fig_dir: Path, label: str | None) -> SessionView:
    view = SessionView(label=label, title=f"Session {label}" if label else "Data")
    anat = sdir / "anat"
    tag = prefix
    # Segmentation overlay
    t1w = sorted(anat.glob(f"{prefix}*_desc-preproc_*.nii.gz"))
    dseg = [p for p in sorted(anat.glob(f"{prefix}*_dseg.nii.gz")) if "atlas-" not in p.name]
    if t1w and dseg:
        png = figures.segmentation_overlay(t1w[0], dseg[0], fig_dir / f"{tag}_desc-seg_dseg.png")
        view.figures.append({"section": "Anatomy", "title": "Tissue segmentation", "src": _rel(png, out_root),
                             "caption": f"{t1w[0].name} with GM (orange), WM (blue), CSF (green) from {dseg[0].name}."})
    atlas = sorted(anat.glob(f"{prefix}*_atlas-*_dseg.nii.gz"))
    if t1w and atlas:
        png = figures.montage(atlas[0], fig_dir / f"{tag}_desc-atlas_dseg.png", cmap="tab20", mask=atlas[0],
                              title=f"{parse_entities(atlas[0]).get('atlas')} atlas in native space", units="label")
        view.figures.append({"section": "Anatomy", "title": "Atlas in native space", "src": _rel(png, out_root),
                             "caption": atlas[0].name})
    # Registration checks: T1w edges over every reference image.
    for mat in sorted(anat.glob(f"{prefix}*_to-T1w_mode-image_xfm.mat")):
        e = parse_entities(mat)
        src_suffix = e.get("from")
        pat = f"{prefix}*" + (f"acq-{e['acq']}_" if "acq" in e else "") + f"desc-ref_{src_suffix}.nii.gz"
        refs = sorted(anat.glob(pat))
        if not refs or not t1w:
            continue
        try:
            from bids_qmri.anatomy import registration as reg

            moved = reg.apply(str(t1w[0]), str(refs[0]), [str(mat)], interpolator="linear", invert=[True])
            moved_img = nb.Nifti1Image(moved.numpy().astype(np.float32), nb.load(refs[0]).affine)
            png = figures.registration_overlay(refs[0], figures.load_ras(moved_img)[0],
                                               fig_dir / f"{tag}_{'acq-' + e['acq'] + '_' if 'acq' in e else ''}"
                                                         f"desc-reg_{src_suffix}.png")
        except Exception as exc:  # a failed figure must not cost the whole report
            view.warnings.append(f"registration figure for {mat.name} failed: {exc}")
            continue
        view.figures.append({"section": "Registration", "title": f"T1w edges over {refs[0].name}",
                             "src": _rel(png, out_root),
                             "caption": f"Red: edges of the T1w resampled onto the reference grid through {mat.name}."})
    # Maps
    from bids_qmri import modalities

    protocol_keys = modalities.protocol_fields()
    order = modalities.method_order()
    maps = _find_maps(sdir)
    by_key: dict[tuple, list[Path]] = {}
    for p in maps:
        side = _sidecar(p)
        e = parse_entities(p)
        mask = _brain_mask_for(sdir, nb.load(p), e.get("acq"))
        units = side.get("Units", "")
        vrange = None
        if e["suffix"] in ("T1map", "T2map", "M0map", "PDmap"):  # positive quantities: scale from 0
            data = figures.load_ras(p)[0]
            vrange = (0.0, figures.robust_range(data, mask if mask is not None and mask.shape == data.shape
                                                 else None, 2, 98)[1])
        png = figures.montage(p, fig_dir / (p.name.replace(".nii.gz", ".png")), mask=mask, units=units,
                              title=_label(p), cmap=figures.DEFAULT_CMAPS.get(e["suffix"], "gray"),
                              symmetric=e["suffix"] == "fieldmap", vrange=vrange)
        view.maps.append({"title": _label(p), "src": _rel(png, out_root), "file": _rel(p, out_root), "units": units,
                          "algorithm": side.get("EstimationAlgorithm", "")})
        by_key.setdefault((e.get("acq"), e["suffix"]), []).append(p)
        card = side.get("ModelCard")
        if card or side.get("EstimationAlgorithm"):
            view.provenance.append({
                "map": p.name, "algorithm": side.get("EstimationAlgorithm", ""),
                "reference": side.get("EstimationReference", ""),
                "card": card if isinstance(card, dict) else ({"value": card} if card else {}),
                "protocol": {k: side[k] for k in protocol_keys if k in side},
            })
    # Figures the modalities' workflows wrote for the report (e.g. fingerprint fits).
    for modality in modalities.modalities():
        if modality.report_figures is None:
            continue
        try:
            extra = modality.report_figures(fig_dir, prefix)
        except Exception as exc:  # a failed figure must not cost the whole report
            view.warnings.append(f"{modality.title} report figures failed: {exc}")
            continue
        for f in extra:
            view.figures.append({"section": f["section"], "title": f["title"], "src": _rel(Path(f["path"]), out_root),
                                 "caption": f.get("caption", "")})
    # Method differences: every method against the reference one (its modality's first method).
    for (acq, suffix), paths in sorted(by_key.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if len(paths) < 2:
            continue
        paths = sorted(paths, key=lambda q: (_rank(parse_entities(q).get("desc"), order), q.name))
        base = paths[0]
        base_img = nb.load(base)
        units = _sidecar(base).get("Units", "")
        mask = _brain_mask_for(sdir, base_img, acq)
        base_data = figures.load_ras(base_img)[0]
        for other in paths[1:]:
            o_img = nb.load(other)
            if o_img.shape[:3] != base_img.shape[:3]:
                continue
            diff = figures.load_ras(o_img)[0] - base_data
            d_img = nb.Nifti1Image(diff, nb.as_closest_canonical(base_img).affine)
            m_ref = parse_entities(base).get("desc")
            m_oth = parse_entities(other).get("desc")
            name = f"{tag}_{'acq-' + acq + '_' if acq else ''}desc-{m_oth}minus{m_ref}_{suffix}.png"
            png = figures.montage(d_img, fig_dir / name, mask=mask, units=units, cmap="RdBu_r", symmetric=True,
                                  title=f"{suffix}: {m_oth} − {m_ref}")
            view.figures.append({"section": "Method differences", "title": f"{suffix} {m_oth} − {m_ref}"
                                 + (f" (acq-{acq})" if acq else ""), "src": _rel(png, out_root),
                                 "caption": f"{other.name} minus {base.name}, {units}."})
    # Warnings recorded in sidecars (e.g. no T1w, fallbacks of a mapping method), once each.
    for dt in ("anat", "fmap"):
        for p in sorted((sdir / dt).glob(f"{prefix}*.json")) if (sdir / dt).is_dir() else []:
            try:
                side = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            found = side.get("Warnings") if isinstance(side, dict) else None
            for w in found if isinstance(found, list) else []:
                if w not in view.warnings:
                    view.warnings.append(str(w))
    # ROI table
    roi = sorted(anat.glob(f"{prefix}*_roistats.tsv"))
    if roi:
        df = pd.read_csv(roi[0], sep="\t", keep_default_na=False)
        view.roi_file = _rel(roi[0], out_root)
        view.roi_columns = list(df.columns)
        for row in df.itertuples(index=False):
            view.roi_rows.append([_fmt(v) for v in row])
    return view


def _rank(method, order) -> int:
    return order.index(method) if method in order else len(order)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def _versions() -> list[tuple[str, str]]:
    out = []
    for pkg in SOFTWARE:
        try:
            out.append((pkg, __version__ if pkg == "bids_qmri" else metadata.version(pkg)))
        except metadata.PackageNotFoundError:
            continue
    return out


def _citations(methods: set[str]) -> list[str]:
    """The references of the methods whose maps the report shows and of their modalities
    (``bids_qmri.modalities``), then the software the app always uses."""
    from bids_qmri import modalities

    cites: list[str] = []
    for modality in modalities.modalities():
        seen = [m for m in modality.methods if m.name in methods]
        if seen:
            cites += list(modality.citations) + [m.reference for m in seen]
    data = json.loads(resources.files("bids_qmri.data").joinpath("reports/citations.json").read_text())
    return list(dict.fromkeys(cites)) + list(data["software"])


def write_participant_report(output_dir, subject: str, sessions=None, config=None) -> Path:
    """Render ``OUTPUT_DIR/sub-<subject>.html`` (figures in ``sub-<subject>/figures/``) -> path."""
    out_root = Path(output_dir)
    subject = str(subject).removeprefix("sub-")
    sub_dir = out_root / f"sub-{subject}"
    fig_dir = sub_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    sessions = list(sessions or [])
    record = _inputs_record(config, subject) if config is not None else {}
    if not sessions and record:
        sessions = record.get("sessions", [])
    ses_dirs = sorted(p for p in sub_dir.glob("ses-*") if p.is_dir())
    labels = [d.name[4:] for d in ses_dirs] or [None]
    for s in sessions:  # sessions that produced nothing still get a section (inputs, skips)
        lab = s.get("session_id") if isinstance(s, dict) else getattr(s, "session", None)
        lab = lab[4:] if isinstance(lab, str) and lab.startswith("ses-") else lab
        if lab not in labels and (lab is not None or labels != [None]):
            labels.append(lab)
    views = []
    methods: set[str] = set()
    for lab in labels:
        sdir = sub_dir / f"ses-{lab}" if lab else sub_dir
        prefix = f"sub-{subject}" + (f"_ses-{lab}" if lab else "")
        view = _build_session(out_root, sdir, prefix, fig_dir, lab) if sdir.is_dir() else SessionView(
            label=lab, title=f"Session {lab}" if lab else "Data")
        for s in sessions:
            s_lab = s.get("session_id") if isinstance(s, dict) else getattr(s, "session", None)
            s_lab = s_lab[4:] if isinstance(s_lab, str) and s_lab.startswith("ses-") else s_lab
            if s_lab == lab:
                inputs, skipped, unprocessed, notes = _session_inputs(s, config)
                view.inputs += inputs
                view.skipped += skipped
                view.unprocessed += unprocessed
                view.warnings += notes
        methods |= {parse_entities(m["file"]).get("desc", "") for m in view.maps}
        views.append(view)
    env = jinja2.Environment(loader=jinja2.PackageLoader("bids_qmri.reports", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    html = env.get_template("participant.html").render(
        subject=subject, sessions=views, versions=_versions(), citations=_citations(methods),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
        atlas=getattr(config, "atlas", None), template=getattr(config, "template", None),
    )
    return write_text_atomic(out_root / f"sub-{subject}.html", html)
