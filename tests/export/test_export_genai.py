"""``export --format onnx`` for causal LMs: onnxruntime-genai generates from the folder as is.

The default suite checks the graph surgery and the refusals everywhere; where onnxruntime-genai is
installed (``pip install -e '.[genai,dev]'``, see scripts/engines/genai.sh) it also builds a tiny
Llama, serves two compressed adapters of different ranks plus no adapter from one graph and
compares the generated token ids with stock PEFT's. ``-m slow`` adds fp16, merged mode and the
real SmolLM2-135M base (GGUF) with rank-heterogeneous adapters.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loracompress.core.adapter import LoraModule
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.export.genai_graph import GenaiGraphSpec, LoraInput, adapter_arrays, match_modules, rank_dim
from loracompress.export.genai_verify import genai_generate
from loracompress_cli.app import main
from tests.tiny import LLAMA_TARGETS, make_adapter, tiny_tokenizer

HAVE_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
needs_genai = pytest.mark.skipif(not HAVE_GENAI, reason="onnxruntime-genai is not installed (scripts/engines/genai.sh sets up its venv)")
PROMPTS = ("the good movie", "a dog and a cat", "red blue green one two")


# --------------------------------------------------------------------------- graph logic, no engine needed


def test_builder_names_map_to_peft_paths_by_layer_and_projection():
    graph = ["model.layers.0.attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.10.attn.q_proj"]
    peft = ["model.layers.10.self_attn.q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    assert match_modules(graph, peft) == {
        "model.layers.10.self_attn.q_proj": "model.layers.10.attn.q_proj",
        "model.layers.0.self_attn.q_proj": "model.layers.0.attn.q_proj",
        "model.layers.0.mlp.down_proj": "model.layers.0.mlp.down_proj",
    }


def test_a_module_the_builder_gave_no_lora_path_is_refused():
    with pytest.raises(LoraCompressError, match="lm_head"):
        match_modules(["model.layers.0.attn.q_proj"], ["model.layers.0.self_attn.q_proj", "lm_head"])
    with pytest.raises(LoraCompressError, match="no adapter has"):
        match_modules(["model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"], ["model.layers.0.self_attn.q_proj"])


def test_adapter_tensors_are_the_transposed_factors_with_the_scale_folded_in():
    g = torch.Generator().manual_seed(0)
    m = LoraModule(A=torch.randn(3, 8, generator=g), B=torch.randn(5, 3, generator=g), scale=2.5)
    spec = GenaiGraphSpec(modules={"model.layers.0.self_attn.q_proj": LoraInput("qa", "qb", 8, 5)}, dtype="fp16")

    class _Adapter:
        modules = {"model.layers.0.self_attn.q_proj": m, "model.layers.1.self_attn.q_proj": LoraModule(
            A=torch.zeros(0, 8), B=torch.zeros(5, 0))}  # rank 0: left out, the graph's default applies

    arrays = adapter_arrays(_Adapter(), spec)
    assert set(arrays) == {"qa", "qb"} and arrays["qa"].shape == (8, 3) and arrays["qb"].shape == (3, 5)
    assert arrays["qa"].dtype == np.float16
    x = torch.randn(4, 8, generator=g)
    got = x.numpy() @ arrays["qa"].astype(np.float32) @ arrays["qb"].astype(np.float32)
    np.testing.assert_allclose(got, (x @ m.delta().T).numpy(), rtol=2e-2, atol=2e-2)
    wrong = GenaiGraphSpec(modules={"model.layers.0.self_attn.q_proj": LoraInput("qa", "qb", 8, 6)}, dtype="fp32")
    with pytest.raises(LoraCompressError, match="another base model"):
        adapter_arrays(_Adapter(), wrong)


@pytest.mark.skipif(HAVE_GENAI, reason="checks the message shown when onnxruntime-genai is missing")
def test_causal_lm_export_without_genai_says_how_to_install_it(tmp_path, capsys):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    code = main(["export", str(src), "-f", "onnx", "--base-model", str(tmp_path / "base"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'loracompress[genai]'" in err and "--engine ort" in err
    assert not (tmp_path / "o").exists()


def test_engine_genai_refuses_an_encoder(tmp_path, capsys):
    src, base = make_adapter("bert", tmp_path / "a", r=4)
    code = main(["export", str(src), "-f", "onnx", "--engine", "genai", "-o", str(tmp_path / "o")])
    assert code == 2 and "causal LMs" in capsys.readouterr().err


def test_export_onnx_through_genai_reads_each_adapter_once(tmp_path, monkeypatch):
    """Regression: ``export --format onnx`` read every adapter to choose the engine and check the bases,
    then ``export_genai`` read them all again. Stopped where the base model would load."""
    import loracompress.export.genai as genai
    import loracompress.export.onnx as onnx
    import loracompress.runtime.model as model
    from loracompress.export.onnx import OnnxOptions, export_onnx

    (a, base), (b, _) = (make_adapter("llama", tmp_path / name, r=4, lora_seed=seed) for name, seed in (("a", 1), ("b", 2)))
    base.save_pretrained(str(tmp_path / "base"))
    sources = [a, b]
    reads: list[str] = []

    def counted(source, **kwargs):
        reads.append(str(source))
        return load_adapter(source, **kwargs)

    class Stop(Exception):
        pass

    def no_base(*args, **kwargs):
        raise Stop

    for module in (onnx, genai):
        monkeypatch.setattr(module, "load_adapter", counted)
    monkeypatch.setattr(genai, "import_genai", lambda: None)  # no engine needed: the run stops before it is used
    monkeypatch.setattr(model, "load_base_model", no_base)
    with pytest.raises(Stop):
        export_onnx(sources, tmp_path / "o", OnnxOptions(engine="genai", mode="adapters", base_model=str(tmp_path / "base")))
    assert sorted(reads) == sorted(map(str, sources))


# --------------------------------------------------------------------------- tiny Llama under onnxruntime-genai


def genai_llama(seed: int = 0) -> torch.nn.Module:
    """tests.tiny's Llama has head size 12; GroupQueryAttention on CPU needs a multiple of 8. The
    MLP width must differ from the vocabulary size: the builder takes any Linear with
    ``out_features == vocab_size`` for the LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


def peft_adapter(base: torch.nn.Module, out: Path, r: int, seed: int, targets=LLAMA_TARGETS) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                           task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.tensor([0.6**i for i in range(r)])
    with torch.no_grad():  # a per-module strength, so the SVD cut keeps different ranks per module
        for mod in model.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                strength = float(torch.exp(torch.randn((), generator=g)))
                A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) * spectrum[None, :] * 0.5 * strength)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved base and two adapters pruned to different per-module ranks (one on three module types only)."""
    root = tmp_path_factory.mktemp("genai")
    base = genai_llama()
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer("llama").save_pretrained(str(root / "base"))
    peft_adapter(base, root / "a1", r=8, seed=1)
    peft_adapter(base, root / "a2", r=6, seed=2, targets=("q_proj", "v_proj", "down_proj"))
    assert main(["prune", str(root / "a1"), "--budget", "0.5", "-o", str(root / "small1")]) == 0
    assert main(["prune", str(root / "a2"), "--budget", "0.3", "-o", str(root / "small2")]) == 0
    r1, r2 = (load_adapter(root / n).ranks for n in ("small1", "small2"))
    assert len(set(r1.values())) > 1 and len(set(r2.values())) > 1 and r1 != r2
    return root, base, [root / "small1", root / "small2"]


def export(tiny, out_name: str, mode: str, dtype: str) -> Path:
    """The library call, with prompts the tiny word-level tokenizer knows."""
    from loracompress.export.genai import GenaiOptions, export_genai

    root, _, adapters = tiny
    sources = adapters if mode == "adapters" else adapters[:1]
    export_genai(sources, root / out_name, GenaiOptions(base_model=str(root / "base"), mode=mode, dtype=dtype, prompts=PROMPTS))
    return root / out_name


def peft_tokens(base: torch.nn.Module, adapter: Path | None, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval() if adapter else copy.deepcopy(base)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters_export(tiny):
    """Through the CLI: a causal LM goes to onnxruntime-genai by default (its default prompts)."""
    root, _, adapters = tiny
    out = root / "onnx-adapters"
    assert main(["export", *map(str, adapters), "-f", "onnx", "--mode", "adapters", "--base-model", str(root / "base"),
                 "-o", str(out)]) == 0
    return out


@needs_genai
def test_graph_has_a_kv_cache_and_one_rank_dim_per_module(tiny, adapters_export):
    import onnx
    import onnxruntime as ort

    _, _, adapters = tiny
    out = adapters_export
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = [o.name for o in graph.output]
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= set(inputs)
    assert outputs[0] == "logits" and {"present.0.key", "present.1.value"} <= set(outputs)

    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["num_hidden_layers"] == 2 and config["model"]["type"] == "llama"
    assert (out / "tokenizer.json").is_file()

    report = json.loads((out / "export_report.json").read_text())
    lora = report["lora_inputs"]
    union = {p for a in adapters for p, r in load_adapter(a).ranks.items() if r > 0}
    assert set(lora) == union
    inits = {t.name: list(t.dims) for t in graph.initializer}
    for path, names in lora.items():
        a, b = inputs[names["A"]], inputs[names["B"]]
        assert a[1] == b[0] == rank_dim(path) == names["rank_dim"]  # its own rank dimension
        assert inits[names["A"]][1] == 0 and inits[names["B"]][0] == 0  # default: rank 0, the base alone
    assert len({inputs[n["A"]][1] for n in lora.values()}) == len(lora)

    for adapter in adapters:  # the files hold the true, compressed ranks under the graph's names
        params = ort.AdapterFormat.read_adapter(str(out / f"{adapter.name}.onnx_adapter")).get_parameters()
        ranks = {p: params[n["A"]].shape()[1] for p, n in lora.items() if n["A"] in params}
        assert ranks == {p: r for p, r in load_adapter(adapter).ranks.items() if r > 0}
        assert set(params) <= set(inputs)
    assert [c["passed"] for c in report["checks"]] == [True] * 3
    assert report["tokens_identical"] == "9/9" and report["first_step_max_abs_diff"] <= 1e-3


@needs_genai
def test_two_ranked_adapters_and_no_adapter_generate_peft_tokens_on_one_graph(tiny, adapters_export):
    import onnxruntime_genai as og

    _, base, adapters = tiny
    out = adapters_export
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    tok = tiny_tokenizer("llama")
    config = og.Config(str(out))
    config.clear_providers()
    model = og.Model(config)
    loaded = og.Adapters(model)
    for a in adapters:
        loaded.load(str(out / f"{a.name}.onnx_adapter"), a.name)
    seen = {}
    for name in (adapters[0].name, None, adapters[1].name, adapters[0].name):  # switching back and forth
        src = next((a for a in adapters if a.name == name), None)
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            got = genai_generate(model, ids, 20, loaded, name)[0]
            assert got == peft_tokens(base, src, ids, 20, eos), (name, text)
            seen.setdefault(name, []).append(got)
    assert seen[adapters[0].name][:3] != seen[None] and seen[adapters[1].name] != seen[None]  # adapters matter


@needs_genai
def test_existing_output_is_not_replaced_without_force(tiny, adapters_export, capsys):
    root, _, adapters = tiny
    code = main(["export", *map(str, adapters), "-f", "onnx", "--mode", "adapters", "--base-model", str(root / "base"),
                 "-o", str(adapters_export)])
    assert code == 2 and "--force" in capsys.readouterr().err


@needs_genai
@pytest.mark.slow
@pytest.mark.parametrize("mode,dtype", [("merged", "fp32"), ("adapters", "fp16")])
def test_tiny_merged_and_fp16(tiny, mode, dtype):
    out = export(tiny, f"onnx-{mode}-{dtype}", mode, dtype)
    report = json.loads((out / "export_report.json").read_text())
    assert all(c["passed"] for c in report["checks"]) and report["dtype"] == dtype
    if dtype == "fp16":  # built for CUDA (where fp16 is served), verified here on CPU
        assert report["providers_in_config"] == ["cuda"]
        assert not [c for c in report["checks"] if c["mismatches"]]


# --------------------------------------------------------------------------- SmolLM2-135M (real base, slow)


@needs_genai
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_smollm2_rank_heterogeneous_adapters_match_peft(tmp_path_factory, dtype):
    """Two SVD-compressed adapters (ranks 1-12 over 196 and 143 modules) and no adapter on one graph."""
    import sys

    samples = Path(__file__).resolve().parents[2] / "samples"
    sys.path.insert(0, str(samples))
    from base_model_path import BaseModelNotFound, base_model_path
    from serving_adapters import make_serving_adapters

    try:
        gguf = base_model_path("smollm2")
    except BaseModelNotFound as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("smol")
    made = make_serving_adapters(root / "adapters")
    out = root / f"onnx-{dtype}"
    assert main(["export", str(made["small-a"]), str(made["small-b"]), "-f", "onnx", "--mode", "adapters",
                 "--dtype", dtype, "--base-model", str(gguf), "-o", str(out)]) == 0
    report = json.loads((out / "export_report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"small-a.onnx_adapter", "small-b.onnx_adapter", "base only (no adapter active)"}
    assert all(c["passed"] for c in checks.values())
    if dtype == "fp32":
        assert report["tokens_identical"] == "9/9" and report["first_step_max_abs_diff"] <= 1e-3
