"""Token data: tokenizer wrapper, the embedded default corpus, local files, hub streaming, episode display,
and labelled data for fine-tuning evaluations (CoNLL-U, CoNLL/IOB columns, text/label tables).

Importing this package is cheap: ``tokenizers``, ``transformers``, ``datasets`` and ``pyarrow`` are imported
only by the functions that need them.
"""

from picomaml.data.corpus import EmbeddedCorpus, load_default_corpus, pack_rows
from picomaml.data.display import format_episode, format_window
from picomaml.data.hub import DOLMA, PretokenizedStream
from picomaml.data.labelled import (
    CONLLU_COLUMNS,
    LabelledText,
    TaggedSentence,
    read_conll,
    read_conllu,
    read_text_labels,
)
from picomaml.data.sources import TokenRows, iter_token_rows, load_token_rows
from picomaml.data.tokenizer import TokenizerWrapper, load_tokenizer, padded_vocab_size

__all__ = [
    "CONLLU_COLUMNS",
    "DOLMA",
    "LabelledText",
    "TaggedSentence",
    "read_conll",
    "read_conllu",
    "read_text_labels",
    "EmbeddedCorpus",
    "PretokenizedStream",
    "TokenRows",
    "TokenizerWrapper",
    "format_episode",
    "format_window",
    "iter_token_rows",
    "load_default_corpus",
    "load_token_rows",
    "load_tokenizer",
    "pack_rows",
    "padded_vocab_size",
]
