"""The entry point from a path to :class:`Examples`: read the rows, find the fields, take a subset."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example, Examples
from loracompress.runtime.data.fields import Held, examples_from_records, take
from loracompress.runtime.data.labels import LabelNames
from loracompress.runtime.data.readers import read_records


def read_examples(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    label2id: dict[str, int] | None = None,
    label_names: LabelNames | None = None,
    max_chars: int | None = None,
) -> Examples:
    """Read the samples in ``path`` (a file or a ``save_to_disk`` folder).

    Args:
        path: the data file or folder.
        text_field: the field holding the text; detected when ``None``.
        label_field: the field holding the class; detected when ``None``. Give ``""`` to ignore labels.
        max_samples: keep a seeded random subset of at most this many samples (in file order).
        seed: seed of that subset.
        label2id: how string labels map to indices (e.g. the model's ``config.label2id``);
            sorted order when ``None``.
        label_names: the same with its origin, and whether string labels need it (wins over ``label2id``).
        max_chars: cut every text to this many characters while reading (see
            :func:`~loracompress.runtime.data.batching.char_limit`); ``None`` keeps them whole.

    Raises:
        LoraCompressError: missing, empty, binary or non-UTF-8 data, not a regular file (``/dev/zero``, a
            pipe), no text field, too many rows without it, bad labels.
    """
    p = Path(path).expanduser()
    if max_samples is not None and max_samples < 1:
        raise LoraCompressError(f"--max-samples must be >= 1 (got {max_samples})")
    if not p.exists():
        raise LoraCompressError(f"data {p} not found; pass --data with an existing file or folder")
    if not p.is_dir() and not p.is_file():  # a device (/dev/zero), a pipe or a socket never ends or never seeks
        raise LoraCompressError(f"data {p} is not a regular file; pass a data file or a datasets folder")
    if label_names is None and label2id:
        label_names = LabelNames(dict(label2id))
    records, fmt = read_records(p, max_chars)

    def subset(n: int) -> list[int] | None:
        """A seeded random subset of ``max_samples`` of ``n`` positions, in file order (None: all)."""
        if max_samples is None or max_samples >= n:
            return None
        return sorted(random.Random(seed).sample(range(n), max_samples))

    choose = subset if max_samples is not None else None  # without a subset, every sample is held: one pass

    if fmt == "text":
        examples = _text_examples(records, p, choose)
    else:
        examples = examples_from_records(records, p, text_field=text_field, label_field=label_field,
                                         label_names=label_names, max_chars=max_chars, choose=choose)
        examples.info["format"] = fmt
    if not examples:
        raise LoraCompressError(f"data {p}: every sample has an empty text; pass a file with text in it")
    examples.info["source"] = str(p)
    examples.info["samples"] = len(examples)
    return examples


def _text_examples(texts: Iterable[str], p: Path, choose: Callable[[int], list[int] | None] | None) -> Examples:
    """Plain text: one sample per text, the subset taken as :func:`examples_from_records` takes it."""
    held: Held[str] = Held(bounded=choose is not None)
    n = 0
    for t in texts:
        n += 1
        held.add(t, len(t))
    if not n:
        raise LoraCompressError(f"data {p} holds no samples; pass a non-empty file")
    kept = take(held, texts, choose(n) if choose is not None else None, n, p)
    return Examples((Example(text=t) for t in kept), info={"format": "text", "text_field": None, "total_samples": n})
