"""Inversion-recovery T1 and multi-echo spin-echo T2 series (SPEC §3): one 3D file per time point.

``anat/sub-X[_ses-Y][_acq-<label>]_inv-<i>_IRT1.nii.gz`` with ``InversionTime`` (s) per file;
``anat/sub-X[_ses-Y][_acq-<label>]_echo-<i>_MESE.nii.gz`` with ``EchoTime`` (s) per file. A series
is skipped, naming the file at fault, when a time is missing or not a number, looks like
milliseconds, repeats, when its indices have a gap (a file is missing), when it has too few time
points for the model, or (in a real run) when an image is unusable or differs in shape or
position from the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from bids_qmri.bids.collect import collect_series, files_cell
from bids_qmri.bids.inputs import SeriesInput
from bids_qmri.utils.cache import protocol_hash


@dataclass(frozen=True)
class SeriesKind:
    """What distinguishes the two series: BIDS suffix, index entity, time key, model size."""

    suffix: str  # "IRT1" | "MESE"
    entity: str  # "inv" | "echo"
    time_key: str  # "InversionTime" | "EchoTime"
    symbol: str  # "TI" | "TE"
    min_points: int  # more time points than free parameters
    max_time_s: float  # longer times are taken to be milliseconds


IRT1 = SeriesKind("IRT1", "inv", "InversionTime", "TI", 4, 30.0)
MESE = SeriesKind("MESE", "echo", "EchoTime", "TE", 3, 5.0)


# Sidecar key of the time points in the maps' sidecars: BIDS defines EchoTime as a number or a
# list, but InversionTime as a number only, so the list of a series' TIs gets its own key.
SIDECAR_KEY = {"InversionTime": "InversionTimes", "EchoTime": "EchoTime"}


@dataclass(frozen=True)
class SeriesProtocol:
    """The time points of a series (seconds, sorted): all the signal models depend on."""

    time_key: str
    times: tuple[float, ...]

    def key(self) -> str:
        canon = {"key": self.time_key, "times_us": [round(t * 1e6, 1) for t in self.times]}
        return protocol_hash(canon)

    def slug(self) -> str:
        return f"n{len(self.times)}_{self.key()}"

    def describe(self) -> str:
        symbol = "TI" if self.time_key == "InversionTime" else "TE"
        values = ", ".join(f"{1000 * t:g}" for t in self.times)
        return f"{len(self.times)} {symbol}s [{values}] ms"

    def as_dict(self) -> dict:
        return {SIDECAR_KEY[self.time_key]: list(self.times)}

    @classmethod
    def from_dict(cls, d: dict) -> "SeriesProtocol":
        (key,) = [k for k, side in SIDECAR_KEY.items() if side in d]
        return cls(key, tuple(float(t) for t in d[SIDECAR_KEY[key]]))


def _index(path: Path, entity: str) -> int | None:
    m = re.search(rf"_{entity}-(\d+)_", Path(path).name)
    return int(m.group(1)) if m else None


def collect(kind: SeriesKind, sess, flists: dict, layout, problems, check_content: bool) -> list[SeriesInput]:
    """Every usable series of ``kind`` in the session (see the module docstring)."""
    out = []
    for series in collect_series(kind.suffix, kind.entity, kind.time_key, flists.get(kind.suffix, []), problems,
                                 check_content):
        first = series.files[0]
        times = np.asarray(series.values)
        indices = sorted(i for i in (_index(p, kind.entity) for p in series.files) if i is not None)
        if times.max() > kind.max_time_s:
            problems.skip(series.files[int(times.argmax())],
                          f"{kind.time_key} {times.max():g} looks like milliseconds",
                          f"BIDS times are in seconds: divide the sidecar's {kind.time_key} by 1000")
            continue
        if (times <= 0).any():
            problems.skip(series.files[int(times.argmin())], f"{kind.time_key} must be positive (found {times.min():g})")
            continue
        _, unique = np.unique(np.round(times, 9), return_index=True)
        repeats = sorted(set(range(len(times))) - set(unique.tolist()))
        if repeats:
            j = repeats[0]
            earlier = next(i for i in range(j) if round(times[i], 9) == round(times[j], 9))
            problems.skip(series.files[j], f"{kind.time_key} {times[j]:g} repeats {series.files[earlier].name}'s",
                          f"every {kind.entity}-<i> file needs its own {kind.time_key}")
            continue
        if indices and indices != list(range(indices[0], indices[0] + len(indices))):
            gap = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
            problems.skip(first, f"{kind.suffix} series lacks {kind.entity}-{gap[0]} "
                          f"(found {kind.entity}-{', '.join(map(str, indices))})",
                          "add the missing file or rename the series without the gap")
            continue
        if len(times) < kind.min_points:
            problems.skip(first, f"only {len(times)} {kind.symbol}s; {kind.min_points} are needed to fit the model")
            continue
        if check_content and not _same_grid(series, problems):
            continue
        out.append(series)
    return out


def _same_grid(series: SeriesInput, problems) -> bool:
    """All files of a series share shape and position (they are one acquisition). The images
    were checked by ``collect_series``; only their headers are read here."""
    ref = nb.load(str(series.files[0]))
    for path in series.files[1:]:
        img = nb.load(str(path))
        if img.shape[:3] != ref.shape[:3]:
            problems.skip(path, f"shape {img.shape[:3]} differs from {series.files[0].name}'s {ref.shape[:3]}",
                          "all files of a series must come from one acquisition")
            return False
        if not np.allclose(img.affine, ref.affine, atol=1e-3):
            problems.skip(path, f"image position (affine) differs from {series.files[0].name}'s",
                          "all files of a series must come from one acquisition")
            return False
    return True


def protocol(series: SeriesInput) -> SeriesProtocol:
    key = "InversionTime" if series.kind == "IRT1" else "EchoTime"
    return SeriesProtocol(key, tuple(float(v) for v in series.values))


def plan_row(series: SeriesInput, sess, config) -> tuple[str, str]:
    key = "InversionTime" if series.kind == "IRT1" else "EchoTime"
    return (f"{len(series.files)} files: {files_cell(series.files)}",
            f"{key} = [{', '.join(f'{v:g}' for v in series.values)}] s")


def reference_volume(n: int) -> int:
    """0-based index of the volume the others are registered to: the middle one, which keeps
    the largest displacement of a drifting head smallest."""
    return n // 2
