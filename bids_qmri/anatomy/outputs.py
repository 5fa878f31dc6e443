"""Write the anatomical derivatives (SPEC §4) through the derivatives writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd

from bids_qmri.bids.derivatives import (
    derivative_path, ensure_within_output, save_json, save_nifti, save_tsv, sidecar_path, tissue_dseg_table,
)
from bids_qmri.utils.atomic import atomic_path
from bids_qmri.utils.hdf5 import copy_without_times

from .segmentation import TISSUES


def _copy(src: str | Path, dest: Path, sidecar: dict | None = None) -> str:
    if sidecar is not None:
        save_json(sidecar_path(dest), sidecar)
    with atomic_path(ensure_within_output(dest)) as tmp:
        if str(dest).endswith(".h5"):
            # ITK stamps every HDF5 object with its creation time: copied without the times so
            # that a --seed gives byte-identical transforms (bids_qmri.utils.hdf5).
            copy_without_times(src, tmp)
        else:
            shutil.copyfile(src, tmp)
    return str(dest)


def _nifti(src: str | Path, dest: Path, sidecar: dict, dtype=None) -> str:
    img = nb.load(src)
    data = np.asanyarray(img.dataobj)
    if dtype is not None:
        data = data.astype(dtype)
    return str(save_nifti(dest, data, img.affine, sidecar=sidecar))


def write_anat_derivatives(*, output_dir: str, subject: str, session: str | None, source: str, source_uri: str,
                           space_suffix: str, space_acq: str | None, t1w_preproc: str, seg: dict, reg: dict,
                           atlas: dict, warnings: list[str]) -> dict:
    """Write preprocessed T1w, mask, dseg (+ dseg.tsv), probsegs, transforms and the native-space
    atlas (+ its label table). ``space_suffix`` is "T1w" normally, or the suffix of the reference
    image used when no T1w exists (then ``space_acq`` is its acq label and no preproc T1w is
    written). Returns the written paths under the outputnode names."""
    ents = dict(subject=subject, session=session, datatype="anat")
    fallback = space_suffix != "T1w"
    common = {"Sources": [source_uri], "SkullStripped": False}
    if fallback:
        common["AnatomicalReference"] = f"{Path(source).name} (no T1w: template registered to this image)"
    if warnings:
        common["Warnings"] = list(warnings)
    out: dict = {}
    # Without a T1w the tissue/atlas files keep their usual names (there is no T1w to clash
    # with; their sidecars name the space); the bias-corrected reference and the transforms
    # carry the reference's acq label so they do not collide with the modality's own outputs.
    xacq = space_acq if fallback else None
    acq = None
    if fallback:
        out["t1w_preproc"] = _nifti(t1w_preproc, derivative_path(output_dir, **ents, acq=xacq, desc="preproc",
                                                                  suffix=space_suffix), dict(common))
    else:
        out["t1w_preproc"] = _nifti(t1w_preproc, derivative_path(output_dir, **ents, desc="preproc", suffix="T1w"),
                                    dict(common, Description="N4 bias-field corrected T1w (RAS+)"))
    out["t1w_mask"] = _nifti(seg["mask"], derivative_path(output_dir, **ents, acq=acq, desc="brain", suffix="mask"),
                             dict(common, Type="Brain", Description="template mask warped and refined"), np.uint8)
    seg_algo = ("ANTs Atropos, three classes with template priors (prior weight 0.5, MRF 0.1)"
                if not fallback else "template tissue priors warped by ANTs SyN (no T1w contrast to segment)")
    dseg_path = derivative_path(output_dir, **ents, acq=acq, suffix="dseg")
    out["dseg"] = _nifti(seg["dseg"], dseg_path, dict(common, SegmentationAlgorithm=seg_algo), np.uint8)
    with atomic_path(ensure_within_output(derivative_path(output_dir, **ents, acq=acq, suffix="dseg",
                                                          extension=".tsv"))) as tmp:
        shutil.copyfile(tissue_dseg_table(), tmp)
    out["probseg"] = [
        _nifti(seg[t], derivative_path(output_dir, **ents, acq=acq, label=t, suffix="probseg"),
               dict(common, SegmentationAlgorithm=seg_algo))
        for t in TISSUES
    ]
    tpl = reg["template"]
    xfm_common = {"Sources": [source_uri], "Software": "ANTs (antspyx) SyN",
                  "Format": "ITK CompositeTransform (HDF5): affine followed by a SyN displacement field",
                  "TemplateSource": reg.get("source", "")}
    out["xfm_to_template"] = _copy(reg["to_template"], derivative_path(
        output_dir, **ents, acq=xacq, from_=space_suffix, to_=tpl, mode="image", suffix="xfm", extension=".h5"),
        dict(xfm_common, FromSpace=space_suffix, ToSpace=tpl))
    out["xfm_from_template"] = _copy(reg["to_native"], derivative_path(
        output_dir, **ents, acq=xacq, from_=tpl, to_=space_suffix, mode="image", suffix="xfm", extension=".h5"),
        dict(xfm_common, FromSpace=tpl, ToSpace=space_suffix))
    name = atlas["atlas_name"]
    out["atlas_dseg"] = _nifti(atlas["atlas_dseg"], derivative_path(output_dir, **ents, acq=acq, atlas=name, suffix="dseg"),
                               dict(common, Atlas=name, AtlasDescription=atlas.get("atlas_description", ""),
                                    AtlasCitation=atlas.get("atlas_citation", ""),
                                    Description="atlas labels warped from template space (generic-label interpolation)"),
                               np.int32)
    table_dest = derivative_path(output_dir, **ents, acq=acq, atlas=name, suffix="dseg", extension=".tsv")
    save_tsv(table_dest, pd.read_csv(atlas["atlas_table"], sep="\t"))
    out["atlas_table"] = str(table_dest)
    out["atlas_name"] = name
    return out
