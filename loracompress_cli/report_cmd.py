"""``loracompress report``: sizes of adapter folders; ``--json`` is a baseline for ``check``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from loracompress.gate.baselines import baseline_text
from loracompress.gate.config import load_config
from loracompress.gate.measure import report_sizes
from loracompress_cli.common import console, err_console, human, human_bytes


def report(
    paths: list[str] = typer.Argument(None, help="Adapter folders or globs (default: every entry of the check config)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print a baseline file for `loracompress check --baseline`."),
    config: Path | None = typer.Option(None, "--config", help="loracompress.toml or pyproject.toml (default: found from here upward)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a PNG of every module's rank before/after (needs matplotlib)."),
    force: bool = typer.Option(False, "--force", metavar="", help="Replace an existing --plot PNG (only one that loracompress wrote)."),
) -> None:
    """LoRA parameters, bytes on disk and max rank per adapter; `--json > sizes.json` makes a baseline."""
    cwd = Path.cwd()
    measurements, entries = report_sizes(paths or [], load_config(config, cwd), cwd)
    if plot is not None:
        from loracompress.core.reader import load_adapter
        from loracompress.gate.plots import plot_ranks, rank_profile

        profiles = [rank_profile(m.path, m.report, load_adapter(cwd / m.path).ranks) for m in measurements]
        plot_ranks(profiles, plot, force=force)
        err_console.print(f"wrote {plot}")
    if as_json:
        sys.stdout.write(baseline_text(entries))
        return
    table = Table(title="loracompress report")
    for col in ("adapter", "params", "extra", "bytes on disk", "max rank", "modules", "dtype", "retained energy"):
        table.add_column(col, justify="left" if col in ("adapter", "dtype") else "right")
    for m in measurements:
        energy = (m.report or {}).get("retained_energy")
        table.add_row(m.path, human(m.params), human(m.extra_params), human_bytes(m.bytes), str(m.max_rank),
                      str(m.modules), m.dtype, f"{energy:.4f}" if isinstance(energy, float) else "")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
