"""pc-bSSFP inputs (SPEC §3): a complex 4D series stored as a part pair, last axis = phase cycles.

``anat/sub-X[_ses-Y]_acq-<label>_part-{mag,phase}_bSSFP.nii.gz`` (or ``part-{real,imag}``) with
``RepetitionTimeExcitation``, ``EchoTime``, ``FlipAngle`` and ``PhaseIncrements`` (degrees, one per
volume; the default π(2j−1)/Npc is used, and noted, when absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_qmri.bids.collect import (
    check_images,
    files_cell,
    header_volumes,
    number,
    number_list,
    part_pairs,
)

REQUIRED = ("RepetitionTimeExcitation", "EchoTime", "FlipAngle")


@dataclass
class BSSFPInput:
    """Phase-cycled bSSFP: one complex 4D series (last axis = phase cycles) as a file pair."""

    acq: str | None
    part_files: dict[str, Path]  # {"mag": p, "phase": p} or {"real": p, "imag": p}
    repetition_time: float  # s (RepetitionTimeExcitation)
    echo_time: float  # s
    flip_angle: float  # deg
    phase_increments: list[float]  # deg, one per volume
    metadata: dict = field(default_factory=dict)  # full inherited sidecar of the first part

    @property
    def n_cycles(self) -> int:
        return len(self.phase_increments)

    @property
    def files(self) -> list[Path]:
        return list(self.part_files.values())


def default_phase_increments_deg(npc: int) -> list[float]:
    """π(2j−1)/Npc in degrees, j = 1…Npc (SPEC §6), from the physics module."""
    from bids_qmri.physics.bssfp import default_phase_increments

    return [float(v) for v in np.rad2deg(default_phase_increments(npc).numpy())]


def collect(sess, flists: dict, layout, problems, check_content: bool) -> list[BSSFPInput]:
    """Every usable pc-bSSFP pair of the session (``flists``: {"bSSFP": [BIDSFile]})."""
    out = []
    for key, parts, pair, meta in part_pairs(flists.get("bSSFP", []), "bSSFP", REQUIRED, problems):
        tr, te, fa = (number(meta, k) for k in REQUIRED)
        if tr is None or te is None or fa is None:
            bad = [k for k in REQUIRED if number(meta, k) is None]
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
        increments = number_list(meta, "PhaseIncrements") if "PhaseIncrements" in meta else None
        if "PhaseIncrements" in meta and increments is None:
            problems.skip(parts[pair[0]].path, "PhaseIncrements must be a list of numbers (degrees)")
            continue
        n_vol = None
        if check_content:
            imgs = check_images({p: parts[p].path for p in pair}, problems, ndim=(4,),
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
                n_vol = header_volumes(parts[pair[0]].path)
            if n_vol is None:
                problems.skip(parts[pair[0]].path, "no PhaseIncrements and the image header is unreadable")
                continue
            increments = default_phase_increments_deg(n_vol)
            sess.notes.append(
                f"{Path(parts[pair[0]].path).name}: PhaseIncrements absent, using the default "
                f"π(2j−1)/Npc for Npc={n_vol}")
        acq = dict(key).get("acquisition")
        out.append(BSSFPInput(
            acq=acq, part_files={p: Path(parts[p].path) for p in pair}, repetition_time=tr,
            echo_time=te, flip_angle=fa, phase_increments=increments, metadata=dict(meta)))
    return out


def plan_row(item: BSSFPInput, sess, config) -> tuple[str, str]:
    from bids_qmri.bids.collect import b1_for

    inc = ", ".join(f"{v:g}" for v in item.phase_increments)
    b1 = b1_for(sess, item)
    return (files_cell(item.part_files.values()),
            f"TR={item.repetition_time * 1e3:.4g} ms TE={item.echo_time * 1e3:.4g} ms "
            f"FA={item.flip_angle:g} deg Npc={item.n_cycles} PhaseIncrements=[{inc}] deg"
            + (f"; B1 from {b1.kind}" if b1 else "; no B1 map: B1 = 1 assumed"))


def planned_outputs(item: BSSFPInput, sess, config) -> list[Path]:
    """Files ``init_bssfp_wf`` writes for this series (relative paths)."""
    from bids_qmri.bids.derivatives import derivative_path
    from bids_qmri.bids.collect import b1_for

    from . import MODALITY

    methods = tuple((config.methods or {}).get(MODALITY.name, ()))
    kw = dict(subject=sess.subject, session=sess.session, acq=item.acq)
    out = [derivative_path("", **kw, suffix="bSSFP", desc="ref"),
           derivative_path("", **kw, suffix="mask", desc="brain"),
           derivative_path("", **kw, suffix="bSSFP", extension=".tsv", desc="motion")]
    if b1_for(sess, item) is not None:
        out.append(derivative_path("", **kw, datatype="fmap", suffix="TB1map", desc="bssfp"))
    for m in methods:
        for spec in MODALITY.method(m).maps:
            out.append(derivative_path("", **kw, datatype=spec.datatype, suffix=spec.suffix, desc=m))
    if any(spec.suffix == "fieldmap" for m in methods for spec in MODALITY.method(m).maps):
        out.append(derivative_path("", **kw, datatype="fmap", suffix="magnitude"))
    return out
