"""ROI statistics of quantitative maps (SPEC §4 long-format table).

Columns (exactly): participant_id, session_id, atlas, region_index, region, suffix, method, acq,
n_voxels, mean, std, median, q1, q3, units, coverage.

A region's statistics use only the voxels where the map holds an estimate: finite, inside the
map's own brain mask (the mask its modality's workflow wrote, on the map's grid), and, for maps
whose sidecar counts ``VoxelsNotEstimated`` (``interfaces.maps.EstimateMaps`` writes 0 outside
the mask and where the fit failed), non-zero. ``n_voxels`` counts those voxels; ``coverage`` is
their fraction of the region's voxels (``n/a`` for a region absent from the map's grid), so a
region the acquisition or its brain mask covers only in part is visible in the table.

Tissue rows sit beside the atlas regions in the same table, with negative region indices so
that they can never collide with a label value: -1 GM, -2 WM, -3 CSF (the dseg.tsv classes,
negated) and -4 WholeBrain (brain parenchyma, GM + WM). Their ``atlas`` column is still the
atlas name of the file, so one file is one table.

Partial-volume handling: a voxel counts for a tissue row when that tissue's probability is
>= ``pv_threshold``; WholeBrain uses P(GM) + P(WM). An atlas region keeps the voxels whose
probability of the region's *dominant* tissue (the class with the largest summed probability
over the region: GM for cortex, WM for white-matter labels) is >= ``pv_threshold``; so CSF and
the other tissue's partial-volume voxels at the region's border are dropped. ``std`` is the
sample standard deviation (ddof=1); ``q1``/``q3`` the 25th/75th percentiles.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

LOGGER = logging.getLogger("bids_qmri.anatomy.roistats")

COLUMNS = ["participant_id", "session_id", "atlas", "region_index", "region", "suffix", "method", "acq",
           "n_voxels", "mean", "std", "median", "q1", "q3", "units", "coverage"]
TISSUE_ROWS = {"GM": -1, "WM": -2, "CSF": -3, "WholeBrain": -4}


def parse_entities(path: str | Path) -> dict[str, str]:
    """BIDS entities and suffix of a file name (``suffix`` key holds the suffix)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".tsv", ".json", ".h5", ".mat"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    parts = name.split("_")
    ents = {}
    for part in parts[:-1]:
        if "-" in part:
            k, v = part.split("-", 1)
            ents[k] = v
    ents["suffix"] = parts[-1]
    return ents


def describe(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return {"n_voxels": 0, "mean": np.nan, "std": np.nan, "median": np.nan, "q1": np.nan, "q3": np.nan}
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"n_voxels": n, "mean": float(values.mean()), "std": float(values.std(ddof=1)) if n > 1 else 0.0,
            "median": float(med), "q1": float(q1), "q3": float(q3)}


def region_masks(atlas: np.ndarray, table: pd.DataFrame, probs: dict[str, np.ndarray], brain: np.ndarray,
                 pv_threshold: float) -> list[tuple[int, str, np.ndarray]]:
    """(index, name, boolean mask) for the tissue rows, then every atlas region (same grid)."""
    out = []
    for tissue in ("GM", "WM", "CSF"):
        out.append((TISSUE_ROWS[tissue], tissue, brain & (probs[tissue] >= pv_threshold)))
    out.append((TISSUE_ROWS["WholeBrain"], "WholeBrain", brain & ((probs["GM"] + probs["WM"]) >= pv_threshold)))
    for idx, name in zip(table["index"].astype(int), table["name"].astype(str)):
        region = (atlas == idx) & brain
        if region.any():
            mass = {t: float(probs[t][region].sum()) for t in ("GM", "WM", "CSF")}
            dominant = max(mass, key=mass.get)
            region = region & (probs[dominant] >= pv_threshold)
        out.append((idx, name, region))
    return out


def estimated_voxels(values: np.ndarray, brain: np.ndarray | None = None, zero_is_missing: bool = False) -> np.ndarray:
    """Voxels where a map holds an estimate: finite, inside its own ``brain`` mask (when known)
    and, for a map written with 0 for "not estimated", non-zero."""
    valid = np.isfinite(values)
    if brain is not None:
        valid &= brain
    if zero_is_missing:
        valid &= values != 0
    return valid


def roi_table(values: np.ndarray, masks: list[tuple[int, str, np.ndarray]], *, participant_id: str,
              session_id: str | None, atlas: str, suffix: str, method: str | None, acq: str | None,
              units: str | None, valid: np.ndarray | None = None) -> pd.DataFrame:
    """One map's rows (one per mask) in the SPEC column order; ``valid`` (default: finite values)
    selects the voxels with an estimate (``estimated_voxels``)."""
    if valid is None:
        valid = estimated_voxels(values)
    rows = []
    for idx, name, mask in masks:
        row = {"participant_id": participant_id, "session_id": session_id or "n/a", "atlas": atlas,
               "region_index": int(idx), "region": name, "suffix": suffix, "method": method or "n/a",
               "acq": acq or "n/a", "units": units or "n/a"}
        row.update(describe(values[mask & valid]))
        n_region = int(mask.sum())
        row["coverage"] = row["n_voxels"] / n_region if n_region else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def load_on_grid(path: str | Path) -> tuple[np.ndarray, nb.spatialimages.SpatialImage]:
    img = nb.load(path)
    return np.asanyarray(img.dataobj), img


def _match_reference(map_ents: dict, refs: list[tuple[str, dict]]) -> str | None:
    """The reference image (or brain mask) of a map: same ``acq`` (and run) label, else the only
    one."""
    if not refs:
        return None
    same = [p for p, e in refs if e.get("acq") == map_ents.get("acq") and e.get("run") == map_ents.get("run")]
    if same:
        return same[0]
    same = [p for p, e in refs if e.get("acq") == map_ents.get("acq")]
    if same:
        return same[0]
    return refs[0][0] if len(refs) == 1 else None


def _sidecar(map_path: str | Path) -> dict:
    import json

    side = Path(str(map_path).replace(".nii.gz", ".json").replace(".nii", ".json"))
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _flatten(items) -> list[str]:
    if items is None:
        return []
    if isinstance(items, (str, Path)):
        return [str(items)]
    out = []
    for it in items:
        out += _flatten(it)
    return out


def roi_analysis(*, subject: str, session: str | None, output_dir: str | Path, work_dir: str | Path, t1w: str,
                 mask: str, probseg: list[str], atlas_dseg: str, atlas_table: str, atlas_name: str,
                 ref_images, maps, brain_masks=None, pv_threshold: float = 0.5, nthreads: int = 1,
                 seed: int = 0) -> str:
    """Register every reference image rigidly to the T1w, bring segmentation and atlas onto each
    map's grid, and write the participant/session ROI table -> its path.

    ``brain_masks``: the modalities' own brain masks (matched to a map by ``acq`` like the
    reference); a map's statistics use only voxels inside its mask (``estimated_voxels``).

    Also writes each reference's ``..._from-<suffix>_to-T1w_mode-image_xfm.mat`` (ITK affine:
    resamples reference-space images onto the T1w when applied forward).
    """
    import shutil

    from bids_qmri.bids.derivatives import derivative_path, ensure_within_output
    from bids_qmri.utils.atomic import atomic_path

    from . import registration as reg

    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(atlas_table, sep="\t")
    probseg = _flatten(probseg)
    refs = [(p, parse_entities(p)) for p in _flatten(ref_images)]
    own_masks = [(p, parse_entities(p)) for p in _flatten(brain_masks)]
    xfms: dict[str, str] = {}
    for k, (ref, ents) in enumerate(refs):
        out = reg.register(t1w, ref, work_dir / f"ref{k}_", kind="Rigid", nthreads=nthreads, seed=seed)
        xfms[ref] = out["fwd"][0]
        dest = derivative_path(output_dir, subject=subject, session=session, datatype="anat", suffix="xfm",
                               extension=".mat", acq=ents.get("acq"), run=ents.get("run"),
                               from_=ents["suffix"], to_="T1w", mode="image")
        with atomic_path(ensure_within_output(dest)) as tmp:
            shutil.copyfile(out["fwd"][0], tmp)
    frames = []
    cache: dict[tuple, list] = {}
    participant_id = f"sub-{subject}"
    session_id = f"ses-{session}" if session else None
    for map_path in _flatten(maps):
        ents = parse_entities(map_path)
        img = nb.load(map_path)
        if img.ndim > 3:
            LOGGER.warning("%s: 4D map, ROI statistics of its first volume only", map_path)
        ref = _match_reference(ents, refs)
        key = (ref, img.shape[:3], tuple(np.round(img.affine, 4).ravel()))
        if key not in cache:
            grid = str(map_path)
            if img.ndim > 3:
                grid = str(work_dir / f"grid{len(cache)}.nii.gz")
                nb.save(img.slicer[..., 0], grid)
            if ref is None:
                # No reference: the map is taken to be in T1w world coordinates already.
                transforms, invert = [], None
                LOGGER.warning("%s: no reference image for acq-%s; resampling by its header", map_path, ents.get("acq"))
            else:
                transforms, invert = [xfms[ref]], [True]
            def bring(src, interp):
                if not transforms:
                    return reg.apply(src, grid, [_identity(work_dir)], interpolator=interp, nthreads=nthreads).numpy()
                return reg.apply(src, grid, transforms, interpolator=interp, invert=invert, nthreads=nthreads).numpy()
            probs = {t: bring(p, "linear") for t, p in zip(("GM", "WM", "CSF"), probseg)}
            brain = bring(mask, "linear") >= 0.5
            atlas = np.rint(bring(atlas_dseg, "genericLabel")).astype(np.int64)
            cache[key] = region_masks(atlas, table, probs, brain, pv_threshold)
        values = np.asarray(img.dataobj, dtype=np.float64)
        if values.ndim > 3:
            values = values[..., 0]
        meta = _sidecar(map_path)
        own = _match_reference(ents, own_masks)
        if own is None and own_masks:
            LOGGER.warning("%s: no brain mask for acq-%s; ROI statistics over its finite values", map_path,
                           ents.get("acq"))
        valid = estimated_voxels(values, None if own is None else _mask_on_grid(own, img, work_dir, nthreads),
                                 zero_is_missing="VoxelsNotEstimated" in meta)
        frames.append(roi_table(values, cache[key], participant_id=participant_id, session_id=session_id,
                                atlas=atlas_name, suffix=ents["suffix"], method=ents.get("desc"),
                                acq=ents.get("acq"), units=meta.get("Units"), valid=valid))
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    dest = derivative_path(output_dir, subject=subject, session=session, datatype="anat", suffix="roistats",
                           extension=".tsv", atlas=atlas_name)
    merge_roistats(dest, result)
    return str(dest)


def merge_roistats(dest: Path, new: pd.DataFrame) -> Path:
    """Write ``new`` into the session's table, keeping rows of other acquisitions.

    Several ROI workflows of one session (one per acquisition) may finish at the same time, so
    the read-merge-write runs under an exclusive lock; rows with the same (suffix, method, acq)
    as a new row are replaced, so re-runs do not duplicate.
    """
    from bids_qmri.bids.derivatives import save_tsv
    from bids_qmri.utils.locks import exclusive_lock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(dest.parent / f".{dest.name}.lock"):  # removed after use
        if dest.is_file():
            old = pd.read_csv(dest, sep="\t", keep_default_na=False, na_values=["n/a"])
            for col in ("session_id", "method", "acq", "units"):
                old[col] = old[col].fillna("n/a").astype(str)
            keys = set(zip(new["suffix"], new["method"], new["acq"]))
            keep = [k not in keys for k in zip(old["suffix"], old["method"], old["acq"])]
            old = old.loc[keep].reindex(columns=COLUMNS)  # a table of an older version lacks coverage
            new = pd.concat([old, new], ignore_index=True) if len(old) else new
        new = new.sort_values(["acq", "suffix", "method", "region_index"], kind="stable").reset_index(drop=True)
        save_tsv(dest, new[COLUMNS])
    return dest


def _mask_on_grid(mask_path: str, img, work_dir: Path, nthreads: int) -> np.ndarray:
    """A modality's brain mask on a map's grid: as is when the grids agree (the usual case: the
    mask and the maps come from the same reference), else resampled by the headers."""
    mask_img = nb.load(mask_path)
    if mask_img.shape[:3] == img.shape[:3] and np.allclose(mask_img.affine, img.affine, atol=1e-4):
        return np.asarray(mask_img.dataobj).reshape(img.shape[:3]) > 0.5
    from . import registration as reg

    grid = work_dir / "mask_grid.nii.gz"
    nb.save(nb.Nifti1Image(np.zeros(img.shape[:3], np.float32), img.affine), str(grid))
    on_grid = reg.apply(mask_path, str(grid), [_identity(work_dir)], interpolator="linear", nthreads=nthreads)
    return on_grid.numpy() >= 0.5


def _identity(work_dir: Path) -> str:
    import ants

    path = work_dir / "identity.mat"
    if not path.exists():
        ants.write_transform(ants.create_ants_transform(transform_type="AffineTransform", dimension=3), str(path))
    return str(path)
