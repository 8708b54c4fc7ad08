"""Search-free truncation: cut an ordered adapter to one or several budgets, no data or training.

A DyLoRA-trained adapter (``loracompress.order = dylora`` in its safetensors metadata, written by
``prune --method dylora``) is *nested*: each module's leading components were trained to work
on their own. Truncating it keeps each module's leading components, as many as the global
allocation gives it: :func:`loracompress.core.budget.allocate` over the per-component values recorded
at training time (``loracompress.dylora.values``: the checkpoint's ``σ²``), by value per
parameter (``in + out``). Those are the very cuts the training sampled, so every cut it makes
was trained. The components themselves are kept as they are: never re-factorised, which would
mix them and lose the order.

An adapter that is not DyLoRA-ordered has no such order to keep; it is cut in SVD order instead
(the training-free ``svd`` cut, :func:`loracompress.cuts.svd.compress_svd`), with a warning.

With ``eval_data`` each cut is measured against the input adapter on held-out data
(:func:`loracompress.pipelines.evaluate.compare_adapters`) and the numbers go into its report.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracompress.core.adapter import NESTED_ORDER, Adapter
from loracompress.core.budget import Budget
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.records import CARD_NAME, compression_report, report_json
from loracompress.cuts.nested import Cut, truncate_adapter
from loracompress.errors import LoraCompressError
from loracompress.pipelines.inputs import DataOptions, ModelOptions, load_base, read_batches
from loracompress.pipelines.results import write_result
from loracompress.runtime.device import resolve_device

log = logging.getLogger(__name__)

#: written at the top of a multi-budget output folder: one entry per cut
SUMMARY_NAME = "truncate_report.json"


@dataclass(kw_only=True)
class TruncateOptions(ModelOptions, DataOptions):
    """What ``truncate`` can be told. ``budgets``: one or more budget texts (``0.25``, ``1.2M``, ...);
    the model and data options (shared with the other commands) are used when ``eval_data`` is given."""

    budgets: list[str]
    force: bool = False
    dtype: str | None = None
    allow_nonfinite: bool = False
    eval_data: str | None = None  # quality at each cut, measured when given


def folder_name(budget_text: str) -> str:
    """The sub-folder a budget's cut goes to: the budget as typed, made safe for file names."""
    return re.sub(r"[^A-Za-z0-9._%=+-]+", "_", budget_text.strip()) or "budget"


def truncate(source: str | Path, output: str | Path, options: TruncateOptions) -> list[dict[str, Any]]:
    """Cut the adapter at ``source`` to each budget; returns one compression report per cut.

    One budget: ``output`` is the cut adapter. Several: ``output/<budget>/`` for each, plus
    ``output/truncate_report.json``. Written atomically: all of it, or nothing.
    """

    t0 = time.perf_counter()
    out = Path(output)
    if not options.budgets:
        raise LoraCompressError("give --budget or --budgets (e.g. --budgets 0.5,0.25,0.125)")
    budgets = [Budget.parse(b) for b in options.budgets]
    names = [folder_name(b) for b in options.budgets]
    if len(set(names)) != len(names):
        raise LoraCompressError(f"--budgets lists the same budget twice ({', '.join(options.budgets)}); give each once")
    if options.eval_data is None and options.base_model is not None:
        log.warning("--base-model is only used with --eval-data; no quality is measured")
    inputs = [source, options.base_model, options.eval_data]
    check_output_path(out, force=options.force, inputs=inputs)
    if options.eval_data:
        resolve_device(options.device)  # an unusable --device is refused before anything loads
    adapter = load_adapter(source, allow_nonfinite=options.allow_nonfinite)
    out_dtype = parse_dtype(options.dtype) or adapter.dtype
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    several = len(budgets) > 1  # --budgets: one sub-folder per cut, even when duplicates leave one
    cuts = [truncate_adapter(adapter, b, itemsize, out_dtype) for b in budgets]
    texts, names, cuts = _distinct(list(options.budgets), names, cuts)
    quality = _measure(adapter, cuts, options) if options.eval_data else [{} for _ in cuts]
    reports = []
    for text, cut, q in zip(texts, cuts, quality):
        settings: dict[str, Any] = {
            "order": cut.order,
            "allocation": "leading components, global allocate over recorded values/(in+out)"
            if cut.order == NESTED_ORDER else "global sigma^2/(in+out)",
        }
        if cut.notes:
            settings["notes"] = cut.notes
        original = adapter.original_params
        settings["budget_reference"] = (  # what a fractional budget is a fraction of
            {"of": "original", "params": original, "fraction_of_original": cut.adapter.num_params / original}
            if original is not None else {"of": "input", "params": adapter.num_params})
        if options.eval_data:
            settings.update(eval_data=str(options.eval_data), base_model=options.base_model)
        reports.append(compression_report(
            source=str(source), output=str(out / folder_name(text) if several else out), before=adapter,
            after=cut.adapter, method="truncate", settings=settings, budget=text, target_params=cut.target_params,
            out_dtype=out_dtype, retained_energy=cut.retained_energy, total_retained_energy=cut.total_retained_energy,
            quality=q, seconds=time.perf_counter() - t0,
        ))
    if not several:
        write_result(cuts[0].adapter, out, reports[0], out_dtype, options.force, inputs)
        return reports
    with atomic_output_dir(out, force=options.force, inputs=inputs) as tmp:
        for name, cut, report in zip(names, cuts, reports):
            write_result(cut.adapter, tmp / name, report, out_dtype, force=False)
        summary = [{"budget": r["budget"], "folder": n, "params_after": r["params_after"],
                    "param_ratio": r["param_ratio"], "max_rank_after": r["max_rank_after"],
                    "order": r["settings"]["order"], "quality": r["quality"]} for n, r in zip(names, reports)]
        (tmp / SUMMARY_NAME).write_text(report_json({"source": str(source), "cuts": summary}), encoding="utf-8")
        (tmp / CARD_NAME).write_text(_summary_card(str(source), adapter, summary), encoding="utf-8")
    return reports


def _distinct(texts: list[str], names: list[str], cuts: list[Cut]) -> tuple[list[str], list[str], list[Cut]]:
    """The cuts of distinct parameter counts, first of each kept: ``--budgets 0.25,25%`` is one cut, not two
    identical folders (a warning names the budgets that were the same)."""
    seen: dict[int, str] = {}
    kept: list[int] = []
    for i, cut in enumerate(cuts):
        if cut.target_params in seen:
            log.warning("budget %s is %d parameters, the same as %s: one cut, written as %s", texts[i],
                        cut.target_params, seen[cut.target_params], seen[cut.target_params])
            continue
        seen[cut.target_params] = texts[i]
        kept.append(i)
    return [texts[i] for i in kept], [names[i] for i in kept], [cuts[i] for i in kept]


def _measure(original: Adapter, cuts: list[Cut], options: TruncateOptions) -> list[dict[str, Any]]:
    """Each cut against ``original`` on the held-out data: one model load, one tokenisation."""
    from loracompress.pipelines.evaluate import compare_adapters
    from loracompress.runtime.data import task_of

    base = load_base(original, options)
    task = task_of(base)
    _, batches = read_batches(base, options.eval_data, options)
    return [compare_adapters(base, original, cut.adapter, batches, task) for cut in cuts]


def _summary_card(source: str, adapter: Adapter, cuts: list[dict[str, Any]]) -> str:
    lines = [
        "# Truncated LoRA adapters",
        "",
        f"Cuts of `{source}` ({adapter.num_params:,} LoRA parameters), one stock PEFT adapter per folder.",
        "",
        "| folder | budget | parameters | ratio | max rank | order | KL to the original |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for c in cuts:
        kl = c["quality"].get("kl")
        lines.append(f"| `{c['folder']}` | {c['budget']['text']} | {c['params_after']:,} | {c['param_ratio']:.4f} | "
                     f"{c['max_rank_after']} | {c['order']} | {'' if kl is None else f'{kl:.4g}'} |")
    return "\n".join(lines) + "\n"
