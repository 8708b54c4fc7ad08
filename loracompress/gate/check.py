"""The CI size-regression gate behind ``loracompress check`` and ``loracompress report``.

An adapter folder is *measured* (LoRA parameters, bytes of every file on disk, max rank,
and the quality recorded in its ``compression_report.json``) and the measurement is held
against *thresholds* (from flags or a config file) and, optionally, a *baseline* of earlier
measurements with a growth tolerance.

Config lives in ``[tool.loracompress.check]`` of ``pyproject.toml`` or in ``[check]`` of
``loracompress.toml`` (the same table without the ``tool.loracompress`` prefix), found from
the working folder upward or given with ``--config``::

    [tool.loracompress.check]
    baseline = "sizes.json"          # optional; keys are adapter paths relative to the root
    tolerance = "2%"                 # growth allowed against the baseline

    [[tool.loracompress.check.adapters]]
    path = "out/*-small"             # a folder, a glob (** allowed) or a list of them
    max_params = "2M"                # LoRA parameters (what budgets count)
    max_bytes = "8MB"                # every file in the folder, on disk
    max_rank = 16                    # the serving cost in vLLM-style engines
    min_quality = { "accuracy.retained" = 0.99 }
    max_quality = { "kl.after" = 0.05 }
    message = "the small adapters must fit the edge budget; see docs/check.md"

Relative paths in a discovered config are relative to its folder (the *root*); in a file
given with ``--config`` they are relative to the working folder, as ruff does. Every
threshold that applies to an adapter (each matching entry, and the flags) must hold.

Nothing here prints: :func:`run_check` returns a :class:`CheckResult` and the CLI renders it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracompress.core.records import COMPRESSION_REPORT
from loracompress.errors import LoraCompressError
from loracompress.gate.baselines import baseline_text, load_baseline, write_text_atomic
from loracompress.gate.config import (
    CheckConfig,
    baseline_key,
    display_path,
    resolve_targets,
)
from loracompress.gate.measure import (
    Measurement,
    measure,
    quality_metrics,
    quality_value,
)
from loracompress.gate.thresholds import Thresholds

log = logging.getLogger(__name__)

#: The measurements a baseline holds and ``check --baseline`` compares, with their units.
GROWTH_METRICS = {"params": "params", "bytes": "bytes", "max_rank": "rank"}


@dataclass
class Finding:
    """One comparison: a threshold (``kind="limit"``/``"quality"``) or growth against the baseline."""

    metric: str
    kind: str
    unit: str
    value: float | None
    ok: bool
    limit: float | None = None
    op: str = "<="
    baseline: float | None = None
    message: str | None = None
    source: str = ""
    note: str = ""

    @property
    def compared(self) -> bool:
        """Whether the adapter was held against something here (a limit, or a baseline size); the note
        of an adapter new to the baseline is not a check: a gate never passes on nothing."""
        return self.kind != "baseline" or self.baseline is not None

    @property
    def delta(self) -> float | None:
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    @property
    def delta_pct(self) -> float | None:
        if self.delta is None or not self.baseline:
            return None
        return 100 * self.delta / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "kind": self.kind, "unit": self.unit, "value": self.value, "ok": self.ok,
                "limit": self.limit, "op": self.op, "baseline": self.baseline, "delta": self.delta,
                "delta_pct": self.delta_pct, "message": self.message, "source": self.source, "note": self.note}


@dataclass
class AdapterResult:
    path: str
    folder: Path
    measurement: Measurement
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "measured": self.measurement.sizes(),
                "checks": [f.to_json() for f in self.findings]}


@dataclass
class CheckResult:
    adapters: list[AdapterResult]
    baseline: Path | None = None
    tolerance: float | None = None
    baseline_updated: bool = False

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.adapters)

    @property
    def failures(self) -> list[tuple[AdapterResult, Finding]]:
        return [(a, f) for a in self.adapters for f in a.findings if not f.ok]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "baseline": str(self.baseline) if self.baseline else None,
                "tolerance": self.tolerance, "baseline_updated": self.baseline_updated,
                "adapters": [a.to_json() for a in self.adapters]}


def threshold_findings(m: Measurement, rules: Iterable[Thresholds]) -> list[Finding]:
    findings = []
    for rule in rules:
        for metric, unit, limit, value in (("params", "params", rule.max_params, m.params),
                                           ("bytes", "bytes", rule.max_bytes, m.bytes),
                                           ("max_rank", "rank", rule.max_rank, m.max_rank)):
            if limit is not None:
                findings.append(Finding(metric, "limit", unit, value, value <= limit, limit=limit,
                                        message=rule.message, source=rule.source))
        for bound in rule.quality:
            value = quality_value(m.report, bound.metric)
            note = ""
            if value is None:
                offered = quality_metrics(m.report)
                note = (f"not measured: no {COMPRESSION_REPORT}" if m.report is None else
                        f"not in {COMPRESSION_REPORT} (it has: {', '.join(offered) or 'no quality numbers'})")
            findings.append(Finding(bound.metric, "quality", "", value, value is not None and bound.holds(value),
                                    limit=bound.value, op=bound.op, message=rule.message, source=rule.source,
                                    note=note))
    return findings


def growth_findings(m: Measurement, entry: Mapping[str, Any] | None, tolerance: float, source: str,
                    enforce: bool = True) -> list[Finding]:
    """Growth of each :data:`GROWTH_METRICS` beyond ``tolerance`` fails; shrinking passes."""
    if entry is None:
        return [Finding("baseline", "baseline", "", None, True, source=source,
                        note="new: not in the baseline; --update-baseline adds it")]
    findings = []
    for metric, unit in GROWTH_METRICS.items():
        old = entry.get(metric)
        if old is None:
            continue
        value = getattr(m, metric)
        allowed = old * (1 + tolerance)
        findings.append(Finding(metric, "baseline", unit, value, value <= allowed or not enforce,
                                limit=allowed, baseline=old, source=source,
                                note="" if enforce or value <= allowed else "accepted: baseline updated"))
    return findings


def run_check(
    paths: Sequence[str],
    flags: Thresholds,
    config: CheckConfig,
    cwd: Path,
    baseline: Path | None = None,
    tolerance: float | None = None,
    update_baseline: bool = False,
) -> CheckResult:
    """Measure every target and compare it with its thresholds and the baseline.

    ``baseline`` / ``tolerance`` override the config's. With ``update_baseline`` the baseline
    is rewritten (atomically) with the new measurements, entries for other adapters are kept,
    and growth is shown but does not fail; thresholds still do.
    """
    baseline = baseline if baseline is not None else config.baseline
    tolerance = tolerance if tolerance is not None else config.tolerance
    if baseline is None and (update_baseline or tolerance is not None):
        raise LoraCompressError(
            f"{'--update-baseline' if update_baseline else '--tolerance'} needs a baseline: pass --baseline FILE "
            "or set baseline in the config"
        )
    tolerance = tolerance or 0.0
    old: dict[str, dict[str, Any]] | None = None
    if baseline is not None and (baseline.exists() or not update_baseline):
        old = load_baseline(baseline)
    targets = resolve_targets(paths, config, flags, cwd)
    results = []
    for target in targets:
        if not target.rules and baseline is None:
            raise LoraCompressError(
                f"{display_path(target.path, cwd)}: no threshold applies; pass --max-params/--max-bytes/--max-rank/"
                "--min-quality, a config entry whose path matches it, or --baseline"
            )
        m = measure(target.path, display_path(target.path, cwd))
        findings = threshold_findings(m, target.rules)
        if baseline is not None:
            entry = (old or {}).get(baseline_key(target.path, config.root))
            if entry is not None or old is not None:
                findings += growth_findings(m, entry, tolerance, f"baseline {baseline.name}", enforce=not update_baseline)
        if not update_baseline and not any(f.compared for f in findings):
            raise LoraCompressError(
                f"{m.path}: nothing to check it against (it is not in the baseline {baseline} and no limit applies); "
                "add it with --update-baseline, or give it a limit (--max-params, a config entry ...)"
            )
        results.append(AdapterResult(m.path, target.path, m, findings))
    result = CheckResult(results, baseline, tolerance if baseline is not None else None)
    if update_baseline and baseline is not None:
        entries = dict(old or {})
        entries.update({baseline_key(r.folder, config.root): r.measurement.sizes() for r in results})
        write_text_atomic(baseline, baseline_text(entries))
        result.baseline_updated = True
    return result
