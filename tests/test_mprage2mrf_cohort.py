"""mprage2mrf cohort fine-tuning (``--mprage2mrf-train-on-cohort``): training pairs read from an
earlier run's derivatives (T1w, brain mask, MRF dictmatch maps, MRF-to-T1w transform), registered
to the T1w and turned into targets the MRF matcher maps back to the written T1/T2; leave-one-out
models named by their cards and the maps' sidecars; one cached model per training set; an
actionable error when no other participant has a pair. A tiny synthetic cohort of 6 mm phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_qmri.modalities.base import EstimateContext
from bids_qmri.modalities.mprage2mrf import protocol as mp
from bids_qmri.modalities.mprage2mrf.simulate import mrf_target_basis, simulate_pair
from bids_qmri.modalities.mprage2mrf.unet import MPRAGE2MRFNet, channels_to_coefficients
from bids_qmri.models.registry import cache_dir, save_model

PROTOCOL = mp.synthetic_protocol()


def _mrf_protocol():
    from bids_qmri.modalities.mrf.protocol import MRFProtocol

    schedule, _ = mrf_target_basis()
    return MRFProtocol(tuple(float(v) for v in schedule["flip_rad"].rad2deg()), tuple(float(v) for v in schedule["tr"]),
                       float(schedule["te"]), float(schedule["ti"]))


def _write_derivatives(out, label, pair, *, mrf=True):
    """What the anatomy, the MRF dictmatch and the ROI step write for one participant (identity
    MRF -> T1w transform: the phantom's MRF maps are on its T1w grid)."""
    import ants
    import nibabel as nib

    from bids_qmri.bids.derivatives import derivative_path

    kw = dict(subject=label, datatype="anat")

    def save(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), pair.affine), path)

    save(derivative_path(out, **kw, desc="preproc", suffix="T1w"), pair.mprage * 700.0)  # any scale: normalised
    save(derivative_path(out, **kw, desc="brain", suffix="mask"), pair.brain)
    if not mrf:
        return
    save(derivative_path(out, **kw, acq="fisp", desc="dictmatch", suffix="T1map"), np.where(pair.brain, pair.t1, 0))
    save(derivative_path(out, **kw, acq="fisp", desc="dictmatch", suffix="T2map"), np.where(pair.brain, pair.t2, 0))
    save(derivative_path(out, **kw, acq="fisp", desc="dictmatch", suffix="M0map"), pair.brain * 3.0)
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3)
    ants.write_transform(tx, str(derivative_path(out, **kw, acq="fisp", from_="MRF", to_="T1w", mode="image",
                                                 suffix="xfm", extension=".mat")))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """sub-01 and sub-02 with T1w + MRF derivatives, sub-03 with a T1w only; a tiny start model."""
    root = tmp_path_factory.mktemp("cohort")
    pairs = {label: simulate_pair(seed, protocol=PROTOCOL, resolution_mm=6.0)
             for label, seed in (("01", 41), ("02", 42), ("03", 43))}
    for label, pair in pairs.items():
        _write_derivatives(root / "out", label, pair, mrf=label != "03")
    torch.manual_seed(0)
    _, basis = mrf_target_basis()
    net = MPRAGE2MRFNet(base=4, depth=2, dropout=0.0, n_frames=basis.shape[0])
    net.set_basis(basis)
    net.set_table(torch.tensor([0.0, -1.4, -1e-3, -0.3, -1e-3, -0.3, -1e-3]),
                  torch.tensor([1.0, 0.1, 1e-3, 0.3, 1e-3, 0.4, 1e-3]))
    save_model(net, {"name": "tiny", "mrf_protocol": _mrf_protocol().as_dict(), "mprage_protocol": PROTOCOL.as_dict(),
                     "training_data": "untrained (test)"},
               cache_dir(root / "models", "mprage2mrf", PROTOCOL), f"mprage2mrf_{PROTOCOL.slug()}", origin="test")
    return root, pairs


def _context(root, participant, epochs=2):
    return EstimateContext(model_dir=root / "models", seed=1, options={
        "mprage2mrf_train_on_cohort": "on", "mprage2mrf_participant": participant, "mprage2mrf_cohort_epochs": epochs,
        "mprage2mrf_output_dir": str(root / "out"), "mprage2mrf_grid_steps": 30})


def test_pairs_found_and_their_targets_match_back_to_the_written_maps(cohort, tmp_path):
    from bids_qmri.modalities.mprage2mrf.cohort import find_pairs, pair_slices
    from bids_qmri.modalities.mprage2mrf.estimate import match_coefficients

    root, pairs = cohort
    found = find_pairs(root / "out")
    assert [p.participant for p in found] == ["sub-01", "sub-02"]  # sub-03 has no MRF maps
    x, y, m = pair_slices(found[1], multiple=4)
    truth = pairs["02"]
    assert x.shape[1] == 1 and y.shape[1] == 7 and float(x.max()) == pytest.approx(1.0)
    # the slices are the axial slices with brain: rebuild the volume and match it with the MRF matcher
    keep = [z for z in range(truth.brain.shape[2]) if truth.brain[..., z].sum() >= 20]
    nx, ny = truth.brain.shape[:2]
    coeffs = channels_to_coefficients(y[:, :, :nx, :ny].permute(2, 3, 0, 1)).numpy()  # [X, Y, S, 4]
    valid = m[:, :nx, :ny].permute(1, 2, 0).numpy()
    assert valid.sum() > 0.9 * truth.brain[..., keep].sum()  # identity registration keeps the brain
    _, basis = mrf_target_basis()
    maps, _ = match_coefficients(coeffs, valid, basis.to(torch.complex64), _mrf_protocol(),
                                 EstimateContext(model_dir=tmp_path, options={"mprage2mrf_grid_steps": 40}))
    core = valid & (truth.t1[..., keep] > 0.6) & (truth.t1[..., keep] < 2.0)
    for name, t in (("T1map", truth.t1[..., keep]), ("T2map", truth.t2[..., keep])):
        assert np.median(np.abs(maps[name][core] / t[core] - 1)) < 0.06, name


def test_leave_one_out_models_named_in_cards_and_sidecar_provenance(cohort):
    from bids_qmri.modalities.mprage2mrf.cohort import pair_slices, find_pairs
    from bids_qmri.modalities.mprage2mrf.estimate import estimate_mprage2mrf
    from bids_qmri.modalities.mprage2mrf.training import masked_mse
    from bids_qmri.models.registry import load_model

    root, pairs = cohort
    # a participant of the training set gets a model trained without it
    p1 = pairs["01"]
    maps, prov = estimate_mprage2mrf({"T1w": p1.mprage}, p1.brain, PROTOCOL, _context(root, "sub-01"))
    assert prov["CohortTrainingParticipants"] == ["sub-02"]
    assert prov["model_card"]["training"]["cohort_participants"] == ["sub-02"]
    assert "sub-01" not in prov["model_card"]["training_data"] and "sub-02" in prov["model_card"]["training_data"]
    assert "sub-01" in prov["LeaveOneOut"]
    # an MPRAGE-only participant gets maps from the model trained on both pairs
    p3 = pairs["03"]
    maps, prov = estimate_mprage2mrf({"T1w": p3.mprage}, p3.brain, PROTOCOL, _context(root, "sub-03"))
    assert prov["CohortTrainingParticipants"] == ["sub-01", "sub-02"]
    for name in ("T1map", "T2map"):
        assert maps[name].shape == p3.brain.shape
        assert np.isfinite(maps[name][p3.brain]).mean() > 0.95 and (maps[name][p3.brain] > 0).mean() > 0.95
    # one model per training set, cached: a second MPRAGE-only job reuses it
    card = prov["model_card"]
    assert card["reused"] is False
    _, again = estimate_mprage2mrf({"T1w": p3.mprage}, p3.brain, PROTOCOL, _context(root, "sub-04"))
    assert again["model_card"]["reused"] is True and again["model_card"]["sha256"] == card["sha256"]
    assert len(list((root / "models" / "mprage2mrf" / "cohort").glob("*/*.safetensors"))) == 2
    # fine-tuning fits the cohort: lower loss on its pairs than the start model (a larger step than
    # the default 1e-4, so that a few epochs of the tiny network show it)
    from bids_qmri.modalities.mprage2mrf.cohort import cohort_model

    start, start_card = load_model(next(cache_dir(root / "models", "mprage2mrf", PROTOCOL).glob("*.safetensors")))
    tuned, tuned_card = cohort_model(start, start_card, "sub-03", root / "out", _context(root, "sub-03"), epochs=6,
                                     lr=3e-3)
    assert tuned_card["training"]["cohort_participants"] == ["sub-01", "sub-02"]
    slices = [pair_slices(p, start.multiple) for p in find_pairs(root / "out")]
    for net in (start, tuned):
        net.eval()
    with torch.no_grad():
        def loss(net):
            return sum(float(masked_mse(net(x), net.to_network(y).clamp(-1, 1), m)) for x, y, m in slices)
        assert loss(tuned) < 0.7 * loss(start)


def test_no_other_participant_with_a_pair_is_an_actionable_error(cohort, tmp_path):
    import shutil

    from bids_qmri.errors import InputError
    from bids_qmri.modalities.mprage2mrf.estimate import estimate_mprage2mrf

    root, pairs = cohort
    shutil.copytree(root / "out" / "sub-01", tmp_path / "out" / "sub-01")
    ctx = _context(root, "sub-01")
    ctx.options["mprage2mrf_output_dir"] = str(tmp_path / "out")
    p1 = pairs["01"]
    with pytest.raises(InputError, match="no participant other than sub-01") as err:
        estimate_mprage2mrf({"T1w": p1.mprage}, p1.brain, PROTOCOL, ctx)
    assert "\n" not in str(err.value) and "run the participant level" in str(err.value)


def test_cohort_options_are_declared_run_options():
    from bids_qmri.modalities.mprage2mrf import MODALITY

    flags = {o.flag: o for o in MODALITY.run_options}
    assert flags["--mprage2mrf-train-on-cohort"].default == "off"
    assert flags["--mprage2mrf-train-on-cohort"].choices == ("on", "off")
    assert flags["--mprage2mrf-cohort-epochs"].type is int


def test_group_agreement_pairs_mprage2mrf_with_dictmatch_on_participants_with_both():
    """The group level pairs maps of one quantity across acquisitions: mprage2mrf (on the T1w,
    no acq label) with the MRF's dictmatch, over the participants that have both only."""
    import pandas as pd

    from bids_qmri.anatomy.roistats import COLUMNS
    from bids_qmri.group import stats
    from bids_qmri.group.tables import agreement_table
    from bids_qmri.modalities import get

    for suffix in ("T1map", "T2map"):  # the declarations that make the generic pairing apply
        a = get("mprage2mrf").method("mprage2mrf").map_spec(suffix)
        b = get("mrf").method("dictmatch").map_spec(suffix)
        assert a.units == b.units == "s" and a.quantity == b.quantity
    rng = np.random.default_rng(5)
    regions = [(1, "A"), (2, "B"), (3, "C"), (4, "D")]
    rows, truth = [], {}
    for sub in ("01", "02", "03"):
        t1 = {i: rng.uniform(0.8, 1.6) for i, _ in regions}
        maps = [("mprage2mrf", "n/a", 1.05)] + ([("dictmatch", "fisp", 1.0)] if sub != "03" else [])
        for method, acq, factor in maps:
            for i, name in regions:
                m = factor * t1[i]
                rows.append({"participant_id": f"sub-{sub}", "session_id": "n/a", "atlas": "AAL", "region_index": i,
                             "region": name, "suffix": "T1map", "method": method, "acq": acq, "units": "s",
                             "n_voxels": 50, "mean": m, "std": 0.1, "median": m, "q1": m, "q3": m})
        truth[sub] = t1
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    agr = agreement_table({"AAL": df}, n_bootstrap=50, seed=1)
    row = agr[(agr.method_a == "mprage2mrf") & (agr.method_b == "dictmatch")]
    if row.empty:  # the pair's order follows the acquisition labels
        row = agr[(agr.method_a == "dictmatch") & (agr.method_b == "mprage2mrf")]
    (row,) = row.itertuples()
    assert row.n_participants == 2 and row.n_pairs == 8  # sub-03 has no MRF
    x = np.array([truth[s][i] for s in ("01", "02") for i, _ in regions])
    a, b = (1.05 * x, x) if row.method_a == "mprage2mrf" else (x, 1.05 * x)
    assert row.ccc == pytest.approx(stats.ccc(a, b), rel=1e-9)


def test_workflow_hands_participant_and_output_folder_to_the_estimate(tmp_path):
    from bids_qmri.config import Config
    from bids_qmri.modalities.mprage2mrf import T1wInput
    from bids_qmri.modalities.mprage2mrf.workflow import init_mprage2mrf_wf

    item = T1wInput(None, [tmp_path / "sub-07_T1w.nii.gz"], PROTOCOL.as_dict())
    for on in ("on", "off"):
        config = Config(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", methods={"mprage2mrf": ("mprage2mrf",)},
                        options={"mprage2mrf_train_on_cohort": on, "mprage2mrf_cohort_epochs": 3})
        options = init_mprage2mrf_wf(item, "07", None, config).get_node("estimate_mprage2mrf").inputs.options
        assert options["mprage2mrf_train_on_cohort"] == on and options["mprage2mrf_cohort_epochs"] == 3
        if on == "on":
            assert options["mprage2mrf_participant"] == "sub-07"
            assert options["mprage2mrf_output_dir"] == str(tmp_path / "out")
        else:
            assert "mprage2mrf_participant" not in options


def test_init_from_copies_weights_table_and_basis_and_refuses_another_size(cohort, tmp_path):
    """``bids_qmri-train --method mprage2mrf --init-from``: the start's weights, rescale table and
    basis; the card records the start; another architecture is a one-line error."""
    from bids_qmri.modalities.mprage2mrf.training import initialise_from

    root, _ = cohort
    weights = next(cache_dir(root / "models", "mprage2mrf", PROTOCOL).glob("*.safetensors"))
    _, basis = mrf_target_basis()
    net = MPRAGE2MRFNet(base=4, depth=2, dropout=0.0, n_frames=basis.shape[0])
    record = initialise_from(net, weights)
    from bids_qmri.models.registry import load_model

    ref, card = load_model(weights)
    assert record["sha256"] == card["sha256"] and record["file"] == weights.name
    torch.testing.assert_close(net.table_min, ref.table_min)
    torch.testing.assert_close(net.basis(), ref.basis())
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ref.eval()(x))
    with pytest.raises(ValueError, match="same --mprage2mrf-base"):
        initialise_from(MPRAGE2MRFNet(base=8, depth=2, n_frames=basis.shape[0]), weights)
