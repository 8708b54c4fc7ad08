"""Helpers that look at a loaded base model (a :class:`~loracompress.runtime.model.BaseModel` or
anything with ``.model``, ``.tokenizer`` and ``.task_type``): its task, its pad id, its label names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Examples
from loracompress.runtime.data.labels import LabelNames, check_labels
from loracompress.runtime.data.reading import read_examples


def prepare_model(base_model: Any) -> None:
    """Tell the model the tokenizer's pad id: HF classifiers with a decoder body (Llama, GPT-2, ...)
    find each sequence's last token by it, and refuse batches of more than one without it."""
    tok, config = getattr(base_model, "tokenizer", None), getattr(base_model.model, "config", None)
    pad = getattr(tok, "pad_token_id", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and isinstance(pad, int):
        config.pad_token_id = pad


def model_label2id(base_model: Any) -> dict[str, int] | None:
    """The head's own label names (``config.id2label`` as name -> index), unless they are the generic ``LABEL_i``."""
    id2label = getattr(getattr(base_model.model, "config", None), "id2label", None) or {}
    names = {str(v): int(k) for k, v in id2label.items()}
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def position_limit(base_model: Any) -> int | None:
    """How many tokens the model can read at once: its position table (``max_position_embeddings``,
    ``n_positions``), lowered by the tokenizer's ``model_max_length`` where that is smaller (RoBERTa's
    table has 2 rows more than it can use). ``None`` when nothing says."""
    config = getattr(base_model.model, "config", None)
    limits = [v for v in (getattr(config, a, None) for a in ("max_position_embeddings", "n_positions"))
              if isinstance(v, int) and v > 0]
    tok_max = getattr(getattr(base_model, "tokenizer", None), "model_max_length", None)
    if limits and isinstance(tok_max, int) and 0 < tok_max < min(limits):
        limits.append(tok_max)
    return min(limits) if limits else None


def read_for_model(
    base_model: Any,
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    label_map: dict[str, int] | None = None,
    max_chars: int | None = None,
) -> Examples:
    """:func:`read_examples` for ``base_model``: labels checked against its head.

    String labels take their class index from ``label_map`` (``--label-map``), else from the head's
    own names; a classifier whose head has no names refuses them (see :mod:`.labels`).
    """
    is_cls = task_of(base_model) == "cls"
    if label_map:
        names = LabelNames(dict(label_map), origin="--label-map")
    else:
        names = LabelNames(model_label2id(base_model), required=is_cls)
    examples = read_examples(path, text_field=text_field, label_field=label_field, max_samples=max_samples,
                             seed=seed, label_names=names, max_chars=max_chars)
    num_labels = int(getattr(getattr(base_model.model, "config", None), "num_labels", 0) or 0)
    if is_cls and num_labels:
        check_labels(examples, num_labels)
    return examples


def task_of(base_model: Any) -> str:
    """``"cls"`` for sequence classification, ``"lm"`` for causal LMs (a :class:`~loracompress.runtime.model.BaseModel`)."""
    task = getattr(base_model, "task_type", None)
    if task == "SEQ_CLS":
        return "cls"
    if task == "CAUSAL_LM" or getattr(base_model, "is_causal_lm", False):
        return "lm"
    raise LoraCompressError(
        f"data-driven compression supports CAUSAL_LM and SEQ_CLS adapters, not task_type {task!r}; "
        "use the training-free cut (no --data)"
    )
