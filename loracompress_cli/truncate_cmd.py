"""``loracompress truncate``: search-free cuts of a DyLoRA-trained adapter, no data or training."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from loracompress.core.records import COMPRESSION_REPORT
from loracompress.errors import LoraCompressError
from loracompress.pipelines.inputs import DataOptions
from loracompress.pipelines.truncate import TruncateOptions, truncate
from loracompress.runtime.data.labels import parse_label_map
from loracompress_cli.common import console, human, human_bytes, print_json, skipped_line
from loracompress_cli.options import (
    ALLOW_NONFINITE,
    BASE_MODEL,
    DEVICE,
    FORCE,
    LABEL_FIELD,
    LABEL_MAP,
    SEQ_LEN,
    TEXT_FIELD,
    TRUST_REMOTE_CODE,
)


def truncate_cmd(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder (DyLoRA-ordered, from prune --method dylora)."),
    budget: str | None = typer.Option(None, "--budget", "-b", help="One budget: 0.25, 25%, 1.2M, 4MB or rank=2. A fraction is of the ORIGINAL adapter when ADAPTER records it (every loracompress output does: a DyLoRA output trained at 0.25 cuts to 1/32 of the original at 0.03125), else of ADAPTER; counts and sizes are absolute."),
    budgets: str | None = typer.Option(None, "--budgets", help="Several budgets, comma-separated: 0.5,0.25,0.125 (one sub-folder each), fractions as for --budget."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default: ADAPTER-truncated)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype fp32/fp16/bf16 (default: the input's)."),
    force: bool = FORCE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    eval_data: str | None = typer.Option(None, "--eval-data", help="Held-out data: measure each cut against the input adapter."),
    base_model: str | None = BASE_MODEL,
    text_field: str | None = TEXT_FIELD,
    label_field: str | None = LABEL_FIELD,
    label_map: str | None = LABEL_MAP,
    max_samples: int | None = typer.Option(None, "--max-samples", help="Evaluate on at most this many samples."),
    seq_len: int = SEQ_LEN,
    batch_size: int = typer.Option(DataOptions.batch_size, "--batch-size", help="Samples per forward pass."),
    device: str = DEVICE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the reports as JSON."),
) -> None:
    """Cut ADAPTER to --budget (or to each of --budgets) by keeping leading components; no data or training.

    A DyLoRA-ordered adapter keeps each module's leading components (every cut was trained);
    any other adapter is cut in SVD order, the training-free svd cut, with a warning.
    """
    if (budget is None) == (budgets is None):
        raise LoraCompressError("give exactly one of --budget 0.25 or --budgets 0.5,0.25,0.125")
    texts = [budget] if budget is not None else [b.strip() for b in str(budgets).split(",") if b.strip()]
    out = output or adapter.resolve().parent / f"{adapter.resolve().name}-truncated"
    options = TruncateOptions(budgets=texts, force=force, dtype=dtype, allow_nonfinite=allow_nonfinite,
                              eval_data=eval_data, base_model=base_model, text_field=text_field,
                              label_field=label_field,
                           label_map=parse_label_map(label_map) if label_map is not None else None, max_samples=max_samples, seq_len=seq_len,
                              batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
    reports = truncate(adapter, out, options)
    if as_json:
        print_json(reports if budgets is not None else reports[0])
        return
    table = Table(title=f"{adapter} → {out}")
    for col in ("budget", "parameters", "ratio", "size", "max rank", "order"):
        table.add_column(col, justify="left" if col in ("budget", "order") else "right")
    measured = [k for k in ("kl", "agreement", "accuracy", "perplexity") if any(k in r["quality"] for r in reports)]
    for k in measured:
        before = next((r["quality"][k]["before"] for r in reports if isinstance(r["quality"].get(k), dict)), None)
        table.add_column(k if before is None else f"{k} (input {before:.4g})", justify="right")
    for r in reports:
        row = [r["budget"]["text"], human(r["params_after"]), f"{r['param_ratio']:.4f}", human_bytes(r["bytes_after"]),
               str(r["max_rank_after"]), r["settings"]["order"]]
        for k in measured:
            v = r["quality"].get(k)
            v = v.get("after") if isinstance(v, dict) else v
            row.append("" if v is None else f"{v:.4g}")
        table.add_row(*row)
    console.print(table)
    ref = reports[0]["settings"].get("budget_reference") or {}
    if ref.get("of") == "original":
        console.print(f"fractions are of the original adapter ({human(ref['params'])} parameters, recorded in "
                      f"{adapter}); ratio is of {adapter} ({human(reports[0]['params_before'])})")
    else:
        console.print(f"fractions are of {adapter} ({human(reports[0]['params_before'])} parameters; it records no "
                      "original)")
    if line := skipped_line(reports[0].get("skipped"), COMPRESSION_REPORT):
        console.print(line)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("truncate")(truncate_cmd)
