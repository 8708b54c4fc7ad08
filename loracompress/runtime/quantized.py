"""Quantized base checkpoints read from their files: which format, each weight dequantized, or a refusal by name.

A merge (and any export that merges) adds ``ΔW`` to the base's weights, so it must add it to the
weights the model really computes with: for a quantized checkpoint, the dequantized ones. Formats:

- **block FP8** (``quant_method: fp8``, DeepSeek-V3, Qwen3-FP8): ``float8_e4m3fn`` weights and a
  ``weight_scale_inv`` per block of ``weight_block_size`` (128x128): ``W = fp8 · scale_inv`` per block.
- **bitsandbytes 4-bit** (NF4/FP4, saved by transformers with ``BitsAndBytesConfig(load_in_4bit=True)``)
  and **8-bit** (LLM.int8, ``SCB`` row scales): dequantized by bitsandbytes' own functions.
- **GPTQ, AWQ, compressed-tensors and the other packed formats**: refused by name (their kernels
  and packings are not re-implemented here); the fix is to merge into the unquantized base.

:class:`Dequantizer` works one tensor at a time (the weight and its few scale tensors), so a merge
that uses it keeps the streaming bound: the largest shard plus the adapter. :class:`Requantizer`
stands for a 16-bit base whose adapter was trained against its NF4 quantization (QLoRA): each weight
that transformers would quantize is replaced by ``dequant(quant(W))``, made by bitsandbytes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracompress.core.dtypes import MERGEABLE
from loracompress.errors import LoraCompressError

#: quant_method -> what the base is, for the refusal (formats whose weights are packed integers).
REFUSED = {
    "gptq": "GPTQ-quantized (packed integer weights)",
    "awq": "AWQ-quantized (packed integer weights)",
    "compressed-tensors": "compressed-tensors-quantized",
    "compressed_tensors": "compressed-tensors-quantized",
    "hqq": "HQQ-quantized",
    "aqlm": "AQLM-quantized",
    "quanto": "quanto-quantized",
    "eetq": "EETQ-quantized (int8)",
    "fbgemm_fp8": "FBGEMM-FP8-quantized",
    "torchao": "torchao-quantized",
    "bitnet": "BitNet-quantized (ternary)",
    "vptq": "VPTQ-quantized",
    "spqr": "SpQR-quantized",
    "higgs": "HIGGS-quantized",
    "mxfp4": "MXFP4-quantized",
    "fp_quant": "FP-Quant-quantized",
    "quark": "Quark-quantized",
    "auto-round": "AutoRound-quantized",
}
#: Tensor-name endings that give a format away when the config does not name it.
_NAME_HINTS = (
    (".qweight", "GPTQ- or AWQ-quantized (packed integer weights)"),
    (".qzeros", "GPTQ- or AWQ-quantized (packed integer weights)"),
    (".weight_packed", "compressed-tensors-quantized"),
)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_BNB4_STATE = ".quant_state.bitsandbytes__"  # + nf4 / fp4: the JSON of a 4-bit weight's quantization
_BNB4_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


@dataclass(frozen=True)
class Quantization:
    """What kind of quantized checkpoint a base is; ``method`` is ``fp8``, ``bnb-4bit`` or ``bnb-8bit``
    when it can be dequantized, else ``refused`` (``label`` says what it is)."""

    method: str
    label: str
    block: tuple[int, int] | None = None

    @property
    def supported(self) -> bool:
        return self.method != "refused"


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def detect(config: Any, keys: Iterable[str] = ()) -> Quantization | None:
    """The base's quantization from its config's ``quantization_config`` and its tensor names, else ``None``."""
    raw = _config_dict(config)
    qc = raw.get("quantization_config")
    if qc is None and isinstance(raw.get("text_config"), Mapping):
        qc = raw["text_config"].get("quantization_config")
    qc = _config_dict(qc)
    method = qc.get("quant_method", "") if qc else ""
    method = str(getattr(method, "value", method)).lower().replace("_", "-")  # a loaded config holds an enum
    if method == "fp8":
        block = qc.get("weight_block_size")
        return Quantization("fp8", "block-FP8-quantized" if block else "FP8-quantized",
                            tuple(int(b) for b in block) if block else None)  # type: ignore[arg-type]
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            kind = str(qc.get("bnb_4bit_quant_type", "fp4")).upper()
            return Quantization("bnb-4bit", f"bitsandbytes 4-bit quantized ({kind})")
        return Quantization("bnb-8bit", "bitsandbytes 8-bit quantized (LLM.int8)")
    if method:
        label = REFUSED.get(method) or REFUSED.get(method.replace("-", "_")) or f"{method}-quantized"
        bits = qc.get("bits")
        if isinstance(bits, int) and "(" not in label:
            label += f" ({bits}-bit)"
        elif isinstance(bits, int):
            label = label.replace("(", f"({bits}-bit, ", 1)
        return Quantization("refused", label)
    names = list(keys)
    for ending, label in _NAME_HINTS:
        if any(k.endswith(ending) for k in names):
            return Quantization("refused", label)
    if any(_BNB4_STATE in k for k in names):
        return Quantization("bnb-4bit", "bitsandbytes 4-bit quantized")
    if any(k.endswith(".SCB") for k in names):
        return Quantization("bnb-8bit", "bitsandbytes 8-bit quantized (LLM.int8)")
    if any(k.endswith(".weight_scale_inv") for k in names):
        return Quantization("fp8", "block-FP8-quantized")
    return None


def refusal(q: Quantization, doing: str = "merging into it") -> LoraCompressError:
    """The one-line refusal for a format this tool cannot dequantize."""
    verb = "merge into" if doing.startswith("merging") else "use"
    return LoraCompressError(
        f"the base model is {q.label}; {doing} is not supported: {verb} the unquantized base with "
        "--base-model ORIGINAL (the model it was quantized from)"
    )


def refuse_packed(name: str | Path, doing: str) -> None:
    """Refuse a local base folder in a format that cannot be dequantized here, by its name, before loading it
    (transformers would fail with a missing-package error, or load integer layers no merge can add to)."""
    path = Path(str(name)).expanduser()
    if path.is_dir():
        q = detect_folder(path)
        if q is not None and not q.supported:
            raise refusal(q, doing)


def float_model(model: nn.Module, doing: str) -> nn.Module:
    """``model`` with float weights everywhere a merge adds ``ΔW``: bitsandbytes layers are dequantized by
    transformers (``model.dequantize()``), an FP8 model that transformers left quantized is refused.

    On a machine without a GPU transformers dequantizes FP8 checkpoints on load already.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    if all(p.dtype in MERGEABLE for p in model.parameters()):
        # dequantized on load (a GGUF file always; FP8 without a GPU) though transformers still marks it
        # quantized: the weights are floats, nothing to convert (the GGUF base was refused as "gguf-quantized")
        return model
    q = detect(getattr(model, "config", None))
    if q is not None and q.method.startswith("bnb"):
        # In the dtype of the float parts (embeddings, norms): the one the base was loaded in. (transformers'
        # default reads config.dtype, which can be a string its cast does not take.)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return model.dequantize(dtype=dtype)
    label = q.label if q is not None else "quantized"
    raise LoraCompressError(
        f"the base model is {label} and transformers kept its quantized layers on load (a GPU is visible); "
        f"{doing} needs float weights: run with CUDA_VISIBLE_DEVICES= (FP8 is dequantized on the CPU), or use the "
        "unquantized base with --base-model ORIGINAL"
    )


def detect_folder(folder: str | Path) -> Quantization | None:
    """:func:`detect` on a model folder's ``config.json`` (and its safetensors index's names), else ``None``."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    keys: list[str] = []
    try:
        keys = list(json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return detect(config if isinstance(config, dict) else {}, keys)


def require_bitsandbytes(why: str) -> Any:
    """``bitsandbytes.functional``, or a refusal that says how to install it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraCompressError(f"{why} needs bitsandbytes (it runs on the CPU too): pip install bitsandbytes")
    import bitsandbytes.functional as bnbf

    return bnbf


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """``W = fp8 · scale_inv``, each scale covering a ``block`` (rows, cols) tile; edge tiles may be smaller.

    A scalar scale (per-tensor FP8) covers the whole weight. Without ``block`` (no ``weight_block_size``
    in the config) the grid must divide the weight evenly, as transformers requires: the block size
    of a ragged grid cannot be told from it.
    """
    w = weight.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    if w.ndim != 2 or s.ndim != 2:
        raise LoraCompressError(f"an FP8 weight {tuple(w.shape)} with scales {tuple(s.shape)} is not a block-FP8 "
                                "layout this tool knows; merge into the unquantized base with --base-model ORIGINAL")
    rows, cols = w.shape
    if block is None:
        if rows % s.shape[0] or cols % s.shape[1]:
            raise LoraCompressError(f"an FP8 weight {tuple(w.shape)} has a {tuple(s.shape)} scale grid and the config "
                                    "gives no weight_block_size; add it to quantization_config in config.json")
        block = (rows // s.shape[0], cols // s.shape[1])
    if (math.ceil(rows / block[0]), math.ceil(cols / block[1])) != tuple(s.shape):
        raise LoraCompressError(f"an FP8 weight {tuple(w.shape)} has {tuple(s.shape)} scales, not one per "
                                f"{block[0]}x{block[1]} block; re-download the base model")
    full = s.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return w * full


@dataclass
class Dequantizer:
    """The quantized weights of one checkpoint: their float shapes, the tensors folded into them
    (scales, quantization states: not written to the output), and each one's float32 value."""

    quantization: Quantization
    #: quantized weight key -> its float shape
    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: quantized weight key -> the checkpoint keys its value is made from (besides itself)
    parts: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def companions(self) -> set[str]:
        return {key for parts in self.parts.values() for key in parts.values()}

    def describe(self) -> dict[str, Any]:
        return {"format": self.quantization.method, "what": self.quantization.label,
                "block": list(self.quantization.block) if self.quantization.block else None,
                "weights": len(self.weights)}

    def value(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The float32 weight of quantized ``key`` (its parts read with ``read``)."""
        raw = read(key)
        parts = {name: read(k) for name, k in self.parts[key].items()}
        method = self.quantization.method
        if method == "fp8":
            return fp8_dequantize(raw, parts["scale_inv"], self.quantization.block)
        bnbf = require_bitsandbytes(f"the {self.quantization.label} base")
        if method == "bnb-8bit":
            return bnbf.int8_vectorwise_dequant(raw, parts["SCB"].float()).float()
        state = bnbf.QuantState.from_dict({name: t for name, t in parts.items()}, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(raw, state).float()


def dequantizer(q: Quantization, entries: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                read: Callable[[str], torch.Tensor]) -> Dequantizer:
    """Find every quantized weight of a checkpoint (``entries``: key -> (dtype, shape)) and its parts.

    ``read`` gives one tensor: a 4-bit weight's shape is in its (small) quantization-state tensor.
    """
    if not q.supported:
        raise refusal(q)
    d = Dequantizer(q)
    for key, (dtype, shape) in entries.items():
        if q.method == "fp8" and dtype in _FP8:
            scale = f"{key}_scale_inv"
            if scale not in entries:
                raise LoraCompressError(f"the base's FP8 weight {key} has no {scale}; re-download the base model, "
                                        "or merge into the unquantized base with --base-model ORIGINAL")
            d.weights[key] = shape
            # Static activation scales serve FP8 matmuls only: the float output does not need them.
            d.parts[key] = {"scale_inv": scale, **{n: f"{key[:-len('weight')]}{n}" for n in ("input_scale",)
                                                   if f"{key[:-len('weight')]}{n}" in entries}}
        elif q.method == "bnb-8bit" and dtype == torch.int8 and key.endswith(".weight"):
            module = key[:-len("weight")]
            if f"{module}SCB" not in entries:
                continue
            d.weights[key] = shape
            d.parts[key] = {"SCB": f"{module}SCB", **({"weight_format": f"{module}weight_format"}
                                                        if f"{module}weight_format" in entries else {})}
        elif q.method == "bnb-4bit":
            states = [k for k in entries if k.startswith(f"{key}{_BNB4_STATE}")]
            if not states:
                continue
            found = {p[1:]: f"{key}{p}" for p in _BNB4_PARTS if f"{key}{p}" in entries}
            found[states[0][len(key) + 1:]] = states[0]
            try:
                info = json.loads(bytes(read(states[0]).tolist()).decode("utf-8"))
                d.weights[key] = tuple(int(n) for n in info["shape"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise LoraCompressError(f"the base's 4-bit weight {key} has an unreadable quantization state; "
                                        "re-download or re-save the base model") from None
            d.parts[key] = found
    if not d.weights:
        raise LoraCompressError(f"the base model's config says {q.label} but no quantized weight was found in its "
                                "files; re-download or re-save the base model")
    return d


# --------------------------------------------------------------------------- a 16-bit base trained on as 4-bit


@dataclass(frozen=True)
class Bnb4Settings:
    """How a 16-bit base was quantized to 4 bits when the adapter was trained (the quantization is
    deterministic: the same settings give the same 4-bit weights)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    source: str = "QLoRA's defaults"

    def describe(self) -> str:
        dq = ", double quantization" if self.double_quant else ""
        return f"bitsandbytes {self.quant_type.upper()}, blocks of {self.blocksize}{dq} ({self.source})"


@dataclass
class Requantizer:
    """A 16-bit base seen as its 4-bit quantization: each weight transformers would quantize
    (every ``nn.Linear`` but the head) becomes ``dequant(quant(W))``, made by bitsandbytes."""

    settings: Bnb4Settings
    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def companions(self) -> set[str]:
        return set()

    @property
    def parts(self) -> dict[str, dict[str, str]]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"format": "bnb-4bit", "what": f"the 16-bit base quantized as in training: {self.settings.describe()}",
                "block": None, "weights": len(self.weights)}

    def value(self, key: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        bnbf = require_bitsandbytes("--into dequantized")
        w = read(key)
        packed, state = bnbf.quantize_4bit(w, blocksize=self.settings.blocksize, quant_type=self.settings.quant_type,
                                           compress_statistics=self.settings.double_quant)
        return bnbf.dequantize_4bit(packed, state).float()


def quantized_linears(model: nn.Module, skip: list[str] | None = None) -> list[str]:
    """The weight names transformers' bitsandbytes integration would quantize in ``model``:
    every plain ``nn.Linear`` except the output head, tied and last modules (and ``skip``)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, skip, getattr(model, "_keep_in_fp32_modules", None),
                                                  add_default_skips=True)
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D":
            raise LoraCompressError("--into dequantized: GPT-2-style Conv1D layers are not supported; "
                                    "merge with --into original")
        if type(module) is nn.Linear and should_convert_module(name, keep):
            names.append(f"{name}.weight")
    return names


_CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def trained_in_4bit(adapter_dir: str | Path) -> Bnb4Settings | None:
    """The 4-bit settings an adapter was trained with, when its folder says so, else ``None``.

    Two records say it: PEFT's model card (``README.md``: "The following `bitsandbytes` quantization
    config was used during training", with ``load_in_4bit: True``) and loracompress's own
    ``compression_report.json`` (``settings.base.base_quantization: bitsandbytes 4bit``).
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        return None
    try:
        card = (folder / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        card = ""
    if _CARD_PREFIX in card:
        values = dict(re.findall(r"^- (\w+): (.+?)\s*$", card.split(_CARD_PREFIX, 1)[1], flags=re.MULTILINE))
        if values.get("load_in_4bit") == "True" or values.get("_load_in_4bit") == "True":
            return Bnb4Settings(quant_type=values.get("bnb_4bit_quant_type", "fp4"),
                               double_quant=values.get("bnb_4bit_use_double_quant") == "True",
                               source="the adapter's model card")
    try:
        report = json.loads((folder / "compression_report.json").read_text(encoding="utf-8"))
        base = report["settings"]["base"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(base, dict) and str(base.get("base_quantization", "")).startswith("bitsandbytes 4bit"):
        return Bnb4Settings(source="calibrated on a 4-bit base (compression_report.json), QLoRA's defaults")
    return None
