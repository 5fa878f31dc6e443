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
    basis, _ = dataset.qmt_basis_for(schedule, dataset.QMT_RANK, shipped=False)
    out = resources.files("bids_qmri") / "data" / dataset.SHIPPED_QMT_BASIS
    with resources.as_file(out) as path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"basis": basis, **dataset.qmt_basis_identity(schedule, dataset.QMT_RANK)}, path)
        print(path, tuple(basis.shape), basis.dtype)


if __name__ == "__main__":
    main()
