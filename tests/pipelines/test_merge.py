"""``loracompress merge``: a Hugging Face model folder whose outputs equal stock PEFT base+adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.tiny import make_adapter, sample_inputs


def _peft_outputs(base: torch.nn.Module, adapter_dir, inputs) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _padded_inputs(kind: str) -> dict[str, torch.Tensor]:
    inputs = sample_inputs(kind, batch=3, seq=12, seed=7)
    inputs["attention_mask"][1, 8:] = 0
    return inputs


def _tiny_tokenizer(directory):
    """A real (fast) WordPiece tokenizer over the tiny BERT's 96-token vocabulary."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(91)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_merged_folder_matches_peft(tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    src, base = make_adapter(kind, tmp_path / "a", r=8)
    small = tmp_path / "small"
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(small)]) == 0
    base.save_pretrained(str(tmp_path / "base"))
    if kind == "bert":
        _tiny_tokenizer(tmp_path / "tok").save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(small), "--base-model", str(tmp_path / "base"), "-o", str(out),
                 "--max-shard-size", "100KB"]) == 0
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and "wrote" in printed

    files = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert ("tokenizer.json" in files) == (kind == "bert")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "fp32" and 0 <= report["max_abs_diff"] <= 1e-4
    assert report["modules_merged"] == len(load_adapter(small).modules)

    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    merged = auto.from_pretrained(str(out)).eval()
    inputs = _padded_inputs(kind)
    with torch.no_grad():
        got = merged(**inputs).logits
    ref = _peft_outputs(base, small, inputs)
    if kind == "llama":  # padded positions carry no meaning
        keep = inputs["attention_mask"].bool()
        got, ref = got[keep], ref[keep]
    assert (got - ref).abs().max() <= 1e-4
    # The merge changed the base (a no-op merge would pass a weaker check).
    with torch.no_grad():
        plain = base(**inputs).logits
    assert (plain - _peft_outputs(base, small, inputs)).abs().max() > 1e-3


def test_merge_cast_fp16(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "m16"
    assert main(["merge", str(src), "--base-model", str(tmp_path / "base"), "-o", str(out), "--dtype", "fp16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "fp16" and report["max_abs_diff"] <= 1e-4
    assert 0 < report["max_abs_diff_output_dtype"] < 0.1  # the fp16 cast costs something, measured and recorded
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert {p.dtype for p in merged.parameters()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_merge_refusals_write_nothing(tmp_path, capsys):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    _, other = make_adapter("bert", tmp_path / "b", r=4)
    other.save_pretrained(str(tmp_path / "wrong"))
    cases = [
        (["--base-model", str(tmp_path / "wrong")], "--base-model"),
        (["--base-model", str(tmp_path / "base"), "--tolerance", "1e-12"], "tolerance"),
        (["--base-model", str(tmp_path / "base"), "--dtype", "int8"], "fp32, fp16, bf16"),
    ]
    for i, (args, fix) in enumerate(cases):
        out = tmp_path / f"m{i}"
        assert main(["merge", str(src), "-o", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert fix in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(f".m{i}.*"))


def test_lora_on_a_tied_lm_head_merges_into_the_head_only(tmp_path, capsys):
    """With tie_word_embeddings the head and the input embeddings are one tensor: merging ΔW into it
    in place would change the embeddings too. The merged model unties them, keeps the embeddings,
    and reloads (from safetensors, untied) to the same logits as base + adapter in PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, pad_token_id=0)).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(str(tmp_path / "base"))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(str(tmp_path / "adapter"))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"),
                 "-o", str(tmp_path / "merged")]) == 0, capsys.readouterr().err

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    assert not torch.allclose(merged.lm_head.weight, base.lm_head.weight)
    inputs = sample_inputs("llama", batch=2, seq=10, seed=3)
    with torch.no_grad():
        got = merged(**inputs).logits
    assert (got - _peft_outputs(base, tmp_path / "adapter", inputs)).abs().max() <= 1e-4


# --------------------------------------------------------------------------- the streaming merge


def _merge(adapter, base, out, **kw):
    from loracompress.pipelines.merge import MergeOptions, merge_adapter

    return merge_adapter(adapter, out, MergeOptions(base_model=str(base), **kw))


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize(("kind", "dtype"), [("llama", torch.float32), ("llama", torch.bfloat16),
                                             ("gpt2", torch.float32), ("bert", torch.float32), ("bert", torch.float16)])
def test_streaming_merge_equals_in_memory_and_peft(tmp_path, kind, dtype):
    """Shard by shard equals the whole-model merge (bit for bit in fp32, within one rounding in 16 bits)
    and stock PEFT's merge_and_unload; the output keeps the base's dtype and shard layout."""
    from peft import PeftModel

    src, base = make_adapter(kind, tmp_path / "a", r=4)
    base_dir = tmp_path / "base"
    base.to(dtype).save_pretrained(str(base_dir), max_shard_size="20KB")
    in_files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(in_files) > 2

    streamed = _merge(src, base_dir, tmp_path / "s")
    assert streamed["streamed"] and streamed["shard_layout"] == "base" and streamed["dtype"] != "fp32" or dtype == torch.float32
    in_memory = _merge(src, base_dir, tmp_path / "m", streaming=False)
    assert not in_memory["streamed"]
    got, ref = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "s").glob("*.safetensors")) == in_files  # the base's layout
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"] == index
    base_tensors = _tensors(base_dir)
    assert set(got) == set(ref) == set(base_tensors)
    for name, t in got.items():
        assert t.dtype == base_tensors[name].dtype, name  # each tensor keeps its own dtype
        if dtype == torch.float32:
            assert torch.equal(t, ref[name]), name
        else:  # one rounding of the same fp32 sum at most
            ulp = torch.finfo(dtype).eps * ref[name].float().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((t.float() - ref[name].float()).abs() <= ulp).all(), name
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == str(dtype).replace("torch.", "")

    # Stock PEFT on the same (dtype) base, merged in fp32 for a like-for-like comparison.
    peft = PeftModel.from_pretrained(copy.deepcopy(base).float(), str(src)).merge_and_unload()
    peft_state = {k: v for k, v in peft.state_dict().items()}
    for name, t in got.items():
        assert name in peft_state, name
        assert (t.float() - peft_state[name].to(dtype).float()).abs().max() <= 2 * torch.finfo(dtype).eps * \
            peft_state[name].abs().max().clamp_min(1), name
    changed = [n for n in got if not torch.equal(got[n], base_tensors[n])]
    assert len(changed) >= len(load_adapter(src).modules)  # a no-op merge would pass the equalities


def test_streaming_merge_dtype_override_and_reshard(tmp_path, capsys):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "m"
    assert main(["merge", str(src), "--base-model", str(tmp_path / "base"), "-o", str(out), "--dtype", "fp32",
                 "--max-shard-size", "50KB", "--verify", "modules", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "fp32" and report["verify"] == "modules" and report["outputs"] == []
    assert report["module_check"]["modules"] == len(load_adapter(src).modules) and report["max_abs_diff"] < 1e-5
    assert {t.dtype for t in _tensors(out).values()} == {torch.float32}
    assert len(report["shards"]) > 1 and report["shard_layout"] == "max_shard_size"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_merge_bf16_base_is_written_bf16(tmp_path, capsys):
    """Regression: a bf16 base was written as fp32 (transformers had set config.dtype to float32)."""
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    size_in = sum(p.stat().st_size for p in (tmp_path / "base").glob("*.safetensors"))
    for i, streaming in enumerate((None, False)):
        report = _merge(src, tmp_path / "base", tmp_path / f"m{i}", streaming=streaming)
        assert report["dtype"] == "bf16"
        assert {t.dtype for t in _tensors(tmp_path / f"m{i}").values()} == {torch.bfloat16}
        size_out = sum(p.stat().st_size for p in (tmp_path / f"m{i}").glob("*.safetensors"))
        assert abs(size_out - size_in) < 0.01 * size_in
        assert json.loads((tmp_path / f"m{i}" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(("args", "fix"), [
    (["--verify", "everything"], "use auto, modules or full"),
    (["--verify", ""], "use auto, modules or full"),
    (["--max-shard-size", "big"], "use e.g. 2GB"),
    (["--max-shard-size", "0"], "use e.g. 2GB"),
    (["--max-shard-size", "-5MB"], "use e.g. 2GB"),
    (["--dtype", "fp8"], "fp32, fp16, bf16"),
])
def test_merge_bad_flag_values(tmp_path, capsys, args, fix):
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "m"
    capsys.readouterr()
    assert main(["merge", str(src), "--base-model", str(tmp_path / "base"), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert fix in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".m.*"))


def test_streaming_merge_memory_is_bounded_by_a_shard(tmp_path):
    """4 shards of ~150 MB merged in a subprocess: its peak RSS grows by less than 2 shards."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from synthetic import LlamaShape, write_llama_checkpoint, write_lora

    shape = LlamaShape(hidden=1024, intermediate=4096, layers=16, heads=8, kv_heads=8, vocab=1024)
    files = write_llama_checkpoint(tmp_path / "base", shape, shard_bytes=150_000_000)
    assert len(files) == 4
    shard = max((tmp_path / "base" / f).stat().st_size for f in files)
    assert shard > 130_000_000
    write_lora(tmp_path / "lora", tmp_path / "base", shape, r=8, targets=("q_proj", "v_proj"))
    # A one-shard model merged first: imports and the model-independent set-up are the baseline
    # (the RSS after it; its own peak does not hide the big merge's).
    small = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=128)
    write_llama_checkpoint(tmp_path / "small", small, shard_bytes=10**9)
    write_lora(tmp_path / "small-lora", tmp_path / "small", small, r=8, targets=("q_proj", "v_proj"))
    script = f"""
import resource
from loracompress.pipelines.merge import MergeOptions, merge_adapter
def status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
def peak():
    return max(status('VmHWM'), 0)
def rss():
    return status('VmRSS')
merge_adapter({str(tmp_path / 'small-lora')!r}, {str(tmp_path / 'small-out')!r}, MergeOptions(verify='modules'))
import gc; gc.collect()
# Reset the peak to the current RSS (Linux: 5 > clear_refs), so a transient peak of the imports or of
# the small merge cannot count as the big merge's growth; the peak then is this merge's alone.
open('/proc/self/clear_refs', 'w').write('5')
before = rss()
report = merge_adapter({str(tmp_path / 'lora')!r}, {str(tmp_path / 'out')!r}, MergeOptions(verify='modules'))
print(before, peak(), report['streamed'], len(report['shards']))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before, peak, streamed, shards = done.stdout.split()
    assert streamed == "True" and int(shards) == 4
    growth = int(peak) - int(before)
    assert growth < 2 * shard, f"peak RSS grew by {growth / 1e6:.0f} MB, a shard is {shard / 1e6:.0f} MB"
    print(f"peak RSS growth {growth / 1e6:.0f} MB, largest shard {shard / 1e6:.0f} MB")


def test_merge_into_a_gguf_base_is_saved_plainly(tmp_path, capsys):
    """Regression (issue 13.4): a .gguf base crashed at save ("quantized with gguf and is not serializable")."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_gguf

    save_tiny_gguf(tmp_path / "tiny.gguf")
    src, _ = make_adapter("llama", tmp_path / "a", r=4)
    out = tmp_path / "m"
    capsys.readouterr()
    assert main(["merge", str(src), "--base-model", str(tmp_path / "tiny.gguf"), "-o", str(out), "--json"]) == 0, \
        capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert not report["streamed"] and report["dtype"] == "fp32" and report["max_abs_diff"] <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    gguf_base = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    inputs = sample_inputs("llama", batch=2, seq=10, seed=3)
    with torch.no_grad():
        got = merged(**inputs).logits
    assert (got - _peft_outputs(gguf_base, src, inputs)).abs().max() <= 1e-4


@pytest.mark.parametrize("streaming", [None, False])
def test_adapter_saved_after_resizing_the_vocabulary(tmp_path, capsys, streaming):
    """Regression (issue 13.8): the base's embeddings are resized to the adapter's saved ones, as PEFT
    does, instead of blaming a correct base ("wrong --base-model?")."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tests.tiny import tiny_llama

    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    trained = copy.deepcopy(base)
    trained.resize_token_embeddings(100, mean_resizing=False)
    with torch.no_grad():
        trained.model.embed_tokens.weight[96:].normal_(0, 0.02)
        trained.lm_head.weight[96:].normal_(0, 0.02)
    peft = get_peft_model(trained, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=True)
    out = tmp_path / "m"
    report = _merge(tmp_path / "adapter", tmp_path / "base", out, streaming=streaming)
    assert report["vocab_resized"] == [96, 100] and report["streamed"] == (streaming is None)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 100
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(100, mean_resizing=False)
    reference = PeftModel.from_pretrained(resized, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 97, 98, 99, 12, 40], [96, 3, 7, 99, 1, 2]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert (merged(**inputs).logits - reference(**inputs).logits).abs().max() <= 1e-4
    # The CLI says so, in one line.
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"), "-o", str(tmp_path / "cli")]) == 0
    assert "resized the base's vocabulary from 96 to 100 tokens" in capsys.readouterr().out
