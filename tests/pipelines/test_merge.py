"""``loracompress merge``: a Hugging Face model folder whose outputs equal stock PEFT base+adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from loracompress_cli.app import main

from loracompress.core.adapter import load_adapter
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
