"""Saving and loading networks by class name: safetensors weights, no pickle (SPEC §7).

The file's metadata holds ``bids_qmri_class`` (``module:ClassName``, always inside the
``bids_qmri`` package) and ``bids_qmri_config`` (JSON). Loading imports that module, checks the
class is a network of ours with ``from_config``, builds it from the configuration and loads the
tensors. A file cannot name code outside the package, and no Python object is ever unpickled.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["load_net", "net_class_name", "save_net"]

PACKAGE = "bids_qmri."


def net_class_name(net: nn.Module) -> str:
    cls = type(net)
    return f"{cls.__module__}:{cls.__qualname__}"


def save_net(net: nn.Module, path: str | Path) -> Path:
    """Write weights and buffers as safetensors; class and configuration go into the metadata.

    ``net`` must offer ``config() -> dict`` (JSON-able) and ``from_config(config)``."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"bids_qmri_class": net_class_name(net),
                                          "bids_qmri_config": json.dumps(net.config(), sort_keys=True)})
    return path


def _resolve_class(name: str, path: Path):
    module_name, _, cls_name = name.partition(":")
    if not module_name.startswith(PACKAGE) or not cls_name.isidentifier():
        raise ValueError(f"{path}: network class {name!r} is not a bids_qmri network — "
                         "only files written by bids_qmri can be loaded")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{path}: network class {name!r} does not exist in this version of bids_qmri "
                         "— retrain the model with bids_qmri-train") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ValueError(f"{path}: {name!r} is not a bids_qmri network class")
    return cls


def load_net(path: str | Path) -> nn.Module:
    """Load a network written by ``save_net`` (in eval mode)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "bids_qmri_class" not in meta or "bids_qmri_config" not in meta:
        raise ValueError(f"{path}: not a bids_qmri network file (no class/architecture metadata)")
    cls = _resolve_class(meta["bids_qmri_class"], path)
    net = cls.from_config(json.loads(meta["bids_qmri_config"]))
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net
