"""In-silico bSSFP experiments on tiny sizes: files written, numbers sensible."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bids_qmri.cli.insilico import main as insilico_main
from bids_qmri.modalities.bssfp.insilico import cod, linear_grid, monte_carlo, run_bssfp_insilico, theta_sweep
from bids_qmri.physics.bssfp import seed_protocol


def test_cod_and_grid():
    y = np.linspace(0, 1, 11)
    assert cod(y, y) == 1.0
    assert abs(cod(y, np.full_like(y, y.mean()))) < 1e-12
    assert cod(y, np.where(y > 0.5, np.nan, y)) == 1.0  # failed estimates are left out
    g = linear_grid(5)
    assert g["T1"].numel() == 25 and float(g["T1"].min()) == pytest.approx(0.36) and float(g["T2"].max()) == pytest.approx(0.12)


def test_monte_carlo_statistics():
    p = seed_protocol(12)
    par = linear_grid(3)
    gen = torch.Generator().manual_seed(0)
    clean = monte_carlo("miracle", par, p, math.inf, 50, gen)
    noisy = monte_carlo("miracle", par, p, 30.0, 20, gen)
    mean, sd = clean["T1map"]
    assert np.all(sd == 0) or np.all(np.isnan(sd))  # one deterministic draw when noise-free
    np.testing.assert_allclose(mean, par["T1"].numpy(), rtol=0.05)
    assert np.nanmedian(noisy["T1map"][1]) > 0  # noise spreads the estimates


def test_run_writes_tables_and_figures(tmp_path):
    written = run_bssfp_insilico(
        tmp_path, methods=("miracle", "svnn"), snrs=(math.inf, 10), n_mc=3, grid_n=6, n_invivo=40,
        npcs=(12, 4), theta_methods=("miracle", "pinncomplex"), n_theta=3, theta_grid_n=3, progress=False,
    )
    names = {p.name for p in written}
    assert {"bssfp_cod.tsv", "bssfp_cod.png", "bssfp_relerr_theta.tsv", "bssfp_relerr_theta.png",
            "bssfp_relerr_snr-inf.png", "bssfp_relerr_grid.tsv"} <= names
    df = pd.read_csv(tmp_path / "bssfp_cod.tsv", sep="\t")
    assert len(df) == 2 * 2 * 2 * 2  # sets × SNRs × methods × parameters
    clean = df[(df.snr == np.inf) & (df.method == "miracle") & (df.set == "grid")]
    assert (clean.cod > 0.98).all()
    theta = pd.read_csv(tmp_path / "bssfp_relerr_theta.tsv", sep="\t")
    assert set(theta.npc) == {12, 4} and len(theta) == 2 * 2 * 3 * 2
    assert (tmp_path / "bssfp_cod.png").stat().st_size > 1000


def test_theta_sweep_miracle_is_off_resonance_sensitive_at_low_npc():
    p4 = seed_protocol(4)
    df = theta_sweep("miracle", p4, n_theta=5, grid_n=4)
    t1 = df[df.parameter == "T1"].set_index("theta_rad")["mean_abs_rel_err_pct"]
    # aliasing at Npc 4 makes the magnitude configurations depend on θ
    assert t1.max() - t1.min() > 1.0


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        insilico_main(["bssfp", str(tmp_path), "--mc", "0"])
    assert exc.value.code == 2 and "--mc" in capsys.readouterr().err


def test_onthefly_check_trains_then_reuses(tmp_path, monkeypatch):
    from bids_qmri.modalities.bssfp.insilico import onthefly_check
    from bids_qmri.modalities.bssfp import models as registry
    from bids_qmri.physics.bssfp import BSSFPProtocol

    monkeypatch.setitem(registry.ON_THE_FLY, "svnn", {"n_samples": 3000, "max_epochs": 3, "patience": 3, "lr": 3e-3})
    p = BSSFPProtocol.with_default_increments(5e-3, 2.5e-3, 25.0, 8)
    first = onthefly_check(p, methods=["svnn"], model_dir=tmp_path, grid_n=8)
    again = onthefly_check(p, methods=["svnn"], model_dir=tmp_path, grid_n=8)
    assert not first.reused.any() and again.reused.all()
    assert (first.cod > 0.5).all()
    np.testing.assert_array_equal(first.cod.to_numpy(), again.cod.to_numpy())



@pytest.mark.slow
def test_onthefly_complex_pinn_with_the_default_settings(tmp_path):
    """The complex PINN the app trains for a non-bundled protocol, with its real on-the-fly
    settings (about a minute of CPU), against the noise-free grid simulated by the physics.
    Measured CoD 0.998 / 0.999 (T1 / T2; 54 CPU-s with the svnncomplex it starts from); from
    scratch it was 0.988 / 0.998, and with raw-unit residuals 0.940 / 0.952."""
    from bids_qmri.modalities.bssfp.insilico import onthefly_check
    from bids_qmri.physics.bssfp import BSSFPProtocol

    p = BSSFPProtocol.with_default_increments(5e-3, 2.5e-3, 20.0, 8)
    result = onthefly_check(p, methods=["pinncomplex"], model_dir=tmp_path, grid_n=50).set_index("parameter")
    assert result.loc["T1", "cod"] >= 0.98 and result.loc["T2", "cod"] >= 0.99, result.cod.to_dict()

# Seed 001 Fig. 5: complex nets below 1 / 1.5 / 3.5 % at Npc 12 / 6 / 4. The seed measured one white-matter
# point (T1 939 ms, T2 62 ms) over θ; here the stricter mean over the 20×20 grid of the whole training range
# (its edges included) × 31 θ, the evaluation `bids_qmri-insilico bssfp` writes.
FIG5_TARGET_PCT = {12: 1.0, 6: 1.5, 4: 3.5}
# measured for the bundled models (bids_qmri/models/bundled/bssfp/seed/TRAINING.md; `--models seed`, the default of `theta_sweep`): mean |relative error| T1, T2 in %
BUNDLED_GRID_ERR_PCT = {
    ("svnncomplex", 12): (0.63, 0.56),
    ("svnncomplex", 6): (0.81, 0.63),
    ("svnncomplex", 4): (1.00, 0.98),
    ("pinncomplex", 12): (0.93, 0.34),
    ("pinncomplex", 6): (1.44, 0.70),
    ("pinncomplex", 4): (3.41, 2.98),
}


@functools.lru_cache(maxsize=None)
def _bundled_theta_error(method, npc):
    df = theta_sweep(method, seed_protocol(npc), n_theta=31, grid_n=20)
    assert (df.n_failed == 0).all()
    err = df.groupby("parameter").mean_abs_rel_err_pct.mean()
    return float(err["T1"]), float(err["T2"])


@pytest.mark.parametrize("key", sorted(BUNDLED_GRID_ERR_PCT))
def test_bundled_complex_nets_accuracy_versus_theta(key):
    t1, t2 = _bundled_theta_error(*key)
    want_t1, want_t2 = BUNDLED_GRID_ERR_PCT[key]
    # the measured values (deterministic on CPU; 0.02 points of slack for float32 rounding across BLAS builds)
    assert t1 <= want_t1 + 0.02 and t2 <= want_t2 + 0.02, (t1, t2)


@pytest.mark.parametrize("key", sorted(BUNDLED_GRID_ERR_PCT))
def test_bundled_complex_nets_meet_seed_fig5(key):
    t1, t2 = _bundled_theta_error(*key)
    assert t1 < FIG5_TARGET_PCT[key[1]] and t2 < FIG5_TARGET_PCT[key[1]], (t1, t2)


# The default set (--bssfp-models default, trained on the brain distribution with log-scaled outputs;
# bids_qmri/models/bundled/bssfp/TRAINING.md) on the same seed-range grid test, measured: mean |relative
# error| T1, T2 in %. All meet seed 001 Fig. 5. Since issue 18's third round the set is noise-conditioned;
# this noise-free test tells it η = 0 (measured 2026-12-03; the noise-free set before: svnncomplex 0.98 / 0.98,
# 1.11 / 1.44, 1.41 / 2.15 %, pinncomplex 0.98 / 0.64, 1.45 / 1.20, 2.24 / 2.67 % at Npc 12 / 6 / 4).
DEFAULT_GRID_ERR_PCT = {
    ("svnncomplex", 12): (0.93, 0.99),
    ("svnncomplex", 6): (1.09, 1.47),
    ("svnncomplex", 4): (1.31, 2.14),
    ("pinncomplex", 12): (0.97, 0.60),
    ("pinncomplex", 6): (1.39, 1.03),
    ("pinncomplex", 4): (2.23, 2.44),
}


@pytest.mark.parametrize("key", sorted(DEFAULT_GRID_ERR_PCT))
def test_default_complex_nets_versus_theta(key):
    df = theta_sweep(key[0], seed_protocol(key[1]), n_theta=31, grid_n=20, model_set="default")
    assert (df.n_failed == 0).all()
    err = df.groupby("parameter").mean_abs_rel_err_pct.mean()
    t1, t2 = float(err["T1"]), float(err["T2"])
    want_t1, want_t2 = DEFAULT_GRID_ERR_PCT[key]
    assert t1 <= want_t1 + 0.02 and t2 <= want_t2 + 0.02, (t1, t2)
    assert t1 < FIG5_TARGET_PCT[key[1]] and t2 < FIG5_TARGET_PCT[key[1]], (t1, t2)
    # the seed set on the same grid is a different model (the default is not the seed's file)
    assert abs(t1 - _bundled_theta_error(*key)[0]) > 0.01
