"""The derivatives writer: the only way bids_qmri writes outputs (SPEC §4).

Every write is atomic (temporary file in the same directory, then ``os.replace``), so a killed
run never leaves a half-written file and participants running in parallel into one output
directory never clobber each other. ``init_derivatives`` is idempotent: every job writes the
same bytes, and only when they differ from what is already there.
"""

from __future__ import annotations

import json
import logging
import os
import re
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np

from .. import CODE_URL, __version__
from ..errors import UsageError
from ..utils.atomic import atomic_path, remove_stale_temporaries, write_json_atomic, write_text_atomic

LOGGER = logging.getLogger("bids_qmri.bids.derivatives")

BIDS_VERSION = "1.10.0"
PIPELINE_NAME = "bids_qmri"

# Entities in BIDS order (schema rules.entities), short keys; from/to/mode (transforms, nipreps
# convention) sit after part, before space.
ENTITY_ORDER = (
    "task", "acq", "ce", "trc", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt",
    "part", "proc", "from", "to", "mode", "hemi", "space", "atlas", "seg", "res", "den",
    "label", "desc",
)
_LONG_NAMES = {
    "acquisition": "acq", "ceagent": "ce", "tracer": "trc", "reconstruction": "rec",
    "direction": "dir", "modality": "mod", "inversion": "inv", "mtransfer": "mt",
    "processing": "proc", "hemisphere": "hemi", "segmentation": "seg", "resolution": "res",
    "density": "den", "description": "desc",
}
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9]+$")


def check_label(value, what: str = "label") -> str:
    """Return ``value`` as a BIDS label (letters and digits only) or raise ``ValueError``.

    This is what keeps ``../`` or ``/`` in a label from ever reaching a path.
    """
    value = str(value)
    if not _LABEL_RE.match(value):
        raise ValueError(f"invalid {what} {value!r}: BIDS labels contain only letters and digits")
    return value


def derivative_path(output_dir, *, subject, session=None, datatype="anat", suffix,
                    extension=".nii.gz", **entities) -> Path:
    """``OUTPUT_DIR/sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y]_<entities>_<suffix><extension>``.

    Entities may be given by short (``acq``) or long (``acquisition``) name; ``None`` values
    are dropped; ``from``/``to`` (Python keywords) may be passed as ``from_``/``to_``.
    """
    subject = check_label(str(subject).removeprefix("sub-"), "subject label")
    parts = [f"sub-{subject}"]
    dirs = [f"sub-{subject}"]
    if session:
        session = check_label(str(session).removeprefix("ses-"), "session label")
        parts.append(f"ses-{session}")
        dirs.append(f"ses-{session}")
    clean = {}
    for key, value in entities.items():
        if value is None:
            continue
        key = _LONG_NAMES.get(key.rstrip("_"), key.rstrip("_"))
        if key not in ENTITY_ORDER:
            raise ValueError(f"unknown BIDS entity {key!r}")
        clean[key] = check_label(value, f"{key} label")
    parts += [f"{k}-{clean[k]}" for k in ENTITY_ORDER if k in clean]
    if not _SUFFIX_RE.match(suffix):
        raise ValueError(f"invalid suffix {suffix!r}")
    if datatype and not _SUFFIX_RE.match(datatype):
        raise ValueError(f"invalid datatype {datatype!r}")
    if extension and not re.match(r"^(\.[A-Za-z0-9]+)+$", extension):
        raise ValueError(f"invalid extension {extension!r}")
    name = "_".join(parts) + f"_{suffix}{extension}"
    out = Path(output_dir).joinpath(*dirs, *([datatype] if datatype else []), name)
    return out


class OutputTreeError(UsageError):
    """An output path whose folders resolve outside the output tree (a planted symlink)."""


def _outside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return False
    except ValueError:
        return True


def ensure_within_output(path) -> Path:
    """Refuse to write ``path`` through a symlink that leaves the output tree.

    The output root is the folder above the path's innermost ``sub-<label>`` folder (top-level
    files such as ``sub-X.html`` are replaced by an atomic rename, which replaces a link instead
    of writing through it). Every existing folder between the root and the file must resolve
    inside the resolved root; a planted ``OUTPUT_DIR/sub-01 -> /elsewhere`` (or a link deeper
    down) raises ``OutputTreeError`` naming the link. Returns ``path``.
    """
    path = Path(path).absolute()
    subs = [f for f in path.parents if f.name.startswith("sub-")]
    if not subs:
        return path
    root = subs[0].parent
    real_root = root.resolve()
    chain, folder = [], path.parent
    while folder != root:
        chain.append(folder)
        folder = folder.parent
    for folder in reversed(chain):  # from the top: name the first link that leaves the tree
        if folder.exists() or folder.is_symlink():
            target = folder.resolve()
            if _outside(target, real_root):
                raise OutputTreeError(f"{folder} resolves to {target}, outside the output directory {root}: "
                                      "refusing to write through a symlink — remove the link or choose another "
                                      "OUTPUT_DIR")
    return path


def check_output_tree(output_dir) -> None:
    """Start-up check of ``OUTPUT_DIR/sub-*``: no symlink in it (at any depth) may resolve outside
    the output directory (``ensure_within_output`` guards each write as well)."""
    root = Path(output_dir).absolute()
    real_root = root.resolve()
    if not root.is_dir():
        return
    for top in sorted(root.glob("sub-*")):
        stack = [top]
        while stack:
            p = stack.pop()
            if p.is_symlink():
                target = p.resolve()
                if _outside(target, real_root):
                    raise OutputTreeError(f"{p} is a symlink to {target}, outside the output directory {root}: "
                                          "refusing to write through it — remove the link or choose another "
                                          "OUTPUT_DIR")
                continue
            if p.is_dir():
                stack.extend(sorted(p.iterdir()))


def bids_uri(bids_dir, path, dataset: str = "raw") -> str:
    """BIDS URI of ``path`` relative to ``bids_dir``: ``bids:raw:sub-01/anat/...``.

    ``dataset`` names the entry in ``DatasetLinks``; ``""`` refers to the current dataset
    (``bids::sub-01/...``). A path outside ``bids_dir`` is returned as a ``file:`` URI.
    """
    path = Path(path).absolute()
    try:
        rel = path.relative_to(Path(bids_dir).absolute())
    except ValueError:
        return path.as_uri()
    return f"bids:{dataset}:{rel.as_posix()}"


def map_sidecar(*, units, sources, algorithm, reference, acquisition, model_card=None,
                skull_stripped: bool = False, description: str | None = None, **extra) -> dict:
    """JSON sidecar of a quantitative map (SPEC §4).

    ``acquisition`` holds the acquisition parameters the estimate used, in BIDS keys and units
    (e.g. ``RepetitionTimeExcitation``, ``FlipAngle``, ``PhaseIncrements``); they are written
    at the top level as the BIDS qMRI appendix does. ``model_card`` (dict) is written under
    ``ModelCard``. ``SkullStripped`` is required by BIDS for derivative maps.
    """
    sidecar = {
        "Units": units,
        "SkullStripped": bool(skull_stripped),
        "Sources": [str(s) for s in (sources or [])],
        "EstimationAlgorithm": algorithm,
        "EstimationReference": reference,
    }
    if description:
        sidecar["Description"] = description
    sidecar.update(acquisition or {})
    if model_card is not None:
        sidecar["ModelCard"] = model_card
    sidecar.update(extra)
    return sidecar


def save_json(path, obj) -> Path:
    return write_json_atomic(ensure_within_output(path), obj)


def save_tsv(path, dataframe) -> Path:
    """Write a pandas DataFrame as BIDS TSV (tab-separated, ``n/a`` for missing), atomically."""
    text = dataframe.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return write_text_atomic(ensure_within_output(path), text)


def save_nifti(path, data, affine, *, header=None, sidecar=None) -> Path:
    """Write ``data`` as NIfTI at ``path`` (and ``sidecar`` as its JSON), each atomically.

    The sidecar is written first: the image appearing last marks the output as complete.
    Floating data is stored as float32; spatial units are set to mm and time to seconds.
    """
    path = ensure_within_output(path)
    data = np.asanyarray(data)
    if np.iscomplexobj(data):
        raise ValueError(f"{path.name}: complex data cannot be written as one NIfTI map")
    if data.dtype == np.float64 or data.dtype == np.float16:
        data = data.astype(np.float32)
    elif data.dtype == bool:
        data = data.astype(np.uint8)
    hdr = header.copy() if header is not None else None
    img = nb.Nifti1Image(data, affine, hdr)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=int(img.header["qform_code"]) or 1)
    img.set_sform(affine, code=int(img.header["sform_code"]) or 1)
    if sidecar is not None:
        save_json(sidecar_path(path), sidecar)
    with atomic_path(path) as tmp:
        nb.save(img, tmp)
    return path


def sidecar_path(path) -> Path:
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".h5", ".mat", ".txt"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def container_info() -> dict | None:
    """``GeneratedBy[].Container`` when running in Docker or Singularity/Apptainer."""
    tag = os.environ.get("BIDS_QMRI_CONTAINER_TAG")
    for var, kind in (("APPTAINER_NAME", "apptainer"), ("SINGULARITY_NAME", "singularity")):
        if os.environ.get(var):
            return {"Type": kind, "Tag": tag or os.environ[var]}
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        info = {"Type": "docker"}
        if tag:
            info["Tag"] = tag
        return info
    return None


def dataset_description(bids_dir) -> dict:
    """dataset_description.json of the derivative dataset (deterministic, for idempotence)."""
    bids_dir = Path(bids_dir).absolute()
    generated = {"Name": PIPELINE_NAME, "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        generated["Container"] = container
    source = {"URL": bids_dir.as_uri()}
    try:
        raw_desc = json.loads((bids_dir / "dataset_description.json").read_text())
    except (OSError, ValueError):
        raw_desc = {}
    if isinstance(raw_desc, dict) and raw_desc.get("DatasetDOI"):
        source["DOI"] = str(raw_desc["DatasetDOI"])
    desc = {
        "Name": "bids_qmri: quantitative MRI maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.as_uri()},
    }
    if isinstance(raw_desc, dict) and isinstance(raw_desc.get("License"), str):
        desc["License"] = raw_desc["License"]
    return desc


def bidsignore_text(extra_ignore=()) -> str:
    """The derivatives' ``.bidsignore``: the package's lines, then ``extra_ignore`` (each
    modality's files BIDS has no name for, ``bids_qmri.modalities.bidsignore_lines()``)."""
    text = resources.files("bids_qmri.data").joinpath("bidsignore").read_text()
    extra = [ln for ln in extra_ignore if ln not in text.splitlines()]
    if extra:
        text += "# files of the modalities that BIDS has no name for (SPEC §3, §4)\n" + "\n".join(extra) + "\n"
    return text


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    write_text_atomic(path, text)


def init_derivatives(output_dir, bids_dir, extra_ignore=()) -> Path:
    """Create the derivative dataset root: dataset_description.json and .bidsignore (with the
    ``extra_ignore`` lines the modalities need, see ``bidsignore_text``).

    Safe when several participant jobs call it at once: the content is deterministic and each
    file is replaced atomically, so readers see either nothing or a complete file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(output_dir):
        LOGGER.info("removed %s, left by a killed run", stale)
    desc = json.dumps(dataset_description(bids_dir), indent=2) + "\n"
    _write_if_changed(output_dir / "dataset_description.json", desc)
    ignore = bidsignore_text(extra_ignore)
    existing = ""
    try:
        existing = (output_dir / ".bidsignore").read_text()
    except OSError:
        pass
    # Keep lines a user (or another tool) added; add ours that are missing.
    missing = [ln for ln in ignore.splitlines() if ln and not ln.startswith("#")
               and ln not in existing.splitlines()]
    if missing or not existing:
        text = existing if existing.endswith("\n") or not existing else existing + "\n"
        text = text + ignore if not existing else text + "\n".join(missing) + "\n"
        _write_if_changed(output_dir / ".bidsignore", text)
    return output_dir


def tissue_dseg_table() -> Path:
    """The packaged ``dseg.tsv`` (1 GM, 2 WM, 3 CSF) to copy beside tissue segmentations."""
    return Path(str(resources.files("bids_qmri.data").joinpath("dseg.tsv")))
