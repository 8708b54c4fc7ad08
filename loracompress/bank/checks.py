"""What a set of adapters must share to be banked together: one base, the same modules, one orientation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loracompress.core.adapter import Adapter
from loracompress.errors import LoraCompressError


@dataclass(frozen=True)
class BankShape:
    """What every adapter of a bank agrees on: ``shapes`` maps module path -> (out, in)."""

    base_model: str | None
    fan_in_fan_out: bool
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, adapter: Adapter) -> BankShape:
        base = adapter.config.get("base_model_name_or_path") or None
        shapes = {p: (m.out_features, m.in_features) for p, m in adapter.modules.items()}
        return cls(base_model=base, fan_in_fan_out=adapter.fan_in_fan_out, shapes=shapes)

    def check(self, adapter: Adapter, name: str, reference: str) -> None:
        """Refuse ``adapter`` (called ``name``) unless it matches this shape (taken from ``reference``)."""
        other = BankShape.of(adapter)
        if self.base_model and other.base_model and self.base_model != other.base_model:
            raise LoraCompressError(
                f"{name} was trained on {other.base_model!r} but {reference} on {self.base_model!r}; a bank holds adapters "
                "of one base model: bank each base's adapters apart"
            )
        if self.fan_in_fan_out != other.fan_in_fan_out:
            raise LoraCompressError(
                f"{name} has fan_in_fan_out={str(other.fan_in_fan_out).lower()} but {reference} "
                f"{str(self.fan_in_fan_out).lower()}; adapters of one base agree on it: re-save {name} with the base's layout"
            )
        missing = sorted(set(self.shapes) - set(other.shapes))
        extra = sorted(set(other.shapes) - set(self.shapes))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"also targets {extra[0]}"
            raise LoraCompressError(
                f"{name} {what} ({len(missing)} modules missing, {len(extra)} extra against {reference}); a bank needs "
                "the same target modules in every adapter: bank adapters with equal target_modules together"
            )
        for path, shape in self.shapes.items():
            if other.shapes[path] != shape:
                raise LoraCompressError(
                    f"{name}: module {path} is {other.shapes[path][0]}x{other.shapes[path][1]} but {shape[0]}x{shape[1]} in "
                    f"{reference}; the adapters are of different base models: bank each base's adapters apart"
                )


def folder_names(sources: Sequence[str | Path]) -> list[str]:
    """Each adapter's name in the bank: its folder's name, which must be unique."""
    names = [Path(s).resolve().name for s in sources]
    seen: dict[str, str | Path] = {}
    for name, src in zip(names, sources):
        if name in seen:
            raise LoraCompressError(
                f"two adapters are both named {name!r} ({seen[name]} and {src}); the bank names each adapter by its "
                "folder: rename or copy one of them"
            )
        seen[name] = src
    return names


def check_adapters(adapters: Sequence[Adapter], names: Sequence[str]) -> BankShape:
    """At least two adapters, all of one shape; returns that shape."""
    if len(adapters) < 2:
        raise LoraCompressError("a bank needs at least two adapters; for one adapter use `loracompress prune`")
    shape = BankShape.of(adapters[0])
    for adapter, name in zip(adapters[1:], names[1:]):
        shape.check(adapter, name, names[0])
    return shape
