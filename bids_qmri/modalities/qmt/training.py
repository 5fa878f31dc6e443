"""Training the qMT networks (seed 003 §2.6) with the generic trainer (``training.loop``).

Every epoch (every batch) draws a fresh complex M0 (|M0| ~ U[0.1, 1], phase ~ U[0, 2π)) and
fresh complex Gaussian noise (σ = 0.01 per real channel, so SNR_max = |M0|/σ ∈ [10, 100]) on the
cached noise-free coefficients; the inputs are ``net.features`` (unit ℓ2). Both losses see the
net's parameterisation (m0s, log T1, log T2f by default, ``LOG_OUTPUTS``). ``loss="crb"``: each
squared error divided by the sample's Cramér–Rao bound at its M0 and σ (``crb_unit·σ²/|M0|²``,
``simulate``; ``CRB/θ²`` for a log: the CRB of log θ); ``loss="mse"``: the squared error in units
of the training-set standard deviation (so m0s, T1 and T2f weigh alike; seed 003 does not say how
its MSE was scaled). Both: Adam, batch 512, learning rate 0.01 halved every 40 epochs (seed 003),
the same architecture and initialisation. The validation loss is the training loss on held-out
samples with one fixed noise draw; the card also records the normalised CRB loss of θ (the seed's
metric) per parameter on held-out samples at SNR_max 50, and their mean biases.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from bids_qmri.training.loop import LOSSES, LoopSettings, train_loop, training_record

from . import simulate
from .net import OUTPUTS, ResidualMLP, features

LOGGER = logging.getLogger("bids_qmri.modalities.qmt.training")

METHOD_LOSS = {"qmtnet": "crb", "qmtnetmse": "mse"}
#: outputs the networks estimate as exp(·) (``net.ResidualMLP``; TRAINING.md: the pilot that chose it)
LOG_OUTPUTS = ("T1", "T2f")
#: indices of the network outputs in ``simulate.PARAMETERS``
OUT_INDEX = [simulate.PARAMETERS.index(k) for k in OUTPUTS]


def draw_m0(n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = simulate.M0_ABS_RANGE
    mag = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.polar(mag, phase)


def noisy_batch(data: dict, idx: torch.Tensor, gen: torch.Generator, *, sigma: float = simulate.NOISE_SIGMA,
                m0: torch.Tensor | None = None):
    """``(features, targets [n, 3], crb [n, 3])`` for samples ``idx`` with fresh M0 and noise."""
    m0 = draw_m0(len(idx), gen) if m0 is None else m0
    c = data["coeffs"][idx].to(torch.complex128) * m0[:, None]
    noise = torch.complex(torch.randn(c.shape, generator=gen, dtype=torch.float64),
                          torch.randn(c.shape, generator=gen, dtype=torch.float64))
    x = features(c + sigma * noise)
    target = data["theta"][idx][:, OUT_INDEX].float()
    crb = (data["crb_unit"][idx][:, OUT_INDEX] * (sigma**2 / m0.abs() ** 2)[:, None]).float()
    return x, target, crb


def parameterised_targets(net: ResidualMLP, y: torch.Tensor, crb: torch.Tensor):
    """Targets and their CRBs in the net's training parameterisation: for a log output ``log θ``
    and ``CRB/θ²`` (the CRB of ``log θ``: a CRB transforms with the squared derivative), so the
    CRB-weighted loss keeps its meaning (an efficient unbiased estimator of ``log θ`` scores 1)."""
    is_log = net.is_log.to(y.device)
    return torch.where(is_log, y.clamp_min(1e-30).log(), y), torch.where(is_log, crb / y.clamp_min(1e-30) ** 2, crb)


def _loss_fn(name: str, sd: torch.Tensor):
    base = LOSSES[name]

    def loss(net, batch):
        x, y, crb = batch
        u, crb_u = parameterised_targets(net, y, crb)
        return base(net.parameterised(x) / sd, u / sd, crb_u / sd**2)

    return loss


def evaluate(net, data: dict, *, snr_max: float | None = 50.0, seed: int = 1) -> dict:
    """Held-out numbers: normalised CRB loss and mean bias per output, one noise draw per sample
    (at ``SNR_max = |M0|/σ = snr_max`` with a random phase, or the training M0 range if None)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data["theta"])
    m0 = None
    if snr_max is not None:
        m0 = torch.polar(torch.full((n,), snr_max * simulate.NOISE_SIGMA, dtype=torch.float64),
                         2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64))
    x, y, crb = noisy_batch(data, torch.arange(n), gen, m0=m0)
    with torch.no_grad():
        pred = net(x)
    err = (pred - y).double()
    norm = err**2 / crb.double()
    return {"normalised_crb_loss": float(norm.mean()),
            **{f"normalised_crb_loss_{k}": float(norm[:, i].mean()) for i, k in enumerate(OUTPUTS)},
            **{f"mean_bias_{k}": float(err[:, i].mean()) for i, k in enumerate(OUTPUTS)},
            **{f"mean_abs_error_{k}": float(err[:, i].abs().mean()) for i, k in enumerate(OUTPUTS)}}


def train_qmtnet(method: str, protocol, basis: torch.Tensor | None = None, *, train_set: dict | None = None,
                 val_set: dict | None = None, n_train: int = 4096, n_val: int = 512, max_epochs: int = 400,
                 patience: int = 400, batch_size: int = 512, lr: float = 0.01, lr_step: int = 40,
                 lr_schedule: str = "step", width: int = 128, n_blocks: int = 6,
                 log_outputs: tuple[str, ...] = LOG_OUTPUTS, seed: int = 0, max_seconds: float | None = None,
                 progress=None, epoch_callback=None, cache_dir=None,
                 init_from=None, widen: dict | None = None, keep: str = "best") -> tuple[ResidualMLP, dict]:
    """Train ``qmtnet`` (CRB loss) or ``qmtnetmse`` (MSE) -> ``(net, card)``; the sets are simulated
    for ``protocol``'s schedule and ``basis`` unless given (``simulate.simulate_set`` dicts), and
    kept in ``cache_dir`` (``simulate.cached_set``) when one is given. ``init_from``: a saved
    network (``.safetensors`` with its card) of the same method and architecture to continue from
    (fine-tuning): its weights and output statistics are kept (they belong together), so the loss
    units are the start's; the card records it (``training.init_from``: file, sha256, its own
    training record, so a chain of continuations stays whole). ``widen``: draw a simulated training set
    from ``simulate.widened_distributions(widen)`` (issue 16; the validation set stays on seed 003's
    distributions, the evaluation distribution); given sets carry their own ``widen`` record. The card's
    ``training_distributions.widen`` lists the factors and how many training samples each part had.
    ``keep``: the weights returned, lowest validation loss (``"best"``) or the final epoch (``"last"``)."""
    if method not in METHOD_LOSS:
        raise ValueError(f"unknown qMT network {method!r}; use one of {', '.join(METHOD_LOSS)}")
    widen = simulate.check_widen(widen)
    if widen and train_set is not None:
        raise ValueError("widen applies to a simulated training set; a given set records its own widening")
    start = _load_start(init_from, method) if init_from is not None else None
    loss_name = METHOD_LOSS[method]
    t0, cpu0 = time.perf_counter(), time.process_time()
    schedule = protocol.schedule()
    def make(n, s, w=None):
        if cache_dir is not None:
            return simulate.cached_set(cache_dir, n, schedule, basis, seed=s, widen=w)
        return simulate.simulate_set(n, schedule, basis, seed=s, widen=w)

    if train_set is None:
        train_set = make(n_train, seed, widen)
    if val_set is None:
        val_set = make(n_val, seed + 10_000)
    sim_s = float(train_set["seconds"]) + float(val_set["seconds"])
    sim_cpu_s = sum(float(d.get("cpu_seconds", d["seconds"])) for d in (train_set, val_set))
    n_train, n_val = len(train_set["theta"]), len(val_set["theta"])
    gen = torch.Generator().manual_seed(int(seed))
    targets = train_set["theta"][:, OUT_INDEX].float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = ResidualMLP(2 * train_set["coeffs"].shape[1] - 1, OUTPUTS, width=width, n_blocks=n_blocks,
                          log_outputs=log_outputs)
    net.set_output_stats(targets)
    init = None
    if start is not None:
        start_net, start_card = start
        if start_net.config() != net.config():
            raise ValueError(f"{init_from}: a ResidualMLP {start_net.config()} cannot initialise {method} "
                             f"{net.config()} - pick a network of the same basis rank, width and outputs")
        net.load_state_dict(start_net.state_dict())  # weights and the output statistics they were trained with
        from bids_qmri.models.registry import init_record

        init = init_record(init_from, start_card)
    sd = net.out_sd.clone()  # the losses' units: the SDs of the (log) targets
    loss = _loss_fn(loss_name, sd)
    val = noisy_batch(val_set, torch.arange(n_val), torch.Generator().manual_seed(int(seed) + 1))
    settings = LoopSettings(max_epochs=max_epochs, patience=patience, batch_size=batch_size, lr=lr,
                            lr_schedule=lr_schedule, lr_step=lr_step, lr_gamma=0.5, max_seconds=max_seconds, keep=keep,
                            progress=progress, desc=f"{method} ({loss_name})")
    history_crb = []

    def callback(epoch, model, val_loss):
        with torch.no_grad():
            x, y, crb = val
            history_crb.append(float(((model(x) - y) ** 2 / crb).mean()))
        if epoch_callback is not None:
            epoch_callback(epoch, model, val_loss)

    result = train_loop(net, n_train=n_train, batch=lambda idx: noisy_batch(train_set, idx, gen), loss=loss,
                        validate=lambda m: loss(m, val), settings=settings, generator=gen,
                        epoch_callback=callback, log=LOGGER)
    for row, c in zip(result.history, history_crb):
        row["val_normalised_crb_loss"] = c
    training = training_record(settings, result, n_train=n_train, n_val=n_val, simulation_s=sim_s,
                               wall_s=time.perf_counter() - t0)
    if init is not None:
        training["init_from"] = init
    card = {
        "name": f"bids_qmri-qmt-{method}-{protocol.key()}",
        "modality": "qmt", "method": method, "loss": loss_name,
        "architecture": {"class": "ResidualMLP", "fully_connected_layers": net.n_layers, "width": width,
                         "residual_blocks": n_blocks, "normalisation": "GroupNorm(8)", "activation": "ReLU",
                         "inputs": "unit-norm SVD coefficients, first made real: [Re c_1..c_R, Im c_2..c_R]",
                         "outputs": list(OUTPUTS), "output_units": ["fraction", "s", "s"],
                         "log_outputs": list(net.log_outputs)},
        "protocol": protocol.as_dict(), "protocol_key": protocol.key(),
        "training_distributions": {k: {"mean": v[0], "sd": v[1], "truncated_to": [v[2], v[3]]}
                                   for k, v in simulate.DISTRIBUTIONS.items()}
        | {"B0": "uniform on [-1/TR, 1/TR] Hz", "M0": "|M0| ~ U[0.1, 1], phase ~ U[0, 2pi), redrawn every batch",
           "noise": f"complex Gaussian, sigma {simulate.NOISE_SIGMA} per real channel, redrawn every batch",
           "widen": widen_record(train_set)},
        "simulation_s_per_sample": sim_s / max(1, n_train + n_val),
        "heldout_snr50": evaluate(net, val_set, snr_max=50.0, seed=int(seed) + 2),
        "heldout_training_snr_range": evaluate(net, val_set, snr_max=None, seed=int(seed) + 3),
        "training": training,
        "validation_loss": result.best_loss,
        "cpu_s": {"simulation": round(sim_cpu_s, 1), "training": round(time.process_time() - cpu0, 1),
                  "note": "this process's CPU time (simulation: as recorded with the set)"},
        "history": result.history,
    }
    return net, card


def widen_record(data: dict) -> list[dict]:
    """``[{"factors": {name: factor}, "samples": n, "distributions": {name: [mean, sd, low, high]}}]``: how
    the training samples were drawn (``simulate.widened_distributions``; factors ``{}`` = seed 003's). ``data
    ["widen"]``: ``[n, 7]`` per sample, or one ``[7]`` row for the whole set; absent = seed 003's."""
    n = len(data["theta"])
    w = data.get("widen")
    w = torch.ones(n, len(simulate.PARAMETERS), dtype=torch.float64) if w is None else torch.as_tensor(w)
    rows, counts = torch.unique(w.reshape(-1, len(simulate.PARAMETERS)).expand(n, -1), dim=0, return_counts=True)
    out = []
    for row, count in zip(rows.tolist(), counts.tolist()):
        factors = {k: f for k, f in zip(simulate.PARAMETERS, row) if f != 1.0}
        dist = simulate.widened_distributions(factors)
        out.append({"factors": factors, "samples": int(count), "distributions": {k: list(dist[k]) for k in factors}})
    return out


def _load_start(path, method: str):
    """``(net, card)`` of the network ``init_from`` names (``registry.load_model``: its checksum is
    checked against its card); refuses another kind of network or the other loss's twin."""
    from bids_qmri.models.registry import load_model

    net, card = load_model(path)
    if not isinstance(net, ResidualMLP) or card.get("modality") != "qmt":
        raise ValueError(f"{path}: not a qMT network ({type(net).__name__}) - pick a qmtnet/qmtnetmse .safetensors")
    if card.get("method") != method:
        raise ValueError(f"{path}: a {card.get('method')} network cannot initialise {method} - pick a {method} "
                         "file (the two nets differ in their loss only)")
    return net, card
