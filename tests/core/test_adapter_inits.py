"""PEFT init values, trained AdaLoRA checkpoints and pattern keys, each against stock PEFT.

PEFT builds every LoRA layer through ``LoraLayer.update_layer``, which runs the config's
``init_lora_weights`` again when it *loads* an adapter. Some inits subtract ``s·B0·A0`` from the
base weight there (PiSSA, OLoRA, CorDA; LoRA-GA did so in training), so such an adapter means
``W - s·B0·A0 + s·B·A``, not the ``W + s·B·A`` a merge computes: those are refused. Every other
value leaves the base alone, and outputs always say ``init_lora_weights: true``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracompress.core.adapter import LoraModule
from loracompress.core.reader import load_adapter
from loracompress.core.writer import save_adapter
from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.tiny import make_adapter, peft_deltas, sample_inputs, save_tiny_base, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every LoRA factor away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                for w in (mod.lora_A["default"].weight, mod.lora_B["default"].weight):
                    w.add_(torch.randn(w.shape, generator=g) * 0.1)


def _peft_init_adapter(init: str, directory: Path, **extra) -> torch.nn.Module:
    """A "trained" adapter with ``init_lora_weights=init``, saved the plain way (no conversion)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, task_type="CAUSAL_LM", **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(tiny_llama()), cfg)
    _perturb(model)
    model.save_pretrained(str(directory))
    return model


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_changing_inits_are_refused_with_the_conversion_fix(tmp_path, capsys, init):
    src = tmp_path / "adapter"
    _peft_init_adapter(init, src)
    # The premise, from stock PEFT: loading the folder rewrites the base weights it wraps.
    from peft import PeftModel

    base = tiny_llama()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(src))
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.get_base_layer().weight - base.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3
    with pytest.raises(LoraCompressError, match="path_initial_model_for_weight_conversion"):
        load_adapter(src)
    base_dir = save_tiny_base("llama", tmp_path / "base")
    capsys.readouterr()
    assert main(["merge", str(src), "--base-model", str(base_dir), "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "convert it to plain LoRA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_corda_and_lora_ga_adapters_are_refused(tmp_path, init):
    """Real ones, from PEFT's own preprocessing (CorDA: input covariances; LoRA-GA: gradients). Both
    subtract s·B0·A0 from the base in training. Loading the folder, PEFT refuses CorDA (no covariances)
    and builds LoRA-GA on the *unchanged* base, which is not the model that was trained."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.config import CordaConfig, LoraGAConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.loraga import preprocess_loraga

    base = tiny_llama()
    model = copy.deepcopy(base)
    batches = [sample_inputs("llama", batch=1, seq=12, seed=s) for s in range(4)]
    if init == "corda":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                         corda_config=CordaConfig(corda_method="ipm"), task_type="CAUSAL_LM")
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in batches])
    else:
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                         lora_ga_config=LoraGAConfig(), task_type="CAUSAL_LM")
        preprocess_loraga(model, cfg, train_step=lambda: model(**batches[0], labels=batches[0]["input_ids"]).loss.backward())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = get_peft_model(model, cfg)
    q = trained.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.get_base_layer().weight - base.model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-5
    _perturb(trained)
    trained.save_pretrained(str(tmp_path / "a"))
    if init == "corda":
        with pytest.raises(ValueError, match="eigens"):
            PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    else:
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
        trained.eval()
        assert (_logits(loaded, batches[1]) - _logits(trained, batches[1])).abs().max() > 1e-6
    with pytest.raises(LoraCompressError, match="path_initial_model_for_weight_conversion"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_adapter_converted_by_peft_reads_merges_and_prunes_like_peft(tmp_path, capsys, init):
    """``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes a plain LoRA of doubled
    rank (``[A; A0]``, ``[B, -B0]``) for the original base: it reads, merges and compresses like any LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = save_tiny_base("llama", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, task_type="CAUSAL_LM",
                     rank_pattern={"v_proj": 2})
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.save_pretrained(str(tmp_path / "init"))
    _perturb(model)
    model.eval()
    inputs = sample_inputs("llama", batch=2, seq=10, seed=4)
    trained = _logits(model, inputs)  # the PiSSA model as trained: residual base + adapter
    conv = tmp_path / "converted"
    model.save_pretrained(str(conv), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    config = json.loads((conv / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8 and config["rank_pattern"] == {"v_proj": 4}

    adapter = load_adapter(conv)
    expected = peft_deltas(conv, base)
    assert set(adapter.modules) == set(expected)
    for path, delta in expected.items():
        assert torch.allclose(adapter.modules[path].delta(), delta, atol=1e-6), path

    capsys.readouterr()
    assert main(["merge", str(conv), "--base-model", str(base_dir), "-o", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), str(conv)).merge_and_unload().eval()
    ours = _logits(merged, inputs)
    assert (ours - _logits(peft_merged, inputs)).abs().max() <= 1e-5
    assert (ours - trained).abs().max() <= 1e-4
    assert (_logits(base, inputs) - trained).abs().max() > 1e-2  # the adapter does something

    assert main(["prune", str(conv), "--budget", "0.5", "-o", str(tmp_path / "small")]) == 0
    small = load_adapter(tmp_path / "small")
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["init_lora_weights"] is True
    for path, delta in peft_deltas(tmp_path / "small", base).items():
        assert torch.allclose(small.modules[path].delta(), delta, atol=1e-6), path


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal", "mica", "eva"])
def test_inits_that_keep_the_base_read_like_peft_and_outputs_say_true(tmp_path, capsys, init):
    """PEFT leaves the base alone for these; outputs never carry an init PEFT would re-run at load
    (``orthogonal`` would refuse the odd ranks a cut leaves, ``mica`` would freeze B, ``eva`` would zero it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, base = make_adapter("llama", tmp_path / "a", r=8, init_lora_weights=init)
    adapter = load_adapter(src)
    for path, delta in peft_deltas(src, base).items():
        assert torch.allclose(adapter.modules[path].delta(), delta, atol=1e-6), path
    capsys.readouterr()
    assert main(["prune", str(src), "--budget", "0.3", "-o", str(tmp_path / "small")]) == 0
    config = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert not config.get("eva_config") and not config.get("loftq_config")
    small = load_adapter(tmp_path / "small")
    assert any(m.rank % 2 for m in small.modules.values())  # odd ranks: PEFT's orthogonal init refuses them
    peft = peft_deltas(tmp_path / "small", base)
    assert set(peft) == set(small.modules)
    for path, m in small.modules.items():
        assert torch.allclose(peft[path], m.delta(), atol=1e-6), path


# --------------------------------------------------------------------------- AdaLoRA, trained by PEFT


def _trained_adalora(directory: Path) -> tuple[torch.nn.Module, dict[str, list[bool]]]:
    """Run PEFT's AdaLoRA for real (update_and_allocate each step) until it has masked components."""
    from peft import AdaLoraConfig, get_peft_model

    base = tiny_llama()
    torch.manual_seed(0)
    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=12, target_modules=TARGETS, total_step=12, tinit=2, tfinal=4,
                        deltaT=1, task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = sample_inputs("llama", batch=4, seq=12)
    for step in range(12):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        model.base_model.update_and_allocate(step)
        opt.zero_grad()
    model.save_pretrained(str(directory))
    return base, json.loads((directory / "adapter_config.json").read_text())["rank_pattern"]


def test_trained_adalora_checkpoint_reads_inspects_and_prunes_like_peft(tmp_path, capsys):
    src = tmp_path / "ada"
    base, masks = _trained_adalora(src)
    # What PEFT wrote: boolean masks keyed by "<module>.lora_E", some modules cut to 0, some in part.
    assert masks and all(k.endswith(".lora_E") and all(isinstance(b, bool) for b in v) for k, v in masks.items())
    kept = [sum(v) for v in masks.values()]
    assert 0 in kept and any(0 < k < 6 for k in kept)

    adapter = load_adapter(src)
    expected = peft_deltas(src, base)  # stock PEFT's loaded model, resized by the masks
    assert set(adapter.modules) == set(expected)
    for path, delta in expected.items():
        assert torch.allclose(adapter.modules[path].delta(), delta, atol=1e-6), path
    for key, mask in masks.items():
        assert adapter.modules[key.removesuffix(".lora_E")].rank == sum(mask)

    capsys.readouterr()
    assert main(["inspect", str(src)]) == 0
    assert main(["prune", str(src), "--budget", "0.5", "-o", str(tmp_path / "small")]) == 0, capsys.readouterr().err
    small = load_adapter(tmp_path / "small")
    assert 0 < small.num_params <= adapter.num_params // 2
    peft = peft_deltas(tmp_path / "small", base)
    assert set(peft) == set(small.modules)
    for path, m in small.modules.items():
        assert torch.allclose(peft[path], m.delta(), atol=1e-6), path


# --------------------------------------------------------------------------- pattern keys


class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


class _Nested(torch.nn.Module):
    """Two module paths where one ends with the other: ``attn.q`` and ``block.attn.q``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = _Attn()
        self.block = torch.nn.Module()
        self.block.attn = _Attn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.attn(self.attn(x))


@pytest.mark.parametrize("cut", ["attn.q", "block.attn.q"])
def test_pattern_keys_are_anchored_so_peft_gives_each_module_its_own_rank(tmp_path, capsys, cut):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _Nested().eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q"]))
    _perturb(model)
    model.save_pretrained(str(tmp_path / "a"))
    adapter = load_adapter(tmp_path / "a")
    assert set(adapter.modules) == {"attn.q", "block.attn.q"}
    modules = dict(adapter.modules)
    m = modules[cut]
    modules[cut] = LoraModule(A=m.A[:2].clone(), B=m.B[:, :2].clone(), scale=m.scale)  # a rank-2 cut of one of them
    ours = adapter.replace(modules)
    out = save_adapter(ours, tmp_path / "out")

    for target in ("peft", "vllm"):
        folder = out if target == "peft" else tmp_path / "vllm"
        if target == "vllm":
            assert main(["export", str(out), "--target", "vllm", "-o", str(folder)]) == 0
        config = json.loads((folder / "adapter_config.json").read_text())
        assert all(k.startswith("^") and k.endswith("$") for k in config["rank_pattern"])
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
        layers = dict(loaded.base_model.model.named_modules())
        deltas = peft_deltas(folder, base)
        for path, module in ours.modules.items():
            assert layers[path].r["default"] == module.rank, (target, path)
            assert torch.allclose(deltas[path], module.delta(), atol=1e-6), (target, path)
        # A reader that ignores the patterns (vLLM) and applies one global lora_alpha / r sees the same.
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]
        for path, module in ours.modules.items():
            A = tensors[f"base_model.model.{path}.lora_A.weight"]
            B = tensors[f"base_model.model.{path}.lora_B.weight"]
            assert torch.allclose(scale * B @ A, module.delta(), atol=1e-6), (target, path)
