"""``loracompress export --target gguf``: a llama.cpp LoRA GGUF that reads back as PEFT's ΔW.

The file is read with gguf's own reader and every module's ΔW is rebuilt the way llama.cpp applies
it (one ``adapter.lora.alpha``, each module scaled by ``alpha / r`` with ``r`` from its tensor shape,
q/k rows in llama.cpp's rotary order, undone here with transformers' GGUF loader). The real engine
runs in tests/engines/test_llamacpp.py (slow).
"""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress.export import gguf as gguf_export
from loracompress_cli.app import main
from tests.tiny import make_adapter, peft_deltas, save_tiny_base, tiny_llama

N_HEAD, N_HEAD_KV, N_LAYER = 4, 2, 3  # tests/tiny.py's llama


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny llama base folder, a raw PEFT adapter (r=8, alpha 16, patterns) and its compressed form."""
    root = tmp_path_factory.mktemp("gguf")
    base_dir = save_tiny_base("llama", root / "base")
    src, base = make_adapter("llama", root / "raw", r=8, lora_alpha=16, rank_pattern={"q_proj": 6, "down_proj": 5},
                             alpha_pattern={"v_proj": 3})
    assert main(["prune", str(src), "--budget", "0.4", "-o", str(root / "small")]) == 0
    assert len({m.rank for m in load_adapter(root / "small").modules.values() if m.rank}) > 2
    return root, base_dir, src, root / "small", base


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.get_field(k).contents() for k in reader.fields if not k.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    return fields, tensors


def _llama_cpp_deltas(path) -> dict[str, torch.Tensor]:
    """Every module's ΔW as llama.cpp computes it from the file, in Hugging Face row order."""
    fields, tensors = _read(path)
    alpha = fields["adapter.lora.alpha"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYER)
    unpermute = LlamaTensorProcessor()._reverse_permute_weights
    deltas = {}
    for key in tensors:
        if not key.endswith(".lora_a"):
            continue
        stem = key.removesuffix(".lora_a")
        a, b = tensors[key], tensors[f"{stem}.lora_b"]
        assert b.shape[1] == a.shape[0]
        delta = alpha / b.shape[1] * (b @ a)  # llama.cpp: rank = ne[0] of lora_b
        if stem.endswith("attn_q.weight"):
            delta = unpermute(delta, N_HEAD, N_HEAD)
        elif stem.endswith("attn_k.weight"):
            delta = unpermute(delta, N_HEAD, N_HEAD_KV)
        deltas[stem] = torch.from_numpy(delta).float()
    by_hf = {}
    for layer in range(N_LAYER):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            path = f"model.layers.{layer}.{part}"
            name = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
            if name in deltas:
                by_hf[path] = deltas.pop(name)
    assert not deltas, f"tensors that are no Llama projection: {sorted(deltas)}"
    return by_hf


@pytest.mark.parametrize("which", ["small", "raw"])
def test_gguf_reads_back_as_peft(case, capsys, which):
    """Compressed (portable, rank-heterogeneous) and raw PEFT input (alpha 16, patterns) both read right."""
    root, base_dir, raw, small, base = case
    src = small if which == "small" else raw
    out = root / f"out-{which}"
    assert main(["export", str(src), "--target", "gguf", "--base-model", str(base_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama-server -m BASE.gguf --lora" in printed and "read back" in printed
    fields, tensors = _read(out / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert sum(k == "adapter.lora.alpha" for k in fields) == 1
    reference = peft_deltas(src, base)
    ours = _llama_cpp_deltas(out / "adapter.gguf")
    assert set(ours) == set(reference)
    for path, delta in reference.items():
        assert torch.allclose(ours[path], delta, atol=1e-6, rtol=1e-5), path
    adapter = load_adapter(src)
    ranks = {p: m.rank for p, m in adapter.modules.items() if m.rank}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYER)
    for path, rank in ranks.items():
        name = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
        assert tensors[f"{name}.lora_a"].shape == (rank, adapter.modules[path].in_features)
    report = json.loads((out / "export_report.json").read_text())
    assert report["check"]["max_rel_error"] <= report["check"]["tolerance"] == 1e-5
    assert report["ranks"] == ranks and tensors[next(iter(tensors))].dtype == np.float64


def test_gguf_fp16(case):
    root, base_dir, _, small, base = case
    out = root / "out-fp16"
    report = gguf_export.export_gguf(small, out, base_model=base_dir, dtype=torch.float16)
    assert report["dtype"] == "fp16"
    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    for path, delta in peft_deltas(small, base).items():
        got = _llama_cpp_deltas(out / "adapter.gguf")[path]
        assert torch.allclose(got, delta, atol=2e-3, rtol=1e-2), path


def _fake_base_gguf(path, out_features: int = 48) -> None:
    """A base-model GGUF with the tiny llama's metadata and tensor shapes (zeros; only shapes matter)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    model = tiny_llama()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, N_LAYER)
    for key, param in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None or param.ndim != 2:
            continue
        shape = tuple(param.shape)
        if name == "blk.0.attn_q.weight":
            shape = (out_features, shape[1])
        writer.add_tensor(name, np.zeros(shape, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_base_file_gives_the_config_and_checks_shapes(case, tmp_path):
    _, _, _, small, base = case
    good = tmp_path / "base.gguf"
    _fake_base_gguf(good)
    report = gguf_export.export_gguf(small, tmp_path / "out", base_model=good)
    assert report["architecture"] == "llama" and report["base_model"] == str(good)
    ours = _llama_cpp_deltas(tmp_path / "out" / "adapter.gguf")
    for path, delta in peft_deltas(small, base).items():
        assert torch.allclose(ours[path], delta, atol=1e-6, rtol=1e-5), path
    bad = tmp_path / "other.gguf"
    _fake_base_gguf(bad, out_features=40)
    with pytest.raises(LoraCompressError, match="blk.0.attn_q.weight in the base GGUF is 40×48"):
        gguf_export.export_gguf(small, tmp_path / "out2", base_model=bad)
    assert not (tmp_path / "out2").exists()
    with pytest.raises(LoraCompressError, match="is a LoRA adapter GGUF, not a base model"):
        gguf_export.export_gguf(small, tmp_path / "out3", base_model=tmp_path / "out" / "adapter.gguf")


def _peft_adapter(out, targets, **extra):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_llama()),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **extra))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("what, targets, extra, message", [
    ("embeddings", ["embed_tokens", "q_proj"], {}, "LoRA on embeddings"),
    ("modules_to_save", ["q_proj"], {"modules_to_save": ["lm_head"]}, "cannot load modules_to_save"),
])
def test_gguf_refuses_what_llama_cpp_cannot_take(case, tmp_path, capsys, what, targets, extra, message):
    _, base_dir, _, _, _ = case
    src = _peft_adapter(tmp_path / what, targets, **extra)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", str(src), "--target", "gguf", "--base-model", str(base_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_gguf_refuses_other_architectures_by_name(tmp_path, capsys):
    base_dir = save_tiny_base("gpt2", tmp_path / "gpt2")
    src, _ = make_adapter("gpt2", tmp_path / "a")
    capsys.readouterr()
    assert main(["export", str(src), "--target", "gguf", "--base-model", str(base_dir), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2'" in err and "Llama" in err and len(err.strip().splitlines()) == 1


def test_gguf_lm_head_needs_an_untied_head(case, tmp_path):
    _, base_dir, _, _, base = case
    src = _peft_adapter(tmp_path / "head", ["q_proj", "lm_head"])
    assert gguf_export.tensor_name("lm_head", gguf_export.read_base_shape(base_dir, load_adapter(src))) == "output.weight"
    tied = gguf_export.BaseShape(source="x", model_type="llama", arch="llama", n_head=N_HEAD, n_head_kv=N_HEAD_KV,
                                 n_layer=N_LAYER, tied_embeddings=True)
    with pytest.raises(LoraCompressError, match="ties it to the embeddings"):
        gguf_export.tensor_name("lm_head", tied)


def test_gguf_verification_catches_a_wrong_file(case, tmp_path, monkeypatch):
    """The read-back check is real: a file whose alpha is off (or whose q/k rows are not undone) is refused."""
    _, base_dir, _, small, _ = case
    write = gguf_export.write_gguf
    monkeypatch.setattr(gguf_export, "write_gguf", lambda f, m, b, alpha, n: write(f, m, b, alpha * 1.01, n))
    with pytest.raises(LoraCompressError, match="does not read back as the adapter"):
        gguf_export.export_gguf(small, tmp_path / "out", base_model=base_dir)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(gguf_export, "write_gguf", write)
    monkeypatch.setattr(gguf_export, "unpermute_rows", lambda x, heads: x)
    with pytest.raises(LoraCompressError, match="self_attn.[qk]_proj"):
        gguf_export.export_gguf(small, tmp_path / "out", base_model=base_dir)


def test_permutation_matches_transformers_inverse():
    x = np.arange(48 * 5, dtype=np.float64).reshape(48, 5)
    inverse = LlamaTensorProcessor()._reverse_permute_weights
    for heads in (4, 2):
        permuted = gguf_export.permute_rows(x, heads)
        assert not np.array_equal(permuted, x)
        assert np.array_equal(inverse(permuted, heads, heads), x)
        assert np.array_equal(gguf_export.unpermute_rows(permuted, heads), x)


def test_gguf_writer_progress_stays_out_of_the_output(case, tmp_path, caplog):
    """gguf logs "Writing the following files: ..." at INFO; the CLI's INFO output must not show it."""
    import logging

    _, base_dir, _, small, _ = case
    caplog.set_level(logging.INFO)
    gguf_export.export_gguf(small, tmp_path / "out", base_model=base_dir)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("gguf")]
