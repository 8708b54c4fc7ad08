"""Reading, splitting and batching calibration/evaluation data (loracompress.runtime.data)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from loracompress.errors import LoraCompressError
from loracompress.runtime.data import (
    IGNORE_INDEX,
    Example,
    LabelNames,
    char_limit,
    check_labels,
    make_batches,
    parse_label_map,
    read_examples,
    split_eval,
)
from tests.tiny import WORDS, tiny_sentences, tiny_tokenizer

ROWS = [
    {"id": 1, "review": "good movie", "label": "pos"},
    {"id": 2, "review": "bad film", "label": "neg"},
    {"id": 3, "review": "great story", "label": "pos"},
    {"id": 4, "review": "awful plot , too long", "label": "neg"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_save_to_disk(folder, rows, shards=2):
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow IPC *stream* shards + state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    names = []
    per = -(-len(rows) // shards)
    for i in range(shards):
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        table = pa.Table.from_pylist(rows[i * per:(i + 1) * per])
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        names.append(name)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return folder


EXPECTED = [("good movie", 1), ("bad film", 0), ("great story", 1), ("awful plot , too long", 0)]


@pytest.mark.parametrize("fmt", ["jsonl", "json_list", "json_wrapped", "csv", "tsv", "parquet", "datasets"])
def test_every_format_reads_the_same_examples(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json_list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "json_wrapped":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"version": 1, "data": ROWS}))
    elif fmt in ("csv", "tsv"):
        path = write_csv(tmp_path / f"d.{fmt}", ROWS, "\t" if fmt == "tsv" else ",")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        path = write_save_to_disk(tmp_path / "ds", ROWS)
    ex = read_examples(path)
    assert [(e.text, e.label) for e in ex] == EXPECTED
    assert ex.label_names == ["neg", "pos"]  # sorted order, recorded
    assert ex.info["text_field"] == "review" and ex.info["label_field"] == "label"


def test_plain_text_lines_and_paragraphs(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first sample\nsecond one\n\n")  # a trailing blank line alone is not a paragraph break
    assert [e.text for e in read_examples(lines)] == ["first sample", "second one"]
    para = tmp_path / "para.txt"
    para.write_text("para one line a\nline b\n\n\npara two\n")
    ex = read_examples(para)
    assert [e.text for e in ex] == ["para one line a\nline b", "para two"]
    assert all(e.label is None and e.completion is None for e in ex)
    noext = tmp_path / "corpus"
    noext.write_text("\ufeffbom is stripped\n")
    assert read_examples(noext)[0].text == "bom is stripped"


def test_csv_quoted_fields_and_integer_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a, b\nc",1\nplain,0\nthird, 2.0\n')
    ex = read_examples(path)
    assert [(e.text, e.label) for e in ex] == [("a, b\nc", 1), ("plain", 0), ("third", 2)]
    assert ex.label_names is None


def test_column_oriented_json(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": ["good", "bad"], "label": [1, 0]}))
    assert [(e.text, e.label) for e in read_examples(path)] == [("good", 1), ("bad", 0)]


def test_prompt_completion_and_sentence_pairs_are_detected(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: hi", "completion": " A: yo", "target": "x"}])
    e = read_examples(pc)[0]
    assert (e.text, e.completion, e.label) == ("Q: hi", " A: yo", None)  # "target" of LM data is no class
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "say", "output": "hey"}])
    assert read_examples(inst)[0].completion == "hey"
    pairs = write_jsonl(tmp_path / "nli.jsonl", [{"premise": "a dog", "hypothesis": "an animal", "label": 0}])
    e = read_examples(pairs)[0]
    assert (e.text, e.pair, e.label) == ("a dog", "an animal", 0)
    # An explicit --text-field wins over detection and disables pairing.
    e = read_examples(pc, text_field="completion")[0]
    assert (e.text, e.completion) == (" A: yo", None)


def test_given_fields_label2id_and_ignoring_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x y", "cls": "b"}, {"body": "z", "cls": "a"}])
    ex = read_examples(path, text_field="body", label_field="cls", label2id={"b": 0, "a": 1})
    assert [e.label for e in ex] == [0, 1] and ex.label_names == ["b", "a"]
    unlabelled = read_examples(write_jsonl(tmp_path / "l.jsonl", ROWS), label_field="")
    assert all(e.label is None for e in unlabelled)
    hf_test_split = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": -1}, {"text": "b", "label": -1}])
    assert all(e.label is None for e in read_examples(hf_test_split))


def test_max_samples_is_a_seeded_subset_in_file_order(tmp_path):
    rows = [{"text": f"sample {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = read_examples(path, max_samples=10, seed=1)
    b = read_examples(path, max_samples=10, seed=1)
    c = read_examples(path, max_samples=10, seed=2)
    idx = [int(e.text.split()[1]) for e in a]
    assert a == b and a != c
    assert len(a) == 10 and idx == sorted(idx) and len(set(idx)) == 10
    assert a.info["samples"] == 10 and a.info["total_samples"] == 50
    assert len(read_examples(path, max_samples=500)) == 50


def _many_rows(n, width=200):
    """``n`` rows with distinct texts of about ``width`` characters and three string labels."""
    return [{"id": i, "text": f"sample {i} " + WORDS[i % len(WORDS)] * (width // len(WORDS[i % len(WORDS)])),
             "label": ["neg", "neu", "pos"][i % 3], "source": "x" * 50} for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "datasets", "txt"])
def test_a_subset_read_in_two_passes_is_the_one_held_in_memory(tmp_path, fmt, monkeypatch):
    """Past HOLD_CHARS the first pass drops the texts and a second pass reads the chosen ones again:
    the same samples, labels, label names and counts as when the whole file is held."""
    import loracompress.runtime.data.fields as fields

    rows = _many_rows(3000, width=40)
    rows[7] = {"id": 7, "text": "", "label": "neg"}  # an empty text is skipped in both passes
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "csv":
        path = write_csv(tmp_path / "d.csv", rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    elif fmt == "datasets":
        path = write_save_to_disk(tmp_path / "ds", rows, shards=3)
    else:
        path = tmp_path / "d.txt"
        path.write_text("\n".join(r["text"] or "x" for r in rows) + "\n")
    held = read_examples(path, max_samples=25, seed=4)
    monkeypatch.setattr(fields, "HOLD_CHARS", 100)
    streamed = read_examples(path, max_samples=25, seed=4)
    assert [(e.text, e.label) for e in streamed] == [(e.text, e.label) for e in held]
    assert streamed.label_names == held.label_names and streamed.info == held.info
    assert held.info["total_samples"] == (3000 if fmt == "txt" else 2999) and len(held) == 25


def test_a_subset_of_a_huge_file_holds_the_subset_not_the_file(tmp_path, monkeypatch):
    """--max-samples bounds the memory of reading: past HOLD_CHARS (here made small, so that a 19 MB
    file is "huge") the rows are streamed twice, never held.

    Before, every row of the file was parsed into a dict and kept until the subset was taken (a
    330 MB JSONL of 2M rows peaked at 2.2 GB for 200 samples)."""
    import tracemalloc

    import loracompress.runtime.data.fields as fields

    monkeypatch.setattr(fields, "HOLD_CHARS", 2**18, raising=False)
    path = write_jsonl(tmp_path / "big.jsonl", _many_rows(60_000))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        ex = read_examples(path, max_samples=50, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ex) == 50 and ex.info["total_samples"] == 60_000
    assert size > 15 * 2**20
    # what stays is one label code per row (a few bytes each), not the rows
    assert peak < 0.3 * size, f"reading held {peak / size:.2f}x the file's size"


def test_a_file_that_changes_between_the_passes_is_refused(tmp_path):
    from loracompress.runtime.data.fields import examples_from_records

    rows = _many_rows(100, width=10)

    class Shrinking:
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(rows if self.passes <= 2 else rows[:60])  # the head, the count, then a shorter file

    with pytest.raises(LoraCompressError, match="changed while it was read"):
        import loracompress.runtime.data.fields as fields

        old, fields.HOLD_CHARS = fields.HOLD_CHARS, 10
        try:
            examples_from_records(Shrinking(), tmp_path / "d.jsonl", text_field=None, label_field=None,
                                  choose=lambda n: [0, n - 1])
        finally:
            fields.HOLD_CHARS = old


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_unicode_text_with_a_byte_order_mark_is_read(tmp_path, encoding):
    """Excel's "Unicode text" and "CSV UTF-8" exports: UTF-16 or UTF-8 with a byte-order mark."""
    path = tmp_path / "reviews.csv"
    text = "text,label\ncafé naïve movie,1\nbad film,0\n"
    bom = b"\xfe\xff" if encoding == "utf-16-be" else b""
    path.write_bytes(bom + text.encode(encoding))
    rows = read_examples(path)
    assert [r.text for r in rows] == ["café naïve movie", "bad film"] and [r.label for r in rows] == [1, 0]


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.jsonl", "not found"),
        (b"", "empty.jsonl", "no samples"),
        (b"\n\n  \n", "blank.txt", "no samples"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "img.txt", "binary"),
        ("caf\u00e9\n".encode("latin-1"), "latin.txt", "not UTF-8"),
        (b'{"text": "ok"}\n{"text": broken\n', "bad.jsonl", "line 2: not valid JSON"),
        (b'{"id": 1, "score": 0.5}\n', "nofield.jsonl", r"no text field found \(fields: id, score\)"),
        (b'{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n', "mixed.jsonl", "mixes label kinds"),
        (b'{"text": "a", "label": 0.5}\n', "float.jsonl", "non-class values"),
        (b'text,label\na,0.5\nb,1\n', "float.csv", "non-class values"),
        (b'{"text": "a", "label": 1}\n{"text": "b"}\n', "partial.jsonl", "1 of 2 samples have no 'label'"),
        (b'{"text": "a", "label": -3}\n', "neg.jsonl", "negative"),
        (b'{"text": ["a", "b"]}\n', "list.jsonl", "not text"),
        (b'[1, 2]', "nums.json", "expected an object"),
        (b'{"text": ""}\n', "emptytext.jsonl", "empty text"),
    ],
)
def test_bad_data_is_a_one_line_user_error(tmp_path, content, name, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LoraCompressError, match=match) as err:
        read_examples(path)
    assert "\n" not in str(err.value)


def test_unknown_fields_and_bad_folders(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(LoraCompressError, match=r"no field 'txt' \(fields: id, review, label\); fix --text-field"):
        read_examples(path, text_field="txt")
    with pytest.raises(LoraCompressError, match="fix --label-field"):
        read_examples(path, label_field="y")
    with pytest.raises(LoraCompressError, match="max-samples"):
        read_examples(path, max_samples=0)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LoraCompressError, match="not a datasets save_to_disk folder"):
        read_examples(tmp_path / "empty_dir")
    dd = tmp_path / "dd"
    write_save_to_disk(dd / "train", ROWS, shards=1)  # creates dd/ too
    write_save_to_disk(dd / "test", ROWS, shards=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(LoraCompressError, match="several splits .*test, train.*pass one split folder"):
        read_examples(dd)
    assert len(read_examples(dd / "test")) == 4
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(LoraCompressError, match="not a readable parquet"):
        read_examples(bad)


def test_split_eval_is_seeded_disjoint_and_complete():
    ex = [Example(text=f"s{i}") for i in range(20)]
    train, held = split_eval(ex, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(e.text for e in train + held) == sorted(e.text for e in ex)
    assert split_eval(ex, 0.25, seed=3) == (train, held)
    assert split_eval(ex, 0.25, seed=4)[1] != held
    assert [e.text for e in train] == [e.text for e in ex if e in train]  # file order kept
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(LoraCompressError, match="eval-fraction"):
            split_eval(ex, bad, seed=0)
    with pytest.raises(LoraCompressError, match="too few"):
        split_eval(ex[:1], 0.5, seed=0)


def test_check_labels_against_the_head():
    check_labels([Example("a", 0), Example("b", 2), Example("c")], 3)
    with pytest.raises(LoraCompressError, match="sample 1 has label 3 but the model's head has 3 classes"):
        check_labels([Example("a", 0), Example("b", 3)], 3)


# --------------------------------------------------------------------------- batching


def test_cls_batches_pad_right_truncate_and_carry_labels():
    tok = tiny_tokenizer("bert")
    texts = tiny_sentences(7, seed=1, min_words=2, max_words=30)
    ex = [Example(t, label=i % 3) for i, t in enumerate(texts)]
    batches = make_batches(ex, tok, task="cls", seq_len=16, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [i % 3 for i in range(7)]
    rows = [(b["input_ids"][r], b["attention_mask"][r]) for b in batches for r in range(b["input_ids"].shape[0])]
    for (ids, mask), text in zip(rows, texts):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (ids[n:] == tok.pad_token_id).all()
        expected = tok(text, truncation=True, max_length=16)["input_ids"]
        assert ids[:n].tolist() == expected and n <= 16
        assert ids[0] == tok.cls_token_id and ids[n - 1] == tok.sep_token_id  # truncation keeps specials
    # Some example without a label: no labels key at all (the engine then distils only).
    assert "labels" not in make_batches(ex[:2] + [Example("x y")], tok, task="cls", seq_len=16, batch_size=8)[0]


def test_cls_sentence_pairs_use_the_tokenizer_pair_encoding():
    tok = tiny_tokenizer("bert")
    b = make_batches([Example("good movie", 1, pair="bad film")], tok, task="cls", seq_len=16, batch_size=1)[0]
    assert b["input_ids"][0].tolist() == tok("good movie", "bad film")["input_ids"]


def test_lm_batches_mask_padding_and_prompt_tokens():
    tok = tiny_tokenizer("llama")
    ex = [Example("the movie is", completion=" very good"), Example("a long story about a dog and a cat")]
    b = make_batches(ex, tok, task="lm", seq_len=32, batch_size=2)[0]
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == labels.shape
    # prompt/completion: the prompt's tokens (with BOS) are ignored, the completion's count
    n_prompt = len(tok("the movie is")["input_ids"])
    n0 = int(mask[0].sum())
    assert (labels[0, :n_prompt] == IGNORE_INDEX).all()
    assert labels[0, n_prompt:n0].tolist() == ids[0, n_prompt:n0].tolist()
    assert [WORDS.index(w) + 4 for w in ("very", "good")] == ids[0, n_prompt:n0].tolist()
    assert (labels[0, n0:] == IGNORE_INDEX).all()
    # plain text: every real token counts, padding never
    assert torch.equal(labels[1], ids[1].masked_fill(mask[1] == 0, IGNORE_INDEX))


def test_lm_truncation_and_shuffle_are_deterministic():
    tok = tiny_tokenizer("gpt2")
    ex = [Example(t) for t in tiny_sentences(12, seed=2, min_words=5, max_words=40)]
    b = make_batches(ex, tok, task="lm", seq_len=8, batch_size=4)
    assert all(x["input_ids"].shape[1] <= 8 for x in b)
    s1 = make_batches(ex, tok, task="lm", seq_len=8, batch_size=4, shuffle=True, seed=5)
    s2 = make_batches(ex, tok, task="lm", seq_len=8, batch_size=4, shuffle=True, seed=5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(s1, s2))
    flat = sorted(tuple(r.tolist()) for x in s1 for r in x["input_ids"])
    assert flat == sorted(tuple(r.tolist()) for x in b for r in x["input_ids"])  # same samples, new order
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(s1, b))


def test_batching_errors():
    tok = tiny_tokenizer("gpt2")
    with pytest.raises(LoraCompressError, match="no tokenizer"):
        make_batches([Example("a")], None, task="lm", seq_len=8, batch_size=1)
    with pytest.raises(LoraCompressError, match="seq-len"):
        make_batches([Example("a")], tok, task="lm", seq_len=1, batch_size=1)
    with pytest.raises(LoraCompressError, match="no samples"):
        make_batches([], tok, task="lm", seq_len=8, batch_size=1)


# --------------------------------------------------------------------------- streaming, character limit, missing rows, labels


def test_streamed_text_reads_like_the_whole_file(tmp_path):
    """Line endings of every kind, leading whitespace of the file, blank runs: as the whole-file reader read them."""
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"  first sample \r\nsecond one\rthird\n")
    assert [e.text for e in read_examples(crlf)] == ["first sample", "second one", "third"]
    para = tmp_path / "para.txt"
    para.write_bytes(b"\n\n  para one\r\nline b\r\n \r\n\r\npara two\n\n")
    assert [e.text for e in read_examples(para)] == ["para one\nline b", "para two"]
    jsonl_crlf = tmp_path / "d.jsonl"
    jsonl_crlf.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n')
    assert [e.text for e in read_examples(jsonl_crlf)] == ["a", "b"]


def test_max_chars_cuts_lines_paragraphs_and_fields_while_reading(tmp_path):
    long_line = tmp_path / "one.txt"
    long_line.write_text("x" * 100_000 + "\nshort\n")
    assert [len(e.text) for e in read_examples(long_line, max_chars=50)] == [50, 5]
    para = tmp_path / "para.txt"
    para.write_text("\n".join(["y" * 30] * 10) + "\n\nnext\n")
    assert [len(e.text) for e in read_examples(para, max_chars=50)] == [50, 4]
    rows = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 80, "completion": "c" * 80}])
    e = read_examples(rows, max_chars=50)[0]
    assert (len(e.text), len(e.completion)) == (50, 50)


def test_the_character_cut_keeps_the_tokens(tmp_path):
    """Cutting at char_limit(tokenizer, seq_len) gives the very batches the whole text gives."""
    tok = tiny_tokenizer("llama")
    text = " ".join(tiny_sentences(400, max_words=12))
    limit = char_limit(tok, 16)
    assert limit == 16 * 32 and len(text) > 4 * limit
    whole = make_batches([Example(text=text)], tok, task="lm", seq_len=16, batch_size=1)
    cut = make_batches([Example(text=text[:limit])], tok, task="lm", seq_len=16, batch_size=1)
    assert torch.equal(whole[0]["input_ids"], cut[0]["input_ids"]) and whole[0]["input_ids"].shape[1] == 16


def test_samples_above_the_position_limit_are_refused():
    tok = tiny_tokenizer("bert")
    long = [Example(text=" ".join(WORDS[:70]), label=0)]
    with pytest.raises(LoraCompressError, match=r"64 positions and --seq-len 100 keeps them; pass --seq-len 64"):
        make_batches(long, tok, task="cls", seq_len=100, batch_size=1, max_positions=64)
    assert make_batches(long, tok, task="cls", seq_len=64, batch_size=1, max_positions=64)[0]["input_ids"].shape[1] == 64
    short = [Example(text="good movie", label=0)]
    assert make_batches(short, tok, task="cls", seq_len=1000, batch_size=1, max_positions=64)


def test_only_regular_files_and_folders_are_read(tmp_path):
    import os

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for p in (fifo, "/dev/zero", "/dev/null"):
        with pytest.raises(LoraCompressError, match="not a regular file"):
            read_examples(p)


def test_rows_without_the_field_are_missing_and_refused_above_five_percent(tmp_path, caplog):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"sentence" if i % 4 == 0 else "text": f"s {i}"} for i in range(20)])
    with pytest.raises(LoraCompressError, match=r"5 of 20 rows \(25%\) have no 'text' field \(they have 'sentence'\)"):
        read_examples(mixed)
    few = write_jsonl(tmp_path / "few.jsonl", [{"sentence" if i == 0 else "text": f"s {i}"} for i in range(40)]
                      + [{"text": ""}])
    ex = read_examples(few)
    assert len(ex) == 39
    assert "skipped 1 of 41 row(s) (2.44%) with no 'text' field" in caplog.text
    assert "skipped 1 sample(s) with an empty 'text'" in caplog.text


def test_parse_label_map():
    assert parse_label_map("fresh=1, rotten=0") == {"fresh": 1, "rotten": 0}
    assert parse_label_map("a=b=2") == {"a=b": 2}  # the index follows the last '='
    for bad, match in [("", "empty"), ("fresh", "NAME=INDEX"), ("=1", "NAME=INDEX"), ("a=x", "not a class index"),
                       ("a=-2", ">= 0"), ("a=1,a=2", "'a' twice"), ("a=1,b=1", "index 1 twice")]:
        with pytest.raises(LoraCompressError, match=match):
            parse_label_map(bad)


def test_string_labels_with_a_required_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(LoraCompressError, match=r"labels are names \('neg', 'pos'\).*--label-map neg=N,pos=N"):
        read_examples(path, label_names=LabelNames(None, required=True))
    ex = read_examples(path, label_names=LabelNames({"pos": 1, "neg": 0}, origin="--label-map"))
    assert [e.label for e in ex] == [1, 0, 1, 0] and ex.label_names == ["neg", "pos"]
    with pytest.raises(LoraCompressError, match="'pos' is not in --label-map"):
        read_examples(path, label_names=LabelNames({"neg": 0}, origin="--label-map"))
