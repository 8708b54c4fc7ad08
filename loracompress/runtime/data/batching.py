"""Tokenising :class:`Example` s and padding them into model batches."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) ignore
#: batch keys that are model inputs (``labels`` is not: callers compute their own losses)
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int] | None = None  # per-token LM labels
    type_ids: list[int] | None = None


def make_batches(
    examples: list[Example],
    tokenizer: Any,
    *,
    task: str,
    seq_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize and pad ``examples`` into batches (right padding, truncated to ``seq_len``).

    ``task == "cls"``: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
    makes them), plus ``labels`` (LongTensor[B]) when every example has a label.
    ``task == "lm"``: ``input_ids``, ``attention_mask``, ``labels`` = ``input_ids`` with -100 on
    padding and, for prompt/completion pairs, on the prompt tokens.
    """
    if task not in ("cls", "lm"):
        raise ValueError(f"task must be 'cls' or 'lm', not {task!r}")
    if tokenizer is None:
        raise LoraCompressError("the base model has no tokenizer; pass a --base-model folder that includes one")
    if seq_len < 2 or batch_size < 1:
        raise LoraCompressError(f"--seq-len must be >= 2 and --batch-size >= 1 (got {seq_len}, {batch_size})")
    if not examples:
        raise LoraCompressError("no samples to batch; pass more data")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    pad_id = _pad_id(tokenizer)
    with_labels = task == "cls" and all(e.label is not None for e in examples)
    encoded = [_encode(examples[i], tokenizer, task, seq_len) for i in order]
    if task == "lm":
        empty = sum(1 for e in encoded if e.labels is not None and all(v == IGNORE_INDEX for v in e.labels[1:]))
        if empty:
            log.warning("%d sample(s) have no completion tokens left within --seq-len %d; raise --seq-len",
                        empty, seq_len)
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[r, :len(e.ids)] = 1
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if chunk[0].type_ids is not None:
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, e in enumerate(chunk):
                types[r, :len(e.ids)] = torch.tensor(e.type_ids or [0] * len(e.ids), dtype=torch.long)
            batch["token_type_ids"] = types
        if task == "lm":
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for r, e in enumerate(chunk):
                labels[r, :len(e.ids)] = torch.tensor(e.labels, dtype=torch.long)
            batch["labels"] = labels
        elif with_labels:
            batch["labels"] = torch.tensor([examples[i].label for i in order[start:start + batch_size]],
                                           dtype=torch.long)
        batches.append(batch)
    return batches


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0  # masked out everywhere it is used


def _encode(e: Example, tokenizer: Any, task: str, seq_len: int) -> _Encoded:
    if task == "cls":
        enc = tokenizer(e.text, e.pair, truncation=True, max_length=seq_len)
        ids = list(enc["input_ids"])
        types = enc.get("token_type_ids")
        return _Encoded(ids=ids, type_ids=list(types) if types is not None else None)
    if e.completion is None:
        ids = list(tokenizer(e.text, truncation=True, max_length=seq_len)["input_ids"])
        return _Encoded(ids=ids, labels=list(ids))
    # The prompt's own tokenization gives where the completion starts; the joint one gives
    # the tokens (BPE may merge across the seam, so the boundary is the prompt's length).
    full = list(tokenizer(e.text + e.completion, truncation=True, max_length=seq_len)["input_ids"])
    n_prompt = len(tokenizer(e.text)["input_ids"])
    labels = [IGNORE_INDEX if k < n_prompt else t for k, t in enumerate(full)]
    return _Encoded(ids=full, labels=labels)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch (no ``labels``, so HF models do not compute a loss)."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_KEYS}
