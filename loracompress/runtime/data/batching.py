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


#: characters a token covers at least in the character limit (``--seq-len`` × this): no common
#: vocabulary has longer tokens, and a tokenizer's own longest entry raises it
CHARS_PER_TOKEN = 32


def char_limit(tokenizer: Any, seq_len: int) -> int:
    """How many characters of a text can reach ``seq_len`` tokens: the rest is cut before tokenising.

    ``seq_len`` tokens cover at most ``seq_len`` × (the longest vocabulary entry) characters, so the
    cut never changes the tokens kept (except after runs of characters the tokenizer drops, such as
    whitespace, longer than the limit). Without it a 100 MB line is tokenised whole to keep 128 tokens.
    """
    longest = CHARS_PER_TOKEN
    try:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        longest = max(longest, max((len(str(t)) for t in vocab), default=0))
    except (AttributeError, NotImplementedError, TypeError):
        pass
    return seq_len * min(longest, 1024)


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
    max_positions: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize and pad ``examples`` into batches (right padding, truncated to ``seq_len``).

    Texts are cut to :func:`char_limit` characters first. ``max_positions`` (the model's position
    limit, :func:`~loracompress.runtime.data.for_model.position_limit`): a sample longer than it
    within ``seq_len`` is refused, naming the ``--seq-len`` that fits.

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
    cut = char_limit(tokenizer, seq_len)
    encoded = [_encode(examples[i], tokenizer, task, seq_len, cut) for i in order]
    if max_positions is not None and seq_len > max_positions:
        # Refused, not clamped: the run's records would say --seq-len N while the model saw fewer tokens.
        long = next((k for k, e in enumerate(encoded) if len(e.ids) > max_positions), None)
        if long is not None:
            raise LoraCompressError(
                f"sample {order[long]} has more tokens than the base model's {max_positions} positions and "
                f"--seq-len {seq_len} keeps them; pass --seq-len {max_positions} or less"
            )
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


def _encode(e: Example, tokenizer: Any, task: str, seq_len: int, cut: int) -> _Encoded:
    text = e.text[:cut]
    pair = e.pair[:cut] if e.pair is not None else None
    completion = e.completion[:cut] if e.completion is not None else None
    if task == "cls":
        enc = tokenizer(text, pair, truncation=True, max_length=seq_len)
        ids = list(enc["input_ids"])
        types = enc.get("token_type_ids")
        return _Encoded(ids=ids, type_ids=list(types) if types is not None else None)
    if completion is None:
        ids = list(tokenizer(text, truncation=True, max_length=seq_len)["input_ids"])
        return _Encoded(ids=ids, labels=list(ids))
    # The prompt's own tokenization gives where the completion starts; the joint one gives
    # the tokens (BPE may merge across the seam, so the boundary is the prompt's length).
    full = list(tokenizer(text + completion, truncation=True, max_length=seq_len)["input_ids"])
    n_prompt = len(tokenizer(text)["input_ids"])
    labels = [IGNORE_INDEX if k < n_prompt else t for k, t in enumerate(full)]
    return _Encoded(ids=full, labels=labels)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch (no ``labels``, so HF models do not compute a loss)."""
    return {k: (v.to(device) if device is not None else v) for k, v in batch.items() if k in MODEL_KEYS}
