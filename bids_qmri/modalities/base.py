"""The modality contract (SPEC §5): what a plug-in folder under ``bids_qmri/modalities/`` declares.

A modality is one kind of quantitative acquisition (pc-bSSFP, an inversion-recovery series, …).
Its folder holds everything that knows about it — the BIDS inputs and how they are collected,
the protocol, the methods and the maps they write, the nipype workflow, the planned outputs — and
exposes ``MODALITIES``: a tuple of :class:`Modality` objects. One line in
``bids_qmri.modalities.PLUGINS`` registers the folder. The shared layers (CLI, discovery, the
participant workflow, the model registry, the reports and the group level) only read these
declarations; none of them names a modality.

The pieces a modality provides, in the order the app uses them:

1. **Inputs** — ``suffixes`` it claims, ``required_metadata`` per suffix, and ``collect()``,
   which turns the session's files of those suffixes into input records (any object with
   ``acq`` and ``files``), reporting unusable ones through the :class:`Problems` it is given.
2. **Protocol** — ``protocol(input)`` returns an object with a stable ``key()`` (hash of what
   determines the signal), ``describe()`` (one line for people) and ``as_dict()`` (the BIDS
   sidecar fields written into every map's sidecar); ``protocol_from_dict`` inverts ``as_dict``.
3. **Needs** — ``uses_b1`` (a session's B1 map is matched to each input and content-checked);
   every modality gets the session's T1w anatomy for ROI statistics.
4. **Methods** — :class:`Method`: name, algorithm text, reference, the :class:`MapSpec` of each
   output map, ``estimate()`` and, for learned methods, ``train()`` (handed to the model registry).
5. **Workflow** — ``init_workflow(input, session, config, name)`` returns a nipype workflow whose
   ``outputnode`` has ``ref_image`` (the written reference image, ``..._desc-ref_<suffix>``),
   ``brain_mask`` and ``maps`` (paths of every map written); the participant workflow feeds them
   to the ROI workflow, which registers each reference image to the T1w.
6. **Plan** — ``planned_outputs(input, session, config)`` lists the files that workflow writes
   (``--dry-run``), ``plan_row(input, session, config)`` the input's line of the plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol as _Protocol


class Problems(_Protocol):
    """Where a collector reports an unusable input (``bids.discovery`` provides it)."""

    def skip(self, path, problem: str, fix: str = "") -> None:
        """Record ``path`` as skipped with a one-line reason (or raise with --stop-on-first-crash)."""


class AcquisitionProtocol(_Protocol):
    """What every modality's protocol object offers (duck-typed, e.g. a frozen dataclass)."""

    def key(self) -> str:
        """Stable short hash of everything that determines the signal (model cache key)."""

    def describe(self) -> str:
        """One line for people (plan, logs, error messages)."""

    def as_dict(self) -> dict:
        """BIDS sidecar fields (seconds, degrees) written into every map's sidecar."""


@dataclass(frozen=True)
class MapSpec:
    """One output map of a method: ``..._desc-<method>_<suffix>.nii.gz`` in ``datatype``.

    ``quantity`` names what is measured, so that maps of the same quantity from different
    modalities meet in the group agreement table (``None``: the map is not comparable across
    acquisitions, e.g. a proton density in arbitrary units).
    """

    suffix: str
    units: str
    description: str
    datatype: str = "anat"
    quantity: str | None = None
    # A map BIDS has no suffix for is listed in the derivatives' .bidsignore (SPEC §4).
    bids_suffix: bool = True


@dataclass(frozen=True)
class RunOption:
    """A command-line option of ``bids_qmri`` that belongs to one modality; its value reaches
    the workflows as ``config.options[dest]`` (``default`` when not given)."""

    flag: str  # e.g. "--bssfp-denoise"
    dest: str  # e.g. "bssfp_denoise"
    default: Any
    help: str
    choices: tuple | None = None
    type: Callable | None = None


@dataclass(frozen=True)
class EstimateContext:
    """Everything an ``estimate()`` may need besides the data and the protocol."""

    model_dir: Path | None = None
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1
    allow_training: bool = True
    options: dict = field(default_factory=dict)  # modality options from the command line


#: ``estimate(data, mask, protocol, context) -> (maps, provenance)``. ``data``: role -> volume
#: ``[X, Y, Z, ...]`` on one grid, ``mask`` the voxels to estimate. ``maps``: suffix -> ``[X, Y, Z]``
#: float volume (NaN where no estimate); ``provenance``: dict with at least ``algorithm`` and
#: ``reference`` (sidecar text), optionally ``model_card``, ``warnings`` (list of str) and settings.
EstimateFn = Callable[[dict, Any, Any, EstimateContext], tuple[dict, dict]]
#: ``train(protocol, seed, device) -> (net, card)`` for the model registry (cards without checksum).
TrainFn = Callable[..., tuple[Any, dict]]


@dataclass(frozen=True)
class Method:
    """A mapping method of a modality (SPEC §4 ``desc-<method>``)."""

    name: str
    algorithm: str
    reference: str
    maps: tuple[MapSpec, ...]
    estimate: EstimateFn
    train: TrainFn | None = None
    default: bool = True  # run when --methods does not name this modality

    def map_spec(self, suffix: str) -> MapSpec | None:
        return next((m for m in self.maps if m.suffix == suffix), None)


@dataclass(frozen=True)
class Modality:
    """One modality's declaration. Callables are plain functions of the plug-in folder; those
    that need nipype or torch import them lazily, so the registry is cheap to load."""

    name: str  # --methods / --bids-filter-file key, e.g. "bssfp"
    title: str  # for people, e.g. "pc-bSSFP"
    suffixes: tuple[str, ...]  # BIDS suffixes this modality collects
    required_metadata: dict[str, tuple[str, ...]]
    collect: Callable[..., list]  # (session, {suffix: [BIDSFile]}, layout, problems, check_content)
    plan_row: Callable[..., tuple[str, str]]  # (input, session, config) -> (files cell, metadata used)
    ref_suffix: str  # suffix of the reference image (``desc-ref_<ref_suffix>``) and motion table
    # What maps it (a modality without methods is discovered, checked and listed only).
    methods: tuple[Method, ...] = ()
    protocol: Callable[[Any], AcquisitionProtocol] | None = None
    protocol_from_dict: Callable[[dict], AcquisitionProtocol] | None = None
    init_workflow: Callable[..., Any] | None = None  # (input, session, config, name) -> pe.Workflow
    planned_outputs: Callable[..., list[Path]] | None = None  # (input, session, config) -> paths
    uses_b1: bool = False
    # Sidecar keys that describe the acquisition (shown beside each map in the report).
    protocol_keys: tuple[str, ...] = ()
    # Extra lines for the derivatives' .bidsignore and the input dataset's .bidsignore snippet.
    bidsignore: tuple[str, ...] = ()
    # Full references of the modality's approach and preprocessing, cited by the participant
    # report beside its methods' own references whenever its maps are shown.
    citations: tuple[str, ...] = ()
    # Options of ``bids_qmri`` that belong to this modality (-> ``config.options``).
    run_options: tuple[RunOption, ...] = ()
    # Figures the workflow wrote under ``sub-X/figures/`` for the participant report:
    # ``(figures_dir, prefix) -> [{"section", "title", "path", "caption"}]`` (prefix ``sub-X[_ses-Y]``).
    report_figures: Callable[..., list[dict]] | None = None
    # Optional hooks: ``bids_qmri-train`` support, ``bids_qmri-insilico`` subcommands.
    add_train_arguments: Callable | None = None
    train_from_args: Callable | None = None
    add_insilico_commands: Callable | None = None

    # ---------------------------------------------------------------------------- helpers
    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    @property
    def default_methods(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods if m.default)

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"{self.name} has no method {name!r} (available: {', '.join(self.method_names) or 'none'})")

    @property
    def processes(self) -> bool:
        """Whether this version can map this modality (a modality may be collected and listed only)."""
        return bool(self.methods) and self.init_workflow is not None

    def all_maps(self) -> list[MapSpec]:
        seen, out = set(), []
        for m in self.methods:
            for spec in m.maps:
                if spec.suffix not in seen:
                    seen.add(spec.suffix)
                    out.append(spec)
        return out


def workflow_label(item, index: int) -> str:
    """``acq`` label of an input, else its 1-based index: names its nipype sub-workflow."""
    return str(item.acq or index)
