"""Label values to class indices, and the check of those indices against a classifier's head."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from loracompress.errors import LoraCompressError
from loracompress.runtime.data.examples import Example

log = logging.getLogger(__name__)


def class_indices(
    values: list[Any], p: Path, name: str, label2id: dict[str, int] | None
) -> tuple[list[int] | None, list[str] | None]:
    """Class indices for ``values`` and, for string labels, the names in index order.

    ``(None, None)`` when the data is unlabelled (the field empty everywhere, or every label -1).
    """
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
        if label2id:
            missing = sorted(set(strs) - set(label2id))
            if missing:
                raise LoraCompressError(
                    f"data {p}: label {missing[0]!r} is not one of the model's labels ({', '.join(sorted(label2id))}); fix the data"
                )
            mapping = dict(label2id)
        else:
            mapping = {s: i for i, s in enumerate(sorted(set(strs)))}
        names = [n for n, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        log.info("data %s: string labels mapped to indices: %s", p, mapping)
        return [mapping[s] for s in strs], names
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
