"""Helpers for the hostile-input tests: small synthetic PEFT adapter folders and CLI assertions.

The adapters are written byte for byte the way PEFT's ``save_pretrained`` lays them out
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<path>.lora_A.weight``),
but without importing PEFT, so each case costs milliseconds. Module paths match
:func:`tests.tiny.tiny_llama` so the same folders load against a real tiny base model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

HIDDEN, INTER = 48, 80  # tiny_llama's sizes
KV = 24  # num_key_value_heads * head_dim
# (module path, in, out) for layer 0 of tiny_llama
LLAMA_MODULES = [
    ("model.layers.0.self_attn.q_proj", HIDDEN, HIDDEN),
    ("model.layers.0.self_attn.k_proj", HIDDEN, KV),
    ("model.layers.0.self_attn.v_proj", HIDDEN, KV),
    ("model.layers.0.mlp.up_proj", HIDDEN, INTER),
    ("model.layers.0.mlp.down_proj", INTER, HIDDEN),
]


DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def base_config(r: int = 4, alpha: int = 8, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(DEFAULT_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    config.update(changes)
    return config


def lora_tensors(
    r: int = 4, modules: list[tuple[str, int, int]] | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, n_in, n_out in modules or LLAMA_MODULES:
        tensors[f"base_model.model.{path}.lora_A.weight"] = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype)
        tensors[f"base_model.model.{path}.lora_B.weight"] = (torch.randn(n_out, r, generator=g) * 0.1).to(dtype)
    return tensors


def write_adapter(
    directory: Path,
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A PEFT adapter folder; ``config``/``tensors`` default to a valid 5-module rank-4 adapter.

    A config left at the default ``target_modules`` targets the modules ``tensors`` holds, as the config
    save_pretrained writes beside them does (PEFT skips LoRA tensors on modules its config does not target).
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = base_config() if config is None else config
    if tensors is not None and isinstance(config, dict) and config.get("target_modules") == DEFAULT_TARGETS:
        held = sorted({m["path"].rsplit(".", 1)[-1] for k in tensors
                       if (m := re.match(r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_", k))})
        config = {**config, "target_modules": held or DEFAULT_TARGETS}
    (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(lora_tensors() if tensors is None else tensors, str(directory / "adapter_model.safetensors"),
              metadata=metadata or {"format": "pt"})
    return directory


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (relative), to prove that a refused run wrote nothing."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under ``root``: a run must not touch its input either."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def stray_temps(directory: Path) -> list[str]:
    """Temporary siblings an output run may have left behind (``.NAME.tmp-*`` / ``.NAME.old-*``)."""
    if not directory.is_dir():
        return []
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n or ".old-" in n)


def assert_user_error(code: int, err: str, *fix_words: str) -> str:
    """Exit 2, exactly one line on stderr starting with ``error:``, no traceback, naming the fix."""
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for word in fix_words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line


def refused(capsys: Any, root: Path, args: list[object], *words: str) -> str:
    """Run the CLI in-process; exit 2, one line naming every word, nothing under ``root`` changed."""
    from loracompress_cli.app import main

    before = tree(root), snapshot(root)
    capsys.readouterr()
    code = main([str(a) for a in args])
    line = assert_user_error(code, capsys.readouterr().err, *words)
    assert (tree(root), snapshot(root)) == before, "a refused run changed the tree"
    return line
