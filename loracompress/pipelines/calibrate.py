"""``prune`` with a calibration method: load the base model and data, run the engine, write the result.

The one-call path behind ``loracompress prune ADAPTER --method prilora --base-model BASE --data
calib.jsonl -o OUT`` (and ``api.prune`` with ``PruneOptions(method=...)``)::

    adapter ─▶ student (full rank, SVD order) ─▶ Engine(base, Method, budget, batches) ─▶ OUT/

Everything that can fail on user input fails before the first step. Checkpoints (``--checkpoint-every``)
go to ``.OUT.ckpt/`` beside the output and are removed once the output is written. Under
``accelerate launch`` every process trains its shard; only the main process writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loracompress.calibration.engine import (
    DEFAULT_MAX_STEPS,
    Engine,
    EngineConfig,
    ProgressFn,
    config_dict,
    remove_checkpoints,
    svd_student,
)
from loracompress.calibration.engine.sharding import QUANTIZED, check_shardable, fsdp_requested
from loracompress.core.adapter import Adapter
from loracompress.core.budget import Budget
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import sibling_stem
from loracompress.core.reader import load_adapter
from loracompress.core.records import compression_report
from loracompress.errors import LoraCompressError
from loracompress.pipelines.inputs import CalibrationData, input_paths, load_base, load_data
from loracompress.pipelines.plan import PruneOptions, PrunePlan

log = logging.getLogger(__name__)


#: The training settings for classification calibration data without labels, applied where the options
#: leave them to us (``lr``, ``hidden_weight``, ``pseudo_labels`` at None; ``epochs`` when neither
#: ``--steps`` nor ``--epochs`` is given, then capped at :data:`LABEL_FREE_MAX_STEPS` steps). Chosen on a
#: held-out split of the 20-label news20 sample: benchmarks/results/labelfree_sweep.md. Without labels the
#: only signal is the teacher's few logits per document, so the student needs more and larger steps than
#: with labels to reach the same agreement, and it sees a fresh view of each text at every step (10% of its
#: tokens deleted, the teacher scored on the same view) instead of fitting the same few hundred outputs.
LABEL_FREE: dict[str, Any] = {"hidden_weight": 0.0, "pseudo_labels": False, "token_dropout": 0.1, "lr": 3e-3,
                              "epochs": 6.0}
#: Twice the labelled cap (DEFAULT_MAX_STEPS), as the epochs are twice the labelled ones.
LABEL_FREE_MAX_STEPS = 2 * DEFAULT_MAX_STEPS
#: The same settings for every other calibration (labelled data, causal LMs): the engine's defaults.
LABELLED: dict[str, Any] = {"hidden_weight": 0.0, "pseudo_labels": False, "token_dropout": 0.0, "lr": EngineConfig.lr,
                            "epochs": None}


#: The settings that :data:`LABEL_FREE` and :data:`LABELLED` choose when the options leave them unset (None)
#: (their ``epochs`` only sizes ``steps``: see :func:`data_defaults`).
DATA_DEPENDENT = ("hidden_weight", "pseudo_labels", "token_dropout", "lr")


def data_defaults(options: PruneOptions, data: CalibrationData) -> dict[str, Any]:
    """The EngineConfig fields that the options leave unset and that depend on the data read: :data:`LABEL_FREE`
    for unlabelled classification data, else :data:`LABELLED`, and for unlabelled data that nobody sized
    (no ``--steps``, no ``--epochs``) the steps of its epochs over the batches, capped. Nothing the user gave
    is here. These cannot be in the :class:`~loracompress.pipelines.plan.PrunePlan`: it is built before any
    data is read, and whether the data is labelled and how many batches it makes is known only after."""
    label_free = data.task == "cls" and not data.labelled
    auto = LABEL_FREE if label_free else LABELLED
    chosen = {k: auto[k] for k in DATA_DEPENDENT if getattr(options, k, None) is None}
    if label_free and options.steps is None and options.epochs is None:  # sized like a labelled run: epochs, capped
        steps = math.ceil(LABEL_FREE["epochs"] * len(data.train))
        chosen["steps"] = max(1, min(LABEL_FREE_MAX_STEPS, steps))
    return chosen


def data_settings(options: PruneOptions, data: CalibrationData) -> dict[str, Any]:
    """Every training setting that depends on the data, as the run uses it: what the options give, and where
    they say nothing, :func:`data_defaults`. Returns EngineConfig fields, ``steps`` and ``epochs`` included
    (for a caller that builds its own EngineConfig, such as the quality benchmark's scratch LoRA)."""
    given = {k: getattr(options, k, None) for k in (*DATA_DEPENDENT, "steps", "epochs")}
    return {**given, **data_defaults(options, data)}


def engine_config(options: PruneOptions, out: Path) -> EngineConfig:
    """The engine's settings as the options give them, checked: a bad ``--steps``, ``--epochs`` or ``--lr`` is
    refused here, before any model loads. What the options leave to the data (:func:`data_defaults`) keeps
    the engine's defaults until :func:`calibrate` has read the data."""
    given = {k: getattr(options, k) for k in DATA_DEPENDENT if getattr(options, k) is not None}
    return EngineConfig(
        steps=options.steps, epochs=options.epochs, warmup=options.warmup, seed=options.seed,
        kd_weight=options.kd_weight, task_weight=options.task_weight, temperature=options.temperature,
        device=options.device, precision=options.precision, checkpoint_every=options.checkpoint_every,
        checkpoint_dir=checkpoint_dir(out), resume=options.resume, **given, **memory_settings(options),
    )


def checkpoint_dir(out: Path) -> Path:
    """Where checkpoints of the run writing ``out`` live: the hidden sibling ``.NAME.ckpt``."""
    out = Path(out).resolve()
    return out.parent / f".{sibling_stem(out)}.ckpt"  # a long -o gets a short stem (a file name is 255 bytes)


#: ``phase(name, done, total)``: the work after the last calibration step (held-out evaluation, the
#: ``--keep-best`` comparison), counted in batches, so a caller can show it as its own bar.
PhaseFn = Callable[[str, int, int], None]
#: the name :func:`calibrate` reports that work under
EVALUATING = "evaluating on the held-out data"


class _Phase:
    """Counts the batches of every pass after training (one per held-out comparison, one over the
    calibration batches for the activation-aware cut) and reports them to ``phase`` as one phase."""

    def __init__(self, phase: PhaseFn | None, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        if phase is not None and total:
            phase(EVALUATING, 0, total)

    def tick(self) -> None:
        self.done += 1
        if self.phase is not None:
            self.phase(EVALUATING, min(self.done, self.total), self.total)

    def counted(self, batches: Sequence[dict[str, torch.Tensor]]) -> Sequence[dict[str, torch.Tensor]]:
        """``batches`` for a consumer that iterates them once, ticking as each one is done."""
        return _Counted(batches, self.tick)


class _Counted(Sequence):  # type: ignore[type-arg]
    def __init__(self, batches: Sequence[dict[str, torch.Tensor]], tick: Callable[[], None]) -> None:
        self.batches, self.tick = batches, tick

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        return self.batches[i]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield batch
            self.tick()


def _evaluation_passes(options: PruneOptions, data: CalibrationData, keeps_best: bool) -> int:
    """Batches the evaluation after training will run: what :func:`_quality` and :func:`_keep_best` do."""
    if not options.evaluate or not data.held_out:
        return 0
    if not options.keep_best or not keeps_best:
        return len(data.held_out)
    return 3 * len(data.held_out) + len(data.train)


def calibrate(plan: PrunePlan, progress: ProgressFn | None = None, phase: PhaseFn | None = None) -> dict[str, Any]:
    """Compress ``plan.source`` into ``plan.output`` by calibrating with ``plan.method``; returns the report.

    ``plan`` is what :func:`loracompress.pipelines.prune.prune` checked (output path, budget, method and its
    settings, device, the engine's settings as the options give them): nothing is parsed or checked again
    here. Only what the options leave to the data (:func:`data_defaults`) is filled in, once it is read. ``progress`` is called after each
    calibration step, ``phase`` through the evaluation that follows (see :data:`PhaseFn`).
    """
    from loracompress.pipelines.results import write_result
    from loracompress.runtime.placement import resolve_placement

    t0 = time.perf_counter()
    source, out, options, budget = plan.source, plan.output, plan.options, plan.budget
    method = plan.new_method()  # this run's own instance: freed before the evaluation (below)
    if budget is None:  # prune() refuses it; a plan built by hand must hold one too
        raise LoraCompressError(f"method {options.method!r} needs a --budget (e.g. --budget 0.25)")
    if plan.engine is None:  # prune() builds it for every method that trains
        raise LoraCompressError(f"method {options.method!r} trains: its plan needs the engine settings (PrunePlan.engine)")
    config = plan.engine
    placement = resolve_placement(options.base_dtype, options.device, options.load_in_4bit, options.load_in_8bit)
    if config.fsdp:
        check_shardable(options.precision)
        if placement.quantize:
            raise LoraCompressError(QUANTIZED)
    adapter = load_adapter(source, allow_nonfinite=options.allow_nonfinite)
    out_dtype = parse_dtype(options.dtype) or adapter.dtype
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    mods = list(adapter.modules.values())
    target = budget.resolve([m.cost for m in mods], [m.rank for m in mods], itemsize)
    # Straight to the device, in the base dtype; a sharded run reads the base into host memory instead and the
    # engine moves each block to the device as it shards it, so no GPU ever holds the whole base.
    base = load_base(adapter, options, placement=replace(placement, device="cpu") if config.fsdp else placement)
    data = load_data(base, options)
    config = replace(config, **data_defaults(options, data))  # what the options left to the data
    log.info("calibrating with %s on %d %s samples (%d batches), %d held out", options.method, data.samples,
             "labelled" if data.labelled else "unlabelled", len(data.train), data.held_out_samples)

    fingerprint = {"source": str(Path(source).resolve()), "data": str(options.data), "samples": data.samples,
                   "batches": len(data.train), "batch_size": options.batch_size, "seq_len": options.seq_len,
                   **placement.describe()}
    # The student is built in the call, not kept here: the engine copies it into its layers and then holds
    # the only reference, so it is freed (one copy of the factors during training, not two).
    result = Engine(config).run(base.model, adapter, svd_student(adapter), method, target, data.train, data.task,
                                progress=progress, fingerprint=fingerprint)
    described, keeps_best = method.describe(), method.keeps_best()
    # The method's context holds the run's layers, optimizer (AdamW moments) and gradients, and the method its
    # own state (importance averages): free them before the evaluation runs the base again.
    del method
    after = _Phase(phase, _evaluation_passes(options, data, keeps_best))
    quality = _quality(base, adapter, result.adapter, data, options, after)
    chosen, quality, kept = (_keep_best(base, adapter, result.adapter, target, quality, data, options, after)
                             if keeps_best else (result.adapter, quality, {}))
    quality.pop("agrees", None)  # the per-sample bits of the paired comparison: not for the report
    report = compression_report(
        source=str(source),
        output=str(out),
        before=adapter,
        after=chosen,
        method=options.method if kept.get("kept", options.method) == options.method else "svd",
        settings={**described, "engine": config_dict(config), "base": placement.describe(), "student_init": "svd",
                  "run": result.summary(), "samples": data.samples, "held_out_samples": data.held_out_samples,
                  "data": str(options.data), "batch_size": options.batch_size, "seq_len": options.seq_len,
                  **({"keep_best": kept} if kept else {})},
        budget=options.budget,
        target_params=target,
        out_dtype=out_dtype,
        quality=quality,
        seconds=time.perf_counter() - t0,
    )
    if _is_main_process():
        write_result(chosen, out, report, out_dtype, options.force, input_paths(source, options))
        remove_checkpoints(config.checkpoint_dir)
    _wait_for_everyone()
    return report


def memory_settings(options: PruneOptions) -> dict[str, Any]:
    """The engine's memory settings among ``options`` (unset ones keep the engine's defaults)."""
    given = {"gradient_checkpointing": options.gradient_checkpointing, "teacher_top_k": options.teacher_top_k,
             "teacher_cache_mb": options.teacher_cache_mb, "fsdp": fsdp_requested(options.fsdp) or None}
    return {k: v for k, v in given.items() if v is not None}


def _quality(base: Any, original: Adapter, compressed: Adapter, data: CalibrationData, options: PruneOptions,
             after: _Phase | None = None) -> dict[str, Any]:
    """Original vs compressed on the held-out batches (the keys ``compare_adapters`` returns)."""
    if not options.evaluate or not data.held_out:
        return {}
    from loracompress.pipelines.evaluate import compare_adapters

    return compare_adapters(base, original, compressed, data.held_out, data.task,
                            on_batch=after.tick if after is not None else None, per_sample=True)


#: ``settings.keep_best.kept`` when the activation-aware cut (``--method svd --data``) was written
AWARE = "svd-aware"


def selection_key(quality: dict[str, Any], task: str) -> tuple[float, ...]:
    """The order of candidates on the held-out data, before noise is allowed for: for a classifier, top-1
    agreement with the original first, then (negated) KL; for a language model, the negated KL."""
    if task == "cls":
        return (float(quality["agreement"]), -float(quality["kl"]))
    return (-float(quality["kl"]),)


#: Two classifiers' held-out agreements differ beyond noise when the paired difference is more than this
#: many of its standard errors (about a 95% two-sided test).
AGREEMENT_Z = 2.0


def agreement_gap(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """``(mean, standard error)`` of the per-sample difference of agreement, ``a`` minus ``b``.

    Paired: both were scored on the same held-out samples (``"agrees"`` from ``evaluate(per_sample=True)``),
    so only the samples where exactly one of them agrees with the original count towards the noise.
    """
    d = a["agrees"].double() - b["agrees"].double()
    n = int(d.numel())
    if n == 0:
        return 0.0, 0.0
    mean = float(d.mean())
    return mean, float(((d - mean).pow(2).mean() / n).sqrt())


def choose(scored: dict[str, dict[str, Any]], task: str, preference: Sequence[str]) -> str:
    """The candidate ``--keep-best`` writes, by name.

    Language models: the lowest held-out KL. Classifiers: among the candidates whose agreement with the
    original is not worse than the best agreement by more than noise (:data:`AGREEMENT_Z` paired standard
    errors), the lowest KL; so a candidate that disagrees with the original on significantly more held-out
    samples is never written, and a one- or two-sample difference on a few hundred samples does not outweigh
    a clearly closer distribution. Ties go to the earlier name in ``preference``.
    """
    def rank(n: str) -> tuple[Any, ...]:
        return (tuple(-v for v in selection_key(scored[n], task)), list(preference).index(n))

    top = min(scored, key=rank)  # classifiers: the best agreement (then KL); LMs: the lowest KL
    if task != "cls" or any("agrees" not in q for q in scored.values()):
        return top

    def within_noise(n: str) -> bool:
        gap, se = agreement_gap(scored[top], scored[n])
        return gap <= AGREEMENT_Z * se

    return min(filter(within_noise, scored), key=lambda n: (float(scored[n]["kl"]), list(preference).index(n)))


def _keep_best(
    base: Any, original: Adapter, calibrated: Adapter, target: int, quality: dict[str, Any], data: CalibrationData,
    options: PruneOptions, after: _Phase | None = None,
) -> tuple[Adapter, dict[str, Any], dict[str, Any]]:
    """A guarantee: never write a result that is worse on the held-out data than the training-free cut.

    Every candidate of the same budget is scored on the same held-out batches by the measure that matches
    the task (:func:`selection_key`): the calibrated adapter, the plain SVD cut and the activation-aware
    cut on the calibration batches. The best by :func:`choose` is written: for a classifier, no candidate
    whose agreement is significantly below the best one's, and among the rest the lowest KL; a tie goes to
    the calibrated result, then to the plain cut. Returns (adapter, its held-out quality, what was compared: each candidate's agreement and
    KL, the winner, and its margin over the plain cut and over the runner-up).

    Calibration starts from the plain cut and can end below it (too few steps, pruning that goes wrong,
    a loss that pulls away from the original); at generous budgets the activation-aware cut is often the
    closest of all (benchmarks/results/quality.md). The check costs one pass over the calibration batches
    (the input statistics) and two over the held-out ones.
    """
    if not options.keep_best or not quality or not math.isfinite(quality.get("kl", math.nan)):
        return calibrated, quality, {}
    from loracompress.cuts.activation import activation_aware_svd
    from loracompress.cuts.svd import compress_svd
    from loracompress.pipelines.evaluate import compare_adapters

    after = after or _Phase(None, 0)
    exact = Budget("params", target, str(target))
    cuts = {"svd": compress_svd(original, exact).adapter,
            AWARE: activation_aware_svd(base, original, after.counted(data.train), exact).adapter}
    scored: dict[str, tuple[Adapter, dict[str, Any]]] = {options.method: (calibrated, quality)}
    scored.update({name: (cut, compare_adapters(base, original, cut, data.held_out, data.task,
                                                    on_batch=after.tick, per_sample=True))
                   for name, cut in cuts.items()})
    preference = [options.method, "svd", AWARE]  # ties: calibrated, then the plain cut
    qualities = {n: q for n, (_, q) in scored.items()}
    name = choose(qualities, data.task, preference)
    runner_up = choose({n: q for n, q in qualities.items() if n != name}, data.task, preference)
    chosen, chosen_quality = scored[name]

    def margin(over: str) -> dict[str, float]:
        a, b = scored[name][1], scored[over][1]
        out = {"agreement": float(a["agreement"]) - float(b["agreement"]), "kl": float(b["kl"]) - float(a["kl"])}
        if data.task == "cls":
            out["agreement_se"] = agreement_gap(a, b)[1]
        return out

    info: dict[str, Any] = {
        "measure": "agreement beyond noise, then kl" if data.task == "cls" else "kl",
        **({"agreement_tie_z": AGREEMENT_Z} if data.task == "cls" else {}),
        "held_out_samples": data.held_out_samples,
        "candidates": {n: {"agreement": float(q["agreement"]), "kl": float(q["kl"])} for n, (_, q) in scored.items()},
        "kept": name,
        "runner_up": runner_up,
        "margin_over_runner_up": margin(runner_up),
        "margin_over_svd_cut": margin("svd"),
        # the KLs under the names earlier reports used
        "calibrated_kl": float(quality["kl"]), "svd_cut_kl": float(scored["svd"][1]["kl"]),
        "aware_cut_kl": float(scored[AWARE][1]["kl"]),
    }
    if name != options.method:
        q = scored[options.method][1]
        log.warning("the training-free %s cut is closer to the original on the held-out data than the %s result "
                    "(agreement %.4f vs %.4f, KL %.4g vs %.4g): writing the cut (--no-keep-best writes the %s "
                    "result)", name, options.method, chosen_quality["agreement"], q["agreement"],
                    chosen_quality["kl"], q["kl"], options.method)
    return chosen, chosen_quality, info


def _is_main_process() -> bool:
    from accelerate.state import PartialState

    return PartialState().is_main_process


def _wait_for_everyone() -> None:
    from accelerate.state import PartialState

    PartialState().wait_for_everyone()
