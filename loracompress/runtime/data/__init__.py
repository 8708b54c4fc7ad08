"""Calibration and evaluation data: read it from the user's files, split it, batch it.

Formats (chosen by extension, sniffed when there is none):

* JSON Lines (``.jsonl``; ``.json`` holding a list of records or one record per line),
* CSV / TSV with a header row (``.csv``, ``.tsv``),
* plain text (``.txt`` and anything else that is UTF-8 text): one sample per line, or one per
  paragraph when the file has blank lines,
* parquet (``.parquet``, read with pyarrow),
* a folder written by ``datasets.Dataset.save_to_disk`` (its ``.arrow`` files are read with
  pyarrow; the ``datasets`` package is not needed).

The text field is detected (``text``, ``sentence``, ``content``, …) or given. Prompt/completion
pairs (``prompt``+``completion``, ``prompt``+``response``, ``instruction``+``output``, …) are
detected for causal LMs: the loss is then taken on the completion tokens only. Sentence pairs
(``sentence1``+``sentence2``, ``premise``+``hypothesis``, …) are detected for classifiers. The
label field is detected among ``label``, ``labels``, ``target``, ``class``, ``y`` or given; string
labels take their class index from ``--label-map`` or the head's own ``id2label`` names, and are
refused for a head without names (read without a model, they are numbered in sorted order).
Line-based files are streamed and every text is cut to a character limit derived from
``--seq-len`` before it is tokenised; anything but a regular file or a folder is refused.

The package, one job per module:

* :mod:`.examples`: the :class:`Example` / :class:`Examples` records everything else passes around,
* :mod:`.readers`: a file or folder in, raw rows out (one reader per format),
* :mod:`.fields`: which fields hold the text, the second text and the label; rows to examples,
* :mod:`.labels`: label values to class indices, and the check against a head,
* :mod:`.reading`: :func:`read_examples`, the path-to-examples entry point (readers, fields, subset),
* :mod:`.split`: the seeded held-out split,
* :mod:`.batching`: tokenising and padding into model batches,
* :mod:`.for_model`: the helpers that look at a loaded base model (its task, pad id, label names).
"""

from loracompress.runtime.data.batching import (
    IGNORE_INDEX,
    MODEL_KEYS,
    char_limit,
    make_batches,
    model_inputs,
)
from loracompress.runtime.data.examples import Example, Examples
from loracompress.runtime.data.fields import COMPLETION_PAIRS, LABEL_FIELDS, SENTENCE_PAIRS, TEXT_FIELDS
from loracompress.runtime.data.for_model import (
    model_label2id,
    position_limit,
    prepare_model,
    read_for_model,
    task_of,
)
from loracompress.runtime.data.labels import LabelNames, check_labels, parse_label_map
from loracompress.runtime.data.readers import TEXT_SUFFIXES
from loracompress.runtime.data.reading import read_examples
from loracompress.runtime.data.split import split_eval

__all__ = [
    "COMPLETION_PAIRS",
    "IGNORE_INDEX",
    "LABEL_FIELDS",
    "MODEL_KEYS",
    "SENTENCE_PAIRS",
    "TEXT_FIELDS",
    "TEXT_SUFFIXES",
    "Example",
    "Examples",
    "LabelNames",
    "char_limit",
    "check_labels",
    "make_batches",
    "model_inputs",
    "model_label2id",
    "parse_label_map",
    "position_limit",
    "prepare_model",
    "read_examples",
    "read_for_model",
    "split_eval",
    "task_of",
]
