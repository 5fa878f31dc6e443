"""Where torch runs (``--device``): CPU is the tested default; CUDA is used when asked for, or
with "auto" when torch sees a GPU. Results on CPU are bit-identical for a given ``--seed``; on a
GPU they may differ in the last bits (the sidecars record the device)."""

from __future__ import annotations

from ..errors import UsageError


def resolve_device(device: str | None) -> str:
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA GPU (this torch build or machine has none) — "
                             "use --device cpu or auto")
        return "cuda"
    raise UsageError(f"--device {device!r}: use auto, cpu or cuda")
