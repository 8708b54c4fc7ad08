"""``loracompress check``: fail CI when an adapter breaks a size, rank or quality limit, or grows.

Renders a :class:`~loracompress.gate.check.CheckResult` three ways: a table (or ``--json``) on
stdout, a markdown summary appended to ``$GITHUB_STEP_SUMMARY`` when that is set, and
``::error`` annotations when running under GitHub Actions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from loracompress.errors import CheckFailed, LoraCompressError
from loracompress.gate.check import AdapterResult, CheckResult, Finding, run_check
from loracompress.gate.config import display_path, load_config
from loracompress.gate.thresholds import QualityBound, Thresholds, parse_amount, parse_rank, parse_tolerance
from loracompress_cli.common import console, human, human_bytes, no_breaks, print_json


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "params":
        return human(value)
    if unit == "bytes":
        return human_bytes(value)
    if unit == "rank":
        return str(int(value))
    return f"{value:.4g}"


def fmt_limit(f: Finding) -> str:
    if f.limit is None:
        return ""
    sign = "≥" if f.op == ">=" else "≤"
    return f"{sign} {fmt_value(f.limit, f.unit)}"


def fmt_delta(f: Finding) -> str:
    if f.delta is None:
        return ""
    if f.delta == 0:
        return "±0"
    sign = "+" if f.delta > 0 else "-"
    pct = f" ({f.delta_pct:+.1f}%)" if f.delta_pct is not None else ""
    return f"{sign}{fmt_value(abs(f.delta), f.unit)}{pct}"


def label(f: Finding) -> str:
    return f"{f.metric} vs baseline" if f.kind == "baseline" and f.baseline is not None else f.metric


def describe(a: AdapterResult, f: Finding) -> str:
    """One line for a finding: what was measured against what, and the entry's message."""
    if f.kind == "baseline" and f.baseline is None:
        text = f"{a.path}: {f.note}"
    elif f.value is None:
        text = f"{a.path}: {f.metric} {f.note}; required {f.metric} {fmt_limit(f)}"
    elif f.kind == "baseline":
        text = (f"{a.path}: {f.metric} grew {fmt_delta(f)} over the baseline {fmt_value(f.baseline, f.unit)} "
                f"to {fmt_value(f.value, f.unit)} (allowed {fmt_limit(f)})")
    elif f.ok:
        text = f"{a.path}: {f.metric} {fmt_value(f.value, f.unit)} is within the limit {fmt_limit(f)}"
    else:
        where = "above the maximum" if f.op == "<=" else "below the minimum"
        text = f"{a.path}: {f.metric} {fmt_value(f.value, f.unit)} is {where} {fmt_value(f.limit, f.unit)}"
    return text + (f" — {f.message}" if f.message and not f.ok else "")


def one_line(text: str) -> str:
    """Untrusted text (a --message, a folder name) for one line of rich output: line breaks percent-encoded
    (:func:`~loracompress_cli.common.no_breaks`) and rich markup shown as typed."""
    return escape(no_breaks(text))


def _rows(result: CheckResult) -> list[tuple[AdapterResult, Finding]]:
    return [(a, f) for a in result.adapters for f in a.findings]


def _headline(result: CheckResult) -> str:
    n = len(result.adapters)
    if result.ok:
        return f"all {n} adapter{'s' if n != 1 else ''} pass"
    bad = sum(1 for a in result.adapters if not a.ok)
    return f"{len(result.failures)} breach{'es' if len(result.failures) != 1 else ''} in {bad} of {n} adapters"


def render_table(result: CheckResult) -> None:
    table = Table(title="loracompress check")
    for col in ("adapter", "check", "value", "limit", "baseline", "Δ", "result"):
        table.add_column(col, justify="left" if col in ("adapter", "check", "result") else "right")
    for a, f in _rows(result):
        status = "[green]pass[/green]" if f.ok else "[bold red]FAIL[/bold red]"
        table.add_row(one_line(a.path), label(f), fmt_value(f.value, f.unit),
                      fmt_limit(f), fmt_value(f.baseline, f.unit) if f.baseline is not None else "", fmt_delta(f),
                      status + (f" ({one_line(f.note)})" if f.note else ""))
    console.print(table)
    for a, f in result.failures:
        console.print(f"[red]✘[/red] {one_line(describe(a, f))}", soft_wrap=True)
    mark = "[green]✔[/green]" if result.ok else "[red]✘[/red]"
    console.print(f"{mark} {_headline(result)}")
    if result.baseline_updated:
        console.print(f"updated baseline {one_line(str(display_path(result.baseline, Path.cwd())))}")


def summary_markdown(result: CheckResult) -> str:
    """The GitHub step summary: a headline, a table of every check, and the failures with their messages."""
    lines = [f"### loracompress check: {'✅' if result.ok else '❌'} {_headline(result)}", "",
             "| adapter | check | value | limit | baseline | Δ | result |", "|---|---|---:|---:|---:|---:|---|"]
    for a, f in _rows(result):
        status = "✅ pass" if f.ok else "❌ **fail**"
        lines.append(f"| `{no_breaks(a.path)}` | {label(f)} | "
                     f"{fmt_value(f.value, f.unit)} | {fmt_limit(f)} | "
                     f"{fmt_value(f.baseline, f.unit) if f.baseline is not None else ''} | {fmt_delta(f)} | "
                     f"{status}{f' ({no_breaks(f.note)})' if f.note else ''} |")
    if result.failures:
        lines += ["", *(f"- {no_breaks(describe(a, f))}" for a, f in result.failures)]
    if result.baseline_updated:
        lines += ["", f"Baseline `{display_path(result.baseline, Path.cwd())}` updated."]
    return "\n".join(lines) + "\n\n"


def _escape(text: str, prop: bool = False) -> str:
    # GitHub's workflow-command escaping; properties also escape ':' and ','.
    text = no_breaks(text.replace("%", "%25"))  # \r -> %0D, \n -> %0A, and every other line break too
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def annotations(result: CheckResult) -> list[str]:
    """``::error file=...,title=...::message`` for every breach."""
    out = []
    for a, f in result.failures:
        what = "grew past the baseline" if f.kind == "baseline" else "is over its limit" if f.op == "<=" else \
            "is under its limit"
        title = f"loracompress check: {f.metric} {what}"
        file = f"{a.path}/adapter_config.json"
        out.append(f"::error file={_escape(file, True)},title={_escape(title, True)}::{_escape(describe(a, f))}")
    return out


def check(
    paths: list[str] = typer.Argument(None, help="Adapter folders or globs (default: every entry of the config)."),
    max_params: str | None = typer.Option(None, "--max-params", help="Most LoRA parameters, e.g. 2M or 300k."),
    max_bytes: str | None = typer.Option(None, "--max-bytes", help="Most bytes on disk (all files), e.g. 4MB or 4MiB."),
    max_rank: str | None = typer.Option(None, "--max-rank", help="Highest rank of any module (the vLLM serving cost)."),
    min_quality: list[str] = typer.Option(None, "--min-quality", help="METRIC>=VALUE from compression_report.json, e.g. accuracy.retained>=0.99 (repeatable)."),
    max_quality: list[str] = typer.Option(None, "--max-quality", help="METRIC<=VALUE, e.g. kl.after<=0.05 (repeatable)."),
    message: str | None = typer.Option(None, "--message", help="Shown with every breach of the flags' limits."),
    config: Path | None = typer.Option(None, "--config", help="loracompress.toml or pyproject.toml (default: found from here upward)."),
    baseline: Path | None = typer.Option(None, "--baseline", help="Sizes from `loracompress report --json`; growth beyond --tolerance fails."),
    tolerance: str | None = typer.Option(None, "--tolerance", help="Growth allowed against the baseline, e.g. 2% (default 0%)."),
    update_baseline: bool = typer.Option(False, "--update-baseline", metavar="", help="Rewrite the baseline with these sizes; growth is shown but accepted."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON."),
) -> None:
    """Check adapters against size, rank and quality limits and a baseline; exit 1 on any breach."""
    cwd = Path.cwd()
    flags = Thresholds(
        max_params=parse_amount(max_params, "params", "--max-params") if max_params is not None else None,
        max_bytes=parse_amount(max_bytes, "bytes", "--max-bytes") if max_bytes is not None else None,
        max_rank=parse_rank(max_rank, "--max-rank") if max_rank is not None else None,
        quality=tuple([QualityBound.parse(t, ">=") for t in min_quality or []]
                      + [QualityBound.parse(t, "<=") for t in max_quality or []]),
        message=message,
    )
    if message is not None and flags.empty:
        raise LoraCompressError("--message goes with a limit flag (--max-params, --max-bytes, --max-rank, --min-quality)")
    cfg = load_config(config, cwd)
    result = run_check(
        paths or [],
        flags,
        cfg,
        cwd,
        baseline=baseline,
        tolerance=parse_tolerance(tolerance, "--tolerance") if tolerance is not None else None,
        update_baseline=update_baseline,
    )
    if as_json:
        print_json(result.to_json())
    else:
        render_table(result)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(summary_markdown(result))
        except OSError as err:  # the summary is a courtesy: it must not turn a breach (1) or a pass (0) into 2
            print(f"warning: cannot append to $GITHUB_STEP_SUMMARY ({summary}): {err.strerror or err}; "
                  "the check result stands", file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        stream = sys.stderr if as_json else sys.stdout  # keep --json output parseable
        for line in annotations(result):
            print(line, file=stream)
    if not result.ok:
        raise CheckFailed(f"check failed: {_headline(result)}")


def register(app: typer.Typer) -> None:
    app.command("check")(check)
