"""Padding of id lists, collation, and encoding instruction rows (shared by pipeline and probe)."""

from __future__ import annotations

import torch

from data.formatting import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_example,
    encode_rows,
    left_pad,
    right_pad,
)
from tests.helpers.tiny import byte_tokenizer


def test_right_and_left_pad_place_the_content_and_the_mask():
    seqs = [[5, 6, 7], [8], []]
    ids, mask = right_pad(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = left_pad(seqs, pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_collate_pads_ids_with_pad_and_labels_with_ignore():
    examples = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3], "en", "a"), Example([4], [4], "sw", "b")]
    batch = collate(examples, pad_id=0, languages=["en", "sw"])
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.lang_ids.tolist() == [0, 1]


def test_encode_rows_keeps_wanted_languages_and_counts_the_too_long():
    tok = byte_tokenizer()
    rows = [
        {"lang": "en", "instruction": "Hi", "response": "Hello there", "id": "1"},
        {"lang": "fr", "instruction": "Salut", "response": "Bonjour", "id": "2"},
        {"lang": "de", "instruction": "Hallo", "response": "Guten Tag", "id": "3"},
        {"lang": "en", "instruction": "x" * 200, "response": "too long", "id": "4"},
    ]
    examples, dropped = encode_rows(tok, rows, {"en", "fr"}, max_length=64)
    assert [e.id for e in examples] == ["1", "2"] and dropped == 1
    one = encode_example(tok, "Salut", "Bonjour", lang="fr", id="2", max_length=64)
    assert examples[1] == one  # the same example encode_example gives
