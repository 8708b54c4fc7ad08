"""loracompress: make trained LoRA adapters smaller under a parameter budget, then ship them.

The library is importable without the CLI dependencies (typer, rich)::

    from loracompress import load_adapter, Budget, compress_svd
    adapter = load_adapter("ckpt/")
    small, report = compress_svd(adapter, Budget.parse("0.25"))
    save_adapter(small, "small/")
"""

from loracompress.core.adapter import Adapter, LoraModule, load_adapter, save_adapter
from loracompress.core.budget import Budget, allocate
from loracompress.cuts.svd import compress_svd
from loracompress.errors import LoraCompressError

__all__ = [
    "Adapter",
    "Budget",
    "LoraCompressError",
    "LoraModule",
    "allocate",
    "compress_svd",
    "load_adapter",
    "save_adapter",
]
__version__ = "0.1.0"
