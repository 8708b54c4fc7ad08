"""``loracompress export --format onnx``: onnxruntime (CPU) against stock PEFT in PyTorch.

Merged and adapters modes on tiny BERT (default suite) and tiny Llama (``-m slow``: each
export of the 3-layer Llama takes 20-30 s of CPU; ``--engine ort``, the single-forward graph; the
generating onnxruntime-genai export is tested in test_export_genai.py). The adapters are compressed by ``prune`` so
their modules have different ranks, and two of them are served from one graph.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loracompress.core.adapter import KEY_PREFIX
from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.tiny import make_adapter

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOL = 1e-4


# --------------------------------------------------------------------------- helpers


def probe(kind: str, batch: int, seq: int, seed: int, pad_row: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_row is not None:
        mask[pad_row, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def peft_logits(base: torch.nn.Module, adapter_dir: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


def session(path: Path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, inputs: dict[str, torch.Tensor], adapter_file: Path | None = None, feeds=None) -> np.ndarray:
    run_options = None
    if adapter_file is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_file))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)
    all_feeds = {k: v.numpy() for k, v in inputs.items()} | dict(feeds or {})
    return sess.run(["logits"], all_feeds, run_options)[0].astype(np.float32)


def max_diff(got: np.ndarray, ref: np.ndarray, mask: torch.Tensor) -> float:
    if got.ndim == 3:  # per-token logits: padded positions carry no meaning
        keep = mask.bool().numpy()
        got, ref = got[keep], ref[keep]
    return float(np.abs(got - ref).max())


def compressed_pair(root: Path, kind: str):
    """Two adapters of one base, pruned to different per-module rank patterns."""
    src1, base = make_adapter(kind, root / "a1", r=8, seed=0)
    src2, _ = make_adapter(kind, root / "a2", r=6, seed=3, decay=0.5)
    assert main(["prune", str(src1), "--budget", "0.5", "-o", str(root / "small1")]) == 0
    assert main(["prune", str(src2), "--budget", "0.3", "-o", str(root / "small2")]) == 0
    base.save_pretrained(str(root / "base"))
    r1, r2 = (load_adapter(root / n).ranks for n in ("small1", "small2"))
    assert len(set(r1.values())) > 1 and len(set(r2.values())) > 1 and r1 != r2
    return base, root / "base", [root / "small1", root / "small2"]


def check_adapters_graph(out: Path, base: torch.nn.Module, adapters: list[Path], kind: str) -> None:
    """Each adapter active in the one graph matches PEFT; the base-only run matches the base."""
    report = json.loads((out / "export_report.json").read_text())
    assert report["mode"] == "adapters" and report["provider"] == "CPUExecutionProvider"
    assert all(c["passed"] and c["max_abs_diff"] <= TOL for c in report["checks"]) and len(report["checks"]) == 3
    sess = session(out / "model.onnx")
    outputs = {}
    for i, adapter in enumerate(adapters):
        for shape in ((3, 12, 0, 1), (1, 20, None, 2)):
            inputs = probe(kind, shape[0], shape[1], seed=shape[3] + 10 * i, pad_row=shape[2])
            got = run(sess, inputs, out / f"{adapter.name}.onnx_adapter")
            assert max_diff(got, peft_logits(base, adapter, inputs), inputs["attention_mask"]) <= TOL
        outputs[adapter.name] = got

    # Base only: no adapter active, every LoRA input falls back to its rank-0 default. Saved
    # heads (BERT's classifier) default to the first adapter's.
    reference = copy.deepcopy(base)
    head = {k.removeprefix(KEY_PREFIX): v for k, v in load_adapter(adapters[0]).extra_tensors.items()}
    reference.load_state_dict(head, strict=False)
    with torch.no_grad():
        expected = reference(**inputs).logits.numpy()
    got = run(sess, inputs)
    assert max_diff(got, expected, inputs["attention_mask"]) <= TOL
    for name, adapted in outputs.items():  # the adapters really change the output
        assert max_diff(adapted, got, inputs["attention_mask"]) > 1e-3, name


def check_rank_dims(out: Path, adapters: list[Path]) -> None:
    """Every LoRA input has its own rank dimension and a rank-0 default; files hold the true ranks."""
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    lora_inputs = [i for i in model.graph.input if i.name.endswith((".lora_A", ".lora_B"))]
    rank_dims = set()
    for value in lora_inputs:
        dims = value.type.tensor_type.shape.dim
        path = value.name.rsplit(".", 1)[0]
        rank_axis = 0 if value.name.endswith("lora_A") else 1
        assert dims[rank_axis].dim_param == f"r_{path}"
        assert inits[value.name][rank_axis] == 0  # the default: rank 0, the base alone
        rank_dims.add(dims[rank_axis].dim_param)
    assert len(rank_dims) == len(lora_inputs) // 2 > 1
    for adapter in adapters:
        params = ort.AdapterFormat.read_adapter(str(out / f"{adapter.name}.onnx_adapter")).get_parameters()
        ranks = {name.rsplit(".", 1)[0]: value.shape()[0] for name, value in params.items() if name.endswith("lora_A")}
        assert ranks == {p: r for p, r in load_adapter(adapter).ranks.items() if r > 0}


# --------------------------------------------------------------------------- tiny BERT (default suite)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-bert")
    base, base_dir, adapters = compressed_pair(root, "bert")
    return root, base, base_dir, adapters


@pytest.fixture(scope="module")
def bert_adapters(bert):
    root, _, base_dir, adapters = bert
    out = root / "onnx-adapters"
    assert main(["export", *map(str, adapters), "--format", "onnx", "--mode", "adapters",
                 "--base-model", str(base_dir), "-o", str(out)]) == 0
    return out


def test_bert_merged_matches_peft(bert, capsys):
    root, base, base_dir, adapters = bert
    out = root / "onnx-merged"
    capsys.readouterr()
    assert main(["export", str(adapters[0]), "--format", "onnx", "--base-model", str(base_dir), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CPUExecutionProvider" in printed and "max abs difference" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["mode"] == "merged" and report["dtype"] == "fp32" and report["max_abs_diff"] <= TOL
    assert {"model.onnx", "config.json"} <= {p.name for p in out.iterdir()}
    model = onnx.load(str(out / "model.onnx"))
    assert [(i.name, [d.dim_param for d in i.type.tensor_type.shape.dim]) for i in model.graph.input] == [
        ("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
    sess = session(out / "model.onnx")
    for batch, seq, pad in ((3, 12, 1), (1, 20, None), (5, 7, 4)):
        inputs = probe("bert", batch, seq, seed=batch, pad_row=pad)
        assert max_diff(run(sess, inputs), peft_logits(base, adapters[0], inputs), inputs["attention_mask"]) <= TOL


def test_bert_two_compressed_adapters_share_one_graph(bert, bert_adapters):
    _, base, _, adapters = bert
    check_adapters_graph(bert_adapters, base, adapters, "bert")
    check_rank_dims(bert_adapters, adapters)


def test_io_binding_path_feeds_the_factors_as_inputs(bert, bert_adapters):
    """IO binding ignores active adapters: binding the adapter's tensors as inputs gives the same result."""
    _, base, _, adapters = bert
    sess = session(bert_adapters / "model.onnx")
    inputs = probe("bert", 2, 9, seed=5)
    adapter_file = bert_adapters / f"{adapters[1].name}.onnx_adapter"
    params = ort.AdapterFormat.read_adapter(str(adapter_file)).get_parameters()
    binding = sess.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value.numpy())
    for name, value in params.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("logits")
    sess.run_with_iobinding(binding)
    bound = binding.copy_outputs_to_cpu()[0]
    assert max_diff(bound, peft_logits(base, adapters[1], inputs), inputs["attention_mask"]) <= TOL
    assert max_diff(bound, run(sess, inputs, adapter_file), inputs["attention_mask"]) <= 1e-6


def test_adapter_only_serves_a_new_adapter_from_the_existing_graph(bert, bert_adapters, capsys):
    root, base, base_dir, _ = bert
    src3, _ = make_adapter("bert", root / "a3", r=4, seed=11, decay=0.3)
    third = root / "small3"
    assert main(["prune", str(src3), "--budget", "0.2", "-o", str(third)]) == 0
    out = root / "only3"
    args = ["export", str(third), "--format", "onnx", "--mode", "adapters", "--adapter-only",
            "--graph", str(bert_adapters), "--base-model", str(base_dir)]
    assert main([*args, "-o", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"small3.onnx_adapter", "export_report.json"}
    sess = session(bert_adapters / "model.onnx")
    inputs = probe("bert", 3, 10, seed=8, pad_row=2)
    assert max_diff(run(sess, inputs, out / "small3.onnx_adapter"), peft_logits(base, third, inputs),
                    inputs["attention_mask"]) <= TOL
    # The check really runs: an impossible tolerance fails with exit 2 and writes nothing.
    capsys.readouterr()
    assert main([*args, "-o", str(root / "strict"), "--tolerance", "1e-12"]) == 2
    err = capsys.readouterr().err
    assert "tolerance" in err and len(err.strip().splitlines()) == 1 and not (root / "strict").exists()


def test_fp16_graph_with_external_data(bert, monkeypatch):
    """--dtype fp16 (for GPU serving) runs in onnxruntime too; big models get external data."""
    from loracompress.export import graph
    from loracompress.export.onnx import OnnxOptions, export_onnx

    root, base, base_dir, adapters = bert
    monkeypatch.setattr(graph, "EXTERNAL_DATA_BYTES", 1000)  # as if this tiny model were over 2 GB
    out = root / "onnx-fp16"
    report = export_onnx([adapters[0]], out, OnnxOptions(base_model=str(base_dir), dtype="fp16", device="cpu"))
    assert report["dtype"] == "fp16" and report["files"] == ["model.onnx", "model.onnx.data"]
    assert report["file_bytes"]["model.onnx.data"] > 0
    sess = session(out / "model.onnx")
    assert sess.get_outputs()[0].type == "tensor(float16)"
    inputs = probe("bert", 2, 11, seed=3)
    got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert got.dtype == np.float16
    diff = max_diff(got.astype(np.float32), peft_logits(base, adapters[0], inputs), inputs["attention_mask"])
    assert 0 < diff <= 1e-2


def test_refusals_before_any_work(bert, capsys, tmp_path):
    root, _, base_dir, adapters = bert
    cases = [
        ([*map(str, adapters), "--format", "onnx"], "--mode adapters"),
        ([str(adapters[0]), "--format", "onnx", "--adapter-only", "--mode", "adapters"], "--graph"),
        ([str(adapters[0]), "--format", "onnx", "--dtype", "bf16"], "fp32 or fp16"),
        ([str(adapters[0]), "--format", "onnx", "--mode", "lora"], "merged or adapters"),
        ([str(adapters[0]), "--format", "tflite"], "onnx, peft, vllm, uniform"),
    ]
    for args, fix in cases:
        assert main(["export", *args, "--base-model", str(base_dir), "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert fix in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- tiny Llama (slow)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-llama")
    base, base_dir, adapters = compressed_pair(root, "llama")
    return root, base, base_dir, adapters


@pytest.mark.slow
def test_llama_merged_matches_peft(llama):
    root, base, base_dir, adapters = llama
    out = root / "onnx-merged"
    assert main(["export", str(adapters[0]), "-f", "onnx", "--engine", "ort", "--base-model", str(base_dir), "-o", str(out)]) == 0
    assert json.loads((out / "export_report.json").read_text())["max_abs_diff"] <= TOL
    sess = session(out / "model.onnx")
    for batch, seq, pad in ((3, 12, 1), (1, 30, None)):
        inputs = probe("llama", batch, seq, seed=seq, pad_row=pad)
        assert max_diff(run(sess, inputs), peft_logits(base, adapters[0], inputs), inputs["attention_mask"]) <= TOL


@pytest.mark.slow
def test_llama_two_compressed_adapters_share_one_graph(llama):
    root, base, base_dir, adapters = llama
    out = root / "onnx-adapters"
    assert main(["export", *map(str, adapters), "-f", "onnx", "--engine", "ort", "--mode", "adapters",
                 "--base-model", str(base_dir), "-o", str(out)]) == 0
    check_adapters_graph(out, base, adapters, "llama")
    check_rank_dims(out, adapters)


# --------------------------------------------------------------------------- GPU (skipped without one)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU")
def test_fp16_on_cuda(bert):
    from loracompress.export.onnx import OnnxOptions, export_onnx

    root, _, base_dir, adapters = bert
    report = export_onnx(adapters, root / "cuda", OnnxOptions(base_model=str(base_dir), mode="adapters", dtype="fp16"))
    if report["provider"] != "CUDAExecutionProvider":
        pytest.skip(f"onnxruntime-gpu is installed but CUDA did not start: {report['provider_reason']}")
    assert all(c["passed"] for c in report["checks"])
