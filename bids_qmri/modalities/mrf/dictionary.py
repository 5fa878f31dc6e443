"""The MRF dictionary of a protocol: FISP-EPG fingerprints (``physics.epg.fisp_mrf``) on a grid
over log T1 × log T2 (T2 < T1) at the B1 values the data need, compressed on a temporal basis,
cached on disk (``utils.cache``) keyed by a hash of the schedule, the grid, the B1 value, the
EPG state cap and the basis.

Without a basis (frames input) the dictionary's own SVD basis is computed from its Gram matrix
``DᴴD`` accumulated slice by slice (``fitting.dictmatch.dictionary_gram``; rank by energy), then
the slices are simulated again and projected: the full frames dictionary is never held in memory.
Peak memory is about ``12 × chunk × frames × 4`` bytes of EPG work arrays plus the compressed
atoms (``fitting.dictmatch.chunk_peak_bytes``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bids_qmri.fitting import dictmatch
from bids_qmri.physics import epg, svd
from bids_qmri.utils.cache import cache_key, disk_cached

LOGGER = logging.getLogger("bids_qmri.modalities.mrf.dictionary")

#: EPG states kept per fingerprint (orders 0…K−1): the exact simulation costs ~Nt²/4 state updates
#: per atom; with a cap of 40 the default 1000-frame schedule is within ~3e-5 of it at brain T1/T2
#: and 1.3 % (max-norm) at the grid's corner T1 5 s, T2 2 s (CSF); ``truncation_error`` measures
#: it per dictionary and the sidecars record it (``EPGTruncationError``).
N_STATES = 40
CHUNK = 2048


@dataclass(frozen=True)
class DictionaryGrid:
    """Log-spaced T1 × T2 grid (T2 < T1) and the B1 values a voxel's B1 is rounded to."""

    t1_range: tuple[float, float] = (0.1, 5.0)
    t2_range: tuple[float, float] = (0.01, 2.0)
    t1_steps: int = 80
    t2_steps: int = 80
    b1_range: tuple[float, float] = (0.6, 1.4)
    b1_step: float = 0.05

    @property
    def log_t1(self) -> np.ndarray:
        return np.linspace(np.log(self.t1_range[0]), np.log(self.t1_range[1]), self.t1_steps)

    @property
    def log_t2(self) -> np.ndarray:
        return np.linspace(np.log(self.t2_range[0]), np.log(self.t2_range[1]), self.t2_steps)

    @property
    def cell(self) -> tuple[float, float]:
        """Grid spacing in log T1 and log T2."""
        return (float(np.diff(self.log_t1[:2])[0]), float(np.diff(self.log_t2[:2])[0]))

    @property
    def b1_values(self) -> np.ndarray:
        n = int(round((self.b1_range[1] - self.b1_range[0]) / self.b1_step)) + 1
        return np.round(np.linspace(self.b1_range[0], self.b1_range[1], n), 6)

    def nodes(self) -> np.ndarray:
        """``[A, 2]`` (log T1, log T2) of the atoms of one B1 slice, T1 major; T2 < T1 only."""
        lt1, lt2 = np.meshgrid(self.log_t1, self.log_t2, indexing="ij")
        keep = lt2 < lt1
        return np.stack([lt1[keep], lt2[keep]], -1)

    def b1_index(self, b1: np.ndarray) -> np.ndarray:
        """Nearest B1 grid value of each voxel (NaN / ≤ 0: 1, outside the range: the end value)."""
        b1 = np.where(np.isfinite(b1) & (b1 > 0), b1, 1.0)
        values = self.b1_values
        return np.abs(b1[:, None] - values[None, :]).argmin(1)

    def as_dict(self) -> dict:
        return {"T1Range": list(self.t1_range), "T2Range": list(self.t2_range), "T1Steps": self.t1_steps,
                "T2Steps": self.t2_steps, "Spacing": "log", "Constraint": "T2 < T1",
                "B1Range": list(self.b1_range), "B1Step": self.b1_step, "AtomsPerB1": int(len(self.nodes()))}


def simulator(schedule: dict, b1: float | torch.Tensor, n_states: int | None = N_STATES):
    """``simulate(x [n, 2] = (log T1, log T2)) -> [n, Nt]`` complex64 FISP fingerprints at ``b1``."""

    def simulate(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        b = torch.as_tensor(b1, dtype=torch.float32)
        return epg.fisp_mrf(x[:, 0].exp(), x[:, 1].exp(), b, n_states=n_states, **schedule)

    return simulate


def _key(schedule: dict, grid: DictionaryGrid, n_states) -> list:
    return [schedule["flip_rad"], schedule["tr"], schedule["te"], schedule["ti"], repr(grid), n_states]


def own_basis(schedule: dict, grid: DictionaryGrid, b1_values, cache_dir: Path, *, energy: float = 0.999,
              n_states=N_STATES, progress=None) -> tuple[torch.Tensor, float]:
    """The dictionary's SVD basis ``[Nt, R]`` (complex64) over the B1 slices in ``b1_values`` and
    the energy it keeps (rank: the smallest holding ``energy``)."""
    nodes = torch.from_numpy(grid.nodes())
    gram = None
    for b1 in b1_values:
        def compute(b1=b1):
            g = dictmatch.dictionary_gram(simulator(schedule, float(b1), n_states), nodes, chunk=CHUNK,
                                          progress=progress, desc=f"MRF dictionary SVD, B1 {b1:g}")
            return {"gram": g}

        g = disk_cached(cache_dir, "mrf-gram", _key(schedule, grid, n_states) + [float(b1)], compute)["gram"]
        gram = g if gram is None else gram + g
    basis, _, kept = svd.basis_from_gram(gram, energy=energy)
    return basis.to(torch.complex64), kept


def dictionary(schedule: dict, grid: DictionaryGrid, b1_values, basis: torch.Tensor, cache_dir: Path, *,
               n_states=N_STATES, progress=None) -> tuple[torch.Tensor, list[slice]]:
    """Compressed atoms ``[len(b1_values) × A, R]`` (complex64) and the slice of each B1 value."""
    nodes = torch.from_numpy(grid.nodes())
    basis = torch.as_tensor(basis)
    parts, slices, start = [], [], 0
    for b1 in b1_values:
        def compute(b1=b1):
            LOGGER.info("simulating the MRF dictionary at B1 %g (%d atoms; cached)", b1, len(nodes))
            atoms = dictmatch.simulate_dictionary(simulator(schedule, float(b1), n_states), nodes, basis=basis,
                                                  chunk=CHUNK, progress=progress, desc=f"MRF dictionary, B1 {b1:g}")
            return {"atoms": atoms}

        key = _key(schedule, grid, n_states) + [float(b1), torch.view_as_real(basis.to(torch.complex128))]
        atoms = disk_cached(cache_dir, "mrf-atoms", key, compute)["atoms"]
        parts.append(atoms)
        slices.append(slice(start, start + len(atoms)))
        start += len(atoms)
    return torch.cat(parts), slices


def node_index(grid: DictionaryGrid, b1_indices, slices: list[slice]) -> torch.Tensor:
    """``[T1 steps, T2 steps, B1 values]`` atom row of each grid node in the dictionary made of the
    B1 slices ``b1_indices`` (indices into ``grid.b1_values``) at ``slices``; −1 where there is none
    (T2 ≥ T1, or a B1 slice not simulated)."""
    keep = np.less.outer(grid.log_t2, grid.log_t1).T  # [T1, T2]: T2 < T1
    local = np.where(keep, np.cumsum(keep.ravel()).reshape(keep.shape) - 1, -1)
    out = np.full(keep.shape + (len(grid.b1_values),), -1, dtype=np.int64)
    for k, sl in zip(b1_indices, slices):
        out[:, :, int(k)] = np.where(local >= 0, local + sl.start, -1)
    return torch.from_numpy(out)


def dictionary_hash(schedule: dict, grid: DictionaryGrid, n_states, basis: torch.Tensor) -> str:
    """Hash of what determines the dictionary (for the sidecars)."""
    return cache_key(_key(schedule, grid, n_states) + [torch.view_as_real(torch.as_tensor(basis).to(torch.complex128))])


def truncation_error(schedule: dict, grid: DictionaryGrid, n_states=N_STATES) -> float:
    """Largest relative error (max-norm) of the state cap against the exact EPG at the grid's
    longest T1 and T2 and a short T2 (where truncation matters most), B1 = 1."""
    if n_states is None:
        return 0.0
    t1 = torch.tensor([grid.t1_range[1], grid.t1_range[1], 1.0], dtype=torch.float64)
    t2 = torch.tensor([min(grid.t2_range[1], 0.999 * grid.t1_range[1]), 0.1, 0.05], dtype=torch.float64)
    exact = epg.fisp_mrf(t1, t2, 1.0, **schedule)
    capped = epg.fisp_mrf(t1, t2, 1.0, n_states=n_states, **schedule)
    return float(((exact - capped).abs().amax(-1) / exact.abs().amax(-1)).max())
