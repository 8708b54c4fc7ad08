"""The one place that turns ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device name."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is available, else ``cpu``; any other name is kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
