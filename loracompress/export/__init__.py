"""Shipping an adapter for serving. One entry point, :func:`export`, picks the format by its options' type:

* :class:`~loracompress.export.onnx.OnnxOptions`: merged or multi-LoRA ONNX (``export/onnx.py``; causal LMs
  through onnxruntime-genai, ``export/genai.py``);
* :class:`~loracompress.export.targets.PeftOptions`, ``VllmOptions``, ``UniformOptions``: the adapter itself;
* :class:`~loracompress.export.gguf.GgufOptions`: a llama.cpp LoRA GGUF;
* :class:`~loracompress.export.genai_bank.BankExportOptions`: a bank (``loracompress bank``) for onnxruntime-genai.

A new format is one module that calls :func:`~loracompress.export.registry.register_format`. Importing this
package stays light: the formats are imported when :func:`~loracompress.export.registry.formats` first runs.
"""

from __future__ import annotations

from loracompress.export.registry import (
    REPORT_NAME,
    ExportFormat,
    ExportOptions,
    ExportReport,
    export,
    format_named,
    format_of,
    formats,
    options_for,
    register_format,
)

__all__ = ["REPORT_NAME", "ExportFormat", "ExportOptions", "ExportReport", "export", "format_named", "format_of",
           "formats", "options_for", "register_format"]
