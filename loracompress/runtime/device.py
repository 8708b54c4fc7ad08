"""The one place that turns ``--device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device name.

Every command that places a model goes through :func:`resolve_device` before it loads anything,
so an unusable device is a one-line error instead of a traceback from ``model.to()``.
"""

from __future__ import annotations

import re

import torch

from loracompress.errors import LoraCompressError


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is available, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` are checked.

    Raises:
        LoraCompressError: an unknown name, CUDA asked for where there is none, or a GPU index too high.
    """
    dev = device.strip().lower()
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", dev):
        raise LoraCompressError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoraCompressError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
        if ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
            raise LoraCompressError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev
