"""The modality registry: every plug-in folder of ``bids_qmri/modalities/`` is one line of
``PLUGINS`` (see ``base.py`` for the contract and ``docs/ARCHITECTURE.md`` for a walk-through).

The shared layers ask this module — never a plug-in directly — which modalities exist, which
suffixes they collect, which methods they offer and in which order, and which maps those write.
"""

from __future__ import annotations

import functools
import importlib

from .base import MapSpec, Method, Modality

# One line per plug-in folder; its ``MODALITIES`` tuple is registered in this order, which is also
# the order of the plan, the reports and the agreement table's method pairs.
PLUGINS = (
    "bids_qmri.modalities.bssfp",
    "bids_qmri.modalities.mrf",
    "bids_qmri.modalities.qmt",
    "bids_qmri.modalities.relax",
    "bids_qmri.modalities.mprage2mrf",
)

__all__ = [
    "MapSpec", "Method", "Modality", "PLUGINS", "all_methods", "bidsignore_lines", "by_suffix",
    "default_methods", "get", "method_order", "modalities", "owner_of_method", "protocol_fields",
    "reference_method",
]


@functools.cache
def modalities() -> tuple[Modality, ...]:
    """Every registered modality, in registry order (names are unique)."""
    found: list[Modality] = []
    for module_name in PLUGINS:
        module = importlib.import_module(module_name)
        for modality in module.MODALITIES:
            if any(m.name == modality.name for m in found):
                raise RuntimeError(f"two plug-ins register the modality {modality.name!r}")
            found.append(modality)
    return tuple(found)


def get(name: str) -> Modality:
    for m in modalities():
        if m.name == name:
            return m
    raise KeyError(f"unknown modality {name!r} (known: {', '.join(m.name for m in modalities())})")


def by_suffix() -> dict[str, Modality]:
    """BIDS suffix -> the modality that collects it."""
    return {suffix: m for m in modalities() for suffix in m.suffixes}


def all_methods() -> dict[str, tuple[str, ...]]:
    """Modality -> every method it offers (``--methods`` choices)."""
    return {m.name: m.method_names for m in modalities()}


def default_methods() -> dict[str, tuple[str, ...]]:
    """Modality -> methods run when ``--methods`` is not given."""
    return {m.name: m.default_methods for m in modalities() if m.default_methods}


def method_order() -> tuple[str, ...]:
    """Every method name in registry order, each once (reports and agreement tables use it:
    a modality's first method is its reference, e.g. the conventional fit before the networks)."""
    return tuple(dict.fromkeys(name for m in modalities() for name in m.method_names))


def reference_method(modality: str) -> str | None:
    names = get(modality).method_names
    return names[0] if names else None


def owner_of_method(method: str) -> list[Modality]:
    return [m for m in modalities() if method in m.method_names]


def map_specs() -> dict[str, MapSpec]:
    """Suffix -> its MapSpec (the first declaration wins; suffixes mean one thing everywhere)."""
    out: dict[str, MapSpec] = {}
    for m in modalities():
        for spec in m.all_maps():
            out.setdefault(spec.suffix, spec)
    return out


def protocol_fields() -> tuple[str, ...]:
    """Sidecar keys that describe acquisitions (the reports show them beside each map)."""
    return tuple(dict.fromkeys(k for m in modalities() for k in m.protocol_keys))


def bidsignore_lines() -> list[str]:
    """Derivative files BIDS has no name for: each modality's own lines, then every map suffix
    that is not a BIDS suffix (SPEC §4)."""
    lines: list[str] = []
    for m in modalities():
        lines += list(m.bidsignore)
        lines += [f"*_{spec.suffix}.*" for spec in m.all_maps() if not spec.bids_suffix]
    return list(dict.fromkeys(lines))
