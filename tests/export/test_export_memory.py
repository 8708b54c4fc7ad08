"""ONNX export at about one copy of the model (issue 15.2): what each memory fix keeps true.

Peak memory is measured in subprocesses (``VmHWM``, reset through ``/proc/self/clear_refs`` after
the set-up), with bounds far from both the old and the new figure, so the tests do not depend on timing
or on what else runs on the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loracompress_cli.app import main
from tests.tiny import make_adapter

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
_PEAK = """
def _status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
def reset_peak():
    import gc; gc.collect()
    open('/proc/self/clear_refs', 'w').write('5')  # Linux: the peak (VmHWM) restarts at the current RSS
    return _status('VmRSS')
def peak():
    return _status('VmHWM')
"""


def _run(script: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PEAK + script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def weight_transposes(path: Path) -> list[str]:
    """Transpose nodes that read a constant initializer (not an overridable graph input)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer} - {i.name for i in model.graph.input}
    return [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]


@pytest.mark.parametrize("mode", ["merged", "adapters"])
def test_exported_graph_holds_weights_already_transposed(tmp_path, mode):
    """Regression: merged exports kept a ``Transpose`` of every Linear weight, which onnxruntime runs
    (a second copy of each weight) or folds at load (a second copy of all of them)."""
    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.save_pretrained(str(tmp_path / "base"))
    out = tmp_path / "onnx"
    assert main(["export", str(src), "--format", "onnx", "--engine", "ort", "--mode", mode,
                 "--base-model", str(tmp_path / "base"), "-o", str(out)]) == 0
    assert weight_transposes(out / "model.onnx") == []


def test_cpu_verification_session_of_an_fp16_graph_holds_about_its_weights(tmp_path):
    """Regression: onnxruntime's CPU session folded the Casts it wraps around fp16 MatMuls into fp32
    copies of every weight (an fp16 graph then took 2-3x its size to verify)."""
    script = f"""
import numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
d, n = 2048, 12
rng = np.random.default_rng(0)
inits = [numpy_helper.from_array((rng.standard_normal((d, d)) * 0.01).astype(np.float16), f"w{{i}}") for i in range(n)]
nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{{i-1}}", f"w{{i}}"], [f"h{{i}}"]) for i in range(n)]
graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", d])],
                          [helper.make_tensor_value_info(f"h{{n-1}}", TensorProto.FLOAT16, ["b", d])], inits)
path = {str(tmp_path / 'm.onnx')!r}
onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
                save_as_external_data=True, location="m.onnx.data")
del inits, graph
from loracompress.export.verify import open_session, run_session
before = reset_peak()
session = open_session(path, prefer_gpu=False)
out = run_session(session, {{"x": np.ones((4, d), np.float16)}}, [f"h{{n-1}}"])
assert np.isfinite(out[f"h{{n-1}}"]).all()
print(before, peak(), n * d * d * 2)
"""
    before, peak, weights = map(int, _run(script))
    growth = peak - before
    assert growth < 1.5 * weights, f"the session grew by {growth / weights:.2f}x its fp16 weights"


# Out of the default suite until its measure is fixed: on a quiet 2-core machine (2026-12-08) it read 1.30-1.93x
# with merge_cast as it was before the merging/ move and 1.34-2.03x after it (three runs each, bound 1.8x), so it
# fails CI by chance, not on a change. Run it with -m slow.
@pytest.mark.slow
def test_merge_cast_frees_each_mapped_weight_as_it_goes(tmp_path):
    """Regression: merging and casting a memory-mapped bf16 base to fp16 held both copies of the
    whole model (the old shard pages stay until every tensor of the shard is gone).

    Measured as what it means, the two copies, and nothing a neighbour can move: the new copy is the
    process's anonymous memory grown since the start (``RssAnon``), the old one the resident pages of the
    shard maps (``Rss`` of the ``.safetensors`` maps in ``/proc/self/smaps``), sampled every 2 ms while
    ``merge_cast`` runs. The process's whole RSS (``VmHWM``) was flaky on a shared machine: a page of the
    shards (or of libtorch's code) that memory pressure evicted before the start and faulted back during
    the merge counted as growth. Eviction can only lower both measures here, never fake a second copy.
    """
    script = f"""
import sys, threading, time, torch
sys.path.insert(0, {str(BENCHMARKS)!r})
from synthetic import LlamaShape, write_llama_checkpoint, write_lora
from loracompress.core.reader import load_adapter
from loracompress.merging.inplace import merge_cast
from loracompress.runtime.model import load_base_model
def anon():
    return _status('RssAnon')
def mapped():  # resident bytes of the private maps of the shard files
    total, ours = 0, False
    for line in open('/proc/self/smaps'):
        head = line.split(None, 5)
        if '-' in head[0] and len(head) >= 5 and not head[0].endswith(':'):
            ours = len(head) == 6 and head[5].strip().endswith('.safetensors')
        elif ours and head[0] == 'Rss:':
            total += int(head[1]) * 1024
    return total
shape = LlamaShape(hidden=1024, intermediate=4096, layers=8, heads=8, kv_heads=8, vocab=1024)
from pathlib import Path
write_llama_checkpoint(Path({str(tmp_path / 'base')!r}), shape, shard_bytes=10**9)
write_lora(Path({str(tmp_path / 'lora')!r}), Path({str(tmp_path / 'base')!r}), shape, r=8)
adapter = load_adapter({str(tmp_path / 'lora')!r})
model = load_base_model({str(tmp_path / 'base')!r}, adapter, dtype=torch.bfloat16).model
size = sum(p.numel() * 2 for p in model.parameters())
total = sum(float(p.float().sum()) for p in model.parameters())  # every page resident, as after the reference
assert mapped() > 0.9 * size, 'the base is not memory-mapped here'
import gc; gc.collect()
anon0, samples, done = anon(), [], threading.Event()
def sample():
    while not done.is_set():
        samples.append(anon() - anon0 + mapped())
        time.sleep(0.002)
watcher = threading.Thread(target=sample)
watcher.start()
try:
    merge_cast(model, adapter, torch.float16)
finally:
    done.set()
    watcher.join()
assert {{p.dtype for p in model.parameters()}} == {{torch.float16}}
print(max(samples), len(samples), size)
"""
    most, n, size = map(int, _run(script))
    assert n >= 5, f"only {n} samples: the merge was too quick to watch"
    # one copy (the new fp16 weights, or the old mapped ones) is 1x, both at once 2x; measured 1.32x with the
    # pages handed back (fp32 temporaries, allocator slack) and 2.59x without: the bound is far from both
    assert most < 1.8 * size, f"merge_cast held {most / size:.2f}x the model (old mapped + new) at its peak"


def test_dropping_mapped_pages_is_harmless_and_skips_what_is_still_used(tmp_path):
    """Pages handed back from a private file map read back from the file: the values stay. A weight
    that another live tensor still views is left alone."""
    from loracompress.core.reader import load_adapter
    from loracompress.merging.inplace import MappedShards
    from loracompress.runtime.model import load_base_model

    src, base = make_adapter("llama", tmp_path / "a", r=4)
    base.resize_token_embeddings(4096)  # an embedding of many whole pages
    base.to(torch.bfloat16).save_pretrained(str(tmp_path / "base"))
    model = load_base_model(str(tmp_path / "base"), load_adapter(src), dtype=torch.bfloat16).model
    shards = MappedShards()
    if not shards.maps:
        pytest.skip("this platform does not memory-map safetensors into a private file map")
    embed = model.get_input_embeddings().weight
    expected = embed.detach().clone()
    assert not shards.drop(embed.data, model)  # still the model's own weight
    assert shards.drop(embed.data, torch.nn.Module())  # nothing else uses it: its pages go back
    assert torch.equal(embed.detach(), expected)  # and read back from the file unchanged
    assert not shards.drop(torch.zeros(4096, 64), torch.nn.Module())  # heap memory: never touched
