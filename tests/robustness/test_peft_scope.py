"""An adapter is read exactly as PEFT reads it (issue 23, item 1).

PEFT applies a LoRA only where ``adapter_config.json`` says (``target_modules``, ``layers_to_transform`` /
``layers_pattern``, ``exclude_modules``, ``modules_to_save``) and loads only the keys of the adapter's own
name; every other LoRA tensor of the file is an unexpected key it skips. ``prune`` and ``merge`` must give
what ``PeftModel.from_pretrained`` gives on the same folder, say what they left out, and refuse a file
whose reading is ambiguous or a config PEFT would refuse.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loracompress.core.reader import load_adapter
from loracompress_cli.app import main
from tests.tiny import make_adapter, sample_inputs, save_tiny_base

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A LoRA saved by PEFT on all 7 projections of every layer of a tiny Llama, and that base saved as a folder."""
    root = tmp_path_factory.mktemp("scope")
    src, base = make_adapter("llama", root / "full", r=4, lora_alpha=8)
    return src, save_tiny_base("llama", root / "base"), base


def _variant(src: Path, out: Path, config: dict[str, Any] | None = None,
             tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    """A copy of the adapter at ``src`` with its config updated and/or its tensors rewritten."""
    out.mkdir(parents=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(t) if tensors else t, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _peft(base: torch.nn.Module, folder: Path) -> tuple[torch.Tensor, set[str]]:
    """PEFT's own reading: the logits of base+adapter and the modules it put a loaded LoRA on."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the unexpected keys: that is the point
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        logits = model(**sample_inputs("llama")).logits.float()
    targeted = {name for name, mod in model.base_model.model.named_modules()
                if "default" in getattr(mod, "lora_A", {})}
    return logits, targeted


def _logits_of_lora(base: torch.nn.Module, folder: Path) -> torch.Tensor:
    return _peft(base, folder)[0]


def _logits_of_model(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**sample_inputs("llama")).logits.float()


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


SCOPES = {
    "target_modules": {"target_modules": ["q_proj"]},
    "layers_to_transform": {"layers_to_transform": [0], "layers_pattern": "layers"},
    "layers_to_transform_int": {"layers_to_transform": 2},
    "exclude_modules": {"exclude_modules": ["q_proj", "down_proj"]},
    "exclude_modules_regex": {"exclude_modules": r".*\.1\.mlp\..*"},
    "regex_target_modules": {"target_modules": r".*\.1\.self_attn\.(q|v)_proj"},
}


@pytest.mark.parametrize("case", sorted(SCOPES))
def test_prune_and_merge_read_what_peft_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               full: tuple[Path, Path, torch.nn.Module], case: str) -> None:
    src, base_dir, base = full
    edited = _variant(src, tmp_path / "edited", SCOPES[case])
    reference, targeted = _peft(base, edited)
    everything, _ = _peft(base, src)
    assert (reference - everything).abs().max() > 1e-2  # the config really narrows the adapter

    code, pruned_out, _ = _run(capsys, "prune", edited, "--budget", "1.0", "-o", tmp_path / "pruned")
    assert code == 0
    code, merged_out, _ = _run(capsys, "merge", edited, "--base-model", base_dir, "-o", tmp_path / "merged")
    assert code == 0
    pruned = float((_logits_of_lora(base, tmp_path / "pruned") - reference).abs().max())
    merged = float((_logits_of_model(tmp_path / "merged") - reference).abs().max())
    assert pruned <= 1e-5 and merged <= 1e-5, (pruned, merged)

    # and each says what it left out, as PEFT's own reading does
    left_out = set(load_adapter(src).modules) - targeted
    adapter = load_adapter(edited)
    assert set(adapter.modules) == targeted and {s.name for s in adapter.skipped} == left_out
    assert "PEFT does not load" in pruned_out and "PEFT does not load" in merged_out
    report = json.loads((tmp_path / "pruned" / "compression_report.json").read_text())
    assert {s["name"] for s in report["skipped"]} == left_out
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["modules_merged"] == len(targeted) and {s["name"] for s in report["skipped"]} == left_out


@pytest.mark.parametrize("target", ["vllm", "uniform"])
def test_export_reads_what_peft_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      full: tuple[Path, Path, torch.nn.Module], target: str) -> None:
    src, _, base = full
    edited = _variant(src, tmp_path / "edited", SCOPES["layers_to_transform"])
    code, out, _ = _run(capsys, "export", edited, "--format", target, "-o", tmp_path / "out")
    assert code == 0
    assert (_logits_of_lora(base, tmp_path / "out") - _peft(base, edited)[0]).abs().max() <= 1e-5
    assert "PEFT does not load" in out
    assert len(json.loads((tmp_path / "out" / "export_report.json").read_text())["skipped"]) == 14


def test_inspect_lists_what_peft_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       full: tuple[Path, Path, torch.nn.Module]) -> None:
    edited = _variant(full[0], tmp_path / "edited", {"target_modules": ["q_proj"]})
    code, out, _ = _run(capsys, "inspect", edited, "--json")
    stats = json.loads(out)
    assert code == 0 and len(stats["modules"]) == 3 and len(stats["skipped"]) == 18
    assert {s["reason"] for s in stats["skipped"]} == {"not matched by target_modules"}


# --------------------------------------------------------------------------- the file's keys


def _with_other_adapter(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file plus a second adapter 'zeta' (other values) on the same modules.

    Its keys sort after the default ones (``lora_A.weight`` < ``lora_A.zeta.weight``), the order the
    weights file stores them in: a reader that ignores the name takes zeta's values.
    """
    out = dict(t)
    out.update({k.replace(".weight", ".zeta.weight"): v * 3 for k, v in t.items() if "lora_" in k})
    return out


def test_keys_of_another_adapter_name_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  full: tuple[Path, Path, torch.nn.Module]) -> None:
    src, _, base = full
    mixed = _variant(src, tmp_path / "mixed", tensors=_with_other_adapter)
    reference, _ = _peft(base, mixed)
    assert (reference - _peft(base, src)[0]).abs().max() == 0  # PEFT ignores 'zeta'

    code, _, _ = _run(capsys, "prune", mixed, "--budget", "1.0", "-o", tmp_path / "pruned")
    assert code == 0
    assert (_logits_of_lora(base, tmp_path / "pruned") - reference).abs().max() <= 1e-5
    adapter = load_adapter(mixed)
    assert len(adapter.modules) == 21 and len(adapter.skipped) == 42
    assert all(".zeta." in s.name and "adapter name 'zeta'" in s.reason for s in adapter.skipped)
    assert len(json.loads((tmp_path / "pruned" / "compression_report.json").read_text())["skipped"]) == 42


def test_the_default_adapter_name_in_keys_is_read(tmp_path: Path, full: tuple[Path, Path, torch.nn.Module]) -> None:
    src, _, base = full
    named = _variant(src, tmp_path / "named",
                     tensors=lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    assert (_peft(base, named)[0] - _peft(base, src)[0]).abs().max() == 0  # PEFT loads this form too
    adapter, plain = load_adapter(named), load_adapter(src)
    assert not adapter.skipped and set(adapter.modules) == set(plain.modules)
    assert all(torch.equal(adapter.modules[p].B, plain.modules[p].B) for p in plain.modules)


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: Path, base_dir: Path, *words: str) -> None:
    """prune and merge both exit 2 with one line naming ``words``, and write nothing."""
    for args in (["prune", folder, "--budget", "1.0", "-o", tmp_path / "out"],
                 ["merge", folder, "--base-model", base_dir, "-o", tmp_path / "out"]):
        before = sorted(p.name for p in tmp_path.iterdir())
        code, out, err = _run(capsys, *args)
        assert code == 2, (args[0], out, err)
        line = err.strip()
        assert line.startswith("error: ") and "\n" not in line and all(w in line for w in words), line
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_only_another_adapter_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              full: tuple[Path, Path, torch.nn.Module]) -> None:
    src, base_dir, _ = full
    foo = _variant(src, tmp_path / "foo",
                   tensors=lambda t: {k.replace(".weight", ".foo.weight"): v for k, v in t.items()})
    _refused(capsys, tmp_path, foo, base_dir, "PEFT loads none", "adapter name 'foo'", "rename the keys")


def test_a_module_stored_twice_with_different_values_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 full: tuple[Path, Path, torch.nn.Module]) -> None:
    src, base_dir, base = full

    def twice(scale: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        return lambda t: {**t, **{k.removeprefix(PREFIX): v * scale for k, v in t.items()
                                  if "layers.1.self_attn.q_proj" in k}}

    _refused(capsys, tmp_path, _variant(src, tmp_path / "twice", tensors=twice(2.0)), base_dir,
             "model.layers.1.self_attn.q_proj", "stored twice with different values", "keep one")
    # the same values twice are one module, read as PEFT reads it
    same = _variant(src, tmp_path / "same", tensors=twice(1.0))
    code, _, _ = _run(capsys, "prune", same, "--budget", "1.0", "-o", tmp_path / "pruned")
    assert code == 0
    assert (_logits_of_lora(base, tmp_path / "pruned") - _peft(base, same)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize(("config", "words"), [
    ({"target_modules": ["qkv_proj"]}, ("matches none of the 21 LoRA modules", "target_modules=['qkv_proj']")),
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, ("matches none",)),
    ({"layers_to_transform": [7]}, ("matches none", "layers_to_transform=[7]")),
    ({"target_modules": r"model\.layers\.\d+\.q_proj"}, ("matches none",)),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, ("layers_to_transform cannot be used", "PEFT refuses")),
    ({"layers_pattern": "layers"}, ("layers_pattern is set without layers_to_transform", "PEFT refuses")),
    ({"target_modules": "(q_proj"}, ("target_modules is not a valid regex",)),
    ({"layers_to_transform": ["0"]}, ("layers_to_transform=['0'] must be a layer index",)),
])
def test_a_config_that_targets_nothing_or_that_peft_refuses_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], full: tuple[Path, Path, torch.nn.Module],
    config: dict[str, Any], words: tuple[str, ...],
) -> None:
    src, base_dir, _ = full
    _refused(capsys, tmp_path, _variant(src, tmp_path / "bad", config), base_dir, *words)


# --------------------------------------------------------------------------- the matcher against PEFT's own


MATCHER_CONFIGS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "model.layers.2.mlp.up_proj"]},
    {"target_modules": ["q_proj", "model.layers.2.mlp.up_proj"], "layers_to_transform": [0, 1]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1, "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},
    {"target_modules": ["q_proj", "k_proj", "lm_head"], "exclude_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["mlp"]},
    {"target_modules": r".*(gate|up)_proj", "exclude_modules": r"model\.layers\.0\..*"},
    {"target_modules": ["proj"], "exclude_modules": ["self_attn.o_proj"]},
    {"target_modules": "all-linear", "exclude_modules": ["v_proj"]},
]


@pytest.mark.parametrize("config", MATCHER_CONFIGS, ids=lambda c: json.dumps(c)[:60])
def test_the_matcher_agrees_with_peft(config: dict[str, Any]) -> None:
    """Our matcher against peft's ``check_target_module_exists`` on every module of a Llama."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from loracompress.core.scope import Scope
    from tests.tiny import tiny_llama

    names = [n for n, _ in tiny_llama().named_modules() if n]
    scope = Scope.from_config(config, "adapter_config.json")
    peft_config = LoraConfig(**config)
    for name in names:
        if config["target_modules"] == "all-linear":  # peft expands it to names first, with the model
            continue
        assert (scope.skip_reason(name) is None) == bool(check_target_module_exists(peft_config, name)), name
    if config["target_modules"] == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        expanded = _maybe_include_all_linear_layers(peft_config, tiny_llama())
        linear = {n for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
        for name in linear:
            assert (scope.skip_reason(name) is None) == bool(check_target_module_exists(expanded, name)), name

