"""The second hostile walk (issue 23), items 10 and 11: messages that misled, and minor silent surprises.

Item 10: each case already exited 2 (or 1), but its one line blamed the wrong thing. Each test runs the
real CLI and checks the words of the line (and what it must no longer say). Item 11: flags that were
silently ignored, configs and modes written wrong, a record trusted when it cannot be true, budgets
that are the same cut. Every test here failed on main before the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loracompress.core.adapter import ORIGINAL_PARAMS_KEY
from loracompress.core.reader import load_adapter
from loracompress.errors import LoraCompressError
from loracompress_cli.app import main
from tests.robustness.hostile import (
    LLAMA_MODULES,
    assert_user_error,
    base_config,
    lora_tensors,
    snapshot,
    tree,
    write_adapter,
)
from tests.tiny import save_tiny_base, tiny_sentences


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama base (with its tokenizer) that :func:`write_adapter`'s modules fit."""
    return save_tiny_base("llama", tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(autouse=True)
def no_github(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_sentences(8)))
    return path


def _edit_json(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _refused(capsys: pytest.CaptureFixture[str], root: Path, args: list[object], *words: str) -> str:
    """Exit 2 with one line naming every word, and nothing under ``root`` changed."""
    before = (tree(root), snapshot(root))
    capsys.readouterr()
    line = assert_user_error(main([str(a) for a in args]), capsys.readouterr().err, *words)
    assert (tree(root), snapshot(root)) == before, "a refused run wrote something"
    return line


# --------------------------------------------------------------------------- item 10: messages


def test_a_tokenizer_that_needs_custom_code_says_so(base: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Was: "the base model has no tokenizer" for a tokenizer_config.json with auto_map."""
    custom = shutil.copytree(base, tmp_path / "base")
    _edit_json(custom / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tok.MyTokenizer", None]},
               tokenizer_class="MyTokenizer")
    adapter = write_adapter(tmp_path / "adapter")
    line = _refused(capsys, tmp_path, ["eval", adapter, "--base-model", custom, "--data", _data(tmp_path / "d.jsonl")],
                    "tokenizer", "custom code", "--trust-remote-code")
    assert "has no tokenizer" not in line


def test_a_gguf_export_on_a_custom_code_base_says_so_in_whole_words(tmp_path: Path, base: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Was: "cannot read the config ... offline (... You can inspec)": transformers' words cut mid-word."""
    custom = shutil.copytree(base, tmp_path / "base")
    _edit_json(custom / "config.json", model_type="mything",
               auto_map={"AutoConfig": "cfg.MyConfig", "AutoModelForCausalLM": "mdl.MyModel"})
    adapter = write_adapter(tmp_path / "adapter")
    line = _refused(capsys, tmp_path, ["export", adapter, "--format", "gguf", "--base-model", custom,
                                       "-o", tmp_path / "out"], "custom code", "--trust-remote-code")
    assert "offline" not in line and "inspec" not in line


def test_a_quoted_library_error_is_cut_between_words() -> None:
    from loracompress.errors import brief

    text = "The repository /x contains custom code which must be executed. You can inspect the repository content"
    cut = brief(ValueError(text), 80)
    assert cut.endswith("…") and len(cut) <= 81
    assert text.startswith(cut[:-1]) and text[len(cut) - 1] == " "  # the cut falls on a space
    assert brief(OSError("short\nsecond line")) == "short"


def _tied_lm_head_adapter(root: Path, tied: bool) -> tuple[Path, Path]:
    """A stock PEFT LoRA on q_proj and lm_head (PEFT then also saves lm_head.base_layer.weight)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import tiny_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    tiny_tokenizer("llama").save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(root / "adapter")
    return root / "adapter", root / "base"


def test_a_tied_lm_head_lora_to_gguf_blames_the_tie_not_modules_to_save(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    adapter, base = _tied_lm_head_adapter(tmp_path, tied=True)
    line = _refused(capsys, tmp_path, ["export", adapter, "--format", "gguf", "--base-model", base,
                                       "-o", tmp_path / "out"], "lm_head", "ties it to the embeddings", "merge")
    assert "modules_to_save" not in line


def test_an_untied_lm_head_lora_exports_to_gguf_without_its_saved_base_copy(tmp_path: Path) -> None:
    """PEFT's copy of lm_head (save_embedding_layers) is the base's own weight, not a trained head: llama.cpp
    uses the base's, as vLLM does, so the LoRA itself is written and reads back (the export's own check)."""
    adapter, base = _tied_lm_head_adapter(tmp_path, tied=False)
    assert main(["export", str(adapter), "--format", "gguf", "--base-model", str(base), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert "lm_head" in report["ranks"] and report["check"]["max_rel_error"] <= report["check"]["tolerance"]


def test_weights_that_are_a_device_say_so_not_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    line = _refused(capsys, tmp_path, ["inspect", adapter], "adapter_model.safetensors", "character device",
                    "not a regular file")
    assert "missing" not in line
    weights.unlink()
    weights.mkdir()
    _refused(capsys, tmp_path, ["inspect", adapter], "is a folder, not a regular file")


def test_a_saved_head_the_base_lacks_names_the_base_once() -> None:
    """Was: "base model 'the base model' has no such tensor" when no name was passed."""
    from loracompress.core.adapter import Adapter
    from loracompress.runtime.model import restore_modules_to_save
    from tests.tiny import tiny_llama

    adapter = Adapter(modules={}, config={}, extra_tensors={"base_model.model.score.weight": torch.zeros(2, 48)})
    with pytest.raises(LoraCompressError) as err:
        restore_modules_to_save(tiny_llama(), adapter)
    assert "the base model has no such tensor" in str(err.value) and "'the base model'" not in str(err.value)
    with pytest.raises(LoraCompressError, match="base model 'org/name' has no such tensor"):
        restore_modules_to_save(tiny_llama(), adapter, "org/name")


def test_a_missing_shard_of_a_local_base_is_not_an_offline_problem(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.tiny import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    tiny_tokenizer("llama").save_pretrained(tmp_path / "base")
    shard = sorted((tmp_path / "base").glob("model-*.safetensors"))[1]
    shard.unlink()
    adapter = write_adapter(tmp_path / "adapter")
    line = _refused(capsys, tmp_path, ["eval", adapter, "--base-model", tmp_path / "base",
                                       "--data", _data(tmp_path / "d.jsonl")], shard.name, "incomplete", "re-download")
    assert "offline" not in line and "local folder" not in line


def test_gguf_messages_name_the_format_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bert = save_tiny_base("bert", tmp_path / "bert")
    adapter = write_adapter(tmp_path / "adapter")
    line = _refused(capsys, tmp_path, ["export", adapter, "--format", "gguf", "--base-model", bert,
                                       "-o", tmp_path / "out"], "--format gguf", "--format peft")
    assert "--target" not in line


def test_config_given_a_folder_says_it_is_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    line = _refused(capsys, tmp_path, ["check", "--config", "conf"], "--config conf is a folder")
    assert "no such file" not in line
    (tmp_path / "conf" / "loracompress.toml").write_text("[check]\n")
    _refused(capsys, tmp_path, ["report", "--config", "conf"], "is a folder", "--config conf/loracompress.toml")


def test_report_with_nothing_to_report_says_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, tmp_path, ["report", "--plot", "ranks.png"], "nothing to report", "pass adapter folders")
    assert "check" not in line.split(":")[1]


@pytest.mark.parametrize("breach", [True, False])
def test_an_unwritable_step_summary_keeps_the_checks_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str], breach: bool) -> None:
    """Was: exit 2 ("cannot append to $GITHUB_STEP_SUMMARY"), which hid the breach (1) from the CI."""
    adapter = write_adapter(tmp_path / "adapter")
    (tmp_path / "summary").mkdir()  # appending to a folder fails
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary"))
    limit = "10" if breach else "1M"
    code = main(["check", str(adapter), "--max-params", limit])
    err = capsys.readouterr().err
    assert code == (1 if breach else 0), err
    warning = [line for line in err.splitlines() if "GITHUB_STEP_SUMMARY" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "Traceback" not in err


# --------------------------------------------------------------------------- item 11: minor


def test_calibration_flags_without_data_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    _refused(capsys, tmp_path, ["prune", adapter, "--budget", "0.5", "--steps", "50", "--lr", "0.01", "-o", out],
             "--steps, --lr apply to calibration", "add --data")
    _refused(capsys, tmp_path, ["prune", adapter, "--budget", "0.5", "--kd-weight", "2", "-o", out], "--kd-weight")
    _refused(capsys, tmp_path, ["prune", adapter, "--budget", "0.5", "--seq-len", "64", "--eval-data", "x.jsonl",
                                "-o", out], "--eval-data, --seq-len", "no --data")
    # the activation-aware cut reads the data but trains nothing
    _refused(capsys, tmp_path, ["prune", adapter, "--method", "svd", "--budget", "0.5", "--data", "d.jsonl",
                                "--epochs", "2", "-o", out], "--epochs applies to calibration", "calibration --method")
    assert main(["prune", str(adapter), "--budget", "0.5", "-o", str(out)]) == 0  # the plain cut still runs


@pytest.mark.parametrize("streaming", [True, False])
def test_a_merge_that_did_not_use_the_custom_code_drops_auto_map(base: Path, tmp_path: Path, streaming: bool) -> None:
    """A built-in model_type with auto_map loads transformers' own class (no --trust-remote-code): the merged
    config must not send a reader to .py files that the merged folder does not hold."""
    from loracompress.pipelines.merge import MergeOptions, merge_adapter

    custom = shutil.copytree(base, tmp_path / "base")
    _edit_json(custom / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    adapter = write_adapter(tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", MergeOptions(base_model=str(custom), streaming=streaming))
    assert report["streamed"] is streaming and report["auto_map_dropped"] is True
    assert "auto_map" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not list((tmp_path / "merged").glob("*.py"))


def test_update_baseline_writes_through_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    (tmp_path / "shared").mkdir()
    real = tmp_path / "shared" / "sizes.json"
    real.write_text(json.dumps({"adapters": {}}))
    link = tmp_path / "sizes.json"
    link.symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert main(["check", "adapter", "--baseline", "sizes.json", "--update-baseline"]) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert "adapter" in json.loads(real.read_text())["adapters"]
    assert not [p for p in real.parent.iterdir() if p != real] and adapter.is_dir()


def test_a_plot_gets_the_umask_mode_like_every_other_output(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    old = os.umask(0o022)
    try:
        assert main(["report", str(adapter), "--plot", str(tmp_path / "ranks.png")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ranks.png").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "adapter" / "adapter_config.json").stat().st_mode) == 0o644


def test_a_mixed_fp16_bf16_adapter_is_written_in_fp32_and_loses_nothing(tmp_path: Path) -> None:
    """Was: written as bf16, so the fp16 modules moved by about 1e-3 at --budget 1.0. fp32 holds both exactly."""
    tensors = lora_tensors()
    for i, key in enumerate(sorted(tensors)):
        tensors[key] = tensors[key].to(torch.float16 if i % 4 < 2 else torch.bfloat16)  # whole modules of each
    adapter = write_adapter(tmp_path / "adapter", tensors=tensors)
    assert main(["prune", str(adapter), "--budget", "1.0", "-o", str(tmp_path / "out")]) == 0
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    out = load_adapter(tmp_path / "out")
    scale = base_config()["lora_alpha"] / base_config()["r"]  # PEFT's delta: B @ A * alpha / r, in fp32
    for path, _, _ in LLAMA_MODULES:
        key = f"base_model.model.{path}"
        peft = tensors[f"{key}.lora_B.weight"].float() @ tensors[f"{key}.lora_A.weight"].float() * scale
        ours = out.modules[path].B @ out.modules[path].A * out.modules[path].scale
        assert (ours - peft).abs().max() <= 1e-5 * peft.abs().max()


def test_an_original_count_smaller_than_the_adapter_is_ignored(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter", metadata={"format": "pt", ORIGINAL_PARAMS_KEY: "100"})
    loaded = load_adapter(adapter)
    assert loaded.original_params is None
    assert main(["truncate", str(adapter), "--budget", "0.5", "-o", str(tmp_path / "half")]) == 0
    cut = load_adapter(tmp_path / "half")
    assert loaded.num_params / 2 - 128 < cut.num_params <= loaded.num_params / 2  # half of this adapter


def test_a_budget_within_one_rank_above_the_adapter_is_the_adapter(tmp_path: Path) -> None:
    """An output trained at 0.5 holds a little less (whole ranks); truncate at 0.5 must not refuse it."""
    n = sum(4 * (i + o) for _, i, o in LLAMA_MODULES)
    original = 2 * n + 100  # 0.5 of it is 50 parameters more than the adapter holds: less than one rank (128)
    adapter = write_adapter(tmp_path / "adapter", metadata={"format": "pt", ORIGINAL_PARAMS_KEY: str(original)})
    assert main(["truncate", str(adapter), "--budget", "0.5", "-o", str(tmp_path / "same")]) == 0
    assert load_adapter(tmp_path / "same").num_params == n
    with pytest.raises(LoraCompressError, match="more than this adapter has"):  # a whole rank over still is
        from loracompress.core.budget import Budget
        from loracompress.cuts.nested import truncate_adapter

        truncate_adapter(load_adapter(adapter), Budget.parse("0.6"))


def test_budgets_that_resolve_to_the_same_count_make_one_cut(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    assert main(["truncate", str(adapter), "--budgets", "0.25,25%,0.5", "-o", str(tmp_path / "cuts")]) == 0
    assert sorted(p.name for p in (tmp_path / "cuts").iterdir() if p.is_dir()) == ["0.25", "0.5"]
    summary = json.loads((tmp_path / "cuts" / "truncate_report.json").read_text())
    assert [c["folder"] for c in summary["cuts"]] == ["0.25", "0.5"]
    assert any("25%" in r.getMessage() and "same as 0.25" in r.getMessage() for r in caplog.records)
