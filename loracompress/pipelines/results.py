"""Writing a compressed adapter with its records: the one place every compressing pipeline ends."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loracompress.core.adapter import Adapter, save_adapter
from loracompress.gate.records import CARD_NAME, REPORT_NAME, card, report_json


def write_result(
    adapter: Adapter, out: Path, report: dict[str, Any], dtype: torch.dtype, force: bool,
    inputs: Sequence[str | Path | None] = (),
) -> None:
    """The adapter, its report and its card, atomically; ``inputs``: every other path the run read."""
    save_adapter(
        adapter,
        out,
        dtype=dtype,
        force=force,
        inputs=inputs,
        extra_files={REPORT_NAME: report_json(report), CARD_NAME: card(report)},
    )
