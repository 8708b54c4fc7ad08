"""Original vs compressed adapter on held-out data: KL, top-1 agreement, accuracy or perplexity.

The model carries :class:`~loracompress.runtime.layers.LoraLayer` s with the compressed adapter as the
student and the original as the teacher (``attach(model, compressed, teacher=original)``), so one
copy of the base weights serves both: each batch runs once as the reference and once as the
candidate (:func:`~loracompress.runtime.layers.use_mode`). Without an original adapter the reference is
the base model alone (``reference="base"``).

Metrics, all means over the held-out data:

- ``kl``: KL(reference ‖ candidate) of the softmax of the logits (at ``temperature``), per sample
  for classification, per predicted token for language modelling (padding and prompt tokens of
  prompt/completion pairs excluded: the tokens whose label is not -100).
- ``agreement``: how often the candidate's top-1 prediction equals the reference's.
- ``accuracy`` (classification with labels) or ``perplexity`` (language modelling):
  ``{"before": reference, "after": candidate, ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracompress.core.adapter import Adapter
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.pipelines.inputs import DataOptions, ModelOptions, load_base, read_batches
from loracompress.runtime.data import IGNORE_INDEX, model_inputs, task_of
from loracompress.runtime.device import resolve_device
from loracompress.runtime.layers import attach, detach, use_mode


@dataclass
class _RefStats:
    """What the reference pass leaves for the candidate pass of one batch."""

    logp: torch.Tensor  # log-softmax(logits / T) at the counted positions [N, V]
    top1: torch.Tensor  # [N]
    nll: float = 0.0  # summed NLL (lm) at T=1
    correct: int = 0  # correct top-1 (cls with labels)


@dataclass
class ReferenceCache:
    """Reference-side results per batch, reused when the same batches are evaluated again.

    The engine evaluates the same held-out batches several times against the same teacher; the
    teacher pass is then paid once. Entries are keyed by batch position and checked against a
    fingerprint of the batch, so passing other batches simply misses. Caching stops once
    ``max_bytes`` is used (LM log-probabilities are ``tokens × vocab`` floats).
    """

    max_bytes: int = 512 * 2**20
    entries: dict[tuple[int, str, float], tuple[tuple[Any, ...], _RefStats]] = field(default_factory=dict)
    used_bytes: int = 0

    def get(self, key: tuple[int, str, float], fingerprint: tuple[Any, ...]) -> _RefStats | None:
        hit = self.entries.get(key)
        return hit[1] if hit is not None and hit[0] == fingerprint else None

    def put(self, key: tuple[int, str, float], fingerprint: tuple[Any, ...], stats: _RefStats) -> None:
        size = stats.logp.numel() * stats.logp.element_size()
        if self.used_bytes + size <= self.max_bytes:
            self.entries[key] = (fingerprint, stats)
            self.used_bytes += size


def _fingerprint(batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    ids = batch["input_ids"]
    return tuple(ids.shape), int(ids.sum()), int((ids * torch.arange(ids.shape[-1], device=ids.device)).sum())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**model_inputs(batch))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _positions(batch: dict[str, torch.Tensor], logits: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For lm: the logits that predict a counted token ``[N, V]`` and those tokens ``[N]``."""
    if task == "cls":
        return logits, batch.get("labels")
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    return logits[:, :-1][keep], target[keep]


def evaluate(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    task: str,
    *,
    temperature: float = 1.0,
    reference: str = "teacher",
    candidate: str = "student",
    cache: ReferenceCache | None = None,
    on_batch: Callable[[], None] | None = None,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Compare the ``reference`` and ``candidate`` modes of ``model`` on ``batches``.

    Args:
        model: a base model with LoRA layers attached.
        batches: from :func:`loracompress.runtime.data.make_batches` (``task`` the same).
        task: ``"cls"`` or ``"lm"``.
        temperature: softens both distributions for ``kl`` (agreement and metrics use T=1).
        reference / candidate: layer modes (``teacher``, ``student``, ``base``).
        cache: reuse reference results across calls on the same batches.
        on_batch: called after each batch (progress reporting; the library never prints).
        per_sample: also return ``"agrees"``, a bool tensor with one entry per counted sample (token for
            lm): did the candidate's top-1 equal the reference's (for paired comparisons; not JSON).

    Returns:
        ``{"task", "samples", "kl", "agreement", "accuracy"|"perplexity": {"before", "after", ...}}``
        (``tokens`` too for lm).
    """
    if task not in ("cls", "lm"):
        raise ValueError(f"task must be 'cls' or 'lm', not {task!r}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    dev = _device(model)
    was_training = model.training
    model.eval()
    samples = counted = agree = cand_correct = 0
    kl_sum = ref_nll = cand_nll = 0.0
    ref_correct = 0
    agrees: list[torch.Tensor] = []
    labelled = task == "cls" and bool(batches) and all("labels" in b for b in batches)
    try:
        with torch.no_grad():
            for i, raw in enumerate(batches):
                batch = {k: v.to(dev) for k, v in raw.items()}
                samples += int(batch["input_ids"].shape[0])
                key, fp = (i, reference, float(temperature)), _fingerprint(raw)
                ref = cache.get(key, fp) if cache is not None else None
                if ref is None:
                    with use_mode(model, reference):
                        ref = _reference(_logits(model, batch), batch, task, temperature, labelled)
                    if cache is not None:
                        cache.put(key, fp, ref)
                with use_mode(model, candidate):
                    logits, target = _positions(batch, _logits(model, batch), task)
                n = int(logits.shape[0])
                if n == 0:
                    if on_batch is not None:
                        on_batch()
                    continue
                counted += n
                logq = F.log_softmax(logits / temperature, dim=-1)
                logp = ref.logp.to(dev)
                kl_sum += float((logp.exp() * (logp - logq)).sum())
                top1 = logits.argmax(-1)
                same = top1 == ref.top1.to(dev)
                agree += int(same.sum())
                if per_sample:
                    agrees.append(same.cpu())
                if task == "lm":
                    cand_nll += float(F.cross_entropy(logits, target, reduction="sum"))
                    ref_nll += ref.nll
                elif labelled:
                    cand_correct += int((top1 == target).sum())
                    ref_correct += ref.correct
                if on_batch is not None:
                    on_batch()
    finally:
        model.train(was_training)
    result: dict[str, Any] = {
        "task": task,
        "samples": samples,
        "kl": kl_sum / counted if counted else float("nan"),
        "agreement": agree / counted if counted else float("nan"),
        "temperature": temperature,
        "reference": reference,
    }
    if per_sample:
        result["agrees"] = torch.cat(agrees) if agrees else torch.zeros(0, dtype=torch.bool)
    if task == "lm":
        result["tokens"] = counted
        before = math.exp(ref_nll / counted) if counted else float("nan")
        after = math.exp(cand_nll / counted) if counted else float("nan")
        result["perplexity"] = {"before": before, "after": after, "ratio": after / before if before else float("nan")}
    elif labelled:
        before, after = ref_correct / counted, cand_correct / counted
        result["accuracy"] = {"before": before, "after": after,
                              "retained": after / before if before else float("nan")}
    return result


def _reference(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str, temperature: float,
               labelled: bool) -> _RefStats:
    logits, target = _positions(batch, logits, task)
    stats = _RefStats(logp=F.log_softmax(logits / temperature, dim=-1), top1=logits.argmax(-1))
    if task == "lm" and logits.shape[0]:
        stats.nll = float(F.cross_entropy(logits, target, reduction="sum"))
    elif labelled and target is not None:
        stats.correct = int((stats.top1 == target).sum())
    return stats


def compare_adapters(
    base: Any,
    original: Adapter | None,
    compressed: Adapter,
    batches: Sequence[dict[str, torch.Tensor]],
    task: str,
    *,
    temperature: float = 1.0,
    on_batch: Callable[[], None] | None = None,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Attach ``compressed`` (student) and ``original`` (teacher) to ``base.model``, evaluate, detach.

    ``base`` is a :class:`~loracompress.runtime.model.BaseModel` (or anything with a ``.model``). With
    ``original=None`` the reference is the base model without any adapter.
    """
    model = base.model if hasattr(base, "model") else base
    attach(model, compressed, teacher=original)
    try:
        return evaluate(model, batches, task, temperature=temperature,
                        reference="teacher" if original is not None else "base", on_batch=on_batch,
                        per_sample=per_sample)
    finally:
        detach(model)


@dataclass(kw_only=True)
class EvalOptions(ModelOptions, DataOptions):
    """What ``loracompress eval`` can be told: the shared model and data options, and what to compare."""

    data: str
    reference: str | None = None
    #: of the measured KL: 1 compares the models' own distributions (prune's --temperature is a
    #: training setting, the distillation's, and defaults to the engine's 2)
    temperature: float = 1.0


def evaluate_paths(adapter_path: str | Path, options: EvalOptions) -> dict[str, Any]:
    """Evaluate the adapter at ``adapter_path`` against ``options.reference`` (an adapter folder),
    or against the base model alone when there is no reference, on ``options.data``."""

    if options.temperature <= 0:
        raise LoraCompressError(f"--temperature must be positive (got {options.temperature})")
    resolve_device(options.device)  # an unusable --device is refused before anything loads
    adapter = load_adapter(adapter_path)
    reference = load_adapter(options.reference) if options.reference else None
    if reference is not None:
        _check_same_model(adapter, reference, options.reference)
    notes = []
    if reference is not None and _heads_differ(adapter, reference):
        notes.append("the two adapters carry different modules_to_save tensors (heads); each runs with its own")
    # The reference's record of its base (and its heads) when there is one: it is the ground truth.
    base = load_base(reference or adapter, options)
    task = task_of(base)
    examples, batches = read_batches(base, options.data, options)
    result = compare_adapters(base, reference, adapter, batches, task, temperature=options.temperature)
    result.update({
        "adapter": str(adapter_path),
        "reference_adapter": str(options.reference) if options.reference else None,
        "base_model": base.source,
        "data": str(options.data),
        "data_fields": {k: v for k, v in examples.info.items() if k.endswith("_field") or k == "format"},
        "params": {"before": reference.num_params if reference is not None else 0, "after": adapter.num_params},
    })
    if examples.label_names:
        result["label_names"] = examples.label_names
    if notes:
        result["notes"] = notes
    return result


def _check_same_model(adapter: Adapter, reference: Adapter, where: str | Path) -> None:
    """The evaluated adapter must be a cut of the reference: its modules are the reference's, at the same sizes.

    (A compressed adapter may lack modules whose rank went to 0; the base model follows the reference.)
    """
    for path, m in adapter.modules.items():
        ref = reference.modules.get(path)
        if ref is None:
            raise LoraCompressError(
                f"module {path} of the adapter is not in the reference {where}: it is an adapter of another model; "
                "pass the original adapter this one was compressed from as --reference"
            )
        if (m.out_features, m.in_features) != (ref.out_features, ref.in_features):
            raise LoraCompressError(
                f"module {path}: the adapter is {m.out_features}×{m.in_features} but the --reference {where} has "
                f"{ref.out_features}×{ref.in_features}; pass the original adapter this one was compressed from"
            )


def _heads_differ(a: Adapter, b: Adapter) -> bool:
    if set(a.extra_tensors) != set(b.extra_tensors):
        return True
    # a compressed copy may be stored in fp16/bf16: equal up to that rounding
    return any(not torch.allclose(a.extra_tensors[k].float(), b.extra_tensors[k].float(), rtol=1e-2, atol=1e-3)
               for k in a.extra_tensors)
