"""``loracompress inspect``: what is in an adapter and where its energy is."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loracompress.core.reader import load_adapter
from loracompress.core.records import adapter_stats
from loracompress_cli.common import console, human, human_bytes, print_json, skipped_line
from loracompress_cli.options import ALLOW_NONFINITE


def inspect(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON instead of a table."),
    allow_nonfinite: bool = ALLOW_NONFINITE,
) -> None:
    """Per-module shape, rank, parameters, bytes, scale and effective rank at 90%/99% energy."""
    ad = load_adapter(adapter, allow_nonfinite=allow_nonfinite)
    stats = adapter_stats(ad)
    if as_json:
        print_json(stats.to_json())
        return
    table = Table(title=f"{adapter}  ({stats.dtype}, task {ad.config.get('task_type') or '-'})")
    for col in ("module", "out×in", "rank", "params", "bytes", "scale", "r@90%", "r@99%"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in stats.modules:
        table.add_row(m.path, f"{m.out_features}×{m.in_features}", str(m.rank), human(m.params), human_bytes(m.bytes),
                      f"{m.scale:.3g}", str(m.rank90), str(m.rank99))
    table.add_section()
    table.add_row(f"total: {len(stats.modules)} modules", "", f"max {stats.max_rank}", human(stats.params),
                  human_bytes(stats.bytes), "", "", "")
    console.print(table)
    if stats.extra_tensors:
        console.print(f"carried unchanged (modules_to_save etc.): {len(stats.extra_tensors)} tensors, "
                      f"{human(stats.extra_params)} parameters, {human_bytes(stats.extra_bytes)}")
    if line := skipped_line(stats.skipped, "inspect --json"):
        console.print(line)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
