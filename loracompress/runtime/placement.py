"""Where and how the frozen base model is held during calibration: its storage dtype, its device,
and an optional bitsandbytes quantization (QLoRA bases).

Only the base is affected: the LoRA factors (student and teacher) and the optimizer state are
always float32 (see :class:`loracompress.runtime.layers.LoraLayer`). Everything here is decided
and checked before any weight is read, so a bad flag costs nothing.

Default storage dtype (``--base-dtype auto``): bf16 on a CUDA GPU that supports it, else fp32.
On the CPU, fp32 because it was faster: on the 2-core test machine (avx512_bf16, no AMX) a
bf16-stored base made the student's step 1.7× slower (benchmarks/results/calibration_memory.md),
and the result moved by about 1% (ΔW) to 3% (held-out KL on the tiny Llama of the tests) from the
fp32 one. ``--base-dtype bf16`` halves the base's memory and is the setting for large bases on the CPU.

A quantized base (``--load-in-4bit``/``--load-in-8bit``) runs wherever bitsandbytes runs: CUDA GPUs and
the CPU (bitsandbytes 0.50). Its storage dtype is the compute dtype of the quantized layers and the
dtype of the parts left unquantized (norms, embeddings, head): on a GPU fp32 becomes bf16 (fp16 without
bf16), as QLoRA trains; on the CPU it stays what ``--base-dtype`` says (fp32 by default).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from loracompress.errors import LoraCompressError
from loracompress.runtime.bf16_compute import native_bf16_matmul
from loracompress.runtime.device import resolve_device

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("4bit", "8bit")


@dataclass(frozen=True)
class BasePlacement:
    """The base model's storage dtype, its device and its quantization (``None``, ``"4bit"``, ``"8bit"``)."""

    dtype: torch.dtype
    device: str
    quantize: str | None = None

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in BASE_DTYPES.items() if v == self.dtype)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`loracompress.runtime.model.load_base_model`."""
        return {"dtype": self.dtype, "device": self.device,
                "quantization_config": quantization_config(self) if self.quantize else None}

    def describe(self) -> dict[str, Any]:
        """What the compression report records."""
        info: dict[str, Any] = {"base_dtype": self.dtype_name, "base_device": self.device}
        if self.quantize:
            info["base_quantization"] = f"bitsandbytes {self.quantize}"
            info["merge_note"] = (f"calibrated against the {self.quantize} base: a merge of this adapter goes into "
                                  "the dequantized base weights")
        return info


def cuda_bf16_supported() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def target_device(device: str) -> str:
    """The device the base is loaded onto for ``--device`` (auto, cpu, cuda, cuda:N).

    Under ``accelerate launch`` / ``torchrun`` on GPUs each process takes the GPU of its local rank.
    The flag's syntax and CUDA's presence are checked by :func:`~loracompress.runtime.device.resolve_device`.
    """
    dev = resolve_device(device)
    if dev == "cpu" or ":" in dev:
        return dev
    local_rank = os.environ.get("LOCAL_RANK")  # set by accelerate launch and torchrun
    return f"cuda:{int(local_rank)}" if local_rank and local_rank.isdigit() else "cuda"


def resolve_placement(base_dtype: str | None, device: str, load_in_4bit: bool = False,
                      load_in_8bit: bool = False) -> BasePlacement:
    """Check the flags and decide; every error names the flag and the fix."""
    name = (base_dtype or "auto").lower()
    if name not in (*BASE_DTYPES, "auto"):
        raise LoraCompressError(f"unknown --base-dtype {base_dtype!r}; use auto, bf16, fp16 or fp32")
    if load_in_4bit and load_in_8bit:
        raise LoraCompressError("give --load-in-4bit or --load-in-8bit, not both")
    quantize = "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
    place = target_device(device)
    on_gpu = place.startswith("cuda")
    if name == "auto":
        name = "bf16" if on_gpu and cuda_bf16_supported() else "fp32"
    if name == "fp16" and not on_gpu:
        raise LoraCompressError("--base-dtype fp16 needs a GPU (fp16 on the CPU is slow and overflows); use bf16 or fp32")
    if name == "bf16" and on_gpu and not cuda_bf16_supported():
        raise LoraCompressError("--base-dtype bf16: this GPU has no bf16 support; use fp16 or fp32")
    if quantize:
        check_bitsandbytes(quantize, place)
        if name == "fp32" and on_gpu:  # the non-quantized parts (norms, embeddings, head) and the compute dtype
            name = "bf16" if cuda_bf16_supported() else "fp16"
    return BasePlacement(dtype=BASE_DTYPES[name], device=place, quantize=quantize)


def check_bitsandbytes(quantize: str, device: str) -> None:
    """Refuse ``--load-in-{quantize}`` only where bitsandbytes itself cannot run on ``device``.

    bitsandbytes (0.50) quantizes and runs on the CPU as well as on CUDA GPUs, so the check is not
    about the device type: it is that bitsandbytes is installed, imports, has a backend for the
    device, and quantizes and runs one small layer there (milliseconds; a CUDA build without its
    native library, say, fails here in one line instead of deep inside the model's loading).
    """
    flag = f"--load-in-{quantize}"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraCompressError(f"{flag} needs bitsandbytes: pip install 'loracompress[qlora]'")
    try:
        bitsandbytes = importlib.import_module("bitsandbytes")
    except Exception as err:  # noqa: BLE001 - a broken install raises RuntimeError, OSError, ImportError, ...
        raise LoraCompressError(f"{flag}: bitsandbytes is installed but cannot be imported ({_first_line(err)}); "
                                "reinstall it: pip install -U 'loracompress[qlora]'") from None
    kind = torch.device(device).type
    version = getattr(bitsandbytes, "__version__", "?")
    if kind not in getattr(bitsandbytes, "supported_torch_devices", {"cuda"}):
        raise LoraCompressError(f"{flag}: bitsandbytes {version} has no backend for the {kind} device; "
                                "pip install -U 'loracompress[qlora]' or pick another --device")
    try:
        _run_one_layer(bitsandbytes, quantize, device)
    except Exception as err:  # noqa: BLE001 - whatever its backend raises, the run could not go on
        raise LoraCompressError(f"{flag}: bitsandbytes {version} cannot run {quantize} layers on {device} here "
                                f"({_first_line(err)}); pip install -U 'loracompress[qlora]' or drop {flag}") from None


def _run_one_layer(bnb: Any, quantize: str, device: str) -> None:
    """Quantize a 64×64 layer onto ``device`` and run it forward and backward, as calibration will."""
    dense = torch.nn.Linear(64, 64, bias=False)
    if quantize == "4bit":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    with warnings.catch_warnings():  # e.g. 8-bit on a GPU: "inputs will be cast to float16"; not the user's concern
        warnings.simplefilter("ignore")
        layer.load_state_dict(dense.state_dict())
        layer = layer.to(device)  # quantizes
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()  # the student's gradient flows through the frozen quantized base


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def compute_dtype(placement: BasePlacement) -> torch.dtype:
    """The dtype a 4-bit base's layers compute in: the base dtype, but fp32 for bf16 on a CPU without native
    bf16 products (:mod:`loracompress.runtime.bf16_compute`: its fallback kernel is 200x slower in backward)."""
    if placement.dtype == torch.bfloat16 and not native_bf16_matmul(placement.device):
        return torch.float32
    return placement.dtype


def quantization_config(placement: BasePlacement) -> Any:
    """The ``BitsAndBytesConfig`` for a quantized placement (NF4 with double quantization, as QLoRA)."""
    from transformers import BitsAndBytesConfig

    if placement.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(placement))
    if placement.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"not a quantized placement: {placement}")
