"""The records the data package hands around: one :class:`Example` per sample, a list of them with provenance."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class Example:
    """One sample.

    Attributes:
        text: the input text (the prompt when ``completion`` is set; the first text of a pair).
        label: class index for classification.
        completion: for prompt/completion pairs (causal LM): the loss is on these tokens only.
        pair: the second text of a sentence pair (classification), encoded as the tokenizer's pair.
    """

    text: str
    label: int | None = None
    completion: str | None = None
    pair: str | None = None


class Examples(list):  # type: ignore[type-arg]
    """A ``list[Example]`` that also records how it was read (fields, label names, source)."""

    def __init__(self, items: Iterable[Example] = (), *, label_names: list[str] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.label_names = label_names
        self.info: dict[str, Any] = dict(info or {})

    def derive(self, items: Iterable[Example]) -> Examples:
        """A new collection of ``items`` with this one's label names and info."""
        return Examples(items, label_names=self.label_names, info=self.info)
