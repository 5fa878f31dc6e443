"""Atlases: resolve ``--atlas`` (a name or ``LABELS.nii[.gz]:TABLE``) and read label tables.

Label tables come in many dialects; ``read_label_table`` understands:
- TSV/CSV with a header naming an index column (``index``, ``label``, ``id``, ``value``,
  ``roi_id``, ``region_no`` or an unnamed first column) and a name column (``name``,
  ``label_name``, ``roi_name``, ``region``, ``structure``): BIDS ``dseg.tsv``, Clinica;
- headerless "index name [extra columns]" text, separated by whitespace, tabs, commas or
  semicolons: mricron (``aal.nii.txt``: ``1 Precentral_L 2001``), FreeSurfer colour LUTs
  (``17 Left-Hippocampus 220 216 20 0``), and the MCALT distribution's ``MCALT_ADIR122.txt``
  (number and region name per row, read by MCALT's own MATLAB code as ``Var1``/``Var2``);
- ITK-SNAP label descriptions (index first, the name in double quotes);
- FSL atlas XML (``<label index="i">Name</label>``; FSL indices are 0-based and the label
  image holds ``index + 1``).
Index 0 is background and never a region. Names with spaces are kept; trailing numeric
columns (colour, codes) are dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from bids_qmri.errors import UsageError

LOGGER = logging.getLogger("bids_qmri.anatomy.atlases")

_INDEX_COLS = ("index", "label", "id", "value", "roi_id", "region_no", "region_index", "no", "number", "idx")
_NAME_COLS = ("name", "label_name", "roi_name", "region", "region_name", "structure", "labelname", "roi")
_TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".xml", ".lut", ".label")


@dataclass
class Atlas:
    name: str  # BIDS label for atlas-<name> (alphanumeric)
    labels: Path  # label image in template (MNI) space
    table: pd.DataFrame  # columns index (int), name (str); only labels present in the image
    description: str = ""
    citation: str = ""


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _frame(rows: list[tuple[int, str]], path: Path) -> pd.DataFrame:
    if not rows:
        raise UsageError(f"{path}: no 'index name' rows found in the atlas label table — "
                         "give a TSV with index/name columns or 'index name' text lines")
    df = pd.DataFrame(rows, columns=["index", "name"]).astype({"index": int, "name": str})
    df["name"] = df["name"].str.strip()
    df = df[df["index"] != 0].drop_duplicates("index", keep="first")
    return df.sort_values("index").reset_index(drop=True)


def _read_fsl_xml(path: Path) -> pd.DataFrame:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise UsageError(f"{path}: not a readable XML label table ({err}) — check the file") from None
    rows = []
    for label in root.iter("label"):
        idx = label.get("index")
        if idx is None or label.text is None:
            continue
        # FSL: 0-based index in the XML, value index+1 in the label image.
        rows.append((int(idx) + 1, label.text))
    return _frame(rows, path)


def _header_columns(header: list[str]) -> tuple[int, int] | None:
    """Positions of the index and name columns if ``header`` is a header row, else None."""
    low = [h.strip().strip('"').lower() for h in header]
    if any(_is_number(h) for h in low[:1]) and low[0] != "":
        return None
    name_col = next((i for i, h in enumerate(low) if h in _NAME_COLS), None)
    idx_col = next((i for i, h in enumerate(low) if h in _INDEX_COLS and i != name_col), None)
    if idx_col is None and low and low[0] == "":
        idx_col = 0  # pandas/Clinica-style unnamed index column
    if name_col is None or idx_col is None:
        return None
    return idx_col, name_col


def _split(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:
        return line.split()
    return next(csv.reader([line], delimiter=delimiter, skipinitialspace=True))


def read_label_table(path: str | Path) -> pd.DataFrame:
    """Read an atlas label table in any of the dialects above -> DataFrame(index, name)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: atlas label table not found — check the path given to --atlas")
    if path.suffix.lower() == ".xml":
        return _read_fsl_xml(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text label table (binary file?) — give a TSV or 'index name' text") from None
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "%", "//"))]
    if not lines:
        raise UsageError(f"{path}: the atlas label table is empty — give one 'index name' row per region")
    sample = "\n".join(lines[:20])
    if "\t" in sample:
        delimiter = "\t"
    elif sample.count(",") >= len(lines[:20]):
        delimiter = ","
    elif sample.count(";") >= len(lines[:20]):
        delimiter = ";"
    else:
        delimiter = None
    first = _split(lines[0], delimiter)
    header = _header_columns(first)
    rows: list[tuple[int, str]] = []
    if header is not None:
        idx_col, name_col = header
        for line in lines[1:]:
            cols = _split(line, delimiter)
            if len(cols) <= max(idx_col, name_col) or not _is_number(cols[idx_col].strip()):
                continue
            rows.append((int(float(cols[idx_col])), cols[name_col].strip().strip('"')))
        return _frame(rows, path)
    quoted = re.compile(r'"([^"]*)"')
    for line in lines:
        q = quoted.search(line)
        cols = [c.strip() for c in _split(line, delimiter) if c.strip()]
        if not cols or not _is_number(cols[0]):
            continue
        if q:  # ITK-SNAP: numbers, then the quoted name
            name = q.group(1)
        else:
            words = []
            for tok in cols[1:]:
                if _is_number(tok):
                    break  # colour / code columns follow the name
                words.append(tok.strip('"'))
            name = " ".join(words)
        if name:
            rows.append((int(float(cols[0])), name))
    return _frame(rows, path)


def atlas_label(name: str) -> str:
    """A BIDS-valid ``atlas-`` label (alphanumeric) from a name or file stem."""
    label = re.sub(r"[^A-Za-z0-9]", "", name)
    if not label:
        raise UsageError(f"--atlas {name!r}: cannot make an alphanumeric atlas label from it — rename the file")
    return label


def _registry() -> dict:
    ref = resources.files("bids_qmri.data").joinpath("atlases/atlases.json")
    return json.loads(ref.read_text(encoding="utf-8"))


def available_atlases() -> dict[str, dict]:
    """Named atlases whose files are installed, name -> registry entry with absolute paths."""
    reg = _registry()
    out = {}
    for name, entry in reg["atlases"].items():
        for d in reg["search_dirs"]:
            labels, table = Path(d) / entry["labels"], Path(d) / entry["table"]
            if labels.is_file() and table.is_file():
                out[name] = dict(entry, labels=labels, table=table)
                break
    return out


def _strip_nii(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _sibling_table(labels: Path) -> Path | None:
    stem = _strip_nii(labels)
    for cand in [labels.parent / (labels.name + s) for s in (".txt", ".tsv")] + [
        labels.parent / f"{stem}{s}" for s in _TABLE_SUFFIXES
    ] + [labels.parent / f"{stem}_labels{s}" for s in (".txt", ".tsv", ".csv")]:
        if cand.is_file():
            return cand
    return None


def present_labels(labels_path: Path) -> np.ndarray:
    img = nb.load(labels_path)
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        raise UsageError(f"{labels_path}: the atlas must be a 3D label image (got {data.ndim}D) — "
                         "give a maximum-probability (discrete) atlas")
    if np.issubdtype(data.dtype, np.floating) and not np.allclose(data, np.round(data)):
        raise UsageError(f"{labels_path}: the atlas holds non-integer values — give a discrete label image")
    vals = np.unique(np.round(data).astype(np.int64))
    return vals[vals != 0]


def resolve_atlas(spec: str | None) -> Atlas:
    """``--atlas`` -> Atlas. ``spec`` is a registry name (AAL, AICHA, JHU), ``LABELS:TABLE``,
    or ``LABELS`` alone with the table beside it (same stem, .txt/.tsv/.csv/.xml)."""
    spec = (spec or "AAL").strip()
    named = available_atlases()
    by_upper = {k.upper(): k for k in named}
    if spec.upper() in by_upper:
        key = by_upper[spec.upper()]
        entry = named[key]
        labels, table_path = entry["labels"], entry["table"]
        name, description, citation = key, entry.get("description", ""), entry.get("citation", "")
    elif ":" in spec or Path(spec).suffix in (".gz", ".nii"):
        labels_s, _, table_s = spec.partition(":")
        labels = Path(labels_s).expanduser()
        if not labels.is_file():
            raise UsageError(f"--atlas: label image {labels} not found — give LABELS.nii.gz:TABLE with existing files")
        table_path = Path(table_s).expanduser() if table_s else _sibling_table(labels)
        if table_path is None:
            raise UsageError(f"--atlas {labels}: no label table beside it — give LABELS.nii.gz:TABLE")
        name = _strip_nii(labels)
        description, citation = f"user-supplied atlas {labels.name}", ""
    else:
        reg = _registry()
        known = ", ".join(sorted(reg["atlases"]))
        missing = " (not installed: apt-get install mricron-data)" if spec.upper() in {k.upper() for k in reg["atlases"]} else ""
        raise UsageError(f"--atlas {spec}: unknown atlas{missing} — use one of {known} or LABELS.nii.gz:TABLE")
    table = read_label_table(table_path)
    present = present_labels(Path(labels))
    if not set(present.tolist()) & set(table["index"].tolist()):
        raise UsageError(f"--atlas: none of the indices in {table_path} occur in {labels} — "
                         "the table does not belong to this label image")
    missing_in_table = sorted(set(present.tolist()) - set(table["index"].tolist()))
    if missing_in_table:
        LOGGER.warning("%s: labels %s have no name in %s; they are named label-<n>", labels, missing_in_table[:10], table_path)
        extra = pd.DataFrame({"index": missing_in_table, "name": [f"label-{i}" for i in missing_in_table]})
        table = pd.concat([table, extra]).sort_values("index").reset_index(drop=True)
    # Rows for labels absent from the image (e.g. MCALT's retired indices) would be empty forever.
    table = table[table["index"].isin(present)].reset_index(drop=True)
    return Atlas(name=atlas_label(name), labels=Path(labels), table=table, description=description, citation=citation)
