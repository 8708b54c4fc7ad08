"""``loracompress prune``: compress an adapter under a budget."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from loracompress.core.records import COMPRESSION_REPORT
from loracompress.errors import LoraCompressError
from loracompress.pipelines.prune import (
    DEFAULT_CALIBRATION,
    PruneOptions,
    default_output,
    prune,
    resolve_method,
)
from loracompress.runtime.data.labels import parse_label_map
from loracompress_cli.common import console, err_console, human, human_bytes, print_json, skipped_line
from loracompress_cli.options import (
    ALLOW_NONFINITE,
    BASE_DTYPE,
    BASE_MODEL,
    DEVICE,
    FORCE,
    LABEL_FIELD,
    LABEL_MAP,
    LOAD_IN_4BIT,
    LOAD_IN_8BIT,
    SEQ_LEN,
    TEXT_FIELD,
    TRUST_REMOTE_CODE,
)

#: every default comes from the library's options (and the engine's config behind them): declared once
_D = PruneOptions()


#: its help lists the registered methods, so it is filled in when the command line is built
#: (:func:`refresh_help`): a method registered by a plugin or a test shows up too
METHOD = typer.Option(None, "--method", "-m", help="")


def refresh_help() -> None:
    """Fill in ``--method``'s help from the method registry (called before each command-line parse)."""
    from loracompress.calibration.methods.registry import help_line

    METHOD.help = f"{help_line()} Default: svd, or {DEFAULT_CALIBRATION} (calibration) with --data and --budget."


def prune_cmd(
    adapter: Path = typer.Argument(..., help="PEFT adapter folder to compress."),
    budget: str | None = typer.Option(None, "--budget", "-b", help="0.5, 50%, 1.2M, 300k, 4MB, 4MiB or rank=8."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder (default: ADAPTER-compressed)."),
    method: str | None = METHOD,
    select: str | None = typer.Option(None, "--select", help="Per-module cap: energy:0.95, fro:0.9 or ratio:10."),
    min_rank: int = typer.Option(_D.min_rank, "--min-rank", help="Keep at least this rank in every module."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Keep at most this rank in any module."),
    dtype: str | None = typer.Option(None, "--dtype", help="Output dtype fp32/fp16/bf16 (default: the input's)."),
    force: bool = FORCE,
    allow_nonfinite: bool = ALLOW_NONFINITE,
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the compression report as JSON."),
    base_model: str | None = BASE_MODEL,
    data: str | None = typer.Option(None, "--data", help="Calibration data: jsonl, csv/tsv, txt, parquet or a datasets folder."),
    eval_data: str | None = typer.Option(None, "--eval-data", help="Held-out data for before/after quality (default: a split of --data)."),
    eval_fraction: float = typer.Option(_D.eval_fraction, "--eval-fraction", help="Fraction of --data held out when no --eval-data."),
    text_field: str | None = TEXT_FIELD,
    label_field: str | None = LABEL_FIELD,
    label_map: str | None = LABEL_MAP,
    max_samples: int | None = typer.Option(None, "--max-samples", help="Use at most this many samples."),
    seq_len: int = SEQ_LEN,
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="Samples per step."),
    steps: int | None = typer.Option(None, "--steps", help="Calibration steps."),
    epochs: float | None = typer.Option(None, "--epochs", help="Calibration epochs (instead of --steps). Default: 3 (at most 300 steps); 6 (at most 600) for classification data without labels."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate. Default: 1e-3; 3e-3 for classification data without labels."),
    warmup: float = typer.Option(_D.warmup, "--warmup", help="Warm-up fraction of the steps."),
    seed: int = typer.Option(_D.seed, "--seed", help="Random seed (same seed, same bytes out)."),
    kd_weight: float = typer.Option(_D.kd_weight, "--kd-weight", help="Weight of distillation from the original adapter."),
    task_weight: float = typer.Option(_D.task_weight, "--task-weight", help="Weight of the task loss when labels exist."),
    temperature: float = typer.Option(_D.temperature, "--temperature", help="Distillation temperature."),
    hidden_weight: float | None = typer.Option(None, "--hidden-weight", help="Weight of block-output distillation (every block's output, student vs original). Default: 0 (it did not help label-free calibration, docs/calibration.md)."),
    pseudo_labels: bool | None = typer.Option(None, "--pseudo-labels/--no-pseudo-labels", metavar="", help="Classification without labels: train on the original's top-1 class as the label. Default: off."),
    token_dropout: float | None = typer.Option(None, "--token-dropout", help="Classification: delete this fraction of each text's tokens at every step, a fresh view each time, the original scored on the same view. Default: 0.1 for classification data without labels, else 0."),
    device: str = DEVICE,
    precision: str = typer.Option(_D.precision, "--precision", help="fp32, bf16 or fp16 (mixed precision on GPU)."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    base_dtype: str = BASE_DTYPE,
    load_in_4bit: bool = LOAD_IN_4BIT,
    load_in_8bit: bool = LOAD_IN_8BIT,
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", metavar="", help="Calibration: recompute each transformer block in the backward pass (less activation memory, about one more forward per step)."),
    fsdp: bool = typer.Option(False, "--fsdp", metavar="", help="Calibration under torchrun/accelerate launch: shard the frozen base across the processes (torch FSDP2), the LoRA factors whole (docs/calibration.md)."),
    teacher_cache_mb: float | None = typer.Option(None, "--teacher-cache-mb", help="Calibration: cap of the teacher-target cache in MB (default 1024; 0: recompute every step)."),
    teacher_top_k: int | None = typer.Option(None, "--teacher-top-k", help="Causal LMs: distil over the teacher's top-k tokens plus the rest (0: the full vocabulary; default: full while it fits --teacher-cache-mb, else 64)."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Save a resumable checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", metavar="", help="Continue an interrupted calibration from its checkpoint."),
    no_eval: bool = typer.Option(False, "--no-eval", metavar="", help="Skip the before/after quality measurement."),
    keep_best: bool = typer.Option(_D.keep_best, "--keep-best/--no-keep-best", metavar="", help="Calibration: score the result, the plain SVD cut and the activation-aware cut on the held-out data (classifiers: top-1 agreement with the original, a gap within noise a tie, then KL; LMs: KL) and write the best, so never one worse than the cut. Holds out at least 200 samples (or a quarter of --data)."),
    method_option: list[str] = typer.Option([], "--method-option", "-O", help="A method setting KEY=VALUE, repeatable (e.g. -O rounds=2, see docs/calibration.md)."),
) -> None:
    """Compress ADAPTER under --budget (training-free global SVD allocation by default)."""
    options = PruneOptions(budget=budget, method=method, select=select, min_rank=min_rank, max_rank=max_rank,
                           dtype=dtype, force=force, allow_nonfinite=allow_nonfinite, base_model=base_model, data=data,
                           eval_data=eval_data, eval_fraction=eval_fraction, text_field=text_field,
                           label_field=label_field, label_map=parse_label_map(label_map) if label_map is not None else None,
                           max_samples=max_samples, seq_len=seq_len, batch_size=batch_size,
                           steps=steps, epochs=epochs, lr=lr, warmup=warmup, seed=seed, kd_weight=kd_weight,
                           task_weight=task_weight, temperature=temperature, hidden_weight=hidden_weight,
                           pseudo_labels=pseudo_labels, token_dropout=token_dropout, device=device, precision=precision,
                           trust_remote_code=trust_remote_code, checkpoint_every=checkpoint_every, resume=resume,
                           base_dtype=base_dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                           gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, teacher_cache_mb=teacher_cache_mb,
                           teacher_top_k=teacher_top_k,
                           evaluate=not no_eval, keep_best=keep_best, method_settings=_method_settings(method_option))
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch / torchrun only rank 0 talks
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    calibrated = resolve_method(options)
    with _progress_bars(enabled=main and _trains(calibrated)) as bars:
        report = prune(adapter, output, options, progress=bars.step if bars else None,
                       phase=bars.phase if bars else None)
    if not main:
        return
    if as_json:
        print_json(report)
        return
    out = output or default_output(adapter)
    kept = (report.get("settings") or {}).get("keep_best") or {}
    label = report["method"]
    if kept and kept.get("kept") != calibrated:  # --keep-best wrote a training-free cut instead
        label = f"{kept['kept']} (kept over {calibrated} by --keep-best)"
    console.print(
        f"{label}: {human(report['params_before'])} → {human(report['params_after'])} parameters "
        f"({report['param_ratio']:.3f}), {human_bytes(report['bytes_before'])} → {human_bytes(report['bytes_after'])}, "
        f"max rank {report['max_rank_before']} → {report['max_rank_after']}"
        + (f", retained energy {report['retained_energy']:.4f}" if report.get("retained_energy") is not None else "")
    )
    for name, value in (report.get("quality") or {}).items():
        if isinstance(value, dict) and "before" in value:
            console.print(f"  {name}: {value['before']:.4g} → {value['after']:.4g}")
    if kept.get("candidates"):
        console.print(f"  keep-best: {_keep_best_line(kept)}")
    if line := skipped_line(report.get("skipped"), COMPRESSION_REPORT):
        console.print(line)
    console.print(f"wrote {out}")


def _trains(name: str) -> bool:
    """Whether the method runs a calibration (progress bars); an unknown name is left to ``prune`` to refuse."""
    from loracompress.calibration.methods.registry import available

    cls = available().get(name.lower())
    return cls is not None and cls.trains


def _keep_best_line(kept: dict[str, Any]) -> str:
    """``increlora won on 200 held-out samples (agreement beyond noise, then KL): agreement 0.93 (svd cut 0.84, +0.09), ...``"""
    win, cands = kept["kept"], kept["candidates"]
    w, svd = cands[win], cands["svd"]
    parts = [f"{win} won on {kept['held_out_samples']} held-out samples ({kept['measure'].replace('kl', 'KL')})"]
    if kept["measure"].startswith("agreement"):
        parts.append(f"agreement {w['agreement']:.4f} (svd cut {svd['agreement']:.4f}, "
                     f"{w['agreement'] - svd['agreement']:+.4f})")
    parts.append(f"KL {w['kl']:.4g} (svd cut {svd['kl']:.4g})")
    runner = kept["runner_up"]
    if runner != "svd":
        parts.append(f"runner-up {runner}: agreement {cands[runner]['agreement']:.4f}, KL {cands[runner]['kl']:.4g}")
    return "; ".join(parts)


def _method_settings(items: list[str]) -> dict[str, Any]:
    """``["rounds=2", "score=products"]`` -> ``{"rounds": 2, "score": "products"}`` (values read as JSON when they parse)."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoraCompressError(f"--method-option {item!r}: write KEY=VALUE, e.g. -O rounds=2")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


class _Bars:
    """Rich bars on stderr: one for the calibration steps (loss, ETA), then one for each phase after it
    (the held-out evaluation), so the screen never sits at "5/5 ETA 0:00" while work goes on."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.steps = bar.add_task("calibrating", total=None, loss="-", eta="-")
        self.phases: dict[str, Any] = {}

    def step(self, step: int, total: int, loss: float, eta: float) -> None:
        minutes, seconds = divmod(int(eta), 60)
        self.bar.update(self.steps, completed=step, total=total, loss=f"loss {loss:.4f}",
                        eta=f"ETA {minutes}:{seconds:02d}")

    def phase(self, name: str, done: int, total: int) -> None:
        if name not in self.phases:
            self.bar.update(self.steps, visible=False)  # training is over: its bar would only look stuck
            for task in self.phases.values():
                self.bar.update(task, visible=False)
            self.phases[name] = self.bar.add_task(name, total=total or None, loss="", eta="")
        self.bar.update(self.phases[name], completed=done, total=total or None)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[_Bars | None]:
    """The progress callbacks prune's pipeline calls (the library itself never prints)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn(), TextColumn("{task.fields[eta]}"))
    with Progress(*columns, console=err_console, transient=True) as bar:
        yield _Bars(bar)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_cmd)
