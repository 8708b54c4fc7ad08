"""onnxruntime-genai's model builder, and the one change we make to its graph.

The builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging Face decoder into a
generating ONNX graph (KV cache as ``past_key_values.*`` inputs and ``present.*`` outputs,
GroupQueryAttention) plus ``genai_config.json``. Given ``adapter_path`` it adds a LoRA path to each
targeted projection, but bakes the factors in as initializers ``<m>.lora_A.MatMul.weight``
``[in, r]`` and ``<m>.lora_B.MatMul.weight`` ``[r, out]`` (scale folded into B).

:func:`make_lora_inputs` turns those initializers into graph inputs, each module with its OWN
rank dimension ``r_<peft path>`` (Olive names them all ``lora_r``, which tells onnxruntime that
every module has the same rank and breaks rank-heterogeneous adapters), and a rank-0 default, so
the graph runs the plain base when no adapter is active. ``og.Adapters`` then feeds any adapter's
factors by those input names.

The builder runs in a subprocess of the same Python: it prints freely and holds its own copy of
the weights, and neither should stay in the caller's process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loracompress.core import jsonio
from loracompress.errors import LoraCompressError

log = logging.getLogger(__name__)

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
CONFIG_NAME = "genai_config.json"
META_KEY = "loracompress.genai"
BUILDER = "onnxruntime_genai.models.builder"
#: ``--dtype`` -> the builder's (precision, execution provider). The builder's fp16 graph for the
#: CPU provider has no GroupQueryAttention and fails on the second token (onnxruntime-genai 0.18:
#: "Shape mismatch attempting to re-use buffer"), so fp16 is built for CUDA, where it is meant to
#: run; onnxruntime's CPU kernels run that graph too, which is how it is verified here.
PRECISIONS = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
_NP = {"fp32": np.float32, "fp16": np.float16}
_LORA_INIT = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.MatMul\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def genai_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def import_genai() -> Any:
    """``onnxruntime_genai``, or a one-line error that says how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise LoraCompressError(
            "onnxruntime-genai is not installed: pip install 'loracompress[genai]' "
            "(or pass --engine ort for a single-forward graph without KV cache)"
        ) from None
    return onnxruntime_genai


def rank_dim(path: str) -> str:
    return f"r_{path}"


@dataclass
class LoraInput:
    """The two graph inputs of one LoRA module: ``a`` ``[in, r]`` and ``b`` ``[r, out]``."""

    a: str
    b: str
    in_features: int
    out_features: int


@dataclass
class GenaiGraphSpec:
    """What an adapters-mode genai graph accepts: PEFT module path -> its LoRA inputs; the dtype."""

    modules: dict[str, LoraInput]
    dtype: str

    @property
    def version(self) -> int:
        """A 31-bit fingerprint written as the ``.onnx_adapter`` model version."""
        text = jsonio.dumps([[p, m.a, m.b, m.in_features, m.out_features] for p, m in self.modules.items()] + [self.dtype])
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype,
                "modules": {p: [m.a, m.b, m.in_features, m.out_features] for p, m in self.modules.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenaiGraphSpec:
        return cls(modules={p: LoraInput(str(v[0]), str(v[1]), int(v[2]), int(v[3])) for p, v in data["modules"].items()},
                   dtype=str(data["dtype"]))


# --------------------------------------------------------------------------- the builder


def run_builder(model_dir: Path, out_dir: Path, dtype: str, work: Path, adapter_dir: Path | None = None,
                python: str | None = None) -> list[str]:
    """Build ``model_dir`` (a Hugging Face folder) into ``out_dir``; returns the command line.

    Raises:
        LoraCompressError: the builder is missing or failed (its last output line says why).
    """
    precision, provider = PRECISIONS[dtype]
    cmd = [python or sys.executable, "-m", BUILDER, "-i", str(model_dir), "-o", str(out_dir),
           "-p", precision, "-e", provider, "-c", str(work / "builder-cache")]
    if adapter_dir is not None:
        cmd += ["--extra_options", f"adapter_path={adapter_dir}"]
    # The subprocess only reads local folders; offline keeps a stray hub lookup from hanging.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.info("running %s", " ".join(cmd))
    logfile = work / "builder.log"
    with logfile.open("w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not (out_dir / GRAPH_NAME).is_file():
        lines = [ln.strip() for ln in logfile.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = lines[-1][:200] if lines else f"exit status {proc.returncode}"
        if "No module named" in last and "onnxruntime_genai" in last:
            import_genai()
        raise LoraCompressError(
            f"onnxruntime-genai's model builder failed ({last}); it supports the architectures its builders/ folder "
            "names; --engine ort exports a single-forward graph instead"
        )
    return cmd


# --------------------------------------------------------------------------- LoRA initializers -> inputs


def _key(path: str) -> tuple[str, str] | None:
    """``(layer index, leaf name)``: how a builder module name and a PEFT path are matched."""
    layer = _LAYER.search(path)
    return (layer.group(1), path.rsplit(".", 1)[-1]) if layer else None


def match_modules(graph_modules: list[str], peft_paths: list[str]) -> dict[str, str]:
    """PEFT path -> builder module name (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3.attn.q_proj``).

    The builder renames blocks (``self_attn`` -> ``attn``) but keeps the layer index and the
    projection's own name; a pair that does not match one to one is refused, not guessed.
    """
    by_key: dict[tuple[str, str], str] = {}
    for name in graph_modules:
        key = _key(name)
        if key is None or key in by_key:
            raise LoraCompressError(f"cannot tell which layer the builder's LoRA module {name} belongs to; "
                                    "this architecture is not supported by --engine genai --mode adapters")
        by_key[key] = name
    mapping: dict[str, str] = {}
    for path in peft_paths:
        key = _key(path)
        if key is None or key not in by_key:
            raise LoraCompressError(
                f"onnxruntime-genai's model builder gave module {path} no LoRA path (it adds one to the attention and "
                "MLP projections of each layer); drop that module from the adapter or use --mode merged"
            )
        mapping[path] = by_key.pop(key)
    if by_key:
        raise LoraCompressError(f"the builder made LoRA paths for modules no adapter has ({', '.join(sorted(by_key.values())[:3])})")
    return mapping


def lora_initializers(graph: Any) -> dict[str, dict[str, Any]]:
    """The builder's LoRA factors of an ``onnx_ir`` graph: builder module name -> ``{"A": value, "B": value}``."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in graph.initializers.items():
        m = _LORA_INIT.match(name)
        if m:
            found.setdefault(m["module"], {})[m["part"]] = value
    incomplete = [k for k, v in found.items() if set(v) != {"A", "B"}]
    if incomplete:
        raise LoraCompressError(f"the builder's graph has half a LoRA path at {incomplete[0]}; unsupported builder output")
    return found


def make_lora_inputs(src: Path, dst: Path, peft_paths: list[str], dtype: str) -> GenaiGraphSpec:
    """Read the builder's graph in ``src``, write it to ``dst`` with LoRA factors as inputs.

    ``dst`` must be another folder: the external data of ``src`` is read while ``dst`` is written.
    """
    import onnx_ir as ir

    model = ir.load(str(src / GRAPH_NAME))
    graph = model.graph
    found = lora_initializers(graph)
    mapping = match_modules(list(found), peft_paths)
    np_dtype = _NP[dtype]
    modules: dict[str, LoraInput] = {}
    for path, module in mapping.items():
        a, b = found[module]["A"], found[module]["B"]
        in_f, out_f = int(a.shape[0]), int(b.shape[1])
        dim = rank_dim(path)
        a.shape, b.shape = ir.Shape([in_f, dim]), ir.Shape([dim, out_f])
        # The default is rank 0: MatMul by [in, 0] then [0, out] adds exact zeros, the base alone.
        a.const_value = ir.Tensor(np.zeros((in_f, 0), dtype=np_dtype), name=a.name)
        b.const_value = ir.Tensor(np.zeros((0, out_f), dtype=np_dtype), name=b.name)
        graph.inputs.extend([a, b])
        for node, _ in list(a.uses()):  # x @ A is [.., r]: the builder declared the union's rank there,
            for value in node.outputs:  # and onnxruntime plans buffers by declared shapes
                if value.shape is not None and len(value.shape) >= 1:
                    value.shape = ir.Shape([*list(value.shape)[:-1], dim])
        modules[path] = LoraInput(a=str(a.name), b=str(b.name), in_features=in_f, out_features=out_f)
    spec = GenaiGraphSpec(modules=modules, dtype=dtype)
    model.metadata_props[META_KEY] = jsonio.dumps(spec.to_json())
    dst.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst / GRAPH_NAME), external_data=DATA_NAME)
    return spec


def read_graph_spec(folder: Path) -> GenaiGraphSpec:
    """The LoRA inputs of an adapters-mode genai export folder."""
    import onnx

    path = folder / GRAPH_NAME
    if not path.is_file() or not (folder / CONFIG_NAME).is_file():
        raise LoraCompressError(f"{folder}: no {GRAPH_NAME} and {CONFIG_NAME}; pass a folder written by export --engine genai --mode adapters")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if META_KEY not in meta:
        raise LoraCompressError(f"{path} has no LoRA inputs recorded; export the graph with --mode adapters first")
    return GenaiGraphSpec.from_json(json.loads(meta[META_KEY]))


# --------------------------------------------------------------------------- adapter files


def adapter_arrays(adapter: Any, spec: GenaiGraphSpec) -> dict[str, np.ndarray]:
    """The tensors of one ``.onnx_adapter``: ``Aᵀ`` and ``(scale·B)ᵀ`` under the graph's input names.

    Modules the adapter lacks (or pruned to rank 0) are left out: their rank-0 defaults apply.
    """
    np_dtype = _NP[spec.dtype]
    arrays: dict[str, np.ndarray] = {}
    for path, m in adapter.modules.items():
        if m.rank == 0:
            continue
        target = spec.modules.get(path)
        if target is None:
            raise LoraCompressError(f"module {path} of the adapter is not a LoRA input of the graph; "
                                    "re-export the graph with this adapter among the sources")
        if (m.in_features, m.out_features) != (target.in_features, target.out_features):
            raise LoraCompressError(f"module {path}: the adapter is {m.out_features}x{m.in_features} but the graph expects "
                                    f"{target.out_features}x{target.in_features}; this adapter belongs to another base model")
        arrays[target.a] = np.ascontiguousarray(m.A.float().T.numpy().astype(np_dtype))
        arrays[target.b] = np.ascontiguousarray((m.B.float() * m.scale).T.numpy().astype(np_dtype))
    return arrays


def provider_options(folder: Path) -> list[str]:
    """The execution providers ``genai_config.json`` asks for (empty: CPU)."""
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    options = config["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    return [name for entry in options for name in entry]
