"""Label values to class indices, and the check of those indices against a classifier's head.

String labels ("fresh", "rotten") need to know which class index each name is in the head. That
comes from the user (``--label-map fresh=1,rotten=0``), else from the head's own ``id2label`` when
it has real names. A head without names (``LABEL_0``, ``LABEL_1``, …) gives no order to trust:
string labels are then refused rather than guessed, since a wrong guess inverts every metric
silently. Reading data without a model (:func:`~loracompress.runtime.data.read_examples` on its
own) keeps the sorted order and records it in ``label_names``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelNames:
    """Where string labels get their class indices.

    Attributes:
        mapping: name -> class index; ``None`` when nothing says.
        origin: who gave ``mapping``, named in errors (``"--label-map"``, ``"the model's labels"``).
        required: refuse string labels when there is no ``mapping`` (a classifier head without names).
    """

    mapping: dict[str, int] | None = None
    origin: str = "the model's labels"
    required: bool = False


def parse_label_map(text: str) -> dict[str, int]:
    """``"fresh=1,rotten=0"`` -> ``{"fresh": 1, "rotten": 0}``; each name once, each index once, indices >= 0."""
    mapping: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise LoraCompressError(f"--label-map {item!r}: write NAME=INDEX pairs, e.g. --label-map fresh=1,rotten=0")
        try:
            index = int(value.strip())
        except ValueError:
            raise LoraCompressError(
                f"--label-map {item!r}: {value.strip()!r} is not a class index; write NAME=INDEX, e.g. fresh=1"
            ) from None
        if index < 0:
            raise LoraCompressError(f"--label-map {item!r}: class index {index} must be >= 0")
        if name in mapping:
            raise LoraCompressError(f"--label-map names {name!r} twice; give each name once")
        other = next((n for n, i in mapping.items() if i == index), None)
        if other is not None:
            raise LoraCompressError(
                f"--label-map gives index {index} twice ({other!r} and {name!r}); give each class one name"
            )
        mapping[name] = index
    if not mapping:
        raise LoraCompressError("--label-map is empty; write NAME=INDEX pairs, e.g. --label-map fresh=1,rotten=0")
    return mapping


def class_indices(
    values: list[Any], p: Path, name: str, names: LabelNames | None = None
) -> tuple[list[int] | None, list[str] | None]:
    """Class indices for ``values`` and, for string labels, the names in index order.

    ``(None, None)`` when the data is unlabelled (the field empty everywhere, or every label -1).
    """
    names = names or LabelNames()
    label2id = names.mapping
    present = [v for v in values if v is not None and v != ""]
    if not present:
        log.warning("data %s: field %r is empty everywhere; treating the data as unlabelled", p, name)
        return None, None
    if len(present) != len(values):
        raise LoraCompressError(
            f"data {p}: {len(values) - len(present)} of {len(values)} samples have no {name!r}; label every sample or pass --label-field ''"
        )
    kinds = {_label_kind(v) for v in present}
    if kinds == {"int"}:
        if label2id and names.origin == "--label-map":
            raise LoraCompressError(
                f"data {p}: --label-map is for string labels, but {name!r} holds integer class indices; drop --label-map"
            )
        ints = [int(float(v)) if isinstance(v, str) else int(v) for v in present]
        if all(v == -1 for v in ints):  # the HF convention for an unlabelled (test) split
            log.warning("data %s: every %r is -1 (unlabelled split); ignoring labels", p, name)
            return None, None
        bad = next((v for v in ints if v < 0), None)
        if bad is not None:
            raise LoraCompressError(f"data {p}: label {bad} in {name!r} is negative; labels must be class indices >= 0")
        return ints, None
    if kinds == {"str"}:
        strs = [str(v).strip() for v in present]
        found = sorted(set(strs))
        if label2id:
            missing = [s for s in found if s not in label2id]
            if missing and names.origin == "--label-map":
                raise LoraCompressError(
                    f"data {p}: label {missing[0]!r} is not in --label-map ({', '.join(label2id)}); "
                    f"add it, e.g. --label-map {','.join(f'{k}={v}' for k, v in label2id.items())},{missing[0]}=N"
                )
            if missing:
                raise LoraCompressError(
                    f"data {p}: label {missing[0]!r} is not one of the model's labels ({', '.join(sorted(label2id))}); "
                    "fix the data or pass --label-map NAME=INDEX,..."
                )
            mapping = dict(label2id)
        elif names.required:
            shown = ", ".join(repr(s) for s in found[:6]) + (", ..." if len(found) > 6 else "")
            raise LoraCompressError(
                f"data {p}: labels are names ({shown}) but the model's head has no label names (id2label is LABEL_0, ...); "
                f"pass --label-map {','.join(f'{s}=N' for s in found[:6])} with each name's class index in the head"
            )
        else:
            mapping = {s: i for i, s in enumerate(found)}
        index_order = [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        log.info("data %s: string labels mapped to indices: %s", p, mapping)
        return [mapping[s] for s in strs], index_order
    example = next(v for v in present if _label_kind(v) not in ("int", "str") or len(kinds) > 1)
    raise LoraCompressError(
        f"data {p}: field {name!r} mixes label kinds or holds non-class values (e.g. {example!r}); "
        "use one integer or string class per sample, or pass --label-field"
    )


def _label_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "int"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "int" if v.is_integer() else "other"
    if isinstance(v, str):
        try:
            x = float(v)  # "1" or "1.0" from a CSV is a class index, "0.5" is not a class
        except ValueError:
            return "str"
        return "int" if x.is_integer() else "other"
    return "other"


def check_labels(examples: list[Example], num_labels: int) -> None:
    """Every label must be a class of the model's head (``0 .. num_labels-1``)."""
    for i, e in enumerate(examples):
        if e.label is not None and not 0 <= e.label < num_labels:
            raise LoraCompressError(
                f"sample {i} has label {e.label} but the model's head has {num_labels} classes (0..{num_labels - 1}); "
                "fix the labels or pass the right --label-field"
            )
