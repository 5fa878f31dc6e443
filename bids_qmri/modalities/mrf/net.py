"""``mrfnet``: an MLP on the compressed fingerprint → log T1, log T2 and the log norm of the noise-free
coefficients (so M0 = ‖c‖ / norm), trained on the fly for the data's schedule and SVD basis with
the generic trainer (``training.loop``) and cached by the model registry (seed 002 "MLP regressor
on compressed fingerprints"; seed 003 CRB-weighted loss).

Inputs: the coefficients made unit-norm with the first coefficient real and non-negative
(``physics.svd`` convention), as ``[Re c_1..c_R, Im c_2..c_R]``, plus B1. Training samples: log T1
uniform on 0.1–5 s, log T2 uniform on 0.01–2 s with T2 < T1, B1 uniform on 0.6–1.4, fingerprints
simulated with ``fisp_mrf`` (the dictionary's state cap), complex Gaussian noise drawn afresh for
every batch at an SNR uniform in ``snr_range`` (σ = RMS|frames|/(√2·SNR), white on an orthonormal
basis). ``loss="crb"``: each squared error of (log T1, log T2) divided by its Cramér–Rao bound at
the sample's noise level (Fisher information of (log T1, log T2, Re M0, Im M0) from the
Jacobian of the compressed EPG signal, exact by default: ``physics.epg.fisp_mrf_jacobian``, the
forward mode written out through the EPG recursion, which returns the training fingerprints with
their derivatives in one pass; AD through ``physics.crb`` and forward differences remain as options of
``_unit_sigma_crb``, and the card says which was used); the card records the normalised CRB
loss (1 = efficient) on held-out noisy samples for either loss.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from bids_qmri.nets.mlp import ScaledMLP
from bids_qmri.physics import epg
from bids_qmri.training.loop import LOSSES, LoopSettings, train_loop, training_record

from . import dictionary as mrfdict
from .protocol import MRFProtocol
from bids_qmri.utils.cache import protocol_hash

LOGGER = logging.getLogger("bids_qmri.modalities.mrf.net")

LOG_RANGES = {"logT1": (math.log(0.1), math.log(5.0)), "logT2": (math.log(0.01), math.log(2.0))}
B1_RANGE = (0.6, 1.4)


def basis_key(basis: torch.Tensor) -> str:
    b = torch.view_as_real(torch.as_tensor(basis).to(torch.complex64)).numpy()
    return hashlib.sha256(np.ascontiguousarray(np.round(b, 6)).tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class NetProtocol:
    """What an mrfnet model depends on: the schedule, the basis it reads and its loss."""

    protocol: MRFProtocol
    basis_key: str
    loss: str

    def key(self) -> str:
        canon = {"schedule": self.protocol.key(), "basis": self.basis_key, "loss": self.loss}
        return protocol_hash(canon)

    def slug(self) -> str:
        return f"{self.loss}_{self.key()}"

    def describe(self) -> str:
        return f"{self.protocol.describe()}, basis {self.basis_key}, {self.loss} loss"

    def as_dict(self) -> dict:
        return {**self.protocol.as_dict(), "SVDBasisHash": self.basis_key, "TrainingLoss": self.loss}


def features(coeffs: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """``[N, 2R]`` network inputs from coefficients ``[N, R]`` and B1 ``[N]``."""
    c = torch.as_tensor(coeffs).to(torch.complex64)
    norm = torch.linalg.vector_norm(c, dim=-1, keepdim=True).clamp_min(1e-30)
    c = c / norm
    first = c[:, :1]
    c = c * torch.where(first.abs() > 0, first.conj() / first.abs().clamp_min(1e-30), torch.ones_like(first))
    return torch.cat([c.real, c.imag[:, 1:], torch.as_tensor(b1, dtype=torch.float32)[:, None]], 1)


def _sample(n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` (log T1, log T2, B1) with T2 < T1 (rejection)."""
    out = []
    while sum(len(o) for o in out) < n:
        u = torch.rand(2 * n, 3, generator=gen, dtype=torch.float64)
        x = torch.stack([LOG_RANGES["logT1"][0] + u[:, 0] * (LOG_RANGES["logT1"][1] - LOG_RANGES["logT1"][0]),
                         LOG_RANGES["logT2"][0] + u[:, 1] * (LOG_RANGES["logT2"][1] - LOG_RANGES["logT2"][0]),
                         B1_RANGE[0] + u[:, 2] * (B1_RANGE[1] - B1_RANGE[0])], 1)
        out.append(x[x[:, 1] < x[:, 0]])
    return torch.cat(out)[:n]


def _simulate(schedule, basis, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    out = []
    for lo in range(0, len(x), chunk):
        xs = x[lo:lo + chunk]
        out.append(mrfdict.simulator(schedule, xs[:, 2].float())(xs[:, :2]) @ basis)
    return torch.cat(out)


def _unit_sigma_crb(schedule, basis, x: torch.Tensor, clean: torch.Tensor | None = None, *,
                    jacobian: str = "exact", step: float = 1e-3, chunk: int = 2048,
                    return_clean: bool = False):
    """CRB of (log T1, log T2) at σ = 1 per channel and M0 = 1 (complex, unknown): ``diag(F⁻¹)`` of
    the Fisher information ``F = Re(JᴴJ)`` with ``J = [∂c/∂log T1, ∂c/∂log T2, c, i·c]`` (B1 fixed
    per sample).

    ``jacobian="exact"`` (the training default): the first two columns from
    ``physics.epg.fisp_mrf_jacobian`` (forward mode written out through the EPG recursion; exact, and
    it returns the fingerprints too: with ``return_clean=True`` the result is ``(crb, clean)`` at
    about the cost of the value plus two forward differences). ``"ad"``: forward-mode AD through
    ``physics.crb.jacobian`` (``torch.func.jvp``, one tangent per parameter; same values, 5–8× the
    time on CPU: the EPG is a long loop of small ops, each carrying the dual overhead).
    ``"differences"``: forward differences (``step`` in log units, two extra simulations).
    ``tests/test_mrf.py`` checks all three against an independent float64 Fisher calculation.
    """
    from bids_qmri.physics import crb

    basis = torch.as_tensor(basis).to(torch.complex64)
    if jacobian not in ("differences", "exact", "ad"):
        raise ValueError(f"jacobian must be 'exact', 'ad' or 'differences', got {jacobian!r}")
    out, cleans = [], []
    for lo in range(0, len(x), chunk):
        xs = x[lo:lo + chunk]
        b1 = xs[:, 2].float()
        if jacobian == "exact":
            t1, t2 = xs[:, 0].float().exp(), xs[:, 1].float().exp()
            sig, dsig = epg.fisp_mrf_jacobian(t1, t2, b1, n_states=mrfdict.N_STATES, **schedule)
            c = sig @ basis if clean is None else clean[lo:lo + chunk]
            # ∂/∂log T = T ∂/∂T, then onto the basis: [n, Nt, 2] -> [n, R, 2]
            jac = (dsig * torch.stack([t1, t2], -1)[:, None, :]).mT @ basis
            jac = jac.mT
        else:
            c = _simulate(schedule, basis, xs) if clean is None else clean[lo:lo + chunk]
        if jacobian == "ad":
            def fn(theta, b1=b1):
                return epg.fisp_mrf(theta[:, 0].exp(), theta[:, 1].exp(), b1, n_states=mrfdict.N_STATES,
                                    **schedule) @ basis

            jac = crb.jacobian(fn, xs[:, :2].float(), mode="jvp")  # [n, R, 2]
        elif jacobian == "differences":
            cols = []
            for k in range(2):
                shifted = xs.clone()
                shifted[:, k] += step
                cols.append((_simulate(schedule, basis, shifted) - c) / step)
            jac = torch.stack(cols, -1)
        j = torch.cat([jac, c[..., None], 1j * c[..., None]], -1).to(torch.complex128)  # [n, R, 4]
        fisher = (j.mH @ j).real  # physics.crb.fisher_information at σ = 1
        out.append(torch.linalg.inv(fisher).diagonal(dim1=-2, dim2=-1)[:, :2])
        cleans.append(c)
    if return_clean:
        return torch.cat(out), torch.cat(cleans)
    return torch.cat(out)


def train_mrfnet(net_protocol: NetProtocol, basis: torch.Tensor, *, n_samples: int = 40_000, max_epochs: int = 30,
                 patience: int = 5, batch_size: int = 256, lr: float = 1e-3, hidden: int = 128,
                 snr_range=(10.0, 100.0), seed: int = 0, progress=None,
                 crb_jacobian: str = "exact") -> tuple[ScaledMLP, dict]:
    """Simulate, train and return ``(net, card)`` (the registry adds the checksum).

    ``crb_jacobian``: how the per-sample CRB weights get their Jacobian (``_unit_sigma_crb``): exact
    by default, computed with the training fingerprints in one pass."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss_name = net_protocol.loss
    if loss_name not in LOSSES:
        raise ValueError(f"unknown mrfnet loss {loss_name!r}; use one of {', '.join(LOSSES)}")
    schedule = net_protocol.protocol.schedule()
    basis = torch.as_tensor(basis).to(torch.complex64)
    gen = torch.Generator().manual_seed(int(seed))
    x = _sample(n_samples, gen)
    if crb_jacobian == "exact":
        crb_unit, clean = _unit_sigma_crb(schedule, basis, x, jacobian="exact", return_clean=True)
    else:
        clean = _simulate(schedule, basis, x)
        crb_unit = _unit_sigma_crb(schedule, basis, x, clean, jacobian=crb_jacobian)
    crb_unit = crb_unit.float()
    frame_rms = math.sqrt(float((clean.abs() ** 2).sum(-1).mean()) / basis.shape[0])  # mean |frame| proxy
    targets = torch.stack([x[:, 0], x[:, 1], torch.linalg.vector_norm(clean, dim=-1).double().log()], 1).float()
    b1 = x[:, 2].float()
    n_val = max(1, n_samples // 10)
    n_train = n_samples - n_val
    t_sim = time.perf_counter() - t0

    def noisy(idx):
        snr = snr_range[0] + torch.rand(len(idx), generator=gen) * (snr_range[1] - snr_range[0])
        sigma = frame_rms / (math.sqrt(2) * snr)
        noise = torch.complex(torch.randn(len(idx), basis.shape[1], generator=gen),
                              torch.randn(len(idx), basis.shape[1], generator=gen))
        return features(clean[idx] + sigma[:, None] * noise, b1[idx]), targets[idx], crb_unit[idx] * sigma[:, None] ** 2

    ranges = {**LOG_RANGES, "logNorm": (float(targets[:, 2].min()) - 1.0, float(targets[:, 2].max()) + 1.0)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = ScaledMLP(2 * basis.shape[1], hidden, ("logT1", "logT2", "logNorm"), ranges, depth=3)
    # statistics of noisy inputs: FISP coefficients on a real basis have no imaginary part without
    # noise, so the noise-free spread of those features is 0
    net.set_input_stats(noisy(torch.arange(n_train))[0])
    val = noisy(torch.arange(n_train, n_samples))
    loss_fn = LOSSES[loss_name]

    def loss(model, batch):
        xb, yb, cb = batch
        pred = model(xb)
        # the norm (for M0) is always fitted by MSE; T1/T2 by the chosen loss
        return loss_fn(pred[:, :2], yb[:, :2], cb) + torch.mean((pred[:, 2] - yb[:, 2]) ** 2)

    settings = LoopSettings(max_epochs=max_epochs, patience=patience, batch_size=batch_size, lr=lr,
                            progress=progress, desc=f"mrfnet ({loss_name})")
    result = train_loop(net, n_train=n_train, batch=noisy, loss=loss, validate=lambda m: loss(m, val),
                        settings=settings, generator=gen, log=LOGGER)
    with torch.no_grad():
        pred = net(val[0])
        normalised = ((pred[:, :2] - val[1][:, :2]) ** 2 / val[2]).mean(0)
        rel = (pred[:, :2].double() - val[1][:, :2].double()).exp().sub(1).abs().median(0).values
    card = {
        "name": f"bids_qmri-mrf-mrfnet-{loss_name}-{net_protocol.key()}",
        "modality": "mrf", "method": "mrfnet", "loss": loss_name,
        "architecture": {"class": "ScaledMLP", "inputs": "unit-norm coefficients (first real) + B1",
                         "hidden": hidden, "depth": 3, "outputs": list(net.outputs), "activation": "ReLU"},
        "protocol": net_protocol.as_dict(), "protocol_key": net_protocol.key(),
        "parameter_ranges": {"T1": [0.1, 5.0], "T2": [0.01, 2.0], "B1": list(B1_RANGE)},
        "training_snr_range": list(snr_range),
        "crb_jacobian": crb_jacobian,
        "heldout_normalised_crb_loss": {"logT1": float(normalised[0]), "logT2": float(normalised[1])},
        "heldout_crb_efficiency_note": "mean over held-out noisy samples of (error)^2 / CRB; 1 = efficient unbiased",
        "heldout_median_abs_rel_error": {"T1": float(rel[0]), "T2": float(rel[1]),
                                         "samples": int(len(val[0])), "snr_range": list(snr_range)},
        "cpu_s": round(time.process_time() - cpu0, 3),
        "training": training_record(settings, result, n_train=n_train, n_val=n_val, simulation_s=t_sim,
                                    wall_s=time.perf_counter() - t0),
        "validation_loss": result.best_loss,
    }
    return net, card
