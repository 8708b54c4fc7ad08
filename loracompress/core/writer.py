"""Writing the portable form (:func:`save_adapter`), read identically by every consumer:
the scale is folded into the weights, each module's ``alpha == rank`` (scale 1), the global
``r == lora_alpha == max rank`` (so a reader that ignores the patterns and applies one global
``lora_alpha / r``, as vLLM does, also sees scale 1), ``use_rslora`` is false, patterns are
keyed by anchored full module paths (``^model\\.layers\\.0\\.self_attn\\.q_proj$``), and
``init_lora_weights`` is ``true`` (the weights are trained; PEFT must not re-run an init at load).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from loracompress.core import jsonio
from loracompress.core.adapter import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    Adapter,
    natural_key,
)
from loracompress.core.dtypes import output_dtype
from loracompress.core.scope import KEY_PREFIX
from loracompress.core.validate import require_type
from loracompress.errors import LoraCompressError

# Fields of the input config that describe *where* LoRA was applied; the portable form lists
# modules by full path instead, so these would only contradict it.
_PLACEMENT_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")
_LORA_CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_dropout": 0.0,
    "modules_to_save": None,
    "init_lora_weights": True,
    "use_dora": False,
}


# Settings of the inits PEFT runs at load time, reset to their "not used" defaults in written configs.
_INIT_SETTINGS: dict[str, Any] = {"loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None}


def portable_config(adapter: Adapter) -> dict[str, Any]:
    """The ``adapter_config.json`` of the portable form (see module docstring)."""
    src = adapter.config
    if str(src.get("peft_type", "LORA")).upper() == "LORA":
        config = dict(src)
    else:  # AdaLoRA and others: keep only what a LoraConfig understands
        config = {k: src.get(k, v) for k, v in _LORA_CONFIG_DEFAULTS.items()}
    config.update({k: v for k, v in _LORA_CONFIG_DEFAULTS.items() if k not in config})
    config["peft_type"] = "LORA"
    kept = {p: m.rank for p, m in adapter.modules.items() if m.rank > 0}
    r = max(kept.values(), default=1)
    config.update(r=r, lora_alpha=r, use_rslora=False, target_modules=sorted(kept, key=natural_key))
    config.update(rank_patterns(kept, r))
    # The weights are trained: an init PEFT would re-run at load (PiSSA, LoftQ, ...) must not ride along.
    config["init_lora_weights"] = True
    for name, plain in _INIT_SETTINGS.items():
        if name in config:
            config[name] = plain
    for name in _PLACEMENT_FIELDS:
        config[name] = None
    return config


def pattern_key(path: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that names exactly ``path``.

    PEFT matches keys as regexes against a suffix of each module path (``(.*\\.)?(KEY)$``), so a
    bare ``attn.q`` would also hit ``block.attn.q``; ``^`` and ``$`` anchor it, ``re.escape`` keeps the
    dots literal.
    """
    return f"^{re.escape(path)}$"


def rank_patterns(ranks: dict[str, int], global_rank: int) -> dict[str, dict[str, int]]:
    """``rank_pattern`` and ``alpha_pattern`` (alpha == rank) for the modules whose rank is not ``global_rank``."""
    patterns = {pattern_key(p): k for p, k in sorted(ranks.items(), key=lambda kv: natural_key(kv[0])) if k != global_rank}
    _check_patterns_exact(patterns, ranks)
    return {"rank_pattern": patterns, "alpha_pattern": dict(patterns)}


def _check_patterns_exact(patterns: dict[str, int], paths: Iterable[str]) -> None:
    """Each key reaches only the module it names (a bug guard: anchored keys cannot do otherwise)."""
    for path in paths:
        hits = [k for k in patterns if re.match(rf"(.*\.)?({k})$", path)]
        if hits and hits != [pattern_key(path)]:
            raise RuntimeError(f"rank_pattern keys {hits} match {path!r}")


def portable_tensors(adapter: Adapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the portable form: the scale folded evenly into A and B (√|s| each, sign on B)."""
    out_dtype = dtype or adapter.dtype
    tensors: dict[str, torch.Tensor] = {}
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        if m.scale == 1.0:  # already folded: no copy unless the dtype changes
            A, B = m.A.to(out_dtype), m.B.to(out_dtype)
        else:
            root = math.sqrt(abs(m.scale))
            sign = 1.0 if m.scale >= 0 else -1.0
            A, B = (m.A.float() * root).to(out_dtype), (m.B.float() * (root * sign)).to(out_dtype)
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = B.contiguous()
    for key, t in adapter.extra_tensors.items():
        tensors[key] = t.contiguous()
    return tensors


def write_adapter_files(adapter: Adapter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Write the portable form into an existing (temporary) folder. See :func:`save_adapter`."""
    from loracompress.core.safeio import write_safetensors

    config = portable_config(adapter)
    metadata = {**adapter.metadata, "format": "pt"}
    write_safetensors(directory / SAFETENSORS_NAME, portable_tensors(adapter, dtype), metadata)
    jsonio.write_json(directory / CONFIG_NAME, config, sort_keys=True)


def _check_extra_files(extra_files: Any) -> None:
    """Each name is one plain file beside the adapter: never a path out of the folder, never its own files."""
    if extra_files is None:
        return
    require_type("save_adapter(extra_files)", extra_files, dict, "a dict of file name -> text")
    for name, text in extra_files.items():
        require_type("an extra_files name", name, str, "a file name")
        require_type(f"extra_files[{name!r}]", text, str, "text")
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
            raise LoraCompressError(f"extra_files name {name!r} is not a plain file name; give a name without folders")
        if name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
            raise LoraCompressError(f"extra_files name {name!r} would overwrite the adapter's own file; choose another name")


def save_adapter(
    adapter: Adapter,
    path: str | Path,
    dtype: torch.dtype | None = None,
    force: bool = False,
    extra_files: dict[str, str] | None = None,
    inputs: Iterable[str | Path | None] = (),
) -> Path:
    """Save the portable form atomically (temporary sibling folder, then rename).

    ``dtype``: fp32, fp16 or bf16 (a torch dtype or its name; default: the adapter's). ``extra_files`` maps
    plain file names (no folder, not the adapter's own files) to text written beside the adapter (report,
    card). ``inputs``: other paths the output must not overlap (the adapter's own source always counts).
    """
    from loracompress.core.outputs import atomic_output_dir

    require_type("save_adapter(adapter)", adapter, Adapter, "an Adapter (from load_adapter or compress_svd)")
    require_type("save_adapter(path)", path, (str, os.PathLike), "a folder path")
    dtype = output_dtype(dtype)
    _check_extra_files(extra_files)
    protected = [adapter.source, *inputs]
    with atomic_output_dir(path, force=force, inputs=protected) as tmp:
        write_adapter_files(adapter, tmp, dtype)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(path)
