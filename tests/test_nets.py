"""bSSFP MLPs: feature definition, output ranges, safetensors round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from bids_qmri.modalities.bssfp.net import BSSFPNet, bssfp_features
from bids_qmri.nets.io import load_net, save_net
from bids_qmri.physics.bssfp import BSSFPModel, seed_protocol

RANGES = {"T1": (0.36, 2.08), "T2": (0.02, 0.12), "B0": (-104.0, 104.0)}


def _configs(n=7, npc=6):
    g = torch.Generator().manual_seed(0)
    t1 = torch.empty(n).uniform_(0.5, 2.0, generator=g)
    b0 = torch.empty(n).uniform_(-50, 50, generator=g)
    b1 = torch.empty(n).uniform_(0.8, 1.2, generator=g)
    return BSSFPModel(seed_protocol(npc)).configurations(t1, 0.06, 1.0, b1, b0), b1


def test_features():
    f, b1 = _configs()
    mag = bssfp_features(f, b1, "magnitude")
    cpx = bssfp_features(f, b1, "complex")
    assert mag.shape == (7, 4) and cpx.shape == (7, 6)
    torch.testing.assert_close(mag[:, :3], f.abs())
    torch.testing.assert_close(cpx[:, :3], f.real)
    torch.testing.assert_close(cpx[:, 3], f.imag[:, 0])
    torch.testing.assert_close(cpx[:, 4], f.imag[:, 2])
    torch.testing.assert_close(cpx[:, 5], b1)
    # after receiver-phase removal F0 is real, which is why the complex nets drop Im F0
    assert f.imag[:, 1].abs().max() < 1e-6
    with pytest.raises(ValueError):
        bssfp_features(f, b1, "quaternion")


@pytest.mark.parametrize("kind,n_in,hidden,n_out", [("magnitude", 4, 64, 2), ("complex", 6, 256, 3)])
def test_architecture_and_ranges(kind, n_in, hidden, n_out):
    torch.manual_seed(0)
    net = BSSFPNet(kind, RANGES)
    assert net.net[0].in_features == n_in and net.net[0].out_features == hidden
    assert net.net[-1].out_features == n_out
    if kind == "magnitude":
        assert sum(p.numel() for p in net.parameters()) == 4610  # seed 000: 4610 trainable parameters
    y = net(torch.randn(500, n_in) * 100)
    lo, hi = net.out_lo, net.out_hi
    assert (y >= lo).all() and (y <= hi).all()
    torch.testing.assert_close(net.to_unit(net.to_physical(torch.full((1, n_out), 0.3))), torch.full((1, n_out), 0.3))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net = BSSFPNet("complex", RANGES)
    net.set_input_stats(torch.randn(100, 6) * 3 + 1)
    path = save_net(net, tmp_path / "m.safetensors")
    state = load_file(str(path))  # plain tensors, nothing unpickled
    assert {"in_mean", "in_std", "out_lo", "out_hi"} <= set(state)
    back = load_net(path)
    x = torch.randn(20, 6)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert back.ranges == net.ranges and back.kind == "complex"
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="architecture"):
        load_net(tmp_path / "bare.safetensors")


def test_log_scaled_outputs():
    """Log-scaled outputs map the unit interval geometrically onto the range (u = 0.5 is the
    geometric mean of the limits), round-trip, travel in the file's configuration, and leave
    ΔB0 linear; an output with a non-positive lower limit cannot be log-scaled."""
    ranges = {"T1": (0.25, 5.0), "T2": (0.015, 2.5), "B0": (-100.0, 100.0)}
    net = BSSFPNet("complex", ranges, log_outputs=("T1", "T2"))
    y = net.to_physical(torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.25]]))
    torch.testing.assert_close(y[0], torch.tensor([0.25, (0.015 * 2.5) ** 0.5, 0.0]))
    torch.testing.assert_close(y[1], torch.tensor([5.0, 0.015, -50.0]))
    u = torch.rand(50, 3)
    torch.testing.assert_close(net.to_unit(net.to_physical(u)), u, atol=1e-5, rtol=0)
    linear = BSSFPNet("complex", ranges)
    assert linear.to_physical(torch.tensor([[0.5, 0.5, 0.5]]))[0, 0] == pytest.approx(2.625)
    assert BSSFPNet.from_config(net.config()).log_outputs == ("T1", "T2")
    assert "log_outputs" not in linear.config()  # files written before the option read the same
    with pytest.raises(ValueError, match="log-scaled"):
        BSSFPNet("complex", ranges, log_outputs=("B0",))


def test_log_scaled_net_survives_save_and_load(tmp_path):
    torch.manual_seed(3)
    net = BSSFPNet("magnitude", {"T1": (0.25, 5.0), "T2": (0.015, 2.5)}, log_outputs=("T1", "T2"))
    back = load_net(save_net(net, tmp_path / "log.safetensors"))
    x = torch.randn(30, 4)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert back.log_outputs == ("T1", "T2")
