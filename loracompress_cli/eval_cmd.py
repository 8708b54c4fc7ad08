"""``loracompress eval``: a compressed adapter vs its original (or vs the base model) on held-out data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from loracompress.pipelines.evaluate import EvalOptions, evaluate_paths
from loracompress.runtime.data.labels import parse_label_map
from loracompress_cli.common import console, human, print_json
from loracompress_cli.options import (
    BASE_MODEL,
    DEVICE,
    LABEL_FIELD,
    LABEL_MAP,
    SEQ_LEN,
    TEXT_FIELD,
    TRUST_REMOTE_CODE,
)

_D = EvalOptions(data="")  # the defaults, declared once in the library


def eval_cmd(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder to evaluate (e.g. the compressed one)."),
    data: str = typer.Option(..., "--data", help="Held-out data: jsonl, csv/tsv, txt, parquet or a datasets folder."),
    reference: Path | None = typer.Option(None, "--reference", "-r", help="The original adapter to compare with (default: the base model alone)."),
    base_model: str | None = BASE_MODEL,
    text_field: str | None = TEXT_FIELD,
    label_field: str | None = LABEL_FIELD,
    label_map: str | None = LABEL_MAP,
    max_samples: int | None = typer.Option(None, "--max-samples", help="Use a seeded random subset of this many samples."),
    seq_len: int = SEQ_LEN,
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Samples per forward pass."),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed of the --max-samples subset."),
    temperature: float = typer.Option(_D.temperature, "--temperature", help="Softmax temperature of the measured KL (1: the models' own distributions)."),
    device: str = DEVICE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON instead of a table."),
) -> None:
    """Compare ADAPTER with --reference (or with the base model alone): KL, top-1 agreement, accuracy or perplexity."""
    options = EvalOptions(data=data, base_model=base_model, reference=str(reference) if reference else None,
                          text_field=text_field, label_field=label_field,
                          label_map=parse_label_map(label_map) if label_map is not None else None,
                          max_samples=max_samples, seq_len=seq_len,
                          batch_size=batch_size, seed=seed, temperature=temperature, device=device,
                          trust_remote_code=trust_remote_code)
    result = evaluate_paths(adapter, options)
    if as_json:
        print_json(result)
        return
    console.print(_table(result))
    for note in result.get("notes", []):
        console.print(f"note: {note}")


def _table(r: dict[str, Any]) -> Table:
    ref_name = "reference" if r["reference_adapter"] else "base model"
    unit = f"{r['tokens']} tokens" if r["task"] == "lm" else f"{r['samples']} samples"
    table = Table(title=f"{r['adapter']} vs {r['reference_adapter'] or 'the base model alone'}  ({r['data']}, {unit})")
    for col in ("", ref_name, "adapter", "change"):
        table.add_column(col, justify="left" if not col else "right")
    if r["reference_adapter"]:
        p = r["params"]
        table.add_row("LoRA parameters", human(p["before"]), human(p["after"]),
                      f"{p['after'] / p['before']:.3f}×" if p["before"] else "")
    if "accuracy" in r:
        a = r["accuracy"]
        table.add_row("accuracy", f"{a['before']:.4f}", f"{a['after']:.4f}", f"{_pct(a['retained'])} retained")
    if "perplexity" in r:
        p = r["perplexity"]
        table.add_row("perplexity", f"{p['before']:.4g}", f"{p['after']:.4g}", f"{p['ratio']:.4f}×")
    table.add_section()
    table.add_row(f"KL({ref_name} ‖ adapter)", "", f"{r['kl']:.4g}", "")
    table.add_row("top-1 agreement", "", f"{r['agreement']:.4f}", "")
    return table


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
