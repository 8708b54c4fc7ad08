"""Folding an adapter into its base model's weights, and the memory each way of doing it holds.

Every merge adds ``ΔW = B @ A · scale`` to a base weight in float32 and rounds once to the dtype it
is written in; GPT-2's ``Conv1D`` stores its weight as ``[in, out]`` and gets ``ΔW`` transposed
(:func:`~loracompress.merging.weights.add_delta`, the one place this is written). A LoRA on a tied
weight (an ``lm_head`` sharing the input embeddings) gives that weight its own copy, and the config
stops declaring the tie (:func:`~loracompress.merging.weights.untie`). Two ways, two memory bounds:

* **Streaming** (:mod:`~loracompress.merging.stream`, planned by :mod:`~loracompress.merging.plan`, read
  by :mod:`~loracompress.merging.checkpoint`): a safetensors base is read and written one tensor at a
  time, the model itself only as a structure on the meta device. It holds one tensor (plus its fp32
  copy when it is merged) and the adapter: at most the largest shard plus the adapter, whatever the
  size of the model. A quantized base (block FP8, bitsandbytes) is dequantized one weight at a time as
  it is read (:mod:`~loracompress.merging.quantized`); the bound is the same.
* **In place** (:mod:`~loracompress.merging.inplace`), on a model already in memory (the in-memory
  ``merge`` of a base that cannot be streamed, ONNX and onnxruntime-genai export): the model plus one
  tensor at a time, the weight being merged in fp32. :func:`~loracompress.merging.inplace.merge_cast`
  also hands each replaced weight's memory-mapped pages back at once, so a base held in its stored
  dtype and cast to another holds the two dtypes for one tensor, not for the whole model.

:class:`~loracompress.merging.check.ModuleCheck` checks each merged module against base + LoRA on random
probes in fp32 (``W'x`` against ``Wx + B(Ax)·s``) with no model in memory.
"""
