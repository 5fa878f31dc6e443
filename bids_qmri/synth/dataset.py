"""Synthetic BIDS dataset from the digital brain phantom (``bids_qmri-synth``, SPEC §2-§3).

Per participant one :class:`~bids_qmri.synth.phantom.Phantom` (tissues and parameters shared by
all sessions: test-retest); per session fresh B1/ΔB0 fields, head poses, receiver phase and
noise. Every input kind of SPEC §3 is simulated with the shared physics
(``bids_qmri.physics``) from the parameter maps resampled onto the acquisition's own grid at the
head pose of each volume, so a noise-free series re-simulated from the ground truth on that grid
equals the written data when motion is off.

Noise: complex Gaussian with the seed definition σ = 0.074/(√2·SNR) per channel for pc-bSSFP
(``physics.noise``). The other kinds use the same SNR relative to their own mean brain signal
magnitude (the seed's 0.074 is the mean brain bSSFP magnitude); magnitude images are the modulus
of the noisy complex signal (Rician). TB1TFL famp is written as the scanner does (integer
10× the achieved preparation angle, 800·B1) without noise.

MRF is simulated through a dictionary: the FISP-EPG fingerprints of a regular grid over log T1 ×
log T2 × B1 are SVD-compressed once per process (``physics.svd``) and the complex coefficients
are interpolated multilinearly per voxel (whole-brain simulation in seconds; the interpolation
error is far below the noise, tested against the direct simulation). qMT is simulated exactly per
voxel over the whole head with ``physics.qmt.hybrid_state_signal`` (each voxel's own m0s, T1,
T2f, T2s, Rx, B1 and ΔB0; ~1 ms CPU per voxel) and projected on an SVD basis computed once from a
random brain-range dictionary (the ΔB0 dependence is too sharp to interpolate a dictionary).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import CODE_URL, __version__
from ..bids.basis import read_basis_tsv, write_basis_tsv  # noqa: F401 (read_basis_tsv: re-exported)
from ..bids.derivatives import BIDS_VERSION, save_json, save_nifti, save_tsv
from ..physics import bssfp, epg, mprage, noise, qmt, relaxation, svd
from ..utils.atomic import write_text_atomic
from . import phantom as ph

LOGGER = logging.getLogger("bids_qmri.synth.dataset")

ALL_KINDS = ("bssfp", "tb1tfl", "t1w", "mrf", "qmt", "irt1", "mese")
DEFAULT_KINDS = ALL_KINDS

# Seed protocols (seconds, degrees).
BSSFP_PROTOCOL = {"tr": 0.0048, "te": 0.0024, "flip_deg": 15.0}
TB1TFL_PROTOCOL = {"prep_deg": 80.0, "flip_deg": 8.0, "tr": 14.2, "te": 0.0024}
IRT1_TIS = (0.1, 0.3, 0.6, 1.0, 1.6, 2.5)
IRT1_TR = 10.0
MESE_TES = (0.010, 0.020, 0.040, 0.080, 0.160, 0.320)  # seed 004 Table 2 preparation times
MESE_TR = 3.0
IRT1_META = {"RepetitionTime": IRT1_TR, "EchoTime": 0.01, "FlipAngle": 90}
MESE_META = {"RepetitionTime": MESE_TR, "FlipAngle": 90, "RefocusFlipAngle": 180}
SERIES_SUFFIX = {"irt1": "IRT1", "mese": "MESE"}
MRF_RANK = 10
MRF_FRAMES = 1000
QMT_RANK = 13

#: Acquisition label (``acq-<label>``) of each kind; GT on that grid uses the same label.
ACQ_LABELS = {"t1w": "mprage", "tb1tfl": "tb1tfl", "mrf": "fisp", "qmt": "hybrid",
              "irt1": "ir", "mese": "se"}
#: Voxel size of each kind relative to --resolution (T1w is the finest grid).
RES_FACTOR = {"bssfp": 1.0, "t1w": 1.0, "tb1tfl": 2.0, "mrf": 1.0, "qmt": 2.0, "irt1": 1.0,
              "mese": 1.0}
#: Sub-voxel shift of each kind's grid (fraction of its voxel), so grids do not coincide.
GRID_SHIFT = {"bssfp": 0.5, "t1w": 0.0, "tb1tfl": 0.25, "mrf": 0.3, "qmt": 0.6, "irt1": 0.4,
              "mese": 0.2}


@dataclass
class SynthOptions:
    participants: int = 2
    sessions: int = 2
    resolution: float = 2.0
    snr: float = 25.0  # math.inf: no noise
    seed: int = 0
    motion: bool = True
    npc: int = 12
    kinds: tuple[str, ...] = DEFAULT_KINDS
    anatomy: str = ph.DEFAULT_ANATOMY  # the phantom's head (phantom.ANATOMIES)

    def validate(self) -> None:
        from ..errors import UsageError

        if self.participants < 1 or self.participants > 99:
            raise UsageError(f"--participants must be between 1 and 99, got {self.participants}")
        if self.sessions < 0 or self.sessions > 99:
            raise UsageError(f"--sessions must be between 0 (no session level) and 99, got {self.sessions}")
        if not (0.5 <= self.resolution <= 8.0):
            raise UsageError(f"--resolution must be between 0.5 and 8 mm, got {self.resolution}")
        if not (self.snr > 0):
            raise UsageError(f"--snr must be positive (inf for no noise), got {self.snr}")
        if self.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {self.seed}")
        if not (3 <= self.npc <= 64):
            raise UsageError(f"--npc must be between 3 and 64 phase cycles, got {self.npc}")
        bad = [k for k in self.kinds if k not in ALL_KINDS]
        if bad or not self.kinds:
            raise UsageError(f"unknown --kinds {', '.join(bad) or '(none)'}: choose from {', '.join(ALL_KINDS)}")
        ph.check_anatomy(self.anatomy)


@dataclass
class Acquisition:
    """One simulated scan: its scanner grid, volume poses and ground-truth reference volume."""

    kind: str
    label: str
    grid: ph.Grid
    poses: list[np.ndarray]  # head mm -> scanner mm, one per volume
    reference_volume: int
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Random streams: one independent, order-free stream per (participant, session, purpose).


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def _torch_gen(seed: int, *keys: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


_PURPOSE = {name: i for i, name in enumerate(
    ("phantom", "fields", "poses", "rxphase", "bssfp", "tb1tfl", "t1w", "mrf", "qmt", "irt1",
     "mese", "demographics"))}


# --------------------------------------------------------------------------------------------
# Grids, poses, resampling


def acquisition_grid(reference: ph.Grid, voxel_mm: float, shift_fraction: float) -> ph.Grid:
    """Axis-aligned scanner grid covering the reference field of view at ``voxel_mm``."""
    lo = reference.affine[:3, 3]
    hi = lo + (np.asarray(reference.shape) - 1) * reference.zooms
    shape = tuple(int(math.floor((h - l) / voxel_mm)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = lo + shift_fraction * voxel_mm
    return ph.Grid(shape, affine)


def _random_rigid(rng: np.random.Generator, rot_sd_deg: float, trans_sd_mm: float) -> np.ndarray:
    return ph.rigid_matrix(rng.normal(0.0, rot_sd_deg, 3), rng.normal(0.0, trans_sd_mm, 3))


def make_poses(rng: np.random.Generator, session_pose: np.ndarray, n_volumes: int,
               motion: bool) -> list[np.ndarray]:
    """Scan pose (small change from the session's head position) and a slow drift per volume."""
    if not motion:
        return [np.eye(4) for _ in range(n_volumes)]
    scan = session_pose @ _random_rigid(rng, 1.0, 1.0)
    poses, drift = [], np.eye(4)
    for _ in range(n_volumes):
        poses.append(scan @ drift)
        drift = drift @ _random_rigid(rng, 0.15, 0.15)
    return poses


class MapSampler:
    """Resamples the session's head-space maps onto scanner grids (cached per grid and pose)."""

    NAMES = ("T1", "T2", "PD", "m0s", "T2s", "Rx", "B1", "B0", "GM", "WM", "CSF")

    def __init__(self, phantom: ph.Phantom, fields: ph.SessionFields):
        self.phantom = phantom
        self.maps = {**phantom.params, "B1": fields.b1, "B0": fields.b0_hz,
                     **{t: phantom.fractions[t] for t in ph.BRAIN_TISSUES}}
        self._cache: dict = {}

    def __call__(self, name: str, grid: ph.Grid, pose: np.ndarray) -> np.ndarray:
        key = (name, grid.shape, grid.affine.tobytes(), np.round(pose, 12).tobytes())
        if key not in self._cache:
            vol = ph.sample_to_grid(self.maps[name], self.phantom.grid, grid, pose, order=1)
            if name in ("T1", "T2", "PD", "m0s", "T2s", "Rx", "GM", "WM", "CSF"):
                vol = np.maximum(vol, 0.0)
            self._cache[key] = vol.astype(np.float32)
        return self._cache[key]

    def params(self, names, grid, pose) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(self(n, grid, pose).astype(np.float64)) for n in names}

    def clear(self) -> None:
        self._cache.clear()


def _group_by_pose(poses: list[np.ndarray]) -> list[tuple[np.ndarray, list[int]]]:
    groups: list[tuple[np.ndarray, list[int]]] = []
    for j, p in enumerate(poses):
        for q, members in groups:
            if np.allclose(p, q, atol=1e-12):
                members.append(j)
                break
        else:
            groups.append((p, [j]))
    return groups


# --------------------------------------------------------------------------------------------
# Noise and receiver phase


def receiver_phase(rng: np.random.Generator, grid: ph.Grid) -> torch.Tensor:
    """Smooth coil phase (scanner frame): a random constant plus low-order spatial terms."""
    phase = rng.uniform(-math.pi, math.pi) + ph._low_order_field(rng, grid, ph.HEAD_CENTRE_MM, 80.0, 1.5)
    return torch.from_numpy(np.exp(1j * phase))


def add_noise(signal: torch.Tensor, snr: float, generator: torch.Generator,
              reference: float = noise.REFERENCE_SIGNAL) -> torch.Tensor:
    """Complex noise at ``snr`` relative to ``reference`` signal level (seed definition)."""
    if math.isinf(snr):
        return signal.to(torch.complex128) if not signal.is_complex() else signal
    scale = reference / noise.REFERENCE_SIGNAL
    return noise.add_complex_noise(signal / scale, snr, generator) * scale


def _brain_reference(signal: torch.Tensor, brain: np.ndarray) -> float:
    """Mean brain magnitude (over voxels and volumes) of a noise-free signal [..., N]."""
    mag = signal.abs()
    if mag.ndim > len(brain.shape):
        mag = mag.mean(dim=-1)
    sel = torch.from_numpy(brain)
    value = float(mag[sel].mean()) if sel.any() else float(mag.mean())
    return value if value > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Dictionaries (MRF, qMT)


def _cache_dir() -> Path:
    """Where simulated dictionaries are kept between runs: $BIDS_QMRI_SYNTH_CACHE, else beside
    the model cache (``config.default_model_dir()``)."""
    import os

    from ..config import default_model_dir

    env = os.environ.get("BIDS_QMRI_SYNTH_CACHE")
    return Path(env) if env else default_model_dir().parent / "synth"


def _disk_cached(name: str, key_parts, compute) -> dict[str, torch.Tensor]:
    """``compute()`` (a dict of tensors) cached in ``_cache_dir()`` (``utils.cache.disk_cached``)."""
    from ..utils.cache import disk_cached

    return disk_cached(_cache_dir(), name, key_parts, compute)


MRF_AXES = {
    "T1": np.exp(np.linspace(np.log(0.05), np.log(6.0), 32)),
    "T2": np.exp(np.linspace(np.log(0.004), np.log(3.0), 32)),
    "B1": np.linspace(0.65, 1.35, 8),
}


@functools.lru_cache(maxsize=2)
def mrf_dictionary(n_frames: int = MRF_FRAMES, rank: int = MRF_RANK):
    """SVD-compressed FISP dictionary on a (log T1, log T2, B1) grid: axes, coefficients, basis.

    Coefficients are ``[nT1, nT2, nB1, rank]`` complex (``real_first=False``: physical phase).
    EPG with 40 states (relative error ~2e-5 against the exact simulation), cached on disk.
    """
    schedule = epg.default_fisp_schedule(n_frames)
    t1, t2, b1 = MRF_AXES.values()

    def compute():
        T1, T2, B1 = (torch.from_numpy(g.ravel()).float() for g in np.meshgrid(t1, t2, b1, indexing="ij"))
        LOGGER.info("simulating the MRF dictionary (%d fingerprints, once; cached)", T1.numel())
        sig = epg.fisp_mrf(T1, T2, B1, n_states=40, **schedule).to(torch.complex128)
        basis = svd.svd_basis(sig, rank).to(torch.complex128)
        return {"basis": basis, "coeffs": svd.compress(sig, basis, real_first=False)}

    stored = _disk_cached("mrf-dictionary", (*MRF_AXES.values(), schedule["flip_rad"], schedule["tr"],
                                             schedule["te"], schedule["ti"], rank, 40), compute)
    coeffs = stored["coeffs"].reshape(len(t1), len(t2), len(b1), rank)
    return (np.log(t1), np.log(t2), b1), coeffs, stored["basis"], schedule


#: qMT basis: SVD of a random dictionary over the ranges below (seed 003 training distributions
#: widened to span every phantom tissue: ``phantom.BOUNDS`` for T2s and Rx lie inside).
QMT_BASIS_ATOMS = 1024
QMT_BASIS_RANGES = {"m0s": (0.0, 0.3), "T1": (0.2, 5.0), "T2": (0.01, 2.5), "T2s": (6e-6, 18e-6),
                    "Rx": (5.0, 100.0), "B0": (-300.0, 300.0), "B1": (0.6, 1.4)}
#: How the qMT basis is chosen (part of its cache key): Fisher-information-keeping (issue 16).
QMT_BASIS_KIND = "fisher-m0s-T1-T2f"
#: Voxels per call of the exact qMT simulation (memory ~50 kB per voxel in float32).
QMT_CHUNK = 2048


def _qmt_signal(p: dict[str, torch.Tensor], schedule: dict, chunk: int = QMT_CHUNK) -> torch.Tensor:
    """Exact hybrid-state fingerprints ``[N, Nt]`` (complex128; simulated in float32 chunks)."""
    out = []
    n = p["T1"].shape[0]
    for lo in range(0, n, chunk):
        c = {k: v[lo:lo + chunk].float() for k, v in p.items()}
        out.append(qmt.hybrid_state_signal(c["m0s"], c["T1"], c["T2"], c["T2s"], c["Rx"], c["B0"],
                                           c["B1"], **schedule).to(torch.complex128))
        LOGGER.debug("qMT: %d / %d fingerprints", min(lo + chunk, n), n)
    return torch.cat(out) if out else torch.zeros((0, len(schedule["flip_rad"])), dtype=torch.complex128)


@functools.lru_cache(maxsize=1)
def qmt_basis(rank: int = QMT_RANK) -> tuple[torch.Tensor, dict]:
    """Rank-``rank`` basis ``[Nt, rank]`` of the synthetic dataset's qMT data and the schedule
    (``physics.qmt.default_qmt_schedule()``; ``qmt_basis_for`` builds it, for any schedule).

    Issue 16: a basis that keeps the Fisher information of m0s, T1 and T2f
    (``modalities.qmt.simulate.fisher_basis``: SVD of the atoms' signals stacked with the parts of
    their m0s/T1/T2f Jacobian columns that no nuisance parameter can mimic), rotated within its span
    to the closest of the plain SVD basis of the same atoms. Over seed 003's training distribution
    it cuts the rank-13 √CRB at SNR_max 50 of m0s, T1 and T2f by ~1.8×, 1.8× and 2× against the
    plain SVD (which keeps signal energy, not information; TRAINING.md). Atoms: a random
    brain-range dictionary (``QMT_BASIS_RANGES``), simulated once with its exact Jacobian and cached
    on disk (it depends only on the schedule)."""
    return qmt_basis_for(qmt.default_qmt_schedule(), rank)


def qmt_basis_for(schedule: dict, rank: int = QMT_RANK, *, shipped: bool = True) -> tuple[torch.Tensor, dict]:
    """``qmt_basis``'s construction for another hybrid-state train ``schedule`` (e.g. a candidate
    of ``scripts/design_qmt_schedule.py``), disk-cached by the schedule: ``(basis [Nt, rank], schedule)``.
    The shipped basis (``SHIPPED_QMT_BASIS``) is returned for the schedule it was made for, unless
    ``shipped=False`` (build it here: ``scripts/ship_qmt_basis.py``, the test that checks the file)."""
    from ..modalities.qmt.simulate import coefficient_jacobian, fisher_basis

    def compute():
        rng = np.random.default_rng(2023)
        n, r = QMT_BASIS_ATOMS, QMT_BASIS_RANGES
        p = {k: rng.uniform(*r[k], n) for k in ("m0s", "T2s", "Rx", "B0", "B1")}
        p["T1"], p["T2"] = (np.exp(rng.uniform(*np.log(r[k]), n)) for k in ("T1", "T2"))
        p["T2"] = np.minimum(p["T2"], 0.9 * p["T1"])
        LOGGER.info("simulating the qMT basis dictionary (%d fingerprints and Jacobians, once; cached)", n)
        theta = torch.from_numpy(np.stack([p[k] for k in ("m0s", "T1", "T2", "T2s", "Rx", "B0", "B1")], 1))
        sig, jac = coefficient_jacobian(theta, schedule, None)  # the full signal, float32 physics
        plain = svd.svd_basis(sig, rank).to(torch.complex128)
        return {"basis": fisher_basis(sig, jac, rank, reference=plain)}

    shipped_basis = _shipped_qmt_basis(schedule, rank) if shipped else None
    if shipped_basis is not None:
        return shipped_basis, schedule
    stored = _disk_cached("qmt-basis", list(qmt_basis_identity(schedule, rank).values()), compute)
    return stored["basis"], schedule


#: The synthetic dataset's qMT basis as computed once (``scripts/ship_qmt_basis.py``). Why shipped:
#: the basis comes from float32 physics and LAPACK, whose last bits differ between CPUs, and the
#: protocol key hashes the basis rounded to 1e-6 (``modalities.qmt.protocol.basis_hash``), so a basis
#: computed on another machine gets another key and misses the bundled nets. With the file every
#: machine writes the same basis and finds them.
SHIPPED_QMT_BASIS = "qmt/synthetic_basis.pt"


def qmt_basis_identity(schedule: dict, rank: int) -> dict:
    """What a basis built by ``qmt_basis_for`` depends on: its disk-cache key, and the record stored with
    the shipped basis and compared on load."""
    return {"rank": rank, "atoms": QMT_BASIS_ATOMS, "kind": QMT_BASIS_KIND,
            "ranges": repr(sorted(QMT_BASIS_RANGES.items())), "tr": float(schedule["tr"]),
            "inversion_dur": float(schedule.get("inversion_dur") or 0.0),
            "flip_rad": torch.as_tensor(schedule["flip_rad"], dtype=torch.float64),
            "pulse_dur": torch.as_tensor(schedule["pulse_dur"], dtype=torch.float64)}


def _shipped_qmt_basis(schedule: dict, rank: int) -> torch.Tensor | None:
    """The shipped basis if it was made for exactly this schedule, rank and atom dictionary, else None
    (the schedule's arrays compared to 1e-9, not bit for bit: they too are computed)."""
    path = resources.files("bids_qmri") / "data" / SHIPPED_QMT_BASIS
    if not path.is_file():
        return None
    with resources.as_file(path) as f:
        ship = torch.load(f, weights_only=True)
    want = qmt_basis_identity(schedule, rank)
    same = all(ship[k].shape == v.shape and torch.allclose(ship[k], v, rtol=1e-9, atol=0)
               if isinstance(v, torch.Tensor) else ship[k] == v for k, v in want.items())
    return ship["basis"] if same else None


def interpolate_coefficients(axes, table: torch.Tensor, points: list[np.ndarray]) -> torch.Tensor:
    """Multilinear interpolation of a complex table ``[*grid, R]`` at ``points`` (clamped)."""
    from scipy.interpolate import RegularGridInterpolator

    tab = table.numpy()
    pts = np.stack([np.clip(p, a[0], a[-1]) for p, a in zip(points, axes)], axis=-1)
    out = np.zeros(pts.shape[:-1] + (tab.shape[-1],), dtype=np.complex128)
    for part, fn in ((np.real, 1.0), (np.imag, 1j)):
        interp = RegularGridInterpolator(axes, part(tab), method="linear")
        out += fn * interp(pts)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Writers


def _stem(sub: str, ses: str | None) -> str:
    return f"sub-{sub}" + (f"_ses-{ses}" if ses else "")


def _dir(root: Path, sub: str, ses: str | None, datatype: str) -> Path:
    return root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / datatype


def _common_sidecar() -> dict:
    return {"MagneticFieldStrength": 3, "Manufacturer": "bids_qmri-synth (simulated)",
            "ManufacturersModelName": f"digital brain phantom, bids_qmri {__version__}"}


def _degrees(radians) -> list[float]:
    return [round(math.degrees(float(a)), 8) for a in radians]


def _save(path: Path, data, grid: ph.Grid, sidecar: dict | None) -> Path:
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    save_nifti(path, arr.astype(np.float32) if arr.dtype.kind == "f" else arr, grid.affine,
               sidecar=sidecar)
    return path


def write_dataset_files(root: Path, options: SynthOptions) -> None:
    """dataset_description.json, README, .bidsignore, participants.tsv/json."""
    save_json(root / "dataset_description.json", {
        "Name": "bids_qmri synthetic quantitative MRI dataset (digital brain phantom)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bids_qmri-synth", "bids_qmri developers"],
        "HowToAcknowledge": "Cite bids_qmri and the MNI152 2009 template (Fonov et al. 2011).",
        "GeneratedBy": [{"Name": "bids_qmri-synth", "Version": __version__, "CodeURL": CODE_URL,
                         "Description": _provenance(options)}],
    })
    ignore = resources.files("bids_qmri.data").joinpath("bidsignore_raw").read_text()
    write_text_atomic(root / ".bidsignore", ignore)
    write_text_atomic(root / "README", README_TEXT.format(provenance=_provenance(options)))
    for kind, meta in (("irt1", IRT1_META), ("mese", MESE_META)):
        if kind in options.kinds:
            save_json(root / f"acq-{ACQ_LABELS[kind]}_{SERIES_SUFFIX[kind]}.json",
                      {**_common_sidecar(), **meta})
    rng = _rng(options.seed, 0, 0, _PURPOSE["demographics"])
    rows = [{"participant_id": f"sub-{i + 1:02d}", "age": int(rng.integers(21, 63)),
             "sex": str(rng.choice(["F", "M"]))} for i in range(options.participants)]
    save_tsv(root / "participants.tsv", pd.DataFrame(rows))
    save_json(root / "participants.json", {
        "participant_id": {"Description": "Participant label (one phantom per participant)"},
        "age": {"Description": "Simulated age (no effect on the phantom)", "Units": "year"},
        "sex": {"Description": "Simulated sex (no effect on the phantom)",
                "Levels": {"F": "female", "M": "male"}},
    })


def _provenance(options: SynthOptions) -> str:
    return (f"bids_qmri-synth --participants {options.participants} --sessions {options.sessions} "
            f"--resolution {options.resolution:g} --snr {options.snr:g} --seed {options.seed} "
            f"--npc {options.npc}{'' if options.motion else ' --no-motion'} "
            f"--kinds {' '.join(options.kinds)} --anatomy {options.anatomy}")


README_TEXT = """\
Synthetic quantitative MRI dataset written by bids_qmri-synth
================================================================

Generated with: {provenance}

A digital brain phantom (a crisp GM/WM/CSF anatomy: --anatomy mni152 from the MNI152 2009
template maps in nilearn, each tissue keeping its volume; --anatomy colin27 from the Colin27 head
of Debian mricron-data classified by a Gaussian mixture on its intensities; a skull/fat/skin head
shell; random smooth deformation per participant; partial volume from the voxel size) with tissue T1, T2 and proton density
drawn per participant from Sabidussi et al. Table 1, qMT parameters, a smooth B1 field and a
susceptibility-based off-resonance field. Sessions of one participant share the tissue
parameters; B1/B0 fields, head position, receiver phase and noise are new in every session.

Input kinds (SPEC section 3): phase-cycled bSSFP (anat/*_acq-pc<N>_part-{{mag,phase}}_bSSFP),
Siemens-style TB1TFL B1 maps (fmap/*_acq-{{anat,famp}}_TB1TFL, famp = 800 x B1), MPRAGE T1w,
FISP MRF and hybrid-state qMT as SVD coefficients (*_desc-svd_part-{{real,imag}}_{{MRF,qMT}}) with
their basis (*_desc-svd_{{MRF,qMT}}basis.tsv: one row per frame, columns sv<k>_real/sv<k>_imag;
coefficients = frames x basis), inversion recovery (inv-<i>_IRT1) and multi-echo spin echo
(echo-<i>_MESE).

Ground truth (T1/T2 in s, M0 = proton density, B1 ratio, off-resonance in Hz, m0s, T2s, Rx,
tissue segmentation) is in derivatives/groundtruth/, on the phantom's reference grid and on every
acquisition's own grid and head position (acq-<label>; for series with motion, at the middle
volume).

The files bSSFP, MRF, MRFbasis, qMT and qMTbasis have no BIDS suffix yet; .bidsignore lists them:

    *_bSSFP.*
    *_MRF.*
    *_MRFbasis.*
    *_qMT.*
    *_qMTbasis.*
"""


# --------------------------------------------------------------------------------------------
# Simulation per kind


class SessionSimulator:
    """Simulates and writes all requested kinds for one participant and session."""

    def __init__(self, root: Path, options: SynthOptions, sub: str, ses: str | None,
                 p_index: int, s_index: int, phantom: ph.Phantom):
        self.root, self.opt, self.sub, self.ses = root, options, sub, ses
        self.keys = (p_index, s_index)
        self.phantom = phantom
        self.fields = ph.make_session_fields(self._rng("fields"), phantom)
        self.sampler = MapSampler(phantom, self.fields)
        pose_rng = self._rng("poses")
        self.session_pose = (_random_rigid(pose_rng, 2.0, 3.0) if options.motion else np.eye(4))
        self.acquisitions: list[Acquisition] = []

    def _rng(self, purpose: str) -> np.random.Generator:
        return _rng(self.opt.seed, *self.keys, _PURPOSE[purpose])

    def _gen(self, purpose: str) -> torch.Generator:
        return _torch_gen(self.opt.seed, *self.keys, _PURPOSE[purpose], 1)

    def _acquisition(self, kind: str, label: str, n_volumes: int) -> Acquisition:
        voxel = self.opt.resolution * RES_FACTOR[kind]
        grid = acquisition_grid(self.phantom.grid, voxel, GRID_SHIFT[kind])
        rng = _rng(self.opt.seed, *self.keys, _PURPOSE["poses"], _PURPOSE[kind] + 1)
        poses = make_poses(rng, self.session_pose, n_volumes, self.opt.motion)
        acq = Acquisition(kind, label, grid, poses, n_volumes // 2)
        self.acquisitions.append(acq)
        return acq

    def _brain(self, grid, pose) -> np.ndarray:
        s = sum(self.sampler(t, grid, pose) for t in ph.BRAIN_TISSUES)
        return s > 0.5

    def run(self, kinds) -> list[Acquisition]:
        for kind in ALL_KINDS:
            if kind in kinds:
                LOGGER.info("sub-%s%s: simulating %s", self.sub, f" ses-{self.ses}" if self.ses else "", kind)
                getattr(self, f"sim_{kind}")()
                self.sampler.clear()
        return self.acquisitions

    # -- pc-bSSFP ------------------------------------------------------------------------
    def sim_bssfp(self) -> None:
        npc = self.opt.npc
        acq = self._acquisition("bssfp", f"pc{npc}", npc)
        phi = bssfp.default_phase_increments(npc)
        out = torch.zeros(acq.grid.shape + (npc,), dtype=torch.complex128)
        for pose, members in _group_by_pose(acq.poses):
            p = self.sampler.params(("T1", "T2", "PD", "B1", "B0"), acq.grid, pose)
            s = bssfp.bssfp_signal(p["T1"], p["T2"], p["PD"], p["B1"], p["B0"],
                                   tr=BSSFP_PROTOCOL["tr"], te=BSSFP_PROTOCOL["te"],
                                   flip_rad=math.radians(BSSFP_PROTOCOL["flip_deg"]),
                                   phase_increments_rad=phi[members])
            out[..., members] = torch.nan_to_num(s)
        out = out * receiver_phase(self._rng("rxphase"), acq.grid)[..., None]
        out = add_noise(out, self.opt.snr, self._gen("bssfp"))
        d = _dir(self.root, self.sub, self.ses, "anat")
        stem = f"{_stem(self.sub, self.ses)}_acq-{acq.label}"
        side = {**_common_sidecar(), "PulseSequenceType": "phase-cycled balanced SSFP",
                "RepetitionTimeExcitation": BSSFP_PROTOCOL["tr"], "EchoTime": BSSFP_PROTOCOL["te"],
                "FlipAngle": BSSFP_PROTOCOL["flip_deg"],
                "PhaseIncrements": [round(math.degrees(float(x)), 10) for x in phi]}
        acq.files.append(_save(d / f"{stem}_part-mag_bSSFP.nii.gz", out.abs(), acq.grid, side))
        acq.files.append(_save(d / f"{stem}_part-phase_bSSFP.nii.gz", out.angle(), acq.grid,
                               {**side, "Units": "rad"}))

    # -- TB1TFL ----------------------------------------------------------------------------
    def sim_tb1tfl(self) -> None:
        acq = self._acquisition("tb1tfl", ACQ_LABELS["tb1tfl"], 1)
        pose = acq.poses[0]
        b1 = self.sampler("B1", acq.grid, pose).astype(np.float64)
        pd_ = self.sampler("PD", acq.grid, pose).astype(np.float64)
        p = TB1TFL_PROTOCOL
        # Anatomical reference: proton-density-weighted low-flip GRE (TR ≫ T1).
        anat = torch.from_numpy(pd_ * np.sin(math.radians(p["flip_deg"]) * b1))
        anat = add_noise(anat, self.opt.snr, self._gen("tb1tfl"),
                         _brain_reference(anat, self._brain(acq.grid, pose))).abs()
        famp = np.where(pd_ > 0.05, np.round(10.0 * p["prep_deg"] * b1), 0).astype(np.uint16)
        d = _dir(self.root, self.sub, self.ses, "fmap")
        stem = _stem(self.sub, self.ses)
        side = {**_common_sidecar(), "FlipAngle": p["flip_deg"], "RepetitionTime": p["tr"],
                "EchoTime": p["te"], "B1PreparationFlipAngle": p["prep_deg"],
                "IntendedFor": self._intended_for()}
        acq.files.append(_save(d / f"{stem}_acq-anat_TB1TFL.nii.gz", 1000.0 * anat, acq.grid, side))
        acq.files.append(_save(d / f"{stem}_acq-famp_TB1TFL.nii.gz", famp, acq.grid,
                               {**side, "Description": "10 x achieved preparation flip angle (deg)"}))

    def _intended_for(self) -> list[str]:
        if "bssfp" not in self.opt.kinds:
            return []
        ses = f"ses-{self.ses}/" if self.ses else ""
        stem = f"{_stem(self.sub, self.ses)}_acq-pc{self.opt.npc}"
        return [f"bids::sub-{self.sub}/{ses}anat/{stem}_part-{p}_bSSFP.nii.gz" for p in ("mag", "phase")]

    # -- MPRAGE T1w ------------------------------------------------------------------------
    def sim_t1w(self) -> None:
        acq = self._acquisition("t1w", ACQ_LABELS["t1w"], 1)
        pose = acq.poses[0]
        p = self.sampler.params(("T1", "PD", "B1"), acq.grid, pose)
        prot = mprage.default_mprage_protocol()
        s = torch.zeros(acq.grid.shape, dtype=torch.float64)
        m = p["PD"] > 1e-4
        s[m] = mprage.mprage_signal(p["T1"][m].clamp_min(1e-3), p["PD"][m], p["B1"][m], **prot)
        s = add_noise(s, self.opt.snr, self._gen("t1w"), _brain_reference(s, self._brain(acq.grid, pose)))
        d = _dir(self.root, self.sub, self.ses, "anat")
        side = {**_common_sidecar(), "PulseSequenceType": "MPRAGE",
                "InversionTime": prot["ti"], "RepetitionTimePreparation": prot["tr_prep"],
                "RepetitionTimeExcitation": prot["echo_spacing"],
                "FlipAngle": round(math.degrees(prot["flip_rad"]), 10), "EchoTime": 0.0026,
                "NumberOfReadouts": prot["n_readout"]}
        acq.files.append(_save(d / f"{_stem(self.sub, self.ses)}_acq-{acq.label}_T1w.nii.gz",
                               1000.0 * s.abs(), acq.grid, side))

    # -- IRT1 and MESE series ----------------------------------------------------------------
    def _series(self, kind, times, signal_fn, entity, meta_key) -> None:
        """A multi-file magnitude series (one 3D file per time point), motion between files."""
        acq = self._acquisition(kind, ACQ_LABELS[kind], len(times))
        out = torch.zeros(acq.grid.shape + (len(times),), dtype=torch.float64)
        for pose, members in _group_by_pose(acq.poses):
            p = self.sampler.params(("T1", "T2", "PD", "B1"), acq.grid, pose)
            m = p["PD"] > 1e-4
            sig = signal_fn({k: v[m] for k, v in p.items()}, [times[j] for j in members])
            block = torch.zeros(acq.grid.shape + (len(members),), dtype=torch.float64)
            block[m] = sig
            out[..., members] = block
        pose0 = acq.poses[acq.reference_volume]
        ref = _brain_reference(out, self._brain(acq.grid, pose0))
        noisy = add_noise(out, self.opt.snr, self._gen(kind), ref).abs()
        d = _dir(self.root, self.sub, self.ses, "anat")
        stem = f"{_stem(self.sub, self.ses)}_acq-{acq.label}"
        # Shared metadata sits in the top-level sidecar (inheritance); the time is per file.
        suffix = SERIES_SUFFIX[kind]
        for j, t in enumerate(times):
            acq.files.append(_save(d / f"{stem}_{entity}-{j + 1}_{suffix}.nii.gz",
                                   1000.0 * noisy[..., j], acq.grid, {meta_key: t}))

    def sim_irt1(self) -> None:
        def fn(p, tis):
            b = 1.0 - torch.cos(math.pi * p["B1"])  # inversion efficiency of a B1-scaled 180°
            return relaxation.inversion_recovery(p["PD"], b, p["T1"].clamp_min(1e-3), tis)

        self._series("irt1", IRT1_TIS, fn, "inv", "InversionTime")

    def sim_mese(self) -> None:
        def fn(p, tes):
            a = p["PD"] * -torch.expm1(-MESE_TR / p["T1"].clamp_min(1e-3))
            return relaxation.t2_decay(a, p["T2"].clamp_min(1e-4), tes)

        self._series("mese", MESE_TES, fn, "echo", "EchoTime")

    # -- MRF (FISP, SVD coefficients) --------------------------------------------------------
    def sim_mrf(self) -> None:
        acq = self._acquisition("mrf", ACQ_LABELS["mrf"], 1)
        pose = acq.poses[0]
        axes, table, basis, schedule = mrf_dictionary()
        p = self.sampler.params(("T1", "T2", "PD", "B1"), acq.grid, pose)
        m = (p["PD"] > 1e-4).numpy()
        pts = [np.log(p["T1"].numpy()[m].clip(1e-3)), np.log(p["T2"].numpy()[m].clip(1e-4)),
               p["B1"].numpy()[m]]
        coeffs = torch.zeros(acq.grid.shape + (basis.shape[1],), dtype=torch.complex128)
        coeffs[torch.from_numpy(m)] = interpolate_coefficients(axes, table, pts) * p["PD"][m][:, None]
        self._write_coefficients(acq, "MRF", coeffs, basis, {
            "MRFSequenceType": "FISP", "FlipAngle": _degrees(schedule["flip_rad"]),
            "RepetitionTimeExcitation": [round(float(t), 10) for t in schedule["tr"]],
            "EchoTime": schedule["te"], "InversionTime": schedule["ti"]})

    def _write_coefficients(self, acq: Acquisition, suffix: str, coeffs: torch.Tensor,
                            basis: torch.Tensor, meta: dict) -> None:
        """Receiver phase, noise, then the part-real/imag coefficient pair and the basis TSV."""
        pose = acq.poses[0]
        coeffs = coeffs * receiver_phase(self._rng("rxphase"), acq.grid)[..., None]
        # Orthonormal basis: white frame noise of σ gives white coefficient noise of σ; the
        # reference level is the RMS frame magnitude in the brain.
        ref = _brain_reference(coeffs.norm(dim=-1) / math.sqrt(basis.shape[0]),
                               self._brain(acq.grid, pose))
        coeffs = add_noise(coeffs, self.opt.snr, self._gen(acq.kind), ref)
        d = _dir(self.root, self.sub, self.ses, "anat")
        stem = f"{_stem(self.sub, self.ses)}_acq-{acq.label}_desc-svd"
        side = {**_common_sidecar(), **meta, "SVDRank": int(basis.shape[1]),
                "SVDBasisConvention": "coefficients = frames @ basis (basis TSV: rows = frames)"}
        acq.files.append(_save(d / f"{stem}_part-real_{suffix}.nii.gz", coeffs.real, acq.grid, side))
        acq.files.append(_save(d / f"{stem}_part-imag_{suffix}.nii.gz", coeffs.imag, acq.grid, side))
        acq.files.append(write_basis_tsv(d / f"{stem}_{suffix}basis.tsv", basis))

    # -- hybrid-state qMT (exact simulation, SVD coefficients) ----------------------------
    def sim_qmt(self) -> None:
        acq = self._acquisition("qmt", ACQ_LABELS["qmt"], 1)
        pose = acq.poses[0]
        basis, schedule = qmt_basis()
        p = self.sampler.params(("m0s", "T1", "T2", "T2s", "Rx", "B0", "B1", "PD"), acq.grid, pose)
        m = p["PD"] > 1e-3
        inside = {k: v[m] for k, v in p.items()}
        inside["T1"] = inside["T1"].clamp_min(1e-3)
        inside["T2"] = torch.minimum(inside["T2"].clamp_min(1e-4), inside["T1"])
        inside["T2s"] = inside["T2s"].clamp_min(1e-6)
        fingerprints = _qmt_signal(inside, schedule)
        coeffs = torch.zeros(acq.grid.shape + (basis.shape[1],), dtype=torch.complex128)
        coeffs[m] = svd.compress(fingerprints, basis, real_first=False) * inside["PD"][:, None]
        self._write_coefficients(acq, "qMT", coeffs, basis, {
            "PulseSequenceType": "hybrid-state qMT (balanced, inversion per cycle)",
            "FlipAngle": _degrees(schedule["flip_rad"]),
            "RFPulseDuration": [round(float(t), 10) for t in schedule["pulse_dur"]],
            "RepetitionTimeExcitation": schedule["tr"],
            "InversionPulseDuration": schedule.get("inversion_dur", 1e-3),
            "SemiSolidLineshape": "super-Lorentzian"})


# --------------------------------------------------------------------------------------------
# Ground truth (derivatives/groundtruth)

GT_NAME = "groundtruth"
#: suffix -> (source map, units, datatype, description)
GT_MAPS = {
    "T1map": ("T1", "s", "anat", "longitudinal relaxation time"),
    "T2map": ("T2", "s", "anat", "transverse relaxation time (free pool)"),
    "M0map": ("PD", "arbitrary", "anat", "equilibrium magnetisation = proton density (CSF ~ 1)"),
    "m0smap": ("m0s", "arbitrary", "anat", "semi-solid pool fraction m0s/(m0s + m0f)"),
    "T2smap": ("T2s", "s", "anat", "semi-solid pool T2"),
    "Rxmap": ("Rx", "1/s", "anat", "exchange rate between free and semi-solid pools"),
    "TB1map": ("B1", "ratio", "fmap", "transmit field: achieved / nominal flip angle"),
    "fieldmap": ("B0", "Hz", "fmap", "off-resonance (B0 inhomogeneity)"),
}
GT_README = """\
Ground truth of the bids_qmri-synth digital brain phantom
=========================================================

Per participant and session: T1map, T2map (s), M0map (proton density), m0smap, T2smap (s), Rxmap
(1/s) in anat/, TB1map (ratio) and fieldmap (Hz, with its magnitude = proton density) in fmap/,
the tissue segmentation (dseg: 1 GM, 2 WM, 3 CSF; label-<T>_probseg; desc-brain_mask).

Files without acq- are on the phantom's reference grid (head space). Files with acq-<label> are
on the grid of the raw acquisition with that label, at its head position (the middle volume of
series with motion); their sidecar holds the head pose and the raw Sources. The custom suffixes
m0smap, T2smap and Rxmap are listed in .bidsignore.
"""
GT_BIDSIGNORE = "*_m0smap.*\n*_T2smap.*\n*_Rxmap.*\n"


def write_groundtruth_description(gt_root: Path) -> None:
    save_json(gt_root / "dataset_description.json", {
        "Name": "bids_qmri-synth ground truth",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_qmri-synth", "Version": __version__, "CodeURL": CODE_URL}],
        "SourceDatasets": [{"URL": "bids::"}],
        "License": "CC0",
        "Authors": ["bids_qmri-synth", "bids_qmri developers"],
    })
    write_text_atomic(gt_root / "README", GT_README)
    write_text_atomic(gt_root / ".bidsignore", GT_BIDSIGNORE)
    table = resources.files("bids_qmri.data").joinpath("dseg.tsv").read_text()
    write_text_atomic(gt_root / "dseg.tsv", table)


def _segmentation(gm, wm, csf) -> tuple[np.ndarray, np.ndarray]:
    """dseg (0 background, 1 GM, 2 WM, 3 CSF: largest fraction) and brain mask (sum ≥ 0.5)."""
    brain = gm + wm + csf
    stack = np.stack([1.0 - brain, gm, wm, csf])
    return stack.argmax(axis=0).astype(np.uint8), (brain >= 0.5).astype(np.uint8)


def write_groundtruth(gt_root: Path, sub: str, ses: str | None, sim: SessionSimulator) -> list[Path]:
    """GT maps on the reference grid and on each acquisition's grid at its reference volume."""
    written = []
    phantom, fields = sim.phantom, sim.fields
    ref_maps = {**phantom.params, "B1": fields.b1, "B0": fields.b0_hz}
    targets = [(None, phantom.grid, None, ref_maps,
                {t: phantom.fractions[t] for t in ph.BRAIN_TISSUES})]
    for acq in sim.acquisitions:
        pose = acq.poses[acq.reference_volume]
        maps = {src: sim.sampler(src, acq.grid, pose) for src, *_ in GT_MAPS.values()}
        fr = {t: sim.sampler(t, acq.grid, pose) for t in ph.BRAIN_TISSUES}
        targets.append((acq, acq.grid, pose, maps, fr))
    for acq, grid, pose, maps, fr in targets:
        label = acq.label if acq else None
        extra = {"SkullStripped": False}
        if acq is not None:
            extra.update({
                "Description": f"ground truth on the {acq.kind} grid at volume {acq.reference_volume}",
                "Sources": [f"bids:raw:{f.relative_to(sim.root).as_posix()}" for f in acq.files],
                "HeadPose": np.round(pose, 10).tolist(),
                "HeadPoseDescription": "4x4 head (reference grid mm) -> scanner mm of this volume",
                "ReferenceVolume": acq.reference_volume,
            })
        base = gt_root / f"sub-{sub}" / (f"ses-{ses}" if ses else "")
        stem = _stem(sub, ses) + (f"_acq-{label}" if label else "")
        for suffix, (src, units, datatype, desc) in GT_MAPS.items():
            side = {"Units": units, **extra, "Description": desc + (
                f" ({extra['Description']})" if "Description" in extra else " (reference grid)")}
            written.append(_save(base / datatype / f"{stem}_{suffix}.nii.gz",
                                 np.asarray(maps[src], dtype=np.float32), grid, side))
        # BIDS fieldmaps need a magnitude image beside them: the proton density on that grid.
        written.append(_save(base / "fmap" / f"{stem}_magnitude.nii.gz",
                             np.asarray(maps["PD"], dtype=np.float32), grid,
                             {**extra, "Description": "proton density (magnitude for the fieldmap)"}))
        gm, wm, csf = (np.asarray(fr[t], dtype=np.float32) for t in ph.BRAIN_TISSUES)
        dseg, mask = _segmentation(gm, wm, csf)
        written.append(_save(base / "anat" / f"{stem}_dseg.nii.gz", dseg, grid, extra))
        written.append(_save(base / "anat" / f"{stem}_desc-brain_mask.nii.gz", mask, grid,
                             {**extra, "Type": "Brain"}))
        for t, vol in zip(ph.BRAIN_TISSUES, (gm, wm, csf)):
            written.append(_save(base / "anat" / f"{stem}_label-{t}_probseg.nii.gz", vol, grid, extra))
    return written


# --------------------------------------------------------------------------------------------
# Driver


def session_labels(n: int) -> list[str | None]:
    return [None] if n == 0 else [f"{k + 1:02d}" for k in range(n)]


def simulate_participant(root: Path, options: SynthOptions, p: int) -> list[str]:
    """Phantom and all sessions of participant ``p`` (0-based) into ``root``; returns the
    session names done. Independent of other participants (own random streams), so participants
    can run in parallel processes with identical results."""
    import torch

    torch.set_num_threads(1)
    sub = f"{p + 1:02d}"
    LOGGER.info("sub-%s: building the phantom at %g mm", sub, options.resolution)
    phantom = ph.make_phantom(_rng(options.seed, p, 0, _PURPOSE["phantom"]), options.resolution,
                              anatomy=options.anatomy)
    done = []
    for s, ses in enumerate(session_labels(options.sessions)):
        sim = SessionSimulator(root, options, sub, ses, p, s, phantom)
        sim.run(options.kinds)
        write_groundtruth(root / "derivatives" / GT_NAME, sub, ses, sim)
        done.append(f"sub-{sub}" + (f" ses-{ses}" if ses else ""))
    return done


def write_dataset(out_dir, options: SynthOptions, progress: bool = True, nprocs: int = 1) -> Path:
    """Write the whole dataset to ``out_dir`` (created; must not exist or be empty).

    Everything is written into a hidden temporary directory beside ``out_dir`` and renamed at the
    end, so an interrupted run leaves no half-written dataset. ``nprocs`` > 1 simulates
    participants in parallel processes (same files as serial).
    """
    import os
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from ..errors import UsageError

    options.validate()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} already exists and is not an empty directory — "
                         "choose a new output directory or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_dataset_files(tmp, options)
        write_groundtruth_description(tmp / "derivatives" / GT_NAME)
        ids = range(options.participants)
        bar = tqdm(total=options.participants, desc="bids_qmri-synth", unit="participant",
                   disable=not progress or None)
        workers = max(1, min(int(nprocs), options.participants))
        if workers == 1:
            for p in ids:
                bar.set_postfix_str(f"sub-{p + 1:02d}")
                simulate_participant(tmp, options, p)
                bar.update()
        else:
            import multiprocessing

            # spawn: a clean interpreter per worker (forking a process that has run torch is unsafe)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for _ in pool.map(simulate_participant, [tmp] * len(ids), [options] * len(ids), ids):
                    bar.update()
        bar.close()
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
