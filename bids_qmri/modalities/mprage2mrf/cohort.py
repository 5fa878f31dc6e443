"""Cohort fine-tuning (``--mprage2mrf-train-on-cohort on``): the phantom-trained U-Nets are
fine-tuned on the participants of the dataset that have both a T1w and MRF maps, then applied.

Where the pairs come from: an earlier participant run's derivatives in the output folder (the
anatomy's bias-corrected T1w and brain mask, the MRF plug-in's ``dictmatch`` T1/T2/M0 maps, and
the ROI step's rigid ``from-MRF_to-T1w`` transform, which registers them to the T1w). The targets
are built from the matched T1/T2/M0 exactly as the phantom targets are (the model's MRF
dictionary at B1 = 1, ``simulate.coefficient_targets``), so the cohort's own MRF schedule does not
have to be the model's.

Leave-one-out: a participant's model is trained on every pair except its own participant's (all
of its sessions), so no participant receives maps from a model that saw its data; participants
without MRF share the model trained on all pairs. A model is trained once per set of training
participants and cached under ``<model-dir>/mprage2mrf/cohort/<key>/``; the key hashes the start
model, the training participants' input files and the fine-tuning settings, so separate jobs
(one per participant) reuse it, and a lock makes concurrent jobs wait for the first one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CohortPair", "find_pairs", "cohort_model", "fine_tune", "pair_slices", "slices_from_maps"]

log = logging.getLogger("bids_qmri.modalities.mprage2mrf.cohort")

MRF_METHOD = "dictmatch"  # the MRF maps the cohort targets come from


@dataclass(frozen=True)
class CohortPair:
    """One session's training pair, as derivative files (all in the output folder)."""

    participant: str  # "sub-XX"
    session: str | None
    t1w: Path  # the anatomy's bias-corrected T1w
    mask: Path  # its brain mask
    maps: dict  # "T1map" / "T2map" / "M0map" -> MRF-space map
    xfm: Path  # rigid MRF -> T1w (forward resamples MRF-space images onto the T1w)

    def files(self) -> list[Path]:
        return [self.t1w, self.mask, *self.maps.values(), self.xfm]


def find_pairs(output_dir) -> list[CohortPair]:
    """Every session in ``output_dir`` with all the derivatives a training pair needs (the first
    MRF acquisition of a session), sorted by participant and session."""
    from bids_qmri.anatomy.roistats import parse_entities
    from bids_qmri.bids.derivatives import derivative_path

    pairs = []
    for t1map in sorted(Path(output_dir).glob(f"sub-*/**/anat/*_desc-{MRF_METHOD}_T1map.nii.gz")):
        ents = parse_entities(t1map)
        sub, ses, acq = ents["sub"], ents.get("ses"), ents.get("acq")
        if any(p.participant == f"sub-{sub}" and p.session == ses for p in pairs):
            continue
        kw = dict(subject=sub, session=ses, datatype="anat")
        pair = CohortPair(
            f"sub-{sub}", ses,
            derivative_path(output_dir, **kw, desc="preproc", suffix="T1w"),
            derivative_path(output_dir, **kw, desc="brain", suffix="mask"),
            {s: derivative_path(output_dir, **kw, acq=acq, desc=MRF_METHOD, suffix=s) for s in ("T1map", "T2map", "M0map")},
            derivative_path(output_dir, **kw, acq=acq, from_="MRF", to_="T1w", mode="image", suffix="xfm",
                            extension=".mat"))
        missing = [p.name for p in pair.files() if not p.is_file()]
        if missing:
            log.info("%s: not a cohort training pair (missing %s)", t1map.name, ", ".join(missing))
            continue
        pairs.append(pair)
    return pairs


def pair_slices(pair: CohortPair, multiple: int):
    """``(x, y, mask)`` axial slice stacks of one pair on the T1w grid: the skull-stripped T1w
    normalised as at inference, targets where the registered MRF maps are valid."""
    import tempfile

    import nibabel as nib

    from bids_qmri.anatomy import registration as reg

    img = nib.load(pair.t1w)
    t1w = np.asarray(img.dataobj, dtype=np.float32)
    brain = np.asarray(nib.load(pair.mask).dataobj) > 0

    def on_t1w(path):
        return reg.apply(str(path), str(pair.t1w), [str(pair.xfm)], interpolator="linear").numpy()

    t1, t2, m0 = (on_t1w(pair.maps[s]) for s in ("T1map", "T2map", "M0map"))
    # linear interpolation mixes the zeros outside the MRF mask into its edge: keep whole voxels only
    ref = nib.load(pair.maps["T1map"])
    with tempfile.TemporaryDirectory() as tmp:
        estimated = Path(tmp) / "estimated.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(ref.dataobj) > 0).astype(np.float32), ref.affine), estimated)
        whole = on_t1w(estimated) > 0.999
    return slices_from_maps(t1w, brain, t1, t2, m0, img.affine, multiple, covered=whole)


def slices_from_maps(t1w, brain, t1, t2, m0, affine, multiple: int, *, covered=True):
    """``(x, y, mask)`` slice stacks of a T1w and MRF maps on its grid: the T1w (skull-stripped
    with ``brain``) normalised as at inference, targets (the model's dictionary at B1 = 1) where
    ``brain`` and ``covered`` (the MRF's field of view) have valid maps."""
    from .simulate import PairVolume, coefficient_targets, normalise_mprage, slices_of

    valid = brain & covered & (t1 > 0) & (t2 > 0) & (m0 > 0)
    target = coefficient_targets(t1, t2, m0, valid, valid)
    volume = PairVolume(normalise_mprage(t1w, brain), target, valid, t1, t2, affine)
    return slices_of(volume, multiple)


def _stack(stacks):
    """Concatenate ``(x, y, mask)`` slice stacks, zero-padding every slice to the largest in-plane size."""
    import torch
    import torch.nn.functional as F

    h = max(x.shape[-2] for x, _, _ in stacks)
    w = max(x.shape[-1] for x, _, _ in stacks)

    def pad(t):
        return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))

    return tuple(torch.cat([pad(part[i]) for part in stacks]) for i in range(3))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fine_tune(base_net, train, *, epochs: int, lr: float, seed: int, threads: int):
    """A copy of ``base_net`` trained on the ``(x, y, mask)`` slice stacks ``train`` (its rescale
    table kept) -> ``(net, LoopResult, LoopSettings)``."""
    import torch

    from .training import Mprage2MRFTrainConfig, train_on_slices

    cfg = Mprage2MRFTrainConfig(epochs=int(epochs), patience=int(epochs), lr=float(lr), seed=int(seed),
                                base=base_net.base, depth=base_net.depth, dropout=base_net.dropout,
                                threads=threads, progress=False)
    net = type(base_net).from_config(base_net.config())
    net.load_state_dict(base_net.state_dict())
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            # no held-out pair in a small cohort: the training pairs select the epoch (keep best)
            result, loop_settings = train_on_slices(net, train, train, cfg, set_table=False)
    finally:
        torch.set_num_threads(old)
    return net, result, loop_settings


def cohort_model(base_net, base_card: dict, participant: str, output_dir, context, *, epochs: int, lr: float = 1e-4):
    """``(net, card)``: ``base_net`` fine-tuned on every cohort pair in ``output_dir`` except
    ``participant``'s ("sub-XX"); trained once per training set and cached under the model folder."""
    from bids_qmri.errors import InputError
    from bids_qmri.models.registry import load_model, save_model, sha256_file
    from bids_qmri.utils.locks import exclusive_lock

    from .training import model_card

    all_pairs = find_pairs(output_dir)
    pairs = [p for p in all_pairs if p.participant != participant]
    if not pairs:
        raise InputError(output_dir, f"--mprage2mrf-train-on-cohort: no participant other than {participant} has a "
                         f"preprocessed T1w, MRF {MRF_METHOD} maps and their MRF-to-T1w transform here",
                         "run the participant level with the MRF maps first (default methods), or drop the option")
    names = sorted({p.participant for p in pairs})
    settings = {"epochs": int(epochs), "lr": float(lr), "seed": int(context.seed), "batch_size": 8}
    key = _digest({"start": base_card.get("sha256"), "settings": settings,
                   "files": [[str(f.name), sha256_file(f)] for p in pairs for f in p.files()]})[:12]
    folder = Path(context.model_dir) / "mprage2mrf" / "cohort" / key
    stem = "mprage2mrf_cohort"
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / f".{stem}.lock"):
        if (folder / f"{stem}.safetensors").is_file():
            net, card = load_model(folder / f"{stem}.safetensors")
            return net, {**card, "path": str(folder / f"{stem}.safetensors"), "reused": True}
        log.info("fine-tuning mprage2mrf on the cohort (%s) for %s", ", ".join(names), participant)
        t0, cpu0 = time.perf_counter(), time.process_time()
        train = _stack([pair_slices(p, base_net.multiple) for p in pairs])
        t_pairs = time.perf_counter() - t0
        net, result, loop_settings = fine_tune(base_net, train, epochs=epochs, lr=lr, seed=context.seed,
                                               threads=context.num_threads)
        from bids_qmri.modalities.mrf.protocol import MRFProtocol
        from bids_qmri.training.loop import training_record

        training = training_record(loop_settings, result, n_train=len(train[0]), n_val=len(train[0]),
                                   simulation_s=t_pairs, wall_s=time.perf_counter() - t0)
        training.update({"cpu_s": round(time.process_time() - cpu0, 1), "cohort_participants": names,
                         "cohort_sessions": [f"{p.participant}" + (f"_ses-{p.session}" if p.session else "")
                                             for p in pairs],
                         "init_from": {"file": Path(str(base_card.get("path", base_card.get("weights_file", "")))).name,
                                       "sha256": base_card.get("sha256"),
                                       "previous_training": base_card.get("training", {})},
                         "cohort_key": key, "units": "slices"})
        card = model_card(net, _protocol_of(base_card), MRFProtocol.from_dict(base_card["mrf_protocol"]), net.basis(),
                          training, result.best_loss,
                          training_data=(f"fine-tuned on the cohort's T1w / MRF {MRF_METHOD} pairs of "
                                         f"{', '.join(names)}, from "
                                         f"{base_card.get('name', 'the base model')}: "
                                         f"{base_card.get('training_data', '')}"))
        save_model(net, card, folder, stem, origin="fine-tuned on the cohort")
        net, card = load_model(folder / f"{stem}.safetensors")
        return net, {**card, "path": str(folder / f"{stem}.safetensors"), "reused": False}


def _protocol_of(card: dict):
    from .protocol import MPRAGEProtocol

    return MPRAGEProtocol.from_dict(card["mprage_protocol"])
