"""``export BANK_DIR --format bank-genai`` (alias ``bank-export``): a bank as onnxruntime-genai graphs whose
LoRA paths hold the shared bases.

One graph per cluster. onnxruntime-genai's builder is given one of the cluster's expanded adapters
(rank R per module), so each targeted projection gets a LoRA path ``(x @ A) @ B`` with ``A`` [in, R] and
``B`` [R, out] initializers. We set ``A = V`` and ``B = Uᵀ`` (the cluster's bases, constants of the
graph) and put one MatMul between them by a graph input ``<module>.lora_S`` [R, R] whose default is
zeros: ``y += ((x V) S) Uᵀ``, with ``S = Σᵢᵀ`` (so ``y += U Σᵢ Vᵀ x``) fed from each adapter's
``.onnx_adapter``, which therefore holds only the cores (R² values per module). With no adapter active the path adds exact zeros: the base.

Nothing is written unless greedy generation under onnxruntime-genai gives PEFT's tokens on each
adapter's expanded folder (and the base's with no adapter), as ``export --engine genai`` checks.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loracompress.bank.io import ADAPTERS_DIR, read_bank
from loracompress.core import jsonio
from loracompress.core.outputs import atomic_output_dir, check_output_path
from loracompress.core.units import human_bytes
from loracompress.errors import LoraCompressError
from loracompress.export.genai import ADAPTER_SUFFIX, save_hf
from loracompress.export.genai_graph import (
    DATA_NAME,
    GRAPH_NAME,
    import_genai,
    lora_initializers,
    match_modules,
    run_builder,
)
from loracompress.export.genai_verify import (
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPTS,
    DEFAULT_TOLERANCE,
    encode_prompts,
    engine_versions,
    eos_ids,
    peft_references,
    require_passed,
    stop_at_eos,
    verify_folder,
)
from loracompress.export.registry import (
    REPORT_NAME,
    ExportFormat,
    ExportOptions,
    ExportReport,
    register_format,
)

CORE_SUFFIX = ".lora_S"


@dataclass(kw_only=True)
class BankExportOptions(ExportOptions):
    """What ``export BANK_DIR --format bank-genai`` can be told (fp32 only, so no ``--dtype``)."""

    base_model: str | None = None
    tolerance: float | None = None
    prompts: tuple[str, ...] = tuple(DEFAULT_PROMPTS)
    new_tokens: int = DEFAULT_NEW_TOKENS
    force: bool = False
    trust_remote_code: bool = False


def core_input(path: str) -> str:
    return f"{path}{CORE_SUFFIX}"


def bank_graph(src: Path, dst: Path, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, int]:
    """The builder's graph in ``src`` with each LoRA path made ``x V S Uᵀ``, written to ``dst``; module -> R."""
    import onnx_ir as ir

    model = ir.load(str(src / GRAPH_NAME))
    graph = model.graph
    found = lora_initializers(graph)
    kept = [p for p, (U, _) in bases.items() if U.shape[1] > 0]
    mapping = match_modules(list(found), kept)
    ranks: dict[str, int] = {}
    for path, module in mapping.items():
        U, V = bases[path]
        R = int(U.shape[1])
        a, b = found[module]["A"], found[module]["B"]
        if tuple(a.shape) != (V.shape[0], R) or tuple(b.shape) != (R, U.shape[0]):
            raise LoraCompressError(f"the builder's LoRA path of {path} is {tuple(a.shape)}/{tuple(b.shape)}, not rank {R}; "
                                    "unsupported builder output")
        a.const_value = ir.Tensor(V.float().numpy().astype(np.float32), name=a.name)
        b.const_value = ir.Tensor(U.float().T.contiguous().numpy().astype(np.float32), name=b.name)
        uses = list(a.uses())
        if len(uses) != 1:
            raise LoraCompressError(f"the builder's LoRA path of {path} uses its A factor {len(uses)} times; unsupported builder output")
        first = uses[0][0]
        t = first.outputs[0]
        s = ir.Value(name=core_input(path), shape=ir.Shape([R, R]), type=ir.TensorType(ir.DataType.FLOAT))
        s.const_value = ir.Tensor(np.zeros((R, R), dtype=np.float32), name=s.name)
        graph.register_initializer(s)
        graph.inputs.append(s)
        out = ir.Value(name=f"{path}.lora_S.MatMul/output_0", shape=t.shape, type=t.type)
        consumers = list(t.uses())
        mm = ir.Node("", "MatMul", inputs=[t, s], outputs=[out], name=f"{path}.lora_S.MatMul")
        graph.insert_after(first, mm)
        for node, index in consumers:
            node.replace_input_with(index, out)
        ranks[path] = R
    dst.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(dst / GRAPH_NAME), external_data=DATA_NAME)
    return ranks


def _version(ranks: dict[str, int]) -> int:
    text = jsonio.dumps(sorted(ranks.items()))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


class BankGenaiReport(ExportReport):
    """What the bank's export wrote per cluster, and how generation was verified."""

    def lines(self) -> list[str]:
        out = []
        for c in self["clusters"]:
            sizes = ", ".join(f"{Path(f['file']).name} {human_bytes(f['bytes'])}" for f in c["adapters"])
            out.append(f"{c['folder']}: graph {human_bytes(c['graph_bytes'])}; {sizes}")
        return [*out, f"onnxruntime-genai gave PEFT's tokens on {self['tokens_identical']} prompts (every adapter, and "
                      f"the base with none active); wrote {self['output']} (and {REPORT_NAME})"]


def export_bank_genai(bank_dir: str | Path, output: str | Path, options: BankExportOptions) -> BankGenaiReport:
    """Build, verify and write ``output/cluster-<c>/`` per cluster (graph + one ``.onnx_adapter`` per adapter)."""
    # imported on use (onnx pulls in much): registering the format at every command-line parse stays light
    from loracompress.export.onnx_adapters import write_onnx_adapter
    from loracompress.runtime.model import load_base_model

    t0 = time.perf_counter()
    og = import_genai()
    bf = read_bank(bank_dir)
    if any(m.heads for m in bf.members):
        raise LoraCompressError("the bank's adapters save whole modules (modules_to_save), which onnxruntime-genai cannot "
                                "carry; export a bank of causal-LM adapters without heads")
    if bf.shape.fan_in_fan_out:
        raise LoraCompressError("fan_in_fan_out adapters (GPT-2 Conv1D) are not supported by onnxruntime-genai's builder")
    inputs = [bank_dir, options.base_model]
    out = check_output_path(output, force=options.force, inputs=inputs)
    base = load_base_model(options.base_model, bf.expanded(0), dtype=torch.float32,
                           trust_remote_code=options.trust_remote_code)
    if not base.is_causal_lm:
        raise LoraCompressError("--format bank-genai builds decoder-only causal LMs for onnxruntime-genai; this base is not one")
    tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE["fp32"]
    prompts = encode_prompts(base.tokenizer, options.prompts)
    folders = [Path(bank_dir) / ADAPTERS_DIR / m.name for m in bf.members]
    refs, base_refs = peft_references(base.model, folders, prompts, options.new_tokens, with_base=True)
    clusters: list[dict[str, Any]] = []
    all_checks = []
    with atomic_output_dir(out, force=options.force, inputs=inputs) as tmp, \
            tempfile.TemporaryDirectory(prefix=".genai-work-", dir=str(tmp.parent)) as work_name:
        work = Path(work_name)
        save_hf(base, base.model, work / "hf")
        for c, bases in enumerate(bf.bank.bases):
            members = [i for i, k in enumerate(bf.bank.clusters) if k == c]
            dest = tmp / f"cluster-{c}"
            run_builder(work / "hf", work / f"build-{c}", "fp32", work, adapter_dir=folders[members[0]])
            ranks = bank_graph(work / f"build-{c}", dest, bases)
            for item in (work / f"build-{c}").iterdir():
                if not item.name.startswith(GRAPH_NAME):
                    shutil.copy2(item, dest / item.name)
            files = []
            for i in members:
                name = f"{bf.members[i].name}{ADAPTER_SUFFIX}"
                arrays = {core_input(p): np.ascontiguousarray(bf.bank.cores[i][p].float().T.numpy())
                          for p in ranks}
                write_onnx_adapter(arrays, dest / name, model_version=_version(ranks), adapter_version=i + 1)
                files.append({"file": f"{dest.name}/{name}", "adapter": bf.members[i].name,
                              "values": int(sum(a.size for a in arrays.values())), "bytes": (dest / name).stat().st_size})
            eos = eos_ids(dest)
            checks = verify_folder(og, dest, prompts, [stop_at_eos(refs[i], eos) for i in members],
                                   stop_at_eos(base_refs or [], eos), [Path(f["file"]).name for f in files],
                                   options.new_tokens, tolerance)
            require_passed(checks)
            all_checks += checks
            clusters.append({"cluster": c, "folder": dest.name, "ranks": ranks, "adapters": files,
                             "graph_bytes": sum(p.stat().st_size for p in dest.iterdir() if p.name.startswith(GRAPH_NAME))})
        report = {"format": "onnx", "engine": "onnxruntime-genai", "mode": "bank", "dtype": "fp32", "bank": str(bank_dir),
                  "output": str(out), "base_model": base.source, "verified_on": "cpu", "tolerance": tolerance,
                  "prompts": list(options.prompts), "new_tokens": options.new_tokens,
                  "tokens_identical": f"{sum(c.identical for c in all_checks)}/{sum(c.prompts for c in all_checks)}",
                  "first_step_max_abs_diff": max(c.first_step_max_abs_diff for c in all_checks),
                  "checks": [c.to_json() for c in all_checks], "clusters": clusters, "versions": engine_versions(og),
                  "seconds": round(time.perf_counter() - t0, 2)}
        jsonio.write_json(tmp / REPORT_NAME, report)
    return BankGenaiReport(report)


def _export(sources: Sequence[Path], output: Path, options: BankExportOptions) -> BankGenaiReport:
    return export_bank_genai(sources[0], output, options)


register_format(ExportFormat("bank-genai", "a bank folder (loracompress bank) as onnxruntime-genai graphs, the shared "
                             "bases inside, R×R cores per .onnx_adapter; verified against PEFT's tokens",
                             BankExportOptions, _export))
