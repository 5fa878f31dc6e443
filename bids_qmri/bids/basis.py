"""SVD basis tables (``..._desc-svd_<kind>basis.tsv``, SPEC §3): the temporal basis that MRF or
qMT coefficients were compressed with, one row per time frame, columns ``sv<k>_real`` and
``sv<k>_imag`` (k = 01, 02, …). Coefficients are ``frames @ basis``; frames ≈ ``coeffs @ basisᴴ``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..utils.atomic import write_text_atomic

__all__ = ["read_basis_tsv", "write_basis_tsv"]

_COLUMN = re.compile(r"^sv(\d+)_(real|imag)$")


def write_basis_tsv(path: Path, basis: torch.Tensor) -> Path:
    """Write a complex basis ``[Nt, R]`` atomically."""
    b = torch.as_tensor(basis).numpy()
    cols = {}
    for k in range(b.shape[1]):
        cols[f"sv{k + 1:02d}_real"] = b[:, k].real
        cols[f"sv{k + 1:02d}_imag"] = b[:, k].imag
    text = pd.DataFrame(cols).to_csv(sep="\t", index=False, float_format="%.10g", lineterminator="\n")
    write_text_atomic(path, text)
    return Path(path)


def read_basis_tsv(path) -> torch.Tensor:
    """Complex128 ``[Nt, R]``; ``ValueError`` with a one-line reason if the table is malformed."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable basis table ({' '.join(str(exc).split())[:120]})") from exc
    ranks = sorted({int(m.group(1)) for c in df.columns if (m := _COLUMN.match(str(c)))})
    if not ranks or ranks != list(range(1, len(ranks) + 1)):
        raise ValueError(f"{path}: expected columns sv01_real, sv01_imag, sv02_real, … (one pair per singular vector)")
    missing = [f"sv{k:02d}_{p}" for k in ranks for p in ("real", "imag") if f"sv{k:02d}_{p}" not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    re_ = np.stack([pd.to_numeric(df[f"sv{k:02d}_real"], errors="coerce").to_numpy() for k in ranks], axis=1)
    im_ = np.stack([pd.to_numeric(df[f"sv{k:02d}_imag"], errors="coerce").to_numpy() for k in ranks], axis=1)
    values = re_ + 1j * im_
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"{path}: the basis table is empty or has non-numeric values")
    return torch.from_numpy(values)
