"""Pairwise fusion (`fusion fuse`): alignment units on hand-made token sequences, vocabulary maps,
fusion functions on hand-computed numbers, config and data errors, and end-to-end runs on tiny
models with different tokenizers (knowledge transfer, resume, torchrun/DDP)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fusion.errors import ConfigError, FusionError
from fusion.fuse.align import (EXACT, FALLBACK, MAPPED, VocabMap, dtw, edit_distance, one_to_one,
                               pivot_index, surface_strings)
from fusion.fuse.api import VocabContext
from fusion.fuse.distributions import align, fuse, softmax_rows
from fusion.fuse.represent import Representations
from fusion.plugins import alignments, fusion_functions

ROOT = Path(__file__).resolve().parent.parent


# -- sequence alignment ------------------------------------------------------------------------

def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance(" cat", " cat") == 0


def test_identical_sequences_align_one_to_one():
    tokens = ["<s>", "Hello", " world", "!"]
    assert one_to_one(dtw(tokens, tokens)) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_merged_and_split_tokens_are_not_one_to_one():
    pivot = ["hel", "lo", " world", " again"]  # the source has "hello" as one token
    source = ["hello", " wor", "ld", " again"]  # ... and splits " world"
    path = dtw(pivot, source)
    assert path[0] == (0, 0) and path[-1] == (3, 3)
    assert set(path) >= {(0, 0), (1, 0), (2, 1), (2, 2), (3, 3)}
    assert one_to_one(path) == {3: 3}  # only " again" stands alone on both sides


def test_banded_alignment_matches_the_full_one_on_long_sequences():
    words = [f" w{i % 17}" for i in range(300)]
    split = [p for w in words for p in ((w[:2], w[2:]) if len(w) > 3 else (w,))]
    banded = dtw(words, split, band=16)
    full = dtw(words, split, band=10**9)
    assert banded == full
    assert len(one_to_one(banded)) == sum(len(w) <= 3 for w in words)


# -- token strings -----------------------------------------------------------------------------

def _tokenizer(kind: str):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=120 + len(alphabet), special_tokens=["<unk>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(["hello world, héllo again\nworld hello"] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte", "meta"])
def test_surface_strings_undo_tokenizer_markers(kind):
    tok = _tokenizer(kind)
    strings = surface_strings(tok)
    vocab = tok.get_vocab()
    assert " world" in strings and "Ġworld" not in strings and "▁world" not in strings
    assert strings[vocab["<unk>"]] == "<unk>"
    ids = tok("hello world, héllo again")["input_ids"]
    text = "".join(strings[i] for i in ids)
    assert text.strip() == "hello world, héllo again"


# -- vocabulary maps ---------------------------------------------------------------------------

PIVOT = ["<pad>", " the", " cat", " cats", " dog", "ing", " do", "x"]
SOURCE = [" the", " cat", " dogs", "ings", " doe", "zzzzzzzz"]


def _ctx(cooccurrence=()):
    return VocabContext(PIVOT, SOURCE, pivot_index(PIVOT), Counter(dict(cooccurrence)))


def _map(name, ctx):
    vm = VocabMap(alignments()[name], ctx)
    vm.build(np.arange(len(SOURCE)))
    return vm.table, vm.how


def test_exact_maps_only_identical_strings():
    table, how = _map("exact", _ctx())
    assert table == {0: 1, 1: 2, 2: -1, 3: -1, 4: -1, 5: -1}
    assert how == {0: EXACT, 1: EXACT}


def test_min_ed_maps_to_the_closest_pivot_token():
    table, how = _map("min_ed", _ctx())
    # " dogs" → " dog" (1 edit; " cats" and " do" are 2), "ings" → "ing"; " doe" is 1 edit from
    # both " dog" and " do": the lower id wins; "zzzzzzzz" is 8 edits from "<pad>" and no closer
    # to anything: the lowest id among the closest
    assert table[2] == 4 and table[3] == 5 and table[4] == 4
    assert table[5] == 0
    assert how[2] == MAPPED and how[0] == EXACT


def test_statistics_chooses_among_co_aligned_tokens_by_edit_distance_then_count():
    # " dogs" was aligned with " cats" (5 times) and " dog" (once): " dog" is closer, so it wins;
    # " doe" with " do" (1 edit) and " cats" (3 edits, though more often): " do";
    # "ings" only with "x": the only candidate wins although "ing" is closer
    ctx = _ctx({(2, 3): 5, (2, 4): 1, (4, 6): 2, (4, 3): 7, (3, 7): 1})
    table, _ = _map("statistics", ctx)
    assert table[2] == 4 and table[4] == 6 and table[3] == 7
    # ties in edit distance go to the more frequent pairing
    ctx = _ctx({(4, 4): 1, (4, 6): 3})
    assert _map("statistics", ctx)[0][4] == 6
    ctx = _ctx({(4, 4): 3, (4, 6): 1})
    assert _map("statistics", ctx)[0][4] == 4
    # never co-aligned: minimum edit distance over the whole pivot vocabulary
    assert _map("statistics", _ctx())[0][2] == 4


# -- fusion functions and fused targets --------------------------------------------------------

def test_min_ce_picks_the_lower_cross_entropy_and_the_pivot_on_ties():
    f = fusion_functions()["min_ce"]
    assert f.weights([1.2, 0.7]) == [0.0, 1.0]
    assert f.weights([0.7, 1.2]) == [1.0, 0.0]
    assert f.weights([0.9, 0.9]) == [1.0, 0.0]


def test_avg_ce_weights_are_softmax_of_exp_minus_ce():
    w = fusion_functions()["avg_ce"].weights([1.0, 2.0])
    # exp(-1) = 0.367879, exp(-2) = 0.135335; softmax: 1/(1 + e^(0.135335-0.367879)) = 0.557875
    assert w[0] == pytest.approx(0.557875, abs=2e-6)
    assert w[1] == pytest.approx(0.442125, abs=2e-6)


def _reps(ids, response, topk_ids, topk_logits, ce):
    return Representations(lengths=np.array([len(ids)]), input_ids=np.array(ids), response=np.array(response),
                           topk_ids=np.array(topk_ids, dtype=np.int32),
                           topk_logits=np.array(topk_logits, dtype=np.float32), ce=np.array(ce, dtype=np.float32))


def _pair():
    """Pivot "a|bc|d|e" and source "a|b|c|D|e": "bc" is split, "d"/"D" differ, "e" is identical.

    The pivot predicts "bc" (id 0) with 0.75 and "q" with 0.25 everywhere."""
    pivot_tokens = ["bc", "a", "d", "e", "q"]
    source_tokens = ["a", "b", "c", "D", "e"]
    ln3 = math.log(3.0)
    pivot = _reps([1, 0, 2, 3], [False, True, True, True], [[0, 4]] * 4, [[ln3, 0.0]] * 4, [1.0])
    # source position 3 ("D") predicts "e" with ids [4 ("e"), 1 ("b")] logits [ln 4, 0] → 0.8 / 0.2
    source = _reps([0, 1, 2, 3, 4], [False, True, True, True, True], [[4, 1]] * 5,
                   [[math.log(4.0), 0.0]] * 5, [0.5])
    return pivot, source, pivot_tokens, source_tokens


def test_alignment_carries_source_distributions_to_one_to_one_positions():
    pivot, source, pt, st = _pair()
    a = align(pivot, source, pt, st, alignments()["exact"])
    # t=0 predicts "bc" (split in the source): fallback; t=1 predicts "d" ~ "D": one-to-one but
    # different strings (mapped); t=2 predicts "e": exact
    assert list(a.status[:3]) == [FALLBACK, MAPPED, EXACT]
    assert a.coverage["positions"] == {"exact": 1, "mapped": 1, "fallback": 1}
    assert list(a.ids[0][:2]) == [0, 4]  # the pivot's own top-k at the fallback position
    # at t=2 the source's "e" maps to pivot 3 exactly, its "b" has no pivot token under `exact`
    assert list(a.ids[2][:2]) == [3, -1]
    assert a.coverage["topk_tokens"]["dropped"] > 0
    gold = align(pivot, source, pt, st, alignments()["exact"], fallback="gold")
    assert list(gold.ids[0][:2]) == [0, -1]  # one-hot gold "bc"


def test_fused_targets_min_ce_and_avg_ce_on_hand_computed_numbers():
    pivot, source, pt, st = _pair()
    # "b" is 1 edit from every pivot token: the lowest id, "bc", wins
    a = align(pivot, source, pt, st, alignments()["min_ed"])
    assert list(a.ids[2][:2]) == [3, 0]
    # min_ce: the source (CE 0.5 < 1.0) wins the sequence: position 2 is the source's 0.8 / 0.2
    t = fuse(pivot, a, source.ce, fusion_functions()["min_ce"])
    assert list(t.weights[0]) == [0.0, 1.0]
    assert dict(zip(t.ids[2][:2].tolist(), t.probs[2][:2].tolist())) == pytest.approx({3: 0.8, 0: 0.2})
    # avg_ce: w = softmax([e^-1, e^-0.5]) = softmax([0.367879, 0.606531]) = [0.440619, 0.559381];
    # the pivot's own is 0.75 on id 0 and 0.25 on id 4
    t = fuse(pivot, a, source.ce, fusion_functions()["avg_ce"])
    w0, w1 = 0.440619, 0.559381
    got = {i: p for i, p in zip(t.ids[2].tolist(), t.probs[2].tolist()) if i >= 0}
    assert got == pytest.approx({0: w0 * 0.75 + w1 * 0.2, 4: w0 * 0.25, 3: w1 * 0.8}, abs=1e-5)
    assert sum(got.values()) == pytest.approx(1.0)


def test_softmax_rows_ignores_invalid_entries():
    p = softmax_rows(np.array([[0.0, math.log(3.0), 9.0]]), np.array([[True, True, False]]))
    assert p.tolist()[0] == pytest.approx([0.25, 0.75, 0.0])
