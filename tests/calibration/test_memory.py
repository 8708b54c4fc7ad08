"""Calibration at bounded memory on tiny real models: a bf16-stored base, gradient checkpointing,
top-k teacher targets, the quantized-base refusals, and every new flag's one-line errors."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loracompress.calibration.engine import Engine, EngineConfig, distillation_loss, svd_student
from loracompress.calibration.engine.recompute import gradient_checkpointing
from loracompress.calibration.engine.teacher import DEFAULT_TOP_K, TopK, plan_targets, topk_kl, topk_targets
from loracompress.core.budget import Budget
from loracompress.core.reader import load_adapter
from loracompress.cuts.svd import compress_svd
from loracompress.errors import LoraCompressError
from loracompress.pipelines.evaluate import compare_adapters
from loracompress.pipelines.prune import prune
from loracompress.runtime.data import make_batches, read_examples
from loracompress.runtime.layers import attach, detach, use_mode
from loracompress.runtime.model import load_base_model
from loracompress.runtime.placement import resolve_placement
from loracompress_cli.app import main
from tests.calibration.test_engine import FixedCut, calib_files, options
from tests.tiny import make_adapter, sample_inputs, tiny_sentences, tiny_tokenizer


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory) -> dict[str, Path]:
    return calib_files(tmp_path_factory.mktemp("llama"), "llama")


def _lm_batches(n: int = 32, seed: int = 3, batch_size: int = 8):
    from loracompress.runtime.data import Example

    examples = [Example(text=t) for t in tiny_sentences(n, seed=seed)]
    return make_batches(examples, tiny_tokenizer("llama"), task="lm", seq_len=32, batch_size=batch_size)


def _llama_run(tmp_path: Path, dtype: torch.dtype = torch.float32, steps: int = 12, **cfg):
    """FixedCut calibration of the tiny Llama adapter on a base stored in ``dtype``; returns (result, adapter)."""
    src, base = make_adapter("llama", tmp_path / "a", r=8)
    adapter = load_adapter(src)
    model = copy.deepcopy(base).to(dtype)
    config = EngineConfig(steps=steps, lr=5e-3, device="cpu", **cfg)
    result = Engine(config).run(model, adapter, svd_student(adapter), FixedCut(), int(adapter.num_params * 0.25),
                                _lm_batches(), "lm")
    return result, adapter, base


def _kl_on_fp32_base(base: torch.nn.Module, original, compressed) -> float:
    """Held-out KL(original ‖ compressed), both on the fp32 base: what a user of the output sees."""
    from loracompress.runtime.model import BaseModel

    bm = BaseModel(model=copy.deepcopy(base), tokenizer=tiny_tokenizer("llama"), source="tiny", task_type="CAUSAL_LM")
    return compare_adapters(bm, original, compressed, _lm_batches(32, seed=9), "lm")["kl"]


# --------------------------------------------------------------------------- a bf16-stored base

#: Tolerance of the bf16-stored base against fp32. Measured on this tiny Llama (12 steps): the result's
#: held-out KL (on the fp32 base) differs by 3.0%, the worst module's ΔW by 4.4% relative Frobenius.
BF16_KL_RTOL = 0.10
BF16_DELTA_RTOL = 0.10


def test_calibration_on_a_bf16_stored_base_reaches_the_fp32_result(tmp_path):
    fp32, original, base = _llama_run(tmp_path / "fp32")
    bf16, _, _ = _llama_run(tmp_path / "bf16", torch.bfloat16)
    assert set(fp32.adapter.modules) == set(bf16.adapter.modules)
    assert fp32.ranks == bf16.ranks
    for path, m in fp32.adapter.modules.items():
        assert bf16.adapter.modules[path].A.dtype == torch.float32  # the factors stay fp32 on a bf16 base
        d32, d16 = m.delta(), bf16.adapter.modules[path].delta()
        assert torch.linalg.norm(d16 - d32) <= BF16_DELTA_RTOL * torch.linalg.norm(d32), path
    kl32, kl16 = _kl_on_fp32_base(base, original, fp32.adapter), _kl_on_fp32_base(base, original, bf16.adapter)
    assert abs(kl16 - kl32) <= BF16_KL_RTOL * kl32, (kl16, kl32)
    assert fp32.losses[-1] < fp32.losses[0] and bf16.losses[-1] < bf16.losses[0]


def test_lora_layer_on_a_bf16_base_computes_the_low_rank_path_in_fp32(tmp_path):
    src, base = make_adapter("llama", tmp_path / "a", r=8)
    adapter = load_adapter(src)
    model = copy.deepcopy(base).to(torch.bfloat16)
    layers = attach(model, adapter, trainable=True)
    layer = next(iter(layers.values()))
    assert layer.base.weight.dtype == torch.bfloat16 and layer.A.dtype == torch.float32
    x = torch.randn(3, layer.A.shape[1], dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = layer.base(x).float() + layer.scale * (x.float() @ layer.A.T) @ layer.B.T
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert layer.A.grad is not None and layer.A.grad.dtype == torch.float32
    detach(model)


def test_pipeline_loads_the_base_straight_in_the_base_dtype(llama_files, tmp_path, monkeypatch):
    """``--base-dtype bf16``: transformers reads the weights in bf16 (``dtype=``), no fp32 model is ever made."""
    import transformers

    seen: list[torch.dtype] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(kwargs.get("dtype"))
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    report = prune(llama_files["adapter"], tmp_path / "o", options(llama_files, "lorpa", steps=2, base_dtype="bf16"))
    assert seen == [torch.bfloat16]
    assert report["settings"]["base"] == {"base_dtype": "bf16", "base_device": "cpu"}


def test_default_base_dtype_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_has_it():
    assert resolve_placement(None, "cpu").dtype == torch.float32
    assert resolve_placement("auto", "cpu").dtype == torch.float32
    assert resolve_placement("bf16", "cpu").dtype == torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_placement(None, "cuda").dtype == torch.bfloat16


# --------------------------------------------------------------------------- one copy of each factor set


def test_teacher_factors_are_the_adapters_own_tensors_not_a_copy(tmp_path):
    """An fp32 teacher on the CPU is used in place (read from the file, it stays file-backed): before,
    every layer held a clone, a second copy of the whole original adapter for the run."""
    src, base = make_adapter("llama", tmp_path / "a", r=8)
    adapter = load_adapter(src)
    model = copy.deepcopy(base).to(torch.bfloat16)
    layers = attach(model, svd_student(adapter), teacher=adapter, trainable=True)
    for path, layer in layers.items():
        m = adapter.modules[path]
        assert layer.A0.data_ptr() == m.A.data_ptr() and layer.B0.data_ptr() == m.B.data_ptr(), path
        assert layer.A.data_ptr() != m.A.data_ptr()  # the trained student is its own copy
    before = {p: m.delta().clone() for p, m in adapter.modules.items()}
    detach(model)
    half = adapter.replace({p: type(m)(A=m.A.to(torch.bfloat16), B=m.B.to(torch.bfloat16), scale=m.scale)
                            for p, m in adapter.modules.items()})
    layer = next(iter(attach(model, svd_student(adapter), teacher=half).values()))
    assert layer.A0.dtype == torch.float32  # another dtype: converted (a copy), as before
    detach(model)
    Engine(EngineConfig(steps=3, lr=5e-3, device="cpu")).run(model, adapter, svd_student(adapter), FixedCut(),
                                                             int(adapter.num_params * 0.25), _lm_batches(), "lm")
    for path, m in adapter.modules.items():  # a run leaves the teacher's tensors as they were
        torch.testing.assert_close(m.delta(), before[path], rtol=0, atol=0)


class _StudentFreed(FixedCut):
    """Records, at setup and before each step, whether the student adapter passed in is still alive."""

    def __init__(self, refs):
        super().__init__()
        self.refs, self.alive = refs, []

    def setup(self, ctx):
        super().setup(ctx)
        self.alive.append(any(r() is not None for r in self.refs))

    def before_forward(self, step):
        import gc

        gc.collect()
        self.alive.append(any(r() is not None for r in self.refs))


def test_the_engine_does_not_keep_the_start_adapter_alive(tmp_path):
    """The layers copy the student's factors; the start adapter passed in the call is freed, not kept as a
    second copy of every factor for the whole run."""
    import weakref

    src, base = make_adapter("llama", tmp_path / "a", r=8)
    adapter = load_adapter(src)
    refs: list[weakref.ref] = []

    def start():
        student = svd_student(adapter)
        refs.extend(weakref.ref(t) for m in student.modules.values() for t in (m.A, m.B))
        return student

    method = _StudentFreed(refs)
    Engine(EngineConfig(steps=2, device="cpu")).run(copy.deepcopy(base), adapter, start(), method,
                                                    int(adapter.num_params * 0.25), _lm_batches(), "lm")
    assert refs and method.alive == [False, False, False]


def test_training_state_is_freed_before_the_held_out_evaluation(llama_files, tmp_path, monkeypatch):
    """The optimizer (AdamW moments) and the method (its context holds the layers and gradients; IncreLoRA's
    importance averages) are gone when the evaluation and the --keep-best candidates run over the base: they
    used to stay alive to the end and raised the peak of a default run above the training's."""
    import weakref

    import loracompress.pipelines.calibrate as calibrate

    refs: dict[str, weakref.ref] = {}

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            refs["optimizer"] = weakref.ref(self)

    from loracompress.pipelines.plan import PrunePlan

    real_method, real_quality = PrunePlan.new_method, calibrate._quality

    def spy_method(*args, **kwargs):
        method = real_method(*args, **kwargs)
        refs["method"] = weakref.ref(method)
        return method

    alive: list[list[str]] = []

    def spy_quality(*args, **kwargs):
        alive.append(sorted(name for name, ref in refs.items() if ref() is not None))
        return real_quality(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(PrunePlan, "new_method", spy_method)
    monkeypatch.setattr(calibrate, "_quality", spy_quality)
    report = prune(llama_files["adapter"], tmp_path / "o", options(llama_files, "increlora", steps=3, evaluate=True))
    assert set(refs) == {"optimizer", "method"} and alive == [[]]
    assert report["settings"]["method"] == "increlora" and "target_params" in report["settings"]  # still described


# --------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, kind):
    src, base = make_adapter(kind, tmp_path / "a", r=8)
    adapter = load_adapter(src)
    model = copy.deepcopy(base)
    student = compress_svd(adapter, Budget.parse("rank=1")).adapter  # far from the teacher: gradients not ~0
    layers = attach(model, student, teacher=adapter, trainable=True)
    inputs = sample_inputs(kind, batch=3, seq=12)
    task = "cls" if kind == "bert" else "lm"
    if task == "lm":
        inputs["use_cache"] = False
    with use_mode(layers, "teacher"), torch.no_grad():
        teacher = model(**inputs).logits
    blocks = [m for m in model.modules() if type(m).__name__ in ("LlamaDecoderLayer", "GPT2Block", "BertLayer")]
    calls = {"n": 0}
    # transformers checkpoints a block's forward (not its __call__): a hook inside the block sees the recompute
    inner = next(iter(blocks[0].children()))
    hook = inner.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def grads(checkpointed: bool) -> dict[str, torch.Tensor]:
        for layer in layers.values():
            layer.A.grad = layer.B.grad = None
        calls["n"] = 0
        with gradient_checkpointing(model, checkpointed):
            out = model(**inputs).logits
            loss, _ = distillation_loss(out, teacher, None, inputs["attention_mask"], task)
            loss.backward()
        assert calls["n"] == (2 if checkpointed else 1)  # the block really was recomputed in backward
        return {f"{p}.{n}": getattr(layer, n).grad.clone() for p, layer in layers.items() for n in ("A", "B")
                if layer.rank > 0}

    modes = [m.training for m in model.modules()]
    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=0, atol=1e-5, msg=name)
    scale = max(float(g.abs().max()) for g in plain.values())
    assert scale > 1e-4  # the comparison is not between zeros
    assert max(float((ckpt[n] - g).abs().max()) for n, g in plain.items()) <= 1e-4 * scale  # and relative too
    # everything is put back: the same train/eval flags, no checkpointing
    assert [m.training for m in model.modules()] == modes and not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    hook.remove()
    detach(model)


def test_gradient_checkpointing_run_matches_the_plain_run(tmp_path):
    plain, _, _ = _llama_run(tmp_path / "p", steps=4)
    ckpt, _, _ = _llama_run(tmp_path / "c", steps=4, gradient_checkpointing=True)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-5)
    for path, m in plain.adapter.modules.items():
        torch.testing.assert_close(ckpt.adapter.modules[path].delta(), m.delta(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- top-k teacher targets


def test_topk_kl_is_the_full_kl_at_k_equal_vocab_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(20, 50, generator=g) * 3, torch.randn(20, 50, generator=g) * 3
    full, _ = distillation_loss(s[None], t[None], None, None, "lm", task_weight=0.0)
    exact = topk_kl(s[:-1], topk_targets(t[:-1], 50, 2.0), 2.0)  # the LM loss leaves out the last position
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)
    previous = 0.0
    for k in (1, 4, 16, 49):
        value = float(topk_kl(s[:-1], topk_targets(t[:-1], k, 2.0), 2.0))
        assert previous - 1e-6 <= value <= float(full) + 1e-6  # coarser buckets, smaller KL
        previous = value
    assert float(topk_kl(t, topk_targets(t, 4, 2.0), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_topk_targets_keep_8k_plus_4_bytes_per_token():
    targets = topk_targets(torch.randn(2, 7, 300), 16, 2.0)
    assert isinstance(targets, TopK) and targets.nbytes == 2 * 7 * (16 * 8 + 4)
    assert torch.allclose(torch.logsumexp(torch.cat([targets.logp, targets.log_rest[..., None]], -1), -1),
                          torch.zeros(2, 7), atol=1e-5)  # top-k and the rest hold all the mass


def test_auto_plan_keeps_the_full_distribution_while_it_fits_the_cache_cap():
    logits = torch.zeros(8, 32, 1000)
    assert plan_targets("lm", None, logits, 10, 1024.0).top_k is None  # 10 × 1 MB fits
    assert plan_targets("lm", None, logits, 10, 5.0).top_k == DEFAULT_TOP_K
    assert plan_targets("lm", 0, logits, 10, 5.0).top_k is None
    assert plan_targets("lm", 5000, logits, 10, 5.0).top_k is None  # k >= vocab: the exact distribution
    assert plan_targets("cls", 8, torch.zeros(8, 3), 10, 0.0).top_k is None


def test_topk_calibration_is_close_to_full_vocabulary_distillation_and_reported(llama_files, tmp_path):
    full = prune(llama_files["adapter"], tmp_path / "full", options(llama_files, "lorpa", teacher_top_k=0))
    top = prune(llama_files["adapter"], tmp_path / "top", options(llama_files, "lorpa", teacher_top_k=16))
    assert full["settings"]["run"]["teacher_targets"] == {"kind": "full", "vocab": 96, "cached": True,
                                                         "cache_cap_mb": 1024.0, "loss_chunk_tokens": 174762}
    info = top["settings"]["run"]["teacher_targets"]
    assert info == {"kind": "top-k", "top_k": 16, "vocab": 96, "cached": True, "cache_cap_mb": 1024.0,
                    "loss_chunk_tokens": 174762}  # 64 MiB of float32 logits at a vocabulary of 96
    tokens = sum(int(b["attention_mask"].numel()) for b in _file_batches(llama_files))
    assert top["settings"]["run"]["teacher_cache_mb"] == pytest.approx(tokens * (16 * 8 + 4) / 2**20, abs=1e-3)
    assert top["settings"]["engine"]["teacher_top_k"] == 16
    original = load_adapter(llama_files["adapter"])
    base = load_base_model(llama_files["base"], original)
    held = make_batches(read_examples(llama_files["held"]), base.tokenizer, task="lm", seq_len=32, batch_size=16)
    kl_full = compare_adapters(base, original, load_adapter(tmp_path / "full"), held, "lm")["kl"]
    kl_top = compare_adapters(base, original, load_adapter(tmp_path / "top"), held, "lm")["kl"]
    assert kl_top <= 1.25 * kl_full, (kl_top, kl_full)


def _file_batches(files):
    examples = read_examples(files["data"])
    return make_batches(examples, tiny_tokenizer("llama"), task="lm", seq_len=32, batch_size=8, shuffle=True, seed=0)


def test_a_small_cache_cap_recomputes_the_teacher(llama_files, tmp_path):
    report = prune(llama_files["adapter"], tmp_path / "o", options(llama_files, "lorpa", steps=14,
                                                                     teacher_cache_mb=0.0))
    assert report["settings"]["run"]["teacher_cache_mb"] is None
    assert report["settings"]["run"]["teacher_targets"]["cached"] is False
    assert report["settings"]["run"]["teacher_targets"]["kind"] == "top-k"  # auto: the full one does not fit 0 MB


# --------------------------------------------------------------------------- quantized bases


HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


# On the CPU and the refusals where bitsandbytes cannot run: tests/calibration/test_qlora.py


@pytest.mark.skipif(not (HAS_BNB and torch.cuda.is_available()), reason="needs bitsandbytes and a CUDA GPU")
def test_calibration_on_a_4bit_base_on_the_gpu(llama_files, tmp_path):
    report = prune(llama_files["adapter"], tmp_path / "o",
                   options(llama_files, "lorpa", steps=4, device="cuda", load_in_4bit=True))
    assert report["settings"]["base"]["base_quantization"] == "bitsandbytes 4bit"
    assert "dequantized" in report["settings"]["base"]["merge_note"]
    assert load_adapter(tmp_path / "o").num_params == report["params_after"]


# --------------------------------------------------------------------------- bad values: exit 2, one fix-it line


@pytest.mark.parametrize(
    ("extra", "fix"),
    [
        (["--base-dtype", "int8"], "use auto, bf16, fp16 or fp32"),
        (["--base-dtype", "fp16", "--device", "cpu"], "use bf16 or fp32"),
        (["--load-in-4bit", "--load-in-8bit"], "not both"),
        (["--teacher-top-k", "-3"], "--teacher-top-k must be an integer >= 0"),
        (["--teacher-top-k", "many"], "--teacher-top-k"),
        (["--teacher-cache-mb", "-1"], "--teacher-cache-mb must be a number >= 0"),
        (["--teacher-cache-mb", "nan"], "--teacher-cache-mb must be a finite number"),
    ],
)
def test_bad_memory_flags_exit_2_with_a_fix(llama_files, tmp_path, capsys, extra, fix):
    code = main(["prune", str(llama_files["adapter"]), "-b", "0.25", "--method", "lorpa", "--data",
                 str(llama_files["data"]), "--base-model", str(llama_files["base"]), "--steps", "2",
                 "-o", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and fix in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "fix"),
    [
        (["--gradient-checkpointing"], "--gradient-checkpointing applies to calibration"),
        (["--teacher-top-k", "8"], "--teacher-top-k applies to calibration"),
        (["--base-dtype", "bf16"], "--base-dtype sets how the base model is loaded"),
    ],
)
def test_calibration_flags_on_the_training_free_cut_exit_2(llama_files, tmp_path, capsys, extra, fix):
    code = main(["prune", str(llama_files["adapter"]), "-b", "0.25", "-o", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and fix in err and len(err.strip().splitlines()) == 1, err


def test_quantized_gguf_base_is_refused(tmp_path):
    src, _ = make_adapter("llama", tmp_path / "a")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoraCompressError, match="not a .gguf file"):
        load_base_model(tmp_path / "m.gguf", load_adapter(src), quantization_config=object())


def test_report_records_the_base_placement(llama_files, tmp_path):
    report = prune(llama_files["adapter"], tmp_path / "o",
                   options(llama_files, "lorpa", steps=2, base_dtype="bf16", gradient_checkpointing=True))
    saved = json.loads((tmp_path / "o" / "compression_report.json").read_text())
    assert saved["settings"]["base"] == report["settings"]["base"] == {"base_dtype": "bf16", "base_device": "cpu"}
    assert saved["settings"]["engine"]["gradient_checkpointing"] is True


# --------------------------------------------------------------------------- several processes: FSDP


@pytest.mark.slow
def test_accelerate_fsdp_config_on_two_cpu_processes_shards_the_base(llama_files, tmp_path):
    """accelerate 1.16 enables its FSDP only for GPU-like processes; ``accelerate launch --use_fsdp`` still
    switches on the engine's sharded run (torch FSDP2, tests/calibration/test_sharding.py) on CPU processes,
    and it gives DDP's result: the same global batch, the same averaged gradients."""
    import os
    import subprocess
    import sys

    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "loracompress", "prune", str(llama_files["adapter"]), "--method", "lorpa", "--budget", "0.25",
              "--base-model", str(llama_files["base"]), "--data", str(llama_files["data"]), "--steps", "6",
              "--batch-size", "8", "--seq-len", "32", "--device", "cpu", "--no-eval"]
    fsdp_flags = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                  "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    runs = {}
    for name, flags in (("fsdp", fsdp_flags), ("ddp", ["--multi_gpu"])):
        done = subprocess.run([*accelerate, *flags, *common, "-o", str(tmp_path / name)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "compression_report.json").read_text())
    assert runs["fsdp"]["settings"]["run"]["parallel"] == "fsdp"
    assert runs["ddp"]["settings"]["run"]["parallel"] == "ddp"
    shards = runs["fsdp"]["settings"]["run"]["sharding"]
    assert all(b < shards["base_bytes"] for b in shards["shard_bytes"])
    a, b = load_adapter(tmp_path / "fsdp"), load_adapter(tmp_path / "ddp")
    for path, m in b.modules.items():
        torch.testing.assert_close(a.modules[path].delta(), m.delta(), atol=1e-5, rtol=1e-4)
