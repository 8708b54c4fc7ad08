"""loracompress: make trained LoRA adapters smaller under a parameter budget, then ship them.

The library is importable without the CLI dependencies (typer, rich). The bundled sample, cut to a
quarter of its parameters training-free (paths relative to the repository root)::

    >>> import tempfile
    >>> from loracompress import Budget, compress_svd, load_adapter, save_adapter
    >>> adapter = load_adapter("samples/minilm-rt/adapter")
    >>> result = compress_svd(adapter, Budget.parse("0.25"))
    >>> result.adapter.num_params <= adapter.num_params // 4
    True
    >>> round(result.total_retained_energy, 2) > 0.5
    True
    >>> small = save_adapter(result.adapter, tempfile.mkdtemp() + "/small")
    >>> sorted(p.name for p in small.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']

The one-call pipeline behind ``loracompress prune`` writes the report and card beside it::

    >>> from loracompress.pipelines.prune import PruneOptions, prune
    >>> report = prune("samples/minilm-rt/adapter", tempfile.mkdtemp() + "/small", PruneOptions(budget="0.25"))
    >>> report["params_after"] == result.adapter.num_params
    True
"""

from loracompress._version import __version__ as __version__  # re-exported: loracompress.__version__
from loracompress.core.adapter import Adapter, LoraModule
from loracompress.core.budget import Budget, allocate
from loracompress.core.reader import load_adapter
from loracompress.core.writer import save_adapter
from loracompress.cuts.svd import SvdResult, compress_svd
from loracompress.errors import CheckFailed, LoraCompressError

#: The public API: reading and writing adapters, budgets, the training-free cut, and the two errors
#: the CLI maps to exit codes. Everything else (the pipelines: ``loracompress.pipelines.prune`` ...) is
#: imported from its module, so ``import loracompress`` stays light and free of import cycles.
__all__ = [
    "Adapter",
    "Budget",
    "CheckFailed",
    "LoraCompressError",
    "LoraModule",
    "SvdResult",
    "allocate",
    "compress_svd",
    "load_adapter",
    "save_adapter",
]
