"""Pairwise fusion's units on hand-made cases: sequence alignment, token strings, vocabulary
maps, positions and fused targets on hand-computed numbers, the learning-rate schedule and the
batch shares; config, data and end-to-end runs are in test_fuse.py."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from fusion.api.vocab import VocabContext, edit_distance, pivot_index
from fusion.fuse.align import EXACT, FALLBACK, MAPPED, VocabMap, align_tokens, dtw, one_to_one
from fusion.fuse.distributions import align, fuse, softmax_rows
from fusion.fuse.represent import Representations
from fusion.fuse.tokens import surface_strings
from fusion.host import alignments, fusion_functions


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


def _offsets(tokens):
    ends = np.cumsum([len(t) for t in tokens])
    return np.stack([ends - [len(t) for t in tokens], ends], axis=1)


@pytest.mark.parametrize("pivot,source", [
    (["hel", "lo", " world", " again"], ["hello", " wor", "ld", " again"]),
    (["<s>", "a", "bc", "d", "ef", "g"], ["a", "b", "cd", "e", "f", "g"]),
    ([" the", " cat", " sat"], [" the", " cat", " sat"]),
    (["x", "y"], ["xy"]),
])
def test_piecewise_alignment_equals_whole_sequence_alignment(pivot, source):
    sa, sb = _offsets(pivot), _offsets(source)
    if pivot[0] == "<s>":  # a special token with no characters, as tokenizers add them
        sa = np.vstack([[0, 0], _offsets(pivot[1:])])
    assert align_tokens(pivot, source, sa, sb) == dtw(pivot, source, spans_a=sa, spans_b=sb)


def test_piecewise_alignment_keeps_identical_spans_one_to_one_and_handles_truncation():
    pivot = ["ab", "c", "de", "f"]
    source = ["a", "bc", "de", "f", "gh"]  # the pivot's text was cut short
    pairs = one_to_one(align_tokens(pivot, source, _offsets(pivot), _offsets(source)))
    # "ab"~"a" and "c"~"bc" pair up inside their piece; "de" shares its span; "f" also got "gh"
    assert pairs == {0: 0, 1: 1, 2: 2}


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


def test_nearest_token_search_equals_brute_force():
    import random

    from fusion.api.vocab import min_edit_distance_token

    rng = random.Random(3)
    alphabet = "abcdé Ġ"
    pivot = [""] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(400)]
    ctx = VocabContext(pivot, [], pivot_index(pivot))
    for _ in range(150):
        text = "".join(rng.choice(alphabet + "xyz") for _ in range(rng.randint(0, 9)))
        brute = min(range(1, len(pivot)), key=lambda p: (edit_distance(text, pivot[p]), p))
        assert min_edit_distance_token(text, ctx) == brute, text


def test_statistics_prefers_a_co_aligned_token_that_starts_the_source_token():
    # " dogs" was aligned with " cats" (5 times) and " dog" (once): " dog" starts " dogs" and is closer;
    # " doe" with " do" (2 times) and " cats" (7 times): " do" starts it;
    # "ings" only with "x": the only candidate wins although "ing" is closer
    ctx = _ctx({(2, 3): 5, (2, 4): 1, (4, 6): 2, (4, 3): 7, (3, 7): 1})
    table, _ = _map("statistics", ctx)
    assert table[2] == 4 and table[4] == 6 and table[3] == 7
    # " doe" is one edit from both " dog" and " do"; " do" starts it, however often " dog" was seen
    for counts in ({(4, 4): 1, (4, 6): 3}, {(4, 4): 3, (4, 6): 1}):
        assert _map("statistics", _ctx(counts))[0][4] == 6
    # neither starts "zzzzzzzz" and both are 8 edits away: the more frequent pairing wins
    assert _map("statistics", _ctx({(5, 7): 1, (5, 5): 3}))[0][5] == 5
    assert _map("statistics", _ctx({(5, 7): 3, (5, 5): 1}))[0][5] == 7
    # never co-aligned: minimum edit distance over the whole pivot vocabulary
    assert _map("statistics", _ctx())[0][2] == 4


def test_statistics_maps_a_token_the_pivot_splits_to_its_first_piece():
    """A coarse source token (" river") is aligned with each pivot piece (" ri", "ver") equally
    often and at the same edit distance; the piece the pivot writes first is the one it stands for."""
    pivot, source = ["<pad>", "ver", " ri", " riv", "er"], [" river"]
    for pairs in ({(0, 1): 3, (0, 2): 3}, {(0, 1): 9, (0, 2): 1}):
        ctx = VocabContext(pivot, source, pivot_index(pivot), Counter(pairs))
        assert _map_with("statistics", ctx, [0])[0] == {0: 2}
    # with the longer first piece among the candidates, the closer one wins
    ctx = VocabContext(pivot, source, pivot_index(pivot), Counter({(0, 2): 1, (0, 3): 1, (0, 4): 1}))
    assert _map_with("statistics", ctx, [0])[0] == {0: 3}


def _map_with(name, ctx, ids):
    vm = VocabMap(alignments()[name], ctx)
    vm.build(np.array(ids))
    return vm.table, vm.how


def test_special_tokens_map_to_their_counterparts_before_strings():
    # the source's "</s>" ends its turns; the pivot ends them with "<|end|>" although it also has a "</s>"
    pivot, source = ["</s>", "<|end|>", " a"], ["</s>", "<s>", " a"]
    ctx = VocabContext(pivot, source, pivot_index(pivot), counterparts={0: 1})
    table, how = _map_with("exact", ctx, [0, 1, 2])
    assert table == {0: 1, 1: -1, 2: 2} and how == {0: MAPPED, 2: EXACT}
    # a counterpart with the same string counts as exact
    ctx = VocabContext(pivot, pivot, pivot_index(pivot), counterparts={1: 1})
    assert _map_with("exact", ctx, [1])[1] == {1: EXACT}


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


def _reps(tokens, ids, response, topk_ids, topk_logits, ce):
    ends = np.cumsum([len(tokens[i]) for i in ids])
    offsets = np.stack([ends - [len(tokens[i]) for i in ids], ends], axis=1)
    return Representations(lengths=np.array([len(ids)]), input_ids=np.array(ids), response=np.array(response),
                           offsets=offsets,
                           topk_ids=np.array(topk_ids, dtype=np.int32),
                           topk_logits=np.array(topk_logits, dtype=np.float32), ce=np.array(ce, dtype=np.float32))


def _pair():
    """Pivot "a|bc|d|e" and source "a|b|c|D|e": "bc" is split, "d"/"D" differ, "e" is identical.

    The pivot predicts "bc" (id 0) with 0.75 and "q" with 0.25 everywhere."""
    pivot_tokens = ["bc", "a", "d", "e", "q"]
    source_tokens = ["a", "b", "c", "D", "e"]
    ln3 = math.log(3.0)
    pivot = _reps(pivot_tokens, [1, 0, 2, 3], [False, True, True, True], [[0, 4]] * 4, [[ln3, 0.0]] * 4, [1.0])
    # source position 3 ("D") predicts "e" with ids [4 ("e"), 1 ("b")] logits [ln 4, 0] → 0.8 / 0.2
    source = _reps(source_tokens, [0, 1, 2, 3, 4], [False, True, True, True, True], [[4, 1]] * 5,
                   [[math.log(4.0), 0.0]] * 5, [0.5])
    return pivot, source, pivot_tokens, source_tokens


def test_a_position_takes_the_source_prediction_where_both_have_read_the_same_text():
    pivot, source, pt, st = _pair()
    a = align(pivot, source, pt, st, alignments()["exact"], carry="all")
    # t=0 ("a" on both sides) predicts "bc", which the source splits: carried (FuseChat), then mapped;
    # t=1: the pivot's "bc" ends where the source's "c" does (the last piece): carried, and the next
    # tokens "d" / "D" cover the same character: exact; t=2 "d" ~ "D": exact
    assert list(a.status[:3]) == [MAPPED, EXACT, EXACT]
    assert a.coverage["positions"] == {"exact": 2, "mapped": 1, "fallback": 0}
    # the source predicts "e" (pivot 3) and "b" (no pivot token under `exact`: dropped)
    assert [list(a.ids[t][:2]) for t in range(3)] == [[3, -1]] * 3
    assert a.coverage["topk_tokens"] == {"exact": 3, "mapped": 0, "dropped": 3}
    # by default a source whose next token is only a piece of the pivot's ("b" of "bc") is not carried
    a = align(pivot, source, pt, st, alignments()["exact"])
    assert list(a.status[:3]) == [FALLBACK, EXACT, EXACT] and list(a.ids[0][:2]) == [0, -1]  # gold "bc"


def test_one_to_many_and_many_to_one_positions():
    from fusion.fuse.align import carried

    def spans(tokens, start=0):
        ends = start + np.cumsum([len(t) for t in tokens])
        return np.stack([ends - [len(t) for t in tokens], ends], axis=1)

    # the pivot splits "ab": its first piece has no source token ending with it (fallback); its
    # last piece ends with the source's "ab" and takes its prediction (whose next token, "cd",
    # is the same on both sides)
    rows, status, finer = carried(spans(["a", "b", "cd", "e"]), spans(["ab", "cd", "e"]))
    assert rows.tolist() == [-1, 0, 1, 2] and status.tolist()[:3] == [FALLBACK, EXACT, EXACT]
    assert not finer.any()
    # the source splits "ab": the pivot's whole token takes the source's last piece; before it, both
    # have read "x" and the source's next token ("a") is shorter than the pivot's ("ab"): mapped
    rows, status, finer = carried(spans(["x", "ab", "cd"]), spans(["x", "a", "b", "cd"]))
    assert rows.tolist() == [0, 2, 3] and status.tolist()[:2] == [MAPPED, EXACT]
    assert finer.tolist() == [True, False, False]  # "a" is a piece of what the pivot writes next
    # a coarser source: its next token "abc" covers the pivot's "a": mapped, not finer
    rows, status, finer = carried(spans(["x", "a", "bc"]), spans(["x", "abc"]))
    assert rows.tolist() == [0, -1, 1] and status[0] == MAPPED and not finer[0]
    # BOS: a zero-width token on both sides at 0 is carried; a BOS only the pivot has is not
    bos = np.array([[0, 0]])
    rows, *_ = carried(np.vstack([bos, spans(["ab"])]), np.vstack([bos, spans(["ab"])]))
    assert rows.tolist() == [0, 1]
    rows, *_ = carried(np.vstack([bos, spans(["ab"])]), spans(["ab"]))
    assert rows.tolist() == [-1, 0]
    # a text both cut short at different places: the pivot's tail has nothing to take
    rows, *_ = carried(spans(["ab", "cd", "ef"]), spans(["ab", "c"]))
    assert rows.tolist() == [0, -1, -1]


def test_unaligned_positions_fall_back_to_gold_or_to_the_pivot():
    pt, st = ["ab", "c", "d", "q"], ["a", "bc", "d"]
    pivot = _reps(pt, [0, 1, 2], [False, True, True], [[3, 2]] * 3, [[1.0, 0.0]] * 3, [1.0])
    source = _reps(st, [0, 1, 2], [False, True, True], [[2, 1]] * 3, [[1.0, 0.0]] * 3, [0.5])
    # t=0: the pivot has read "ab", the source only "a" or "abc": nothing to take; t=1: both "abc"
    gold = align(pivot, source, pt, st, alignments()["exact"])
    assert list(gold.status[:2]) == [FALLBACK, EXACT]
    assert list(gold.ids[0][:2]) == [1, -1]  # one-hot gold "c" (FuseChat's default)
    assert list(gold.ids[1][:2]) == [2, -1]  # the source's "d"; its "bc" has no pivot token
    own = align(pivot, source, pt, st, alignments()["exact"], fallback="pivot")
    assert list(own.ids[0][:2]) == [3, 2]  # the pivot's own top-k


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


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    from fusion.fuse.train import lr_factor

    assert [lr_factor(s, 10, 2) for s in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)  # half-way through the decay: cos(π/2)
    assert lr_factor(10, 10, 2) == pytest.approx(0.0)
    assert lr_factor(0, 10, 0) == 1.0


def test_every_process_gets_the_same_number_of_batches():
    from fusion.fuse.train import _batches

    order = np.arange(11)
    shares = [_batches(order, rank, 2, 3) for rank in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]  # ceil(11 / (3 · 2)) steps each
    seen = np.concatenate([b for s in shares for b in s])
    assert set(seen.tolist()) == set(range(11)) and len(seen) == 12  # one sequence wraps around


def test_softmax_rows_ignores_invalid_entries():
    p = softmax_rows(np.array([[0.0, math.log(3.0), 9.0]]), np.array([[True, True, False]]))
    assert p.tolist()[0] == pytest.approx([0.25, 0.75, 0.0])
