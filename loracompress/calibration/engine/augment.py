"""Fresh views of the calibration texts: token deletion, for distillation on unlabelled classification data.

Distillation needs no label, so the teacher can score any input, not only the texts the user gave: each
step sees the batch with a random fraction of its tokens deleted, and the teacher's logits on that same
view are the target. The student meets a new variant of every text in every epoch instead of fitting the
teacher's outputs on a few hundred fixed texts (measured: benchmarks/results/labelfree_sweep.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def delete_tokens(batch: Mapping[str, torch.Tensor], fraction: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of a padded batch with each real token deleted with probability ``fraction``.

    The first and last real token of every row are kept (``[CLS]`` and ``[SEP]`` for BERT-style
    tokenizers, whatever a tokenizer puts there otherwise); the kept tokens close up to the left and the
    attention mask shrinks to match. Per-sample fields (``labels`` of shape ``[B]``) are copied unchanged;
    every other ``[B, L]`` field (``token_type_ids``) moves with its token. Right padding is assumed, as
    :mod:`loracompress.runtime.data` batches it.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    rows, width = ids.shape
    real = mask.bool()
    lengths = real.sum(1, keepdim=True)
    pos = torch.arange(width).expand(rows, width)
    keep = torch.rand(rows, width, generator=generator) >= fraction
    keep |= (pos == 0) | (pos == lengths - 1)
    keep &= real
    # A stable sort of "deleted" puts the kept tokens first, in their order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if value.dim() == 2 and value.shape == ids.shape and key != "attention_mask":
            out[key] = torch.gather(value, 1, order)
        else:
            out[key] = value.clone()
    out["attention_mask"] = (pos < keep.sum(1, keepdim=True)).to(mask.dtype)
    return out
