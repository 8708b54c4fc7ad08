"""Which fields of the rows hold the text, the second text and the label; rows to :class:`Examples`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example, Examples
from loracompress.runtime.data.labels import LabelNames, class_indices

log = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "sentence", "content", "review", "document", "prompt", "input", "question",
               "instruction", "query", "body", "passage", "source", "sentence1", "premise", "tweet",
               "comment", "message", "abstract", "article", "title")
# (first, second) field names: a prompt followed by what the LM should produce.
COMPLETION_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("prompt", "chosen"),
                    ("prompt", "output"), ("prompt", "answer"), ("instruction", "output"),
                    ("instruction", "response"), ("input", "output"), ("input", "target_text"),
                    ("question", "answer"), ("query", "response"), ("source", "target_text"))
# (first, second) field names: two texts a classifier reads together.
SENTENCE_PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                  ("question1", "question2"), ("sentence_a", "sentence_b"), ("text_a", "text_b"),
                  ("question", "passage"))
LABEL_FIELDS = ("label", "labels", "target", "class", "y", "category", "sentiment")


def _pick(fields: Sequence[str], candidates: Sequence[str]) -> str | None:
    lower = {f.lower(): f for f in fields}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _pair(fields: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    lower = {f.lower(): f for f in fields}
    for a, b in pairs:
        if a in lower and b in lower:
            return lower[a], lower[b]
    return None


#: rows without the text field (another schema: ``sentence`` where the rest say ``text``) above this share
#: are refused: dropping them would quietly evaluate or calibrate on part of the data
MAX_MISSING_SHARE = 0.05


def examples_from_records(
    records: list[dict[str, Any]],
    p: Path,
    *,
    text_field: str | None,
    label_field: str | None,
    label_names: LabelNames | None = None,
    max_chars: int | None = None,
) -> Examples:
    """Detect (or check) the fields of ``records`` and build one :class:`Example` per row with text.

    Texts are cut to ``max_chars`` characters (see :func:`~loracompress.runtime.data.batching.char_limit`).
    Rows that lack the text field are *missing*: skipped with a warning up to :data:`MAX_MISSING_SHARE`
    of the rows, refused above it. Rows whose text is empty are skipped with a warning.
    """
    fields: list[str] = []
    for r in records[:1000]:  # union of the first rows' keys, in order of appearance
        fields.extend(k for k in r if k not in fields)
    seen = ", ".join(fields) or "none"
    second: str | None = None
    kind = "text"
    if text_field:
        if text_field not in fields:
            raise LoraCompressError(f"data {p} has no field {text_field!r} (fields: {seen}); fix --text-field")
        first = text_field
    else:
        comp = _pair(fields, COMPLETION_PAIRS)
        sent = _pair(fields, SENTENCE_PAIRS)
        if comp:
            (first, second), kind = comp, "completion"
        elif sent:
            (first, second), kind = sent, "pair"
        else:
            found = _pick(fields, TEXT_FIELDS)
            if found is None:
                raise LoraCompressError(f"data {p}: no text field found (fields: {seen}); pass --text-field NAME")
            first = found
    if label_field == "":
        lab = None
    elif label_field:
        if label_field not in fields:
            raise LoraCompressError(f"data {p} has no field {label_field!r} (fields: {seen}); fix --label-field")
        lab = label_field
    else:
        lab = _pick([f for f in fields if f not in (first, second)], LABEL_FIELDS)
        if lab is not None and kind == "completion":
            lab = None  # prompt/completion data is for LMs: a "target"-like column is not a class

    missing = [r for r in records if first not in r and (second is None or second not in r)]
    share = len(missing) / len(records)
    if share > MAX_MISSING_SHARE:
        others: list[str] = []
        for r in missing[:1000]:
            others.extend(k for k in r if k not in others)
        have = ", ".join(repr(k) for k in others[:5]) or "no fields"
        raise LoraCompressError(
            f"data {p}: {len(missing)} of {len(records)} rows ({_pct(share)}) have no {first!r} field (they have {have}); "
            f"make every row use {first!r}, or pass --text-field for the field they share"
        )
    if missing:
        log.warning("data %s: skipped %d of %d row(s) (%s) with no %r field", p, len(missing), len(records),
                    _pct(share), first)

    texts, empty = [], 0
    for i, r in enumerate(records):
        if first not in r and (second is None or second not in r):
            continue
        t, s = _text(r.get(first), p, first, i), _text(r.get(second), p, second, i) if second else None
        if not t and not s:
            empty += 1
            continue
        if max_chars is not None:
            t, s = t[:max_chars], s[:max_chars] if s is not None else None
        texts.append((i, t, s))
    if empty:
        log.warning("data %s: skipped %d sample(s) with an empty %r", p, empty, first)

    labels, names = class_indices([records[i].get(lab) for i, _, _ in texts], p, lab, label_names) if lab else (None, None)
    out = Examples(label_names=names, info={"text_field": first, "label_field": lab if labels else None})
    if kind == "completion":
        out.info["completion_field"] = second
    elif kind == "pair":
        out.info["pair_field"] = second
    for j, (_, t, s) in enumerate(texts):
        out.append(Example(
            text=t,
            label=labels[j] if labels is not None else None,
            completion=s if kind == "completion" else None,
            pair=s if kind == "pair" else None,
        ))
    return out


def _text(value: Any, p: Path, name: str | None, row: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise LoraCompressError(
        f"data {p}, sample {row}: field {name!r} holds a {type(value).__name__}, not text; pass --text-field with a text field"
    )


def _pct(share: float) -> str:
    """0.5 -> '50%', 0.025 -> '2.5%', 0.0667 -> '6.67%'."""
    return f"{100 * share:.3g}%"
