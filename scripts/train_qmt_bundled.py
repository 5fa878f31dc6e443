"""Train the bundled qMT networks (qmtnet, qmtnetmse) for the synthetic dataset's schedule and basis.

    nice -n 10 python scripts/train_qmt_bundled.py SET.pt METHOD [--minutes M] [--epochs E]

``SET.pt``: a ``modalities.qmt.simulate.simulate_set`` dict (theta, coeffs, crb_unit, seconds) for
``synth.dataset.qmt_basis()``; the last 15 % are held out. Writes
``bids_qmri/models/bundled/qmt/<method>_<slug>.{safetensors,json}`` (see TRAINING.md there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bids_qmri.modalities.qmt.protocol import QMTProtocol
from bids_qmri.modalities.qmt.training import train_qmtnet
from bids_qmri.models.registry import bundled_dir, model_stem, save_model
from bids_qmri.synth.dataset import _degrees, qmt_basis


def synthetic_protocol() -> tuple[QMTProtocol, torch.Tensor]:
    basis, s = qmt_basis()
    meta = {"FlipAngle": _degrees(s["flip_rad"]), "RFPulseDuration": [round(float(t), 10) for t in s["pulse_dur"]],
            "RepetitionTimeExcitation": s["tr"], "InversionPulseDuration": s.get("inversion_dur", 1e-3)}
    return QMTProtocol.from_dict(meta, basis=basis), basis


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("set", type=Path)
    p.add_argument("method", choices=["qmtnet", "qmtnetmse"])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = torch.load(a.set, weights_only=True)
    n = len(data["theta"])
    n_val = max(32, int(0.15 * n))
    split = lambda sl: {k: (v[sl] if v.dim() else v * len(range(n)[sl]) / n) for k, v in data.items()}  # noqa: E731
    train, val = split(slice(0, n - n_val)), split(slice(n - n_val, n))
    protocol, _ = synthetic_protocol()
    net, card = train_qmtnet(a.method, protocol, train_set=train, val_set=val, max_epochs=a.epochs,
                             patience=a.epochs, max_seconds=60 * a.minutes, seed=0, progress=False)
    out = a.out or bundled_dir("qmt")
    out.mkdir(parents=True, exist_ok=True)
    stem = model_stem(a.method, protocol)
    (out / f"{stem}_history.json").write_text(json.dumps(card.pop("history"), indent=1))
    save_model(net, card, out, stem, origin="bundled: scripts/train_qmt_bundled.py")
    print(stem, json.dumps({k: card[k] for k in ("heldout_snr50", "heldout_training_snr_range")}, indent=1))
    print("epochs", card["training"]["epochs_run"], "wall_s", card["training"]["wall_s"])


if __name__ == "__main__":
    main()
