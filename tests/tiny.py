"""Tiny real models and real PEFT adapters built from configs, offline, for tests.

Every adapter is made by stock PEFT (``get_peft_model`` + ``save_pretrained``) with random
non-zero B (PEFT initialises B to zero, which would make every delta trivially zero).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=80, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def make_adapter(
    kind: str,
    out_dir: Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    decay: float = 0.7,
    lora_seed: int | None = None,
    **extra: Any,
) -> tuple[Path, torch.nn.Module]:
    """Save a real PEFT adapter on a tiny ``kind`` model (llama, bert, gpt2); returns (dir, base).

    The LoRA factors are random with a geometric spectrum (``decay**i`` per component) so that
    truncation has something to keep and something to lose. ``lora_seed`` (default: ``seed``) draws
    other LoRA weights on the same base: several adapters of one base, as a bank needs.
    """
    from peft import LoraConfig, get_peft_model

    base = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}[kind](seed)
    targets = {"llama": LLAMA_TARGETS, "bert": BERT_TARGETS, "gpt2": GPT2_TARGETS}[kind]
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}[kind]
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, task_type=task,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     use_rslora=use_rslora, fan_in_fan_out=(kind == "gpt2"), **extra)
    model = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed((seed if lora_seed is None else lora_seed) + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                k = A.shape[0]
                spectrum = torch.tensor([decay**i for i in range(k)])
                A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
                B.copy_(torch.randn(B.shape, generator=g) * spectrum[None, :] * 0.3)
            if kind == "bert" and name.endswith("classifier.modules_to_save.default"):
                for p in mod.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(str(out_dir))
    return Path(out_dir), base


def peft_deltas(adapter_dir: Path, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-module ΔW that stock PEFT computes for the adapter on disk, keyed by module path."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    deltas = {}
    for name, mod in model.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight("default").float()
            if getattr(mod, "fan_in_fan_out", False):
                d = d.T  # PEFT returns Conv1D deltas as [in, out]
            deltas[name] = d
    return deltas


def sample_inputs(kind: str, batch: int = 2, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --------------------------------------------------------------------------- tiny tokenizer + saved base
# A word-level tokenizer over a fixed 92-word vocabulary (ids 4..95) that fits the tiny models'
# vocab_size=96; ids 0..3 are [PAD], [UNK], [CLS]/<s>, [SEP]/</s>.
WORDS = (
    "the a an and or but not is was are be good bad great awful fine poor love hate like movie film "
    "book food service day night time place people man woman child dog cat car house city story plot "
    "actor music song game team player win lose run walk eat drink see hear say tell think know want "
    "need make take give find keep very too so really quite more less most best worst new old big "
    "small long short happy sad funny boring red blue green one two three four"
).split()
assert len(WORDS) == 92, len(WORDS)


def tiny_tokenizer(kind: str) -> Any:
    """A ``PreTrainedTokenizerFast`` for the tiny ``kind`` model (bert: [CLS] a [SEP] b [SEP]; llama: <s> a)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A", pair="[CLS] $A $B:1", special_tokens=[("[CLS]", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       bos_token="[CLS]", eos_token="[SEP]", model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[SEP]", model_max_length=64)


def save_tiny_base(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny ``kind`` base model (same weights as :func:`make_adapter` uses) and its tokenizer."""
    base = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}[kind](seed)
    base.config.pad_token_id = 0
    if kind == "gpt2":  # GPT-2's defaults (50256) lie outside the tiny vocabulary
        base.config.bos_token_id = base.config.eos_token_id = 3
    base.save_pretrained(str(out_dir))
    tiny_tokenizer(kind).save_pretrained(str(out_dir))
    return Path(out_dir)


def tiny_sentences(n: int, seed: int = 0, min_words: int = 3, max_words: int = 12) -> list[str]:
    """``n`` random sentences over the tiny tokenizer's vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def save_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write the tiny Llama (same weights as :func:`tiny_llama`) as an F32 GGUF file; returns the model.

    Tensor names follow llama.cpp's; q/k rows are permuted into its rotary order, which transformers
    undoes when it reads the file.
    """
    import gguf

    model = tiny_llama(seed)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(0)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # HF -> llama.cpp rotary layout
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for key, value in model.state_dict().items():
        if key in top:
            name = top[key]
        else:
            parts = key.split(".")
            name = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:-1])]}"
            if name.endswith("attn_q"):
                value = permute(value, cfg.num_attention_heads)
            elif name.endswith("attn_k"):
                value = permute(value, cfg.num_key_value_heads)
        writer.add_tensor(f"{name}.weight", value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
