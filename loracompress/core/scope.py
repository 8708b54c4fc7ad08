"""Which LoRA tensors of an adapter's weights file PEFT really loads.

PEFT does not apply every ``lora_A``/``lora_B`` tensor of ``adapter_model.safetensors``. It builds
LoRA layers only on the modules ``adapter_config.json`` targets (``target_modules``, narrowed by
``layers_to_transform`` / ``layers_pattern``, minus ``exclude_modules`` and ``modules_to_save``), then
loads the tensors whose keys name those layers under the adapter's name
(``….lora_A.weight`` or ``….lora_A.default.weight``). Every other tensor is an "unexpected key" it
skips with a warning. The reader keeps exactly what PEFT keeps and records the rest as
:class:`Skipped`, so that every command can say what it left out.

The rules mirror ``peft.tuners.tuners_utils.check_target_module_exists`` and the key remapping of
``set_peft_model_state_dict`` (peft 0.22); peft itself is not imported (it is a dev dependency only).
What needs the base model cannot be decided here: ``target_modules: null`` (PEFT then picks its
default list for the model type) keeps every module of the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from loracompress.errors import LoraCompressError

KEY_PREFIX = "base_model.model."
#: PEFT's shorthand for every Linear/Conv1D layer except the output layer.
ALL_LINEAR = "all-linear"
#: The classifier heads PEFT leaves out of ``all-linear`` for SEQ_CLS models without output embeddings.
_SEQ_CLS_HEADS = ("score", "classifier")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<part>A|B|E|embedding_A|embedding_B|magnitude_vector)(?P<rest>(?:\.[^.]+)*)$")
#: Parts LoRA layers store as sub-modules (``lora_A.<adapter>.weight``); the others, and all of AdaLoRA's, are
#: parameters (``lora_E.<adapter>``).
_MODULE_PARTS = ("A", "B")


@dataclass(frozen=True)
class Skipped:
    """A module (or a file key) of the weights file that PEFT does not load, and why."""

    name: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class LoraKey:
    """A LoRA tensor's key, split: module path, part (``A``, ``B``, ``E``, …) and adapter name."""

    path: str
    part: str
    #: the adapter name the key carries (``None``: none, the form save_pretrained writes)
    adapter: str | None
    #: the key has a form PEFT never loads (``lora_B.bias`` without lora_bias, ``lora_A`` without ``.weight``)
    odd: bool = False

    @property
    def ours(self) -> bool:
        """PeftModel.from_pretrained loads it as the (default) adapter."""
        return not self.odd and self.adapter in (None, "default")


def parse_lora_key(key: str, adalora: bool = False) -> LoraKey | None:
    """The parts of a LoRA tensor's key (``base_model.model.`` prefix or not), or ``None`` for any other tensor."""
    bare = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    m = _LORA_KEY.match(bare)
    if m is None:
        return None
    rest = m["rest"].split(".")[1:]
    weight = bool(rest) and rest[-1] == "weight"
    name = rest[:-1] if weight else rest
    # Modules: checkpoint form lora_A.weight, model form lora_A.<name>.weight. Parameters (lora_E, AdaLoRA's
    # A and B): lora_E and lora_E.<name>; a ".weight" after them is read too (older tools wrote one).
    module = m["part"] in _MODULE_PARTS and not adalora
    odd = len(name) > 1 or (module and not weight)
    return LoraKey(m["path"], m["part"], name[0] if name and not odd else None, odd=odd)


def key_skip_reason(key: LoraKey) -> str:
    """Why PEFT does not load a LoRA tensor that is not ours (see :attr:`LoraKey.ours`)."""
    if key.odd:
        return "a key form PEFT does not load (it would be an unexpected key)"
    return (f"adapter name {key.adapter!r}: PEFT loads lora_A.weight or lora_A.default.weight keys as the adapter, "
            f"not lora_A.{key.adapter}.weight")


# --------------------------------------------------------------------------- the config's scope


@dataclass(frozen=True)
class Scope:
    """Where ``adapter_config.json`` lets PEFT put a LoRA layer."""

    #: ``None``: unknown without the base model (keep all); a regex string (full match), or names (exact or suffix)
    target_modules: str | frozenset[str] | None
    exclude_modules: str | frozenset[str] | None
    layers_to_transform: frozenset[int] | None
    layers_pattern: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    seq_cls: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Scope:
        """Read and check the fields; refuses what PEFT refuses (LoraConfig.__post_init__, bad regexes)."""
        targets = _names_or_regex(config.get("target_modules"), "target_modules", where)
        exclude = _names_or_regex(config.get("exclude_modules"), "exclude_modules", where)
        layers = _layer_indexes(config.get("layers_to_transform"), where)
        pattern = config.get("layers_pattern")
        patterns = _strings(pattern, "layers_pattern", where) if pattern not in (None, "", []) else ()
        for name in ("layers_to_transform", "layers_pattern"):
            if isinstance(targets, str) and config.get(name) is not None:
                raise LoraCompressError(f"{where}: {name} cannot be used when target_modules is a string (PEFT refuses "
                                        f"this config); make target_modules a list of names or drop {name}")
        if patterns and config.get("layers_to_transform") is None:
            raise LoraCompressError(f"{where}: layers_pattern is set without layers_to_transform (PEFT refuses this "
                                    "config); add layers_to_transform or drop layers_pattern")
        saved = config.get("modules_to_save")
        to_save = _strings(saved, "modules_to_save", where) if saved else ()
        for name in to_save:
            _compile(rf"(^|.*\.){name}($|\..*)", "modules_to_save", where)
        return cls(targets, exclude, layers, tuple(patterns), tuple(to_save),
                   str(config.get("task_type") or "").upper() == "SEQ_CLS")

    def skip_reason(self, path: str) -> str | None:
        """``None`` when PEFT puts a LoRA layer on the module at ``path``, else why it does not."""
        if isinstance(self.exclude_modules, str):
            if re.fullmatch(self.exclude_modules, path):
                return "excluded by exclude_modules"
        elif self.exclude_modules and _name_match(self.exclude_modules, path):
            return "excluded by exclude_modules"
        if any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in self.modules_to_save):
            return "in modules_to_save (PEFT puts no LoRA layer there)"
        targets = self.target_modules
        if targets is None:
            return None
        if isinstance(targets, str):
            if targets.lower() == ALL_LINEAR:
                return self._all_linear(path)
            return None if re.fullmatch(targets, path) else "not matched by target_modules"
        if path in targets:  # a full name: PEFT does not look at the layer index then
            return None
        if not _name_match(targets, path):
            return "not matched by target_modules"
        return self._layer_reason(path)

    def _all_linear(self, path: str) -> str | None:
        """PEFT's ``all-linear`` leaves out the output layer (``lm_head``; a SEQ_CLS head when there is none)."""
        if path == "lm_head" or (self.seq_cls and path in _SEQ_CLS_HEADS):
            return "the output layer, which all-linear leaves out"
        return None

    def _layer_reason(self, path: str) -> str | None:
        if not self.layers_to_transform:
            return None
        match = None
        if not self.layers_pattern:
            # the first numbered segment is the layer index (not a nested one, such as an MoE expert's)
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if match is not None:
                    break
        if match is None:
            return "no layer index for layers_to_transform" + (" / layers_pattern" if self.layers_pattern else "")
        index = int(match["idx"])
        return None if index in self.layers_to_transform else "its layer is not in layers_to_transform"

    def describe(self) -> str:
        """The config fields that decided, for messages."""
        parts = [f"target_modules={_shown(self.target_modules)}"]
        if self.exclude_modules:
            parts.append(f"exclude_modules={_shown(self.exclude_modules)}")
        if self.layers_to_transform:
            parts.append(f"layers_to_transform={sorted(self.layers_to_transform)}")
        return ", ".join(parts)


def _name_match(names: frozenset[str], path: str) -> bool:
    """PEFT's list rule: the exact module name, or a suffix after a dot."""
    return path in names or any(path.endswith(f".{name}") for name in names)


def _shown(value: str | frozenset[str] | None) -> str:
    return repr(value) if not isinstance(value, frozenset) else str(sorted(value))


def _compile(pattern: str, what: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise LoraCompressError(f"{where}: {what} is not a valid regex ({err}); fix {what} in adapter_config.json") from None


def _strings(value: Any, what: str, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise LoraCompressError(f"{where}: {what}={str(value)[:60]} must be a string or a list of strings; fix adapter_config.json")
    return items


def _names_or_regex(value: Any, what: str, where: str) -> str | frozenset[str] | None:
    """PEFT's two forms: a string is one regex (full match), a list holds module names."""
    if value is None:
        return None
    if isinstance(value, str):
        _compile(value, what, where)
        return value
    return frozenset(_strings(value, what, where))


def _layer_indexes(value: Any, where: str) -> frozenset[int] | None:
    if value is None or value == []:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise LoraCompressError(f"{where}: layers_to_transform={str(value)[:60]} must be a layer index or a list of "
                                "them; fix adapter_config.json")
    return frozenset(items)


# --------------------------------------------------------------------------- the file's keys


def split_tensors(
    tensors: dict[str, torch.Tensor], where: str, adalora: bool = False
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[Skipped]]:
    """The adapter's LoRA tensors by module path and part, the other tensors (by key), and the LoRA keys skipped.

    A module may be stored under both key forms (with and without ``base_model.model.``, with and without
    ``.default``): equal copies are one tensor; different values are refused, since PEFT's loaders
    disagree on which one counts (PeftModel reads the prefixed key, transformers' ``load_adapter`` the last).
    """
    found: dict[tuple[str, str], list[tuple[str, torch.Tensor]]] = {}
    extra: dict[str, torch.Tensor] = {}
    skipped: list[Skipped] = []
    for key, tensor in tensors.items():
        parsed = parse_lora_key(key, adalora)
        if parsed is None:
            extra[key] = tensor
        elif not parsed.ours:
            skipped.append(Skipped(key, key_skip_reason(parsed)))
        else:
            found.setdefault((parsed.path, parsed.part), []).append((key, tensor))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for (path, part), copies in found.items():
        (first_key, first), *others = copies
        for key, other in others:
            if other.dtype != first.dtype or other.shape != first.shape or not torch.equal(other, first):
                raise LoraCompressError(
                    f"{where}: module {path} is stored twice with different values ({first_key!r} and {key!r}); "
                    "PEFT's loaders disagree on which one counts: keep one of them and re-save the adapter"
                )
        parts.setdefault(path, {})[part] = first
    return parts, extra, sorted(skipped, key=lambda s: s.name)


def summary(skipped: list[Skipped], shown: int = 3) -> str:
    """One line: ``left out 18 LoRA modules or keys that PEFT does not load: not matched by target_modules (a, b, c, … 15 more)``."""
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.name)
    groups = []
    for reason, names in by_reason.items():
        more = f", … {len(names) - shown} more" if len(names) > shown else ""
        groups.append(f"{reason} ({', '.join(names[:shown])}{more})")
    return f"left out {len(skipped)} LoRA modules or keys that PEFT does not load: " + "; ".join(groups)
