"""Standard-space templates: a T1w image, a brain mask and GM/WM/CSF priors, all offline.

Two sources, never a download:
- the MNI152 2009a symmetric template that ships inside the ``nilearn`` wheel (T1w, GM, WM at
  1 mm; the T1w is already brain-extracted, so the mask is its support and the CSF prior is the
  part of the mask that is neither GM nor WM);
- a TemplateFlow home (``$TEMPLATEFLOW_HOME``) that already holds the template. TemplateFlow
  keeps zero-byte placeholders for files it has not downloaded yet; those count as missing.
  We read the TemplateFlow layout (``tpl-<name>/tpl-<name>[_res-<r>]_<desc>_<suffix>.nii.gz``)
  directly instead of calling ``templateflow.api.get``, because ``get`` downloads what is
  missing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from bids_qmri.errors import UsageError

LOGGER = logging.getLogger("bids_qmri.anatomy.templates")

NILEARN_TEMPLATE = "MNI152NLin2009aSym"
_NILEARN_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass
class Template:
    """A template in memory: images share one grid; priors are probabilities in [0, 1]."""

    name: str
    source: str  # "nilearn" or the TemplateFlow directory
    t1w: nb.Nifti1Image
    mask: nb.Nifti1Image
    priors: dict[str, nb.Nifti1Image]  # "GM", "WM", "CSF"
    brain_only: bool = False  # the T1w has no skull/scalp (initialised with synthetic_head)

    @property
    def zooms(self) -> tuple[float, ...]:
        return tuple(float(z) for z in self.t1w.header.get_zooms()[:3])


#: Shell of the synthetic head (``synthetic_head``), mm from the template's brain mask: a dark
#: band (CSF and the skull's outer table), then a bright scalp (marrow, fat and skin together).
SYNTHETIC_HEAD_DARK_MM = 5.0
SYNTHETIC_HEAD_SCALP_MM = 12.0


def synthetic_head(tpl: Template) -> nb.Nifti1Image:
    """A T1w-like head in the template's space made from the template's own brain, for the
    initial affine when the template is brain-only.

    A brain-only template matched to a head by mutual information grows to the scalp, so the
    first affine needs a head. Rather than another subject's head (any real head would also be a
    candidate phantom anatomy: see ``bids_qmri.synth.phantom``), the head is the template's T1w
    inside its brain mask wrapped in a generic shell by distance from the mask: dark up to
    ``SYNTHETIC_HEAD_DARK_MM`` (CSF and skull), scalp up to ``SYNTHETIC_HEAD_SCALP_MM`` at the
    brain's 90th intensity percentile (fat is bright on T1w), then air; smoothed by 1 mm. It only
    initialises the brain affine that follows (``anatomy.pipeline.register_template``).
    """
    from scipy import ndimage

    t1 = tpl.t1w.get_fdata(dtype=np.float32)
    mask = tpl.mask.get_fdata(dtype=np.float32) > 0.5
    zooms = tpl.zooms
    dist = ndimage.distance_transform_edt(~mask, sampling=zooms)
    scalp = (dist > SYNTHETIC_HEAD_DARK_MM) & (dist <= SYNTHETIC_HEAD_SCALP_MM)
    head = np.where(mask, t1, 0.0) + scalp * float(np.percentile(t1[mask], 90))
    head = ndimage.gaussian_filter(head, [1.0 / z for z in zooms])
    return _as_float_image(head, tpl.t1w)


def _as_float_image(data: np.ndarray, ref: nb.spatialimages.SpatialImage) -> nb.Nifti1Image:
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), ref.affine)
    img.header.set_xyzt_units("mm")
    return img


def _nilearn_template() -> Template:
    import nilearn.datasets

    data_dir = Path(nilearn.datasets.__file__).parent / "data"
    imgs = {k: nb.load(data_dir / f) for k, f in _NILEARN_FILES.items()}
    t1 = imgs["T1w"].get_fdata(dtype=np.float32)
    # The files are scaled to 0..255; probabilities need 0..1.
    gm = np.clip(imgs["GM"].get_fdata(dtype=np.float32) / 255.0, 0, 1)
    wm = np.clip(imgs["WM"].get_fdata(dtype=np.float32) / 255.0, 0, 1)
    mask = (t1 > 0).astype(np.float32)
    # Priors live inside the brain mask (1 % of the GM mass lies outside, all below 0.5) and
    # the classes sum to at most one.
    gm, wm = gm * mask, wm * mask
    total = gm + wm
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(mask - gm - wm, 0, 1) * mask
    ref = imgs["T1w"]
    return Template(
        name=NILEARN_TEMPLATE,
        source="nilearn",
        t1w=_as_float_image(t1, ref),
        mask=_as_float_image(mask, ref),
        priors={"GM": _as_float_image(gm, ref), "WM": _as_float_image(wm, ref), "CSF": _as_float_image(csf, ref)},
        brain_only=True,
    )


def templateflow_home() -> Path | None:
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(home) if home else None


_RES_RE = re.compile(r"_res-(\d+)_")


def _find_tf(tpl_dir: Path, name: str, pattern: str) -> Path | None:
    """Finest-resolution non-empty file of the template matching ``pattern`` (after tpl-<name>)."""
    found = []
    for path in tpl_dir.glob(f"tpl-{name}*{pattern}"):
        # Zero-byte files are TemplateFlow placeholders for data that was never downloaded.
        if path.is_file() and path.stat().st_size > 0 and "_cohort-" not in path.name:
            m = _RES_RE.search(path.name)
            found.append((int(m.group(1)) if m else 0, path.name, path))
    return sorted(found)[0][2] if found else None


def _templateflow_template(name: str, home: Path) -> Template:
    tpl_dir = home / f"tpl-{name}"
    # A T1w without desc- (head or brain as the template ships it); desc-brain as a fallback.
    t1_path = None
    for path in sorted(tpl_dir.glob(f"tpl-{name}*_T1w.nii.gz")):
        if path.stat().st_size > 0 and "_desc-" not in path.name and "_cohort-" not in path.name:
            res = _RES_RE.search(path.name)
            t1_path = t1_path or path
            if res and res.group(1) == "1":
                t1_path = path
                break
    brain_only = t1_path is None
    t1_path = t1_path or _find_tf(tpl_dir, name, "_desc-brain_T1w.nii.gz")
    if t1_path is None:
        raise UsageError(
            f"--template {name}: no T1w image of tpl-{name} under TEMPLATEFLOW_HOME={home} — "
            f"fetch it beforehand (python -c \"import templateflow.api as t; t.get('{name}')\") "
            f"or use the default {NILEARN_TEMPLATE}"
        )
    res = _RES_RE.search(t1_path.name)

    def same_res(suffix: str) -> Path | None:
        if res:
            exact = tpl_dir / f"tpl-{name}_res-{res.group(1)}_{suffix}"
            if exact.is_file() and exact.stat().st_size > 0:
                return exact
        return _find_tf(tpl_dir, name, f"_{suffix}")

    t1 = nb.load(t1_path)
    priors = {}
    for label in ("GM", "WM", "CSF"):
        p = same_res(f"label-{label}_probseg.nii.gz")
        if p is None:
            raise UsageError(
                f"--template {name}: tpl-{name} under {home} has no label-{label}_probseg image; "
                f"segmentation needs GM/WM/CSF priors — fetch them or use {NILEARN_TEMPLATE}"
            )
        priors[label] = nb.load(p)
    mask_path = same_res("desc-brain_mask.nii.gz")
    t1_data = t1.get_fdata(dtype=np.float32)
    resampled = {}
    for label, img in priors.items():
        resampled[label] = _to_grid(img, t1)
    if mask_path is not None:
        mask = (_to_grid(nb.load(mask_path), t1) > 0.5).astype(np.float32)
    else:
        mask = (sum(resampled.values()) > 0.5).astype(np.float32)
    return Template(
        name=name,
        source=str(tpl_dir),
        t1w=_as_float_image(t1_data, t1),
        mask=_as_float_image(mask, t1),
        priors={k: _as_float_image(np.clip(v, 0, 1), t1) for k, v in resampled.items()},
        brain_only=brain_only,
    )


def _to_grid(img: nb.spatialimages.SpatialImage, ref: nb.spatialimages.SpatialImage) -> np.ndarray:
    """Data of ``img`` on ``ref``'s grid (linear), a no-op when the grids already match."""
    if img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine, atol=1e-4):
        return img.get_fdata(dtype=np.float32)
    from nilearn.image import resample_to_img

    return resample_to_img(img, ref, interpolation="linear", force_resample=True, copy_header=True).get_fdata(
        dtype=np.float32
    )


def load_template(name: str | None = None) -> Template:
    """The template ``name`` from TemplateFlow (if already on disk) or nilearn (MNI152 2009a).

    Raises ``UsageError`` with a one-line message when the template is not available offline.
    """
    name = name or NILEARN_TEMPLATE
    if name.startswith("tpl-"):
        name = name[4:]
    # Never let TemplateFlow reach the network (it updates its skeleton on import otherwise).
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    home = templateflow_home()
    if home is not None and (home / f"tpl-{name}").is_dir():
        try:
            return _templateflow_template(name, home)
        except UsageError:
            if name != NILEARN_TEMPLATE:
                raise
            LOGGER.warning("tpl-%s under %s is incomplete; using the copy bundled with nilearn", name, home)
    if name == NILEARN_TEMPLATE:
        return _nilearn_template()
    where = f"TEMPLATEFLOW_HOME={home}" if home else "TEMPLATEFLOW_HOME (not set)"
    raise UsageError(
        f"--template {name}: not found in {where} and never downloaded at run time — "
        f"pre-fetch it into TEMPLATEFLOW_HOME or use the default {NILEARN_TEMPLATE}"
    )


def check_template(name: str | None) -> str:
    """Fail fast (``UsageError``, one line) when ``--template`` is not available offline;
    returns the template name. Cheap: looks for files, loads no image."""
    name = (name or NILEARN_TEMPLATE).removeprefix("tpl-")
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    home = templateflow_home()
    if home is not None and (home / f"tpl-{name}").is_dir():
        tdir = home / f"tpl-{name}"
        has_t1 = any(p.stat().st_size > 0 for p in tdir.glob(f"tpl-{name}*_T1w.nii.gz"))
        has_priors = all(any(p.stat().st_size > 0 for p in tdir.glob(f"tpl-{name}*_label-{t}_probseg.nii.gz"))
                         for t in ("GM", "WM", "CSF"))
        if has_t1 and has_priors:
            return name
    if name == NILEARN_TEMPLATE:
        return name
    where = f"TEMPLATEFLOW_HOME={home}" if home else "TEMPLATEFLOW_HOME (not set)"
    raise UsageError(
        f"--template {name}: T1w and GM/WM/CSF probseg not found in {where}, and nothing is downloaded at "
        f"run time — pre-fetch tpl-{name} into TEMPLATEFLOW_HOME or use the default {NILEARN_TEMPLATE}"
    )

