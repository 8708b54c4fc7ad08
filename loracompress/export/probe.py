"""Probe batches and reference outputs: what every merge and export is checked against.

The reference is always the fp32 PyTorch base model with the adapter attached as LoRA layers
(:func:`loracompress.runtime.layers.attach`), i.e. exactly what the user had before shipping it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from loracompress.core.adapter import Adapter, base_param_name
from loracompress.runtime.layers import attach, detach
from loracompress.runtime.model import restore_modules_to_save

#: Output fields exported and compared, in order; ``last_hidden_state`` only when none of these exist.
OUTPUT_FIELDS = ("logits", "start_logits", "end_logits")
INPUT_NAMES = ("input_ids", "attention_mask")
_PROBE_TEXTS = (
    "The film was a quiet surprise: slow to start, but the last act earns every minute.",
    "Markets fell on Tuesday after the central bank kept rates unchanged.",
    "def add(a, b):\n    return a + b",
)


def probe_batch(model: nn.Module, tokenizer: Any = None, *, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (int64), right-padded so padding is exercised too.

    Real text through the tokenizer when there is one, seeded random ids otherwise. Row ``i``
    has ``seq - 3*i`` real tokens (at least 2): different lengths, one padded batch.
    """
    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(max_pos, int) and max_pos > 0:
        seq = min(seq, max_pos)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 100
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = int(pad_id) if pad_id is not None else 0
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, seq), pad_id, dtype=torch.int64)
    mask = torch.zeros((batch, seq), dtype=torch.int64)
    for row in range(batch):
        length = max(2, seq - 3 * row)
        tokens: list[int] = []
        if tokenizer is not None:
            text = " ".join(_PROBE_TEXTS[(row + k) % len(_PROBE_TEXTS)] for k in range(4))
            try:
                tokens = [int(t) for t in tokenizer(text)["input_ids"] if 0 <= int(t) < vocab][:length]
            except Exception:  # noqa: BLE001 - a tokenizer that cannot encode falls back to random ids
                tokens = []
        if len(tokens) < length:
            tokens += torch.randint(0, vocab, (length - len(tokens),), generator=g).tolist()
        ids[row, :length] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every export and reference forward uses (no KV cache)."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def output_names(output: Any) -> list[str]:
    """Which fields of a model's output are served: logits (or QA start/end), else hidden states."""
    names = [n for n in OUTPUT_FIELDS if isinstance(_get(output, n), torch.Tensor)]
    if not names and isinstance(_get(output, "last_hidden_state"), torch.Tensor):
        names = ["last_hidden_state"]
    return names


def _get(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


@torch.no_grad()
def model_outputs(model: nn.Module, inputs: Mapping[str, torch.Tensor], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The served outputs of ``model`` on ``inputs`` as float32 numpy arrays."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()}, **forward_kwargs(model))
    names = names or output_names(out)
    return {n: _get(out, n).detach().float().cpu().numpy() for n in names}


def max_abs_diff(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], attention_mask: torch.Tensor | np.ndarray) -> float:
    """Largest ``|got - ref|`` over all outputs, ignoring padded positions of per-token outputs.

    Padded positions carry no meaning (and runtimes legitimately differ there), so outputs whose
    first two axes are ``[batch, sequence]`` are compared where ``attention_mask == 1`` only.
    A NaN anywhere counts as an infinite difference.
    """
    mask = np.asarray(attention_mask).astype(bool)
    worst = 0.0
    for name, r in ref.items():
        g = np.asarray(got[name], dtype=np.float32)
        r = np.asarray(r, dtype=np.float32)
        if g.shape != r.shape:
            return float("inf")
        if g.ndim >= 2 and g.shape[:2] == mask.shape:
            g, r = g[mask], r[mask]
        if g.size == 0:
            continue
        diff = np.abs(g - r)
        if not np.isfinite(diff).all():
            return float("inf")
        worst = max(worst, float(diff.max()))
    return worst


def saved_module_params(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` tensors keyed by the base model's parameter name."""
    return {base_param_name(key): tensor for key, tensor in adapter.extra_tensors.items()}


@contextmanager
def applied(model: nn.Module, adapter: Adapter | None) -> Iterator[nn.Module]:
    """``model`` with ``adapter`` attached as LoRA layers (and its saved heads) inside the block.

    On exit the LoRA layers are removed and any head the adapter overwrote is put back, so one
    loaded base model can serve as the reference for several adapters in turn. ``None``: the
    base model as it is.
    """
    if adapter is None:
        yield model
        return
    state = model.state_dict()
    saved = {name: state[name].detach().clone() for name in saved_module_params(adapter) if name in state}
    restore_modules_to_save(model, adapter)
    try:
        attach(model, adapter)
        yield model
    finally:
        detach(model)
        with torch.no_grad():
            current = model.state_dict()
            for name, value in saved.items():
                current[name].copy_(value)
