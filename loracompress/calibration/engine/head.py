"""A causal LM's forward without its output head, so the loss can apply the head a chunk of tokens at a time.

A model's forward ends in ``logits = lm_head(hidden)`` for every token: ``tokens × vocab`` values
(250 MiB in float32 at 2,048 tokens and a 32k vocabulary, 1 GiB at 128k), and the loss then made
several more of that size. :class:`HeadSplit` puts a forward pre-hook on the output head that keeps
its input (the final hidden states, ``tokens × hidden``) and hands the head an empty slice of
positions instead, so the forward returns no logits; :func:`loracompress.calibration.engine.loss.chunked_lm_loss`
and :meth:`loracompress.calibration.engine.teacher.TargetPlan.make_chunked` then call the head on a
bounded number of tokens at a time.

This is exact only where the model's logits *are* the head's output. A few architectures change
them after the head (Gemma 2's soft-capping, Cohere's ``logit_scale``, Granite's scaling), so
:meth:`HeadSplit.probe` checks it once on a few tokens of the real batch: the logits the model returns
for them against the head applied to the hidden states it kept. Where they differ, the engine takes
the model's whole logits as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: tokens whose logits :meth:`HeadSplit.probe` compares (the first ones of the first row of the batch)
PROBE_TOKENS = 8


class HeadSplit:
    """The output head of ``model`` and a switch that makes the model's forward stop before it."""

    def __init__(self, head: nn.Module):
        self.head = head

    @staticmethod
    def find(model: nn.Module) -> HeadSplit | None:
        """The split for ``model``'s output head, or ``None`` when it has none that can be found."""
        try:
            head = model.get_output_embeddings()  # type: ignore[operator]
        except (AttributeError, NotImplementedError, TypeError):
            return None
        return HeadSplit(head) if isinstance(head, nn.Module) else None

    @contextmanager
    def hidden(self, keep: int = 0) -> Iterator[list[torch.Tensor]]:
        """Inside the block, every forward of the model appends its final hidden states (the head's input,
        ``[B, L, H]``) to the yielded list, and its head runs on the first ``keep`` positions only."""
        kept: list[torch.Tensor] = []

        def stop(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            kept.append(x)
            return (x[..., :keep, :], *args[1:])

        handle = self.head.register_forward_pre_hook(stop)
        try:
            yield kept
        finally:
            handle.remove()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head applied to ``hidden`` ``[..., H]``: float32 logits ``[..., V]``."""
        return self.head(hidden).float()

    def probe(self, model: nn.Module, inputs: Mapping[str, Any], autocast: Callable[[], Any]) -> int | None:
        """The vocabulary size when the model's logits equal the head applied to the hidden states it keeps,
        else ``None``; on the first :data:`PROBE_TOKENS` tokens of the first row of ``inputs`` (no gradients,
        a fraction of one step)."""
        few = {k: (v[:1, :PROBE_TOKENS] if isinstance(v, torch.Tensor) and v.ndim == 2 else v) for k, v in inputs.items()}
        with torch.no_grad(), autocast():
            with self.hidden(keep=PROBE_TOKENS) as kept:
                out = model(**few)
            logits = getattr(out, "logits", None)
            if not kept or logits is None:
                return None
            mine = self.logits(kept[-1])
        ref = logits.float()
        same = mine.shape == ref.shape and bool(torch.allclose(mine, ref, rtol=1e-4, atol=1e-4))
        if not same:
            log.info("this model changes its logits after the output head; the loss takes the whole logits "
                     "(memory grows with tokens × vocabulary)")
        return int(ref.shape[-1]) if same else None
