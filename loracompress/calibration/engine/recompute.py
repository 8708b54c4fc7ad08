"""Gradient (activation) checkpointing for the student's forward: keep only each block's input and
recompute the block in the backward pass, so activation memory no longer grows with the depth.

It goes through transformers' own switch (``gradient_checkpointing_enable``, called
``activation_checkpointing_enable`` from transformers 5) with ``use_reentrant=False``: the
non-reentrant checkpoint carries gradients to the trainable LoRA factors inside a block even though
nothing else there (frozen base weights, the block's input) requires a gradient.

transformers checkpoints a block only when that block is in training mode. The engine keeps the
model in eval mode (no dropout: the student learns the teacher's deterministic function), so only
the checkpointed block modules themselves are flagged as training; everything inside them stays in
eval mode, and float ``*dropout*`` rates held on the block itself (BART-style blocks that call
``F.dropout(..., training=self.training)``) are set to 0 meanwhile. Everything is put back on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from loracompress.errors import LoraCompressError


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The modules transformers checkpoints (``GradientCheckpointingLayer`` or the older flag)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, ``model``'s forward under autograd recomputes each transformer block in backward."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraCompressError(
            f"--gradient-checkpointing: {type(model).__name__} does not support it in transformers; drop the flag"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "disable_input_require_grads"):
        # transformers also hooks the embeddings' output to require a gradient; only the reentrant
        # checkpoint needs that, and it would make backward run through the embedding output for nothing.
        model.disable_input_require_grads()
    blocks = _blocks(model)
    saved: list[tuple[nn.Module, bool, dict[str, float]]] = []
    try:
        if not blocks:
            raise LoraCompressError(
                f"--gradient-checkpointing: {type(model).__name__} has no checkpointable blocks; drop the flag"
            )
        for block in blocks:
            rates = {k: v for k, v in vars(block).items() if "dropout" in k and isinstance(v, float) and v > 0}
            saved.append((block, block.training, rates))
            block.training = True  # this module only: its children stay in eval mode
            for k in rates:
                setattr(block, k, 0.0)
        yield
    finally:
        for block, training, rates in saved:
            block.training = training
            for k, v in rates.items():
                setattr(block, k, v)
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
