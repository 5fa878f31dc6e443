"""Write ``bids_qmri/data/qmt/synthetic_basis.pt``: the synthetic dataset's qMT basis (``qmt_basis()``
for ``physics.qmt.default_qmt_schedule()``), computed on this machine, with the schedule, rank and atom
dictionary it belongs to. Run it only when the default schedule or the basis construction changes,
and re-key the bundled qMT nets (their protocol key hashes this basis). See ``synth.dataset.SHIPPED_QMT_BASIS``.

    python scripts/ship_qmt_basis.py
"""

from __future__ import annotations

from importlib import resources

import torch

from bids_qmri.physics import qmt
from bids_qmri.synth import dataset


def main() -> None:
    schedule = qmt.default_qmt_schedule()
    out = resources.files("bids_qmri") / "data" / dataset.SHIPPED_QMT_BASIS
    with resources.as_file(out) as path:
        if path.exists():
            path.unlink()  # compute, do not load the old file
        basis, _ = dataset.qmt_basis_for(schedule, dataset.QMT_RANK)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"basis": basis, "rank": dataset.QMT_RANK, "atoms": dataset.QMT_BASIS_ATOMS,
                    "kind": dataset.QMT_BASIS_KIND, "ranges": repr(sorted(dataset.QMT_BASIS_RANGES.items())),
                    "tr": float(schedule["tr"]), "inversion_dur": float(schedule["inversion_dur"]),
                    "flip_rad": torch.as_tensor(schedule["flip_rad"], dtype=torch.float64),
                    "pulse_dur": torch.as_tensor(schedule["pulse_dur"], dtype=torch.float64)}, path)
        print(path, tuple(basis.shape), basis.dtype)


if __name__ == "__main__":
    main()
