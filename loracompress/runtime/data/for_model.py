"""Helpers that look at a loaded base model (a :class:`~loracompress.runtime.model.BaseModel` or
anything with ``.model``, ``.tokenizer`` and ``.task_type``): its task, its pad id, its label names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Examples
from loracompress.runtime.data.labels import check_labels
from loracompress.runtime.data.reading import read_examples


def prepare_model(base_model: Any) -> None:
    """Tell the model the tokenizer's pad id: HF classifiers with a decoder body (Llama, GPT-2, ...)
    find each sequence's last token by it, and refuse batches of more than one without it."""
    tok, config = getattr(base_model, "tokenizer", None), getattr(base_model.model, "config", None)
    pad = getattr(tok, "pad_token_id", None)
    if config is not None and getattr(config, "pad_token_id", None) is None and isinstance(pad, int):
        config.pad_token_id = pad


def model_label2id(base_model: Any) -> dict[str, int] | None:
    """The model's own label names (``config.label2id``), unless they are the generic ``LABEL_i``."""
    mapping = getattr(getattr(base_model.model, "config", None), "label2id", None) or {}
    if not mapping or all(str(k).startswith("LABEL_") for k in mapping):
        return None
    return {str(k): int(v) for k, v in mapping.items()}


def read_for_model(
    base_model: Any,
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> Examples:
    """:func:`read_examples` for ``base_model``: string labels in the model's order, labels checked
    against its head."""
    examples = read_examples(path, text_field=text_field, label_field=label_field, max_samples=max_samples,
                             seed=seed, label2id=model_label2id(base_model))
    num_labels = int(getattr(getattr(base_model.model, "config", None), "num_labels", 0) or 0)
    if task_of(base_model) == "cls" and num_labels:
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
