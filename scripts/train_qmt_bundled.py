"""Train the bundled qMT networks (qmtnet, qmtnetmse) for the synthetic dataset's schedule and basis.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/train_qmt_bundled.py METHOD SET.pt [SET.pt ...] \
        [--val-samples N] [--epochs E] [--lr LR] [--lr-step S] [--lr-schedule step|cosine] [--minutes M] \
        [--init-from WEIGHTS] [--keep best|last] [--out DIR]

``SET.pt``: ``modalities.qmt.simulate.simulate_set`` parts (``scripts/simulate_qmt_set.py``) for
``synth.dataset.qmt_basis()``, concatenated; the last ``--val-samples`` (default 15 %) are held out.
Calls ``training.train_qmtnet`` as ``bids_qmri-train --modality qmt --qmt-train-set`` does, and
writes ``<out>/<method>_<slug>.{safetensors,json}`` and ``_history.json`` (default: the bundled
folder; see TRAINING.md there). ``--init-from``: continue (fine-tune) from a saved network of the same
method (e.g. the bundled one), recorded in the card as ``training.init_from`` (file, sha256).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bids_qmri.modalities.qmt.cli import _read_sets
from bids_qmri.modalities.qmt.protocol import synthetic_protocol
from bids_qmri.modalities.qmt.training import train_qmtnet
from bids_qmri.models.registry import bundled_dir, model_stem, save_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("method", choices=["qmtnet", "qmtnetmse"])
    p.add_argument("sets", type=Path, nargs="+")
    p.add_argument("--val-samples", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-step", type=int, default=40)
    p.add_argument("--lr-schedule", default="step", choices=["step", "cosine"])
    p.add_argument("--init-from", type=Path, default=None, metavar="WEIGHTS",
                   help="continue from this .safetensors network of the same method (card beside it)")
    p.add_argument("--keep", default="best", choices=["best", "last"],
                   help="weights kept: lowest validation loss (default) or the final epoch")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--print-every", type=int, default=10, help="print the validation loss every N epochs")
    a = p.parse_args()
    torch.set_num_threads(1)
    cpu0 = time.process_time()

    def report(epoch, model, val_loss):
        if epoch % a.print_every == 0:
            print(f"epoch {epoch}: validation loss {val_loss:.4f}, {time.process_time() - cpu0:.0f} CPU-s", flush=True)

    train, val = _read_sets(a.sets, a.val_samples, p)
    protocol, basis = synthetic_protocol()
    net, card = train_qmtnet(a.method, protocol, basis, train_set=train, val_set=val, max_epochs=a.epochs,
                             patience=a.epochs, lr=a.lr, lr_step=a.lr_step,
                             lr_schedule=a.lr_schedule, init_from=a.init_from, keep=a.keep, epoch_callback=report,
                             max_seconds=None if a.minutes is None else 60 * a.minutes, seed=0, progress=False)
    out = a.out or bundled_dir("qmt")
    out.mkdir(parents=True, exist_ok=True)
    stem = model_stem(a.method, protocol)
    (out / f"{stem}_history.json").write_text(json.dumps(card.pop("history"), indent=1))
    save_model(net, card, out, stem, origin="bundled: scripts/train_qmt_bundled.py")
    print(stem, json.dumps({k: card[k] for k in ("heldout_snr50", "heldout_training_snr_range", "cpu_s")}, indent=1))
    print("epochs", card["training"]["epochs_run"], "wall_s", card["training"]["wall_s"])


if __name__ == "__main__":
    main()
