"""Building blocks for modality collectors (``Modality.collect``): grouping BIDS files into
inputs, checking images and sidecar metadata, finding SVD basis tables.

Every problem with one input is reported through ``Problems.skip`` with a one-line reason that
names the file; the collector goes on with the other inputs.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import InputError
from .inputs import B1Input, FingerprintInput, SeriesInput, SessionInputs, SkippedInput

LOGGER = logging.getLogger("bids_qmri.bids.collect")

PART_PAIRS = ({"mag", "phase"}, {"real", "imag"})
# Entities that carry the role of a file inside a group rather than identify the group.
NON_KEY = {"subject", "session", "suffix", "extension", "datatype"}
SHORT = {"acquisition": "acq", "reconstruction": "rec", "direction": "dir", "ceagent": "ce",
         "inversion": "inv", "mtransfer": "mt", "processing": "proc", "description": "desc"}
LONG = {v: k for k, v in SHORT.items()}


class Problems:
    """Records unusable inputs of one session as ``SkippedInput`` (or raises the ``InputError``
    with ``--stop-on-first-crash``)."""

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


# gzip (deflate) cannot compress better than about 1032:1, so a .nii.gz of N bytes cannot hold
# more than this many bytes of header and voxels: a header claiming more is corrupt.
GZIP_MAX_RATIO = 1100


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_header(path, *, ndim: tuple[int, ...] | None = None, what: str = "image",
                 memory: int | None = None):
    """Validate a NIfTI image from its header alone (no voxel is read); return the image proxy
    or raise ``BadImage`` with a one-line reason.

    Checks: not empty, a readable NIfTI-1/2 header, dimensionality in ``ndim`` (trailing
    singleton dimensions ignored), no empty dimension, a real numeric datatype, the size the
    header claims against the file (uncompressed: the file must hold it; gzip: deflate's maximal
    ratio bounds it) and against the available ``memory`` (bytes; default: ``MemAvailable``) for
    the data as float32, a finite invertible affine with voxel sizes in [1e-4, 1e4] mm, and qform
    and sform (when both are set) placing the image at the same position within half a voxel.
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
        shape = tuple(int(s) for s in img.shape)
        hdr = img.header
        dtype = hdr.get_data_dtype()
        offset = int(hdr.get("vox_offset", 0))
        zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
    except Exception as exc:  # nibabel raises ImageFileError, HeaderDataError, EOFError, gzip errors, ...
        raise BadImage(f"is not a readable NIfTI image ({one_line(exc)})") from exc
    if not isinstance(img, (nb.Nifti1Image, nb.Nifti2Image)):
        raise BadImage(f"is a {type(img).__name__}, not a NIfTI image")
    eff = len(shape)
    while eff > 3 and shape[eff - 1] == 1:
        eff -= 1
    if ndim is not None and eff not in ndim:
        want = " or ".join(f"{n}D" for n in ndim)
        raise BadImage(f"has {eff}D shape {shape} but a {want} {what} is expected")
    if any(s <= 0 for s in shape):
        raise BadImage(f"has an empty dimension (shape {shape})")
    if dtype.fields is not None or dtype.kind not in "uif":
        raise BadImage(f"has datatype {dtype} (header code {int(hdr['datatype'])}); a real-valued "
                       f"numeric {what} is expected")
    claimed = math.prod(shape) * dtype.itemsize
    if str(path).endswith(".gz"):
        if offset + claimed > GZIP_MAX_RATIO * size:
            raise BadImage(f"header claims shape {shape} of {dtype} ({_gb(claimed)}) but the {size}-byte "
                           "compressed file cannot hold that: corrupt header")
    elif offset + claimed > size:
        raise BadImage(f"is truncated: the header claims {offset + claimed} bytes (shape {shape} of {dtype}) "
                       f"but the file has {size}")
    memory = available_memory() if memory is None else memory
    need = math.prod(shape) * max(dtype.itemsize, 4)
    if memory is not None and need > memory:
        raise BadImage(f"header claims shape {shape}: {_gb(need)} in memory, more than the {_gb(memory)} "
                       "available (a corrupt header, or run on a machine with more memory)")
    if not all(math.isfinite(z) and 1e-4 <= z <= 1e4 for z in zooms):
        raise BadImage(f"has invalid voxel sizes {zooms} in its header (pixdim; mm expected): fix the header")
    affines = {}
    for name in ("qform", "sform"):
        code = int(hdr[f"{name}_code"])
        if code <= 0:
            continue
        try:
            aff = hdr.get_qform() if name == "qform" else hdr.get_sform()
        except Exception as exc:  # e.g. an invalid quaternion
            raise BadImage(f"has an invalid {name} ({one_line(exc)}): fix the header") from exc
        affines[name] = aff
    affines["affine"] = img.affine
    for name, aff in affines.items():
        aff = np.asarray(aff, dtype=float)
        if not np.all(np.isfinite(aff)):
            raise BadImage(f"has a non-finite {name} in its header: fix the header")
        det = abs(float(np.linalg.det(aff[:3, :3])))
        if not det > 1e-6 * float(np.prod(zooms)):
            raise BadImage(f"has a non-invertible {name} (determinant {det:.3g}): the voxel-to-world "
                           "mapping is degenerate — fix the header")
    if "qform" in affines and "sform" in affines:
        corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                            for k in (0, (shape[2] - 1) if len(shape) > 2 else 0)]).T
        dist = float(np.max(np.linalg.norm((affines["qform"] @ corners - affines["sform"] @ corners)[:3], axis=0)))
        if dist > 0.5 * min(zooms):
            raise BadImage(f"has qform and sform that disagree by {dist:.3g} mm; tools that read one or the "
                           "other place the image differently — fix the header (set one from the other)")
    return img


def check_image(path, *, ndim: tuple[int, ...], what: str = "image") -> nb.Nifti1Image:
    """``check_header``, then read all voxels; raise ``BadImage`` with a one-line reason.

    Data checks: complete (not truncated) data, finite values, not all zero. Data are read
    volume by volume to bound memory.
    """
    img = check_header(path, ndim=ndim, what=what)
    shape = img.shape
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
    except Exception as exc:  # EOFError, OSError, zlib.error, ValueError, ...: any unreadable data
        raise BadImage(f"is truncated or corrupt ({one_line(exc)})") from exc
    if n_bad:
        raise BadImage(f"contains {n_bad} NaN/Inf voxel(s)")
    if not nonzero:
        raise BadImage("contains only zeros")
    return img


def check_images(paths: dict, problems: Problems, *, ndim, what):
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


def header_volumes(path) -> int | None:
    """Number of volumes from the header alone (None if unreadable or 3D)."""
    try:
        shape = nb.load(str(path)).shape
    except Exception:  # any unreadable header: the caller reports it
        return None
    return int(shape[3]) if len(shape) >= 4 else None


def one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def number(meta: dict, key: str):
    """A finite number from the sidecar, or None."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def number_list(meta: dict, key: str):
    """A non-empty list of finite numbers from the sidecar (a scalar counts as one), or None."""
    value = meta.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return [float(v) for v in value]


def group_key(entities: dict, drop: set[str]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in entities.items() if k not in NON_KEY | drop))


def key_label(key: tuple) -> str:
    return "_".join(f"{SHORT.get(k, k)}-{v}" for k, v in key) or "(no entities)"


def missing_metadata(meta: dict, required: tuple[str, ...]) -> list[str]:
    return [k for k in required if k not in meta]


def part_pairs(flist, kind: str, required: tuple[str, ...], problems: Problems):
    """Group files by entities other than ``part``; yield ``(key, parts, pair, metadata)`` for
    each complete mag/phase or real/imag pair with its ``required`` metadata, skipping the rest."""
    groups = defaultdict(dict)
    for f in flist:
        ent = f.get_entities()
        groups[group_key(ent, {"part"})][ent.get("part")] = f
    for key, parts in sorted(groups.items()):
        first = sorted(parts.values(), key=lambda f: f.path)[0]
        names = set(parts)
        if names not in PART_PAIRS:
            have = ", ".join(f"part-{p}" for p in sorted(map(str, names)))
            problems.skip(first.path, f"{kind} {key_label(key)} has {have}",
                          "provide a part-mag/part-phase or part-real/part-imag pair")
            continue
        pair = ("mag", "phase") if names == {"mag", "phase"} else ("real", "imag")
        meta = parts[pair[0]].get_metadata()
        missing = missing_metadata(meta, required)
        if missing:
            problems.skip(parts[pair[0]].path, f"missing sidecar metadata {', '.join(missing)}",
                          f"add it to the JSON sidecar ({kind} needs {', '.join(required)})")
            continue
        other = parts[pair[1]].get_metadata()
        differ = [k for k in required if other.get(k) != meta.get(k)]
        if differ:
            problems.skip(parts[pair[1]].path,
                          f"part-{pair[0]} and part-{pair[1]} sidecars disagree on " + "; ".join(
                              f"{k} ({_describe(meta.get(k))} vs {_describe(other.get(k))})" for k in differ),
                          "both parts of one acquisition need the same acquisition metadata")
            continue
        yield key, parts, pair, meta


def _describe(value) -> str:
    if isinstance(value, list):
        return f"{len(value)} values"
    return "missing" if value is None else str(value)[:40]


def find_basis(layout, data_file, kind: str) -> Path | None:
    """The SVD basis TSV of ``data_file``: the most specific ``<kind>basis.tsv`` whose entities
    are a subset of the data file's (BIDS inheritance principle)."""
    ent = {k: str(v) for k, v in data_file.get_entities().items() if k not in NON_KEY | {"part"}}
    best, best_score = None, -1
    for cand in layout.get(suffix=f"{kind}basis", extension=".tsv"):
        cent = cand.get_entities()
        if cent.get("subject") not in (None, data_file.entities.get("subject")):
            continue
        if cent.get("session") not in (None, data_file.entities.get("session")):
            continue
        cent = {k: str(v) for k, v in cent.items() if k not in NON_KEY}
        if any(ent.get(k) != v for k, v in cent.items()):
            continue
        score = len(cent) + ("subject" in cand.get_entities()) + ("session" in cand.get_entities())
        if score > best_score:
            best, best_score = cand, score
    return Path(best.path) if best else None


def collect_fingerprints(layout, kind: str, required: tuple[str, ...], flist, problems: Problems,
                         check_content: bool) -> list[FingerprintInput]:
    """MRF/qMT-style inputs: a part pair of 4D frames, or ``desc-svd`` coefficients plus the
    ``<kind>basis.tsv`` they were compressed with."""
    out = []
    for key, parts, pair, meta in part_pairs(flist, kind, required, problems):
        basis = None
        if dict(key).get("desc") == "svd":
            basis = find_basis(layout, parts[pair[0]], kind)
            if basis is None:
                problems.skip(parts[pair[0]].path, f"SVD coefficients without a {kind}basis TSV",
                              f"add ..._desc-svd_{kind}basis.tsv beside the images")
                continue
        if check_content and check_images({p: parts[p].path for p in pair}, problems, ndim=(4,),
                                          what=f"{kind} series") is None:
            continue
        out.append(FingerprintInput(kind=kind, acq=dict(key).get("acquisition"),
                                    part_files={p: Path(parts[p].path) for p in pair},
                                    basis_file=basis, metadata=dict(meta)))
    return out


def collect_series(kind: str, index_entity: str, value_key: str, flist, problems: Problems,
                   check_content: bool) -> list[SeriesInput]:
    """Multi-file series (one 3D file per ``<index_entity>``, e.g. ``inv-<i>``), each file's
    ``value_key`` (seconds) from its sidecar; sorted by that value. A file with a missing value
    or an unusable image skips its whole series, naming that file."""
    groups = defaultdict(list)
    for f in flist:
        groups[group_key(f.get_entities(), {index_entity})].append(f)
    out = []
    for key, members in sorted(groups.items()):
        items, bad = [], False
        for f in sorted(members, key=lambda f: f.path):
            meta = f.get_metadata()
            value = number(meta, value_key)
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
        out.append(SeriesInput(kind=kind, acq=dict(key).get("acquisition"),
                               files=[t[1] for t in items], values=[t[0] for t in items],
                               metadata=[t[2] for t in items]))
    return out


def files_cell(paths) -> str:
    """File names of a group, collapsed to ``..._part-{mag,phase}_bSSFP.nii.gz`` style."""
    import os.path

    names = [Path(p).name for p in paths]
    if len(names) < 2:
        return names[0] if names else ""
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    head = head[: head.rfind("-") + 1] if "-" in head else head
    tail = tail[tail.find("_"):] if "_" in tail else tail
    middles = [n[len(head): len(n) - len(tail)] for n in names]
    inner = ",".join(middles) if len(middles) <= 6 else f"{middles[0]}..{middles[-1]}"
    return f"{head}{{{inner}}}{tail}"


def fingerprint_row(item: FingerprintInput, keys) -> tuple[str, str]:
    """The plan's (files, metadata used) cells of a fingerprint input."""
    files = files_cell(item.part_files.values()) + (f" + {item.basis_file.name}" if item.basis_file else "")
    return files, ", ".join(f"{k}={short_value(item.metadata.get(k))}" for k in keys)


def short_value(v) -> str:
    if isinstance(v, list):
        return f"[{len(v)} values]" if len(v) > 4 else str(v)
    return str(v)


def b1_for(sess: SessionInputs, item) -> B1Input | None:
    """The B1 input to use with an input record: one whose ``IntendedFor`` names one of the
    record's files, else the session's first."""
    if not sess.b1:
        return None
    files = item.files.values() if isinstance(item.files, dict) else item.files
    names = {Path(p).name for p in files}
    for b1 in sess.b1:
        for meta in b1.metadata.values():
            intended = meta.get("IntendedFor") or []
            intended = [intended] if isinstance(intended, str) else intended
            if any(str(i).rsplit("/", 1)[-1] in names for i in intended):
                return b1
    return sess.b1[0]
