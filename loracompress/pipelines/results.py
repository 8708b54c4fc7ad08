"""Writing a compressed adapter with its records: the one place every compressing pipeline ends."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loracompress.core.adapter import ORIGINAL_PARAMS_KEY, Adapter
from loracompress.core.records import CARD_NAME, COMPRESSION_REPORT, card, report_json
from loracompress.core.writer import save_adapter


def write_result(
    adapter: Adapter, out: Path, report: dict[str, Any], dtype: torch.dtype, force: bool,
    inputs: Sequence[str | Path | None] = (),
) -> None:
    """The adapter, its report and its card, atomically; ``inputs``: every other path the run read.

    The adapter's metadata records the original's LoRA parameter count (``loracompress.original_params``):
    kept when the input already carried one (a cut of a compressed adapter), else the input's own count.
    ``truncate`` reads it so that ``--budget 0.03125`` means 1/32 of the original, not of the input.
    """
    if adapter.original_params is None and report.get("params_before"):
        adapter = adapter.replace(adapter.modules, metadata={**adapter.metadata,
                                                             ORIGINAL_PARAMS_KEY: str(int(report["params_before"]))})
    save_adapter(
        adapter,
        out,
        dtype=dtype,
        force=force,
        inputs=inputs,
        extra_files={COMPRESSION_REPORT: report_json(report), CARD_NAME: card(report)},
    )
