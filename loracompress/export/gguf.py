"""``export --format gguf``: a LoRA adapter GGUF for llama.cpp and Ollama.

llama.cpp reads an adapter GGUF by these rules (its ``convert_lora_to_gguf.py`` writes them):

* ``general.type = adapter``, ``adapter.type = lora``, ``general.architecture`` equal to the base's;
* one ``adapter.lora.alpha`` for the whole file, and each module's rank read from its tensor
  shapes, so a module of rank ``r`` is scaled by ``alpha / r``;
* two tensors per module, named after the base tensor: ``blk.N.attn_q.weight.lora_a`` (``[r, in]``)
  and ``...lora_b`` (``[out, r]``); the rows of ``q``/``k`` are permuted the way llama.cpp's converter
  permutes the base weights for its rotary embedding.

A compressed adapter has a different rank (and possibly its own scale) in every module, so each
module's own ``scale · r / alpha`` is folded into its ``B``: then the one global alpha reads every
module right. Before anything is written, the file is read back with gguf's reader and every
module's ΔW is compared with the adapter's (PEFT semantics, factored form, no dense delta).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.core import jsonio
from loracompress.core.adapter import Adapter, LoraModule, base_param_name
from loracompress.core.dtypes import parse_dtype
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.reader import load_adapter
from loracompress.core.units import human_bytes
from loracompress.errors import LoraCompressError, brief
from loracompress.export.registry import (
    REPORT_NAME,
    ExportFormat,
    ExportOptions,
    ExportReport,
    register_format,
)
from loracompress.export.targets import embedding_copies

log = logging.getLogger(__name__)

GGUF_NAME = "adapter.gguf"
#: Hugging Face ``model_type`` -> llama.cpp architecture whose tensors take a LoRA the Llama way.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
#: Relative Frobenius error allowed per module when the file is read back.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


@dataclass(frozen=True)
class BaseShape:
    """What the export needs to know about the base model (its config only, never its weights)."""

    source: str
    model_type: str
    arch: str
    n_head: int
    n_head_kv: int
    n_layer: int
    tied_embeddings: bool
    tensor_shapes: dict[str, tuple[int, ...]] | None = None
    """Numpy shapes of the base GGUF's tensors, when the base is a ``.gguf`` file."""


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise LoraCompressError(
            "--format gguf needs the gguf package; pip install 'loracompress[gguf]'"
        ) from None
    return gguf


# --------------------------------------------------------------------------- base model config


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _base_from_gguf(path: Path) -> BaseShape:
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as ValueError, struct errors, ...
        raise LoraCompressError(f"cannot read GGUF file {path} ({brief(err, 120)}); pass a valid base .gguf") from None
    if _field(reader, "general.type") == "adapter":
        raise LoraCompressError(f"{path} is a LoRA adapter GGUF, not a base model; pass the base model's .gguf")
    arch = str(_field(reader, "general.architecture") or "")
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_layer = _field(reader, f"{arch}.block_count")
    if arch not in set(ARCHITECTURES.values()) or n_head is None or n_layer is None:
        raise LoraCompressError(
            f"GGUF base {path.name} has architecture {arch or 'unknown'!r}; --format gguf supports "
            f"{', '.join(sorted(set(ARCHITECTURES.values())))}"
        )
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return BaseShape(source=str(path), model_type=arch, arch=arch, n_head=int(n_head), n_head_kv=int(n_head_kv),
                     n_layer=int(n_layer), tied_embeddings="output.weight" not in shapes, tensor_shapes=shapes)


def _base_from_config(name: str, trust_remote_code: bool) -> BaseShape:
    from transformers import AutoConfig

    from loracompress.runtime.model import custom_code_error, needs_custom_code

    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise LoraCompressError(f"{path} is not a Hugging Face model folder (no config.json); pass --base-model PATH")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else name, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if needs_custom_code(err):
            raise custom_code_error(name) from None
        raise LoraCompressError(
            f"cannot read the config of base model {name!r} offline ({brief(err, 120)}); pass --base-model with a "
            "local model folder or .gguf file"
        ) from None
    config = getattr(config, "text_config", None) or config
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in ARCHITECTURES:
        raise LoraCompressError(
            f"--format gguf supports Llama-architecture bases ({', '.join(sorted(ARCHITECTURES))}), "
            f"not {model_type or 'this model'!r}; use --format peft or merge the adapter"
        )
    n_head = int(config.num_attention_heads)
    return BaseShape(source=name, model_type=model_type, arch=ARCHITECTURES[model_type], n_head=n_head,
                     n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
                     n_layer=int(config.num_hidden_layers),
                     tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def read_base_shape(spec: str | Path | None, adapter: Adapter, trust_remote_code: bool = False) -> BaseShape:
    """The base model's architecture and head counts, from a ``.gguf`` file or a config (never weights)."""
    name = str(spec) if spec else adapter.config.get("base_model_name_or_path")
    if not name:
        raise LoraCompressError(
            "the adapter does not name its base model (base_model_name_or_path is empty); pass --base-model PATH"
        )
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LoraCompressError(f"GGUF file {path} not found; pass --base-model with an existing .gguf file")
        return _base_from_gguf(path)
    return _base_from_config(name, trust_remote_code)


# --------------------------------------------------------------------------- names and layout


def tensor_name(path: str, base: BaseShape) -> str:
    """The llama.cpp name of the base tensor a module adapts, e.g. ``blk.0.attn_q.weight``.

    Raises:
        LoraCompressError: a module llama.cpp cannot adapt (embeddings, a tied head, anything else).
    """
    gguf = import_gguf()
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ("embed_tokens", "wte", "word_embeddings") or "embed" in leaf:
        raise LoraCompressError(
            f"llama.cpp cannot apply a LoRA on the embeddings ({path}); compress without that module or merge the adapter"
        )
    if path == "lm_head" and base.tied_embeddings:
        raise LoraCompressError(
            "llama.cpp cannot apply a LoRA on lm_head when the base ties it to the embeddings; merge the adapter instead"
        )
    match = _LAYER.match(path)
    if path != "lm_head" and (match is None or int(match.group(1)) >= base.n_layer):
        raise LoraCompressError(
            f"module {path} has no llama.cpp tensor in a {base.model_type} base; --format gguf takes the attention "
            "and MLP projections (and an untied lm_head)"
        )
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == base.arch)
    name = gguf.get_tensor_name_map(arch, base.n_layer).get_name(f"{path}.weight", try_suffixes=(".weight",))
    if name is None:
        raise LoraCompressError(f"module {path} has no llama.cpp tensor name; --format gguf cannot take it")
    return name


def rope_heads(path: str, base: BaseShape) -> int | None:
    """Heads whose rows llama.cpp's converter permutes (``q``: all heads, ``k``: KV heads), else None."""
    if path.endswith("self_attn.q_proj"):
        return base.n_head
    if path.endswith("self_attn.k_proj"):
        return base.n_head_kv
    return None


def permute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """Within each head, interleave the two rotary halves: row order ``(h, 2, d) -> (h, d, 2)``."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`."""
    return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# --------------------------------------------------------------------------- writing and reading back


@dataclass
class GgufModule:
    """One module as written: llama.cpp name, the factors in file layout, what it must read as."""

    path: str
    name: str
    a: np.ndarray
    b: np.ndarray
    heads: int | None
    reference: LoraModule


def plan_modules(adapter: Adapter, base: BaseShape, alpha: float, dtype: torch.dtype) -> list[GgufModule]:
    """Every module of rank > 0 in file layout, with ``scale · r / alpha`` folded into ``B``."""
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    planned = []
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        name = tensor_name(path, base)
        heads = rope_heads(path, base)
        if heads is not None and m.out_features % (2 * heads):
            raise LoraCompressError(
                f"module {path} has {m.out_features} outputs, not a multiple of 2 × {heads} heads; is --base-model right?"
            )
        expected = base.tensor_shapes.get(name) if base.tensor_shapes is not None else None
        if base.tensor_shapes is not None and expected != (m.out_features, m.in_features):
            got = "missing" if expected is None else f"{expected[0]}×{expected[1]}"
            raise LoraCompressError(
                f"module {path} is {m.out_features}×{m.in_features} but {name} in the base GGUF is {got}; "
                "pass the base model this adapter was trained on"
            )
        fold = m.scale * m.rank / alpha
        b = m.B.double().numpy() * fold
        if heads is not None:
            b = permute_rows(b, heads)
        planned.append(GgufModule(path=path, name=name, a=np.ascontiguousarray(m.A.double().numpy(), dtype=np_dtype),
                                  b=np.ascontiguousarray(b, dtype=np_dtype), heads=heads, reference=m))
    return planned


@contextmanager
def _quiet_gguf() -> Iterator[None]:
    """gguf's writer logs its progress at INFO ("Writing the following files: ..."); --debug keeps it."""
    logger = logging.getLogger("gguf")
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def write_gguf(file: Path, modules: list[GgufModule], base: BaseShape, alpha: float, source_name: str) -> None:
    with _quiet_gguf():
        _write(file, modules, base, alpha, source_name)


def _write(file: Path, modules: list[GgufModule], base: BaseShape, alpha: float, source_name: str) -> None:
    gguf = import_gguf()
    writer = gguf.GGUFWriter(str(file), base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(source_name)
    for m in modules:
        writer.add_tensor(f"{m.name}.lora_a", m.a)
        writer.add_tensor(f"{m.name}.lora_b", m.b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def relative_error(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """``‖B1 A1 − B2 A2‖_F / ‖B2 A2‖_F`` through ``r×r`` Gram matrices (no dense ``out×in`` delta)."""
    def inner(bx: torch.Tensor, ax: torch.Tensor, by: torch.Tensor, ay: torch.Tensor) -> float:
        return float(torch.trace((bx.T @ by) @ (ay @ ax.T)))

    ref = inner(b2, a2, b2, a2)
    diff = inner(b1, a1, b1, a1) - 2 * inner(b1, a1, b2, a2) + ref
    return (max(diff, 0.0) ** 0.5) / max(ref ** 0.5, 1e-30)


def verify_gguf(file: Path, modules: list[GgufModule], base: BaseShape) -> dict[str, Any]:
    """Read ``file`` back with gguf's reader; every module's ΔW as llama.cpp scales it vs the adapter's."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(file))
    problems = []
    if _field(reader, "general.type") != "adapter" or _field(reader, gguf.Keys.Adapter.TYPE) != "lora":
        problems.append("general.type/adapter.type")
    if _field(reader, "general.architecture") != base.arch:
        problems.append("general.architecture")
    alpha = float(_field(reader, gguf.Keys.Adapter.LORA_ALPHA))
    tensors = {t.name: t for t in reader.tensors}
    worst, worst_path = 0.0, ""
    for m in modules:
        a = torch.from_numpy(np.array(tensors[f"{m.name}.lora_a"].data, dtype=np.float64))
        b_np = np.array(tensors[f"{m.name}.lora_b"].data, dtype=np.float64)
        if m.heads is not None:
            b_np = unpermute_rows(b_np, m.heads)
        b = torch.from_numpy(b_np) * (alpha / a.shape[0])  # llama.cpp: rank from the tensor shape
        ref = m.reference
        err = relative_error(b, a, ref.B.double() * ref.scale, ref.A.double())
        if err > worst:
            worst, worst_path = err, m.path
    if len(tensors) != 2 * len(modules):
        problems.append(f"{len(tensors)} tensors for {len(modules)} modules")
    return {"alpha": alpha, "modules": len(modules), "max_rel_error": worst, "worst_module": worst_path,
            "problems": problems}


def _check_supported(adapter: Adapter, source: Path) -> None:
    # PEFT's copies of a targeted lm_head / embedding (save_embedding_layers) are the base's own weights, not a
    # trained head: llama.cpp uses the base's, as vLLM does, so they are left out; the module itself is
    # judged by tensor_name (a tied lm_head gets its own message).
    copies = embedding_copies(adapter)
    saved = adapter.config.get("modules_to_save")
    heads = sorted({base_param_name(k) for k in adapter.extra_tensors if k not in copies})
    if heads or saved:
        raise LoraCompressError(
            f"{source}: llama.cpp cannot load modules_to_save ({saved or ', '.join(heads)}); merge the adapter "
            "(loracompress merge) or retrain without modules_to_save"
        )
    if adapter.fan_in_fan_out:
        raise LoraCompressError(f"{source}: fan_in_fan_out (GPT-2 Conv1D) adapters have no llama.cpp LoRA form; merge instead")


@dataclass(kw_only=True)
class GgufOptions(ExportOptions):
    """What ``export --format gguf`` can be told."""

    base_model: str | None = None  # the base's .gguf file or model folder, where the shapes are read from
    dtype: str | None = None  # fp32 (default) or fp16
    trust_remote_code: bool = False


class GgufReport(ExportReport):
    """What ``export --format gguf`` wrote, and how it read back."""

    def lines(self) -> list[str]:
        check = self["check"]
        return [f"llama.cpp LoRA GGUF ({self['dtype']}, {self['architecture']}): {self['modules']} modules, "
                f"ranks {min(self['ranks'].values())}-{self['max_rank']}, adapter.lora.alpha = {self['lora_alpha']:g}, "
                f"{human_bytes(self['bytes'])}",
                f"  read back: max relative ΔW error {check['max_rel_error']:.3g} (tolerance {check['tolerance']:.3g})",
                f"wrote {self['output']}/{self['file']}; serve with: llama-server -m BASE.gguf --lora "
                f"{self['output']}/{self['file']}"]


def _run(sources: Sequence[Path], output: Path, options: GgufOptions) -> GgufReport:
    return export_gguf(sources[0], output, base_model=options.base_model, dtype=parse_dtype(options.dtype),
                       force=options.force, trust_remote_code=options.trust_remote_code,
                       allow_nonfinite=options.allow_nonfinite)


def export_gguf(
    source: str | Path,
    output: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    allow_nonfinite: bool = False,
) -> GgufReport:
    """Write ``source`` as ``output/adapter.gguf`` (+ ``export_report.json``), verified by reading it back.

    Returns the report. Raises LoraCompressError for what llama.cpp cannot take (embeddings, a
    tied head, ``modules_to_save``, a non-Llama architecture) and when the read-back check fails.
    """
    dtype = dtype or torch.float32
    if dtype not in TOLERANCES:
        raise LoraCompressError("--format gguf writes --dtype fp32 (default) or fp16")
    source = Path(source)
    inputs = [source, base_model]  # the .gguf / folder the shapes are read from is an input too
    check_output_path(output, force=force, inputs=inputs)
    adapter = load_adapter(source, allow_nonfinite=allow_nonfinite)
    base = read_base_shape(base_model, adapter, trust_remote_code)
    for path, m in adapter.modules.items():  # what llama.cpp cannot adapt, named before any saved tensor
        if m.rank:
            tensor_name(path, base)
    _check_supported(adapter, source)
    if not any(m.rank for m in adapter.modules.values()):
        raise LoraCompressError(f"{source}: every module has rank 0; there is no adapter to serve")
    # One alpha for the file: the largest rank, so a module of the top rank keeps its factors as they are.
    alpha = float(max(m.rank for m in adapter.modules.values()))
    modules = plan_modules(adapter, base, alpha, dtype)
    report: dict[str, Any] = {
        "target": "gguf", "source": str(source), "output": str(output), "file": GGUF_NAME,
        "base_model": base.source, "architecture": base.arch, "dtype": "fp16" if dtype == torch.float16 else "fp32",
        "lora_alpha": alpha, "max_rank": int(alpha), "modules": len(modules),
        "ranks": {m.path: int(m.a.shape[0]) for m in modules},
        "params": int(sum(m.a.size + m.b.size for m in modules)),
        "skipped": [s.to_json() for s in adapter.skipped],  # what PEFT does not load: not exported
    }
    with atomic_output_dir(output, force=force, inputs=inputs) as tmp:
        write_gguf(tmp / GGUF_NAME, modules, base, alpha, source.resolve().name)
        check = verify_gguf(tmp / GGUF_NAME, modules, base)
        check["tolerance"] = TOLERANCES[dtype]
        if check["problems"] or check["max_rel_error"] > check["tolerance"]:
            raise LoraCompressError(
                f"the written GGUF does not read back as the adapter (max relative ΔW error {check['max_rel_error']:.3g} "
                f"in {check['worst_module'] or '-'}, {', '.join(check['problems']) or 'no metadata problem'}); "
                "nothing was written: report this with the adapter"
            )
        report["check"] = check
        report["bytes"] = (tmp / GGUF_NAME).stat().st_size
        jsonio.write_json(tmp / REPORT_NAME, report)
    return GgufReport(report)


register_format(ExportFormat("gguf", "a llama.cpp / Ollama LoRA GGUF (--base-model BASE.gguf or folder)", GgufOptions, _run))
