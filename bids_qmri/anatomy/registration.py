"""Registration and resampling with ANTs (antspyx), sized for small machines.

Transforms on disk are what antspyx writes:
- template <-> T1w: ITK composite transforms (HDF5, ``.h5``), written by
  ``ants.registration(..., write_composite_transform=True)``: ``Composite.h5`` maps points of
  the fixed (T1w) space into the moving (template) space, i.e. it resamples template images
  onto the T1w grid; ``InverseComposite.h5`` the other way. Both are ITK ``CompositeTransform``
  stacks (affine + SyN displacement field) and work with ``antsApplyTransforms -t <file>``
  and ``ants.apply_transforms(..., transformlist=[file])``.
- modality reference -> T1w (rigid): an ITK affine in MATLAB format (``.mat``), applied as
  ``transformlist=[mat]`` to bring reference-space images to T1w, inverted for the other way.
In nipreps naming, ``from-T1w_to-<tpl>_mode-image_xfm.h5`` is the transform that resamples a
T1w-space image into template space (our ``InverseComposite.h5``), and
``from-<tpl>_to-T1w`` the one that brings template images (atlas, priors) to the T1w.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("bids_qmri.anatomy.registration")


# ANTs runs single-threaded unless the user says otherwise (bids_qmri.utils.itk, applied at
# package import). The ``nthreads`` arguments below are the caller's budget.


def set_seed(seed: int | None) -> None:
    """Make ANTs sampling reproducible (``--random-seed`` on every registration call)."""
    import ants

    from bids_qmri.utils.seeding import ants_random_seed

    ants.config._random_seed = None if seed is None else ants_random_seed(seed)


def read(path_or_img):
    """An ANTsImage from a path, a nibabel image or an ANTsImage (float32)."""
    import ants

    if isinstance(path_or_img, (str, os.PathLike)):
        return ants.image_read(str(path_or_img), pixeltype="float")
    if hasattr(path_or_img, "affine") and hasattr(path_or_img, "dataobj"):
        import nibabel as nb

        img = nb.Nifti1Image(np.asarray(path_or_img.dataobj, dtype=np.float32), path_or_img.affine)
        return ants.from_nibabel_nifti(img)
    return path_or_img


def min_spacing(img) -> float:
    return float(min(read(img).spacing))


def schedules(spacing_mm: float) -> dict:
    """Iteration schedules by resolution: coarse inputs need fewer levels and iterations.

    The affine stage never runs at full resolution (its finest level has 0 iterations), and at
    1 mm neither does SyN (as the antspyx default); at >= 2 mm the finest SyN level is cheap.
    SyN uses mutual information (Mattes): on 2 cores it is 3-4x cheaper than cross-correlation
    and the priors it warps are refined by Atropos anyway.
    """
    if spacing_mm >= 2.0:
        return dict(
            aff_iterations=(200, 100, 0),
            aff_shrink_factors=(4, 2, 1),
            aff_smoothing_sigmas=(2, 1, 0),
            reg_iterations=(40, 20, 10),
            grad_step=0.2,
        )
    return dict(
        aff_iterations=(500, 250, 100, 0),
        aff_shrink_factors=(8, 4, 2, 1),
        aff_smoothing_sigmas=(3, 2, 1, 0),
        reg_iterations=(50, 30, 0),
        grad_step=0.2,
    )


def register(fixed, moving, outprefix: str | Path, *, kind: str = "SyN", fixed_mask=None, initial_transform=None,
             nthreads: int | None = None, seed: int | None = 0, syn_metric: str = "mattes") -> dict:
    """Register ``moving`` onto ``fixed``. ``kind``: "Rigid", "Affine", "SyN" (affine + SyN) or
    "SyNOnly" (SyN on top of ``initial_transform``, no new affine stage).
    ``syn_metric``: "CC" (same contrast) or "mattes" (mutual information, across contrasts).

    Returns ``{"fwd": [...], "inv": [...], "warped": ANTsImage}``; for SyN the lists hold one
    composite ``.h5`` each, for linear kinds one ``.mat`` (use ``whichtoinvert`` for ``inv``).
    """
    import ants

    fixed, moving = read(fixed), read(moving)
    outprefix = str(outprefix)
    Path(outprefix).parent.mkdir(parents=True, exist_ok=True)
    sched = schedules(min(fixed.spacing))
    if kind == "Rigid":
        # Rigid alone is cheap and is the final answer here: also iterate at full resolution.
        sched["aff_iterations"] = tuple(sched["aff_iterations"][:-1]) + (50,)
    set_seed(seed)
    kwargs = dict(
        outprefix=outprefix,
        aff_metric="mattes",
        aff_sampling=32,
        aff_random_sampling_rate=0.2,
        aff_iterations=sched["aff_iterations"],
        aff_shrink_factors=sched["aff_shrink_factors"],
        aff_smoothing_sigmas=sched["aff_smoothing_sigmas"],
    )
    if fixed_mask is not None:
        kwargs["mask"] = read(fixed_mask)
    if initial_transform is not None:
        kwargs["initial_transform"] = initial_transform
    if kind in ("SyN", "SyNOnly"):
        out = ants.registration(
            fixed, moving, type_of_transform=kind, syn_metric=syn_metric,
            syn_sampling=2 if syn_metric == "CC" else 32,
            reg_iterations=sched["reg_iterations"], grad_step=sched["grad_step"], flow_sigma=3,
            total_sigma=0, write_composite_transform=True, **kwargs,
        )
    elif kind in ("Rigid", "Affine"):
        out = ants.registration(fixed, moving, type_of_transform=kind, **kwargs)
    else:
        raise ValueError(f"unknown registration kind {kind!r}")
    # With composite output antspyx returns plain strings, otherwise lists of files.
    fwd, inv = out["fwdtransforms"], out["invtransforms"]
    fwd = [fwd] if isinstance(fwd, str) else list(fwd)
    inv = [inv] if isinstance(inv, str) else list(inv)
    return {"fwd": fwd, "inv": inv, "warped": out["warpedmovout"]}


def apply(moving, reference, transforms: list[str], *, interpolator: str = "linear", invert: list[bool] | None = None,
          nthreads: int | None = None):
    """Resample ``moving`` onto ``reference``'s grid through ``transforms`` -> ANTsImage."""
    import ants

    return ants.apply_transforms(
        fixed=read(reference), moving=read(moving), transformlist=[str(t) for t in transforms],
        interpolator=interpolator, whichtoinvert=invert, defaultvalue=0,
    )


def n4(image, mask=None, nthreads: int | None = None):
    """N4 bias-field correction inside a head mask (``ants.get_mask`` unless given).

    The shrink factor keeps the fitted grid near 10^4 voxels (cost is linear in it): the bias
    field is smooth (B-spline knots every ~200 mm), so a finer grid only costs time.
    """
    import math

    import ants

    img = read(image)
    shrink = max(2, min(8, math.ceil((float(np.prod(img.shape)) / 1e4) ** (1 / 3))))
    msk = read(mask) if mask is not None else ants.get_mask(img)
    return ants.n4_bias_field_correction(
        img, mask=msk, shrink_factor=shrink, convergence={"iters": [50, 50, 30], "tol": 1e-6},
    )


def to_nibabel(img):
    import ants

    return ants.to_nibabel_nifti(img)
