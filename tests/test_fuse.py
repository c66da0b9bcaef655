"""Pairwise fusion (`fusion fuse`): alignment units on hand-made token sequences, vocabulary maps,
fusion functions on hand-computed numbers, config and data errors, and end-to-end runs on tiny
models with different tokenizers (knowledge transfer, resume); torchrun and FSDP are in test_fuse_scale.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fusion.api.errors import ConfigError, FusionError
from fusion.fuse.align import EXACT, FALLBACK, MAPPED, VocabMap, align_tokens, dtw, one_to_one
from fusion.api.vocab import edit_distance, pivot_index
from fusion.fuse.tokens import surface_strings
from fusion.api.vocab import VocabContext
from fusion.fuse.distributions import align, fuse, softmax_rows
from fusion.fuse.represent import Representations
from fusion.host import alignments, fusion_functions

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


# -- config and data ---------------------------------------------------------------------------

def _config(tmp_path, text):
    from fusion.fuse.config import parse_fuse_config

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "fuse.yaml"
    path.write_text(text)
    return parse_fuse_config(text, source=path)


@pytest.mark.parametrize("text,path,line,words", [
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nepochs: 3\n", "epochs", 4, "unknown key"),
    ("pivot: ./p\nsources: [./s]\ndata: missing.jsonl\n", "data", 3, "does not exist"),
    ("pivot: ./p\nsources: []\ndata: d.jsonl\n", "sources", 2, "non-empty list"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: fuzzy\n", "alignment", 4, "min_ed"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nfusion_function: max\n", "fusion_function", 4, "avg_ce"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining:\n  lm_loss_weight: 1.5\n",
     "training.lm_loss_weight", 5, "out of range"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {epochs: 0}\n", "training.epochs", 4, "greater than 0"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {dtype: int8}\n", "training.dtype", 4, "bfloat16"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nmerge: {method: sce, parameters: {density: 0.5}}\n",
     "merge.parameters.density", 4, "select_topk"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nmerge: {method: nope}\n", "merge.method", 4, "ties"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nrepresentations: {store_dtype: bfloat16}\n",
     "representations.store_dtype", 4, "float16"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nrepresentations:\n  dtype: int4\n", "representations.dtype", 5, "auto"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {strategy: zero3}\n", "training.strategy", 4, "fsdp"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {packing: 1}\n", "training.packing", 4, "true or false"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: {method: exact, carry: more}\n", "alignment.carry", 4,
     "coarser"),
])
def test_config_errors_name_the_path_and_line(tmp_path, text, path, line, words):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, text)
    assert info.value.path == path and info.value.line == line, str(info.value)
    assert words in str(info.value)


def test_config_defaults_follow_fusechat(tmp_path):
    c = _config(tmp_path, "pivot: ./p\nsources:\n  - model: ./s\ndata: d.jsonl\nalignment: {method: min_ed, "
                          "fallback: gold}\n")
    assert (c.representations.top_k, c.alignment, c.fallback, c.fusion_function) == (10, "min_ed", "gold", "min_ce")
    t = c.training
    assert (t.lm_loss_weight, t.epochs, t.learning_rate, t.warmup_ratio) == (0.9, 3, 5e-6, 0.03)
    assert (c.merge_method, c.merge_parameters["select_topk"]) == ("sce", 0.1)


def test_every_fuse_setting_is_documented():
    from dataclasses import fields

    from fusion.fuse.config import RepresentationSettings, Training

    doc = (ROOT / "docs" / "fuse.md").read_text()
    for prefix, cls in (("representations", RepresentationSettings), ("training", Training)):
        for f in fields(cls):
            assert f"| `{prefix}.{f.name}` |" in doc, f"{prefix}.{f.name} is not in the table of docs/fuse.md"
    for key in ("alignment.fallback", "alignment.carry", "fusion_function"):
        assert f"| `{key}` |" in doc


def test_chat_formatting_masks_prompts(tmp_path):
    from fuse_models import make_tokenizer

    from fusion.fuse.data import encode, load_examples

    tok = make_tokenizer(tmp_path / "tok", "byte", 320)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "count from apple"}, {"role": "assistant", "content": "river stone"},
                      {"role": "user", "content": "count from ocean"}, {"role": "assistant", "content": "ember"}]},
        {"prompt": "count from tiger", "response": "maple"},
        {"text": "lotus raven"},
    ]) + "\n")
    chat, pr, text = load_examples(tmp_path / "d.jsonl", tok)
    learned = ["".join(chat.text[a:b] for a, b in chat.spans)]
    assert learned == ["river stone<|end|>\nember<|end|>\n"]
    ids, response = encode(tok, pr, 64)
    assert tok.decode(ids[response]) == "maple<|end|>\n"
    assert tok.decode(ids[~response]).startswith("<|user|>count from tiger")
    ids, response = encode(tok, text, 64)
    assert response.all()


def test_data_errors_name_file_and_line(tmp_path):
    from fusion.fuse.data import load_examples

    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(FusionError, match=r"d.jsonl:2: the conversation has no assistant message"):
        load_examples(tmp_path / "d.jsonl", None)
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(FusionError, match=r"d.jsonl:2: not valid JSON"):
        load_examples(tmp_path / "d.jsonl", None)


def test_without_transformers_fuse_says_how_to_install_and_merge_still_works(tmp_path):
    from fusion.demo import make_family

    make_family(tmp_path)
    (tmp_path / "merge.yaml").write_text("merge_method: task_arithmetic\nbase_model: ./base\n"
                                         "models:\n  - model: ./chat\n  - model: ./code\n")
    (tmp_path / "fuse.yaml").write_text("pivot: ./base\nsources: [./chat]\ndata: d.jsonl\n")
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from fusion.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
              "    raise\n")
    merged = subprocess.run([sys.executable, "-c", script, "merge", "merge.yaml", "-o", "out", "-q"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    fused = subprocess.run([sys.executable, "-c", script, "fuse", "fuse.yaml", "-o", "fused"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert fused.returncode == 1
    assert fused.stderr.strip() == ("error: `fusion fuse` needs transformers; install it with: "
                                    "pip install 'model-fusion[fuse]'")
    assert not (tmp_path / "fused").exists()


# -- end to end on tiny models -----------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tiny models and data, built once per test run (shared by the xdist workers)."""
    from fuse_models import build_fusion_case, shared_case

    return shared_case(tmp_path_factory, "fuse-case", build_fusion_case, "heldout.jsonl")


def _copy_case(case: Path, tmp_path: Path) -> Path:
    import shutil

    for name in ("pivot", "source_a", "source_b"):
        shutil.copytree(case / name, tmp_path / name)
    for name in ("train.jsonl", "heldout.jsonl"):
        shutil.copyfile(case / name, tmp_path / name)
    return tmp_path


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_knowledge_transfer_through_aligned_distributions(case, tmp_path):
    """Distillation only (λ = 0): whatever the targets learn of the pattern came through the
    aligned source distributions, also from the source whose tokenizer differs from the pivot's."""
    import transformers

    from fuse_models import write_config
    from fusion.fuse.pipeline import run_fuse

    root = _copy_case(case, tmp_path)
    inputs = _mtimes(root)
    # unaligned positions learn the pivot's own distribution, so nothing of the pattern leaks in there
    config = write_config(root, lm_loss_weight=0.0, alignment="{method: statistics, fallback: pivot}")
    out = root / "out"
    messages = []
    report = run_fuse(config, out, echo=messages.append)
    held = report["heldout_loss"]
    pivot = held["pivot"]
    for name in ("pivot-source_a", "pivot-source_b"):
        assert held["targets"][name] < 0.6 * pivot, held
    assert held["merged"] < 0.6 * pivot, held

    # alignment: the shared vocabulary aligns exactly; the other one partly maps and falls back
    cov_a, cov_b = report["alignment"]["source_a"], report["alignment"]["source_b"]
    assert cov_a["positions"]["exact"] == sum(cov_a["positions"].values()) > 0
    assert cov_b["positions"]["exact"] > 0 and cov_b["positions"]["fallback"] > 0
    assert cov_b["topk_tokens"]["exact"] > 0
    # the sources know the pattern, the pivot does not: MinCE picks the sources
    for name in ("source_a", "source_b"):
        f = report["fusion"][name]
        assert f["source_chosen"] > 0.9 * report["data"]["train"], f
        curve = report["training"][name]["curve"]
        assert curve[-1]["distill_loss"] < 0.5 * curve[0]["distill_loss"]
        assert all(e["lm_loss"] >= 0 for e in curve)
    assert set(report["stages"]) == {"represent", "fuse", "train", "merge", "evaluate"}

    # the outputs: loadable models with cards, the report, the plot; inputs untouched
    for folder in (out / "targets" / "pivot-source_b", out / "merged"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert model(**tok("count from apple", return_tensors="pt")).logits.shape[-1] == len(tok)
        assert "fusion" in (folder / "README.md").read_text()
    assert "source_b" in (out / "targets" / "pivot-source_b" / "README.md").read_text()
    assert "pairwise knowledge fusion" in (out / "merged" / "README.md").read_text()
    assert json.loads((out / "report.json").read_text())["heldout_loss"] == held
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "report.md").read_text()
    assert "held-out loss" in summary and "represent" in summary and "fallback" in summary
    assert _mtimes(root / "pivot") == {k[len("pivot/"):]: v for k, v in inputs.items() if k.startswith("pivot/")}

    # a second run reuses everything it can and gives the same result
    before = _mtimes(out / "cache")
    again = run_fuse(config, out, echo=lambda _m: None)
    assert again["stages"]["represent"]["reused"] == 3
    assert all(t["reused"] for t in again["training"].values())
    assert again["stages"]["merge"]["note"] == again["stages"]["evaluate"]["note"] == "reused"
    assert _mtimes(out / "cache") == before
    assert again["heldout_loss"]["targets"] == pytest.approx(held["targets"])
    assert again["heldout_loss"]["merged"] == pytest.approx(held["merged"])


@pytest.mark.slow
def test_interrupted_run_resumes_from_the_representations(case, tmp_path, monkeypatch, capsys):
    from fuse_models import write_config
    from fusion.cli import main
    from fusion.fuse import train

    root = _copy_case(case, tmp_path)
    config = write_config(root, sources=("source_b",), epochs=2, alignment="min_ed", function="avg_ce")
    out = root / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during training

    with monkeypatch.context() as m:
        m.setattr(train, "distil", interrupted)
        with pytest.raises(SystemExit) as stop:
            main(["fuse", str(config), "-o", str(out), "-q"])
    assert stop.value.code == 130
    assert "a re-run resumes" in capsys.readouterr().err
    cached = _mtimes(out / "cache")
    assert {"represent-pivot/chunk-00000.safetensors", "represent-source_b/chunk-00000.safetensors"} <= set(cached)
    assert not (out / "targets" / "pivot-source_b").exists()  # a target is complete or absent
    assert not list((out / "targets").iterdir())

    main(["fuse", str(config), "-o", str(out), "-q"])
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["represent"]["reused"] == 2 and report["stages"]["represent"]["computed"] == 0
    assert all(_mtimes(out / "cache")[name] == t for name, t in cached.items())
    assert report["training"]["source_b"]["curve"], report
    # avg_ce: both sides weigh in; softmax(exp(−CE)) never gives one side more than e/(1 + e) = 0.731
    assert 0.5 < report["fusion"]["source_b"]["source_weight_mean"] < 0.731
    assert "one source" in " ".join(report["notes"])

    # --until stops after a stage; representations are redone only when what they depend on changes
    write_config(root, sources=("source_b",), epochs=2, alignment="exact", function="avg_ce")
    main(["fuse", str(config), "-o", str(out), "--until", "fuse", "-q"])
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["represent"]["reused"] == 2 and "train" not in report["stages"]
    config.write_text(config.read_text().replace("top_k: 10", "top_k: 5"))
    main(["fuse", str(config), "-o", str(out), "--until", "represent", "-q"])
    assert json.loads((out / "report.json").read_text())["stages"]["represent"]["computed"] == 2


def test_a_plugin_adds_an_alignment_and_a_fusion_function(tmp_path, monkeypatch):
    """The docs/plugins.md examples, loaded as a local plugin file, work as built-ins do."""
    import re

    from fusion import host as pm

    doc = (ROOT / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(import fusion\n\nclass Lowercase.*?)```", doc, re.S).group(1)
    code += '''
class SourceOnly(fusion.FusionFunction):
    name = "source_only"
    description = "Always the aligned source distribution."

    def weights(self, ce):
        return [0.0, 1.0]

@fusion.hookimpl
def register_fusion_functions(register):
    register(SourceOnly())
'''
    (tmp_path / "my_plugin.py").write_text(code)
    monkeypatch.setattr(pm, "_local_plugins", [])
    pm.add_local_plugin(str(tmp_path / "my_plugin.py"))
    try:
        ctx = VocabContext([" The", " cat"], [" the", " CAT", " dog"], pivot_index([" The", " cat"]))
        vm = VocabMap(pm.alignments()["lowercase"], ctx)
        vm.build(np.array([0, 1, 2]))
        assert vm.table == {0: 0, 1: 1, 2: -1}
        c = _config(tmp_path, "pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: lowercase\n"
                              "fusion_function: source_only\n")
        assert (c.alignment, c.fusion_function) == ("lowercase", "source_only")
        info = next(i for i in pm.plugin_infos() if i.name == "my_plugin")
        assert (info.alignments, info.fusion_functions) == (["lowercase"], ["source_only"])
    finally:
        pm.reset()


def test_representations_match_the_model(case):
    """Top-k ids/logits are the model's own forward's (scored through the decoder and the output
    layer a few positions at a time), and the sequence CE is transformers' own masked loss, on
    the source's own reading of the pivot-rendered text."""
    import torch

    from fusion.fuse import models, represent
    from fusion.fuse.data import load_examples
    from fusion.fuse.reading import read, source_reading

    tok = models.load_tokenizer(case / "source_b", "source_b")
    model = models.load_model(case / "source_b", "source_b")
    pivot_tok = models.load_tokenizer(case / "pivot", "pivot")
    examples = load_examples(case / "heldout.jsonl", pivot_tok)[:5]
    reading = source_reading(tok, pivot_tok)
    old_chunk, represent.HEAD_CHUNK = represent.HEAD_CHUNK, 7  # several output-layer chunks per batch
    try:
        reps = represent.score(model, reading, examples, top_k=4, max_length=64, batch_size=3)
    finally:
        represent.HEAD_CHUNK = old_chunk
    assert represent.head_matches(model, reading, examples[0])
    assert len(reps) == 5 and reps.topk_ids.shape == (int(reps.lengths.sum()), 4)
    for i, e in enumerate(examples):
        ids, response, _ = read(reading, e.text, e.spans, e.chat, 64)
        assert (reps.input_ids[reps.span(i)] == ids).all() and (reps.response[reps.span(i)] == response).all()
        x = torch.from_numpy(ids)[None]
        with torch.no_grad():
            out = model(input_ids=x, labels=x.masked_fill(~torch.from_numpy(response)[None], -100))
        assert reps.ce[i] == pytest.approx(float(out.loss), rel=1e-4)
        top = out.logits[0].topk(4, -1)
        assert (reps.topk_ids[reps.span(i)] == top.indices.numpy()).all()
        assert np.allclose(reps.topk_logits[reps.span(i)], top.values.numpy(), atol=1e-4)


def test_cli_reports_a_bad_fuse_config_in_one_sentence(tmp_path, capsys):
    from fusion.cli import main

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "fuse.yaml").write_text("pivot: ./p\nsources: [./s]\ndata: d.jsonl\n"
                                        "training:\n  learning_rate: fast\n")
    with pytest.raises(SystemExit) as stop:
        main(["fuse", str(tmp_path / "fuse.yaml"), "-o", str(tmp_path / "out")])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: training.learning_rate (line 5): must be a number, not 'fast'"
    assert not (tmp_path / "out").exists()


def test_help_and_plugins_stay_light():
    code = """
import sys
from fusion.cli import main
main(["plugins"])
try:
    main(["fuse", "--help"])
except SystemExit:
    pass
heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "alignment statistics" in result.stdout and "fusion function avg_ce" in result.stdout
    assert "--until" in result.stdout


@pytest.mark.slow
def test_a_source_named_by_its_hub_name(case, tmp_path, monkeypatch):
    """Models are named as everywhere else: a Hub name resolves (a local fake Hub) and is scored."""
    import importlib

    import huggingface_hub.constants
    from hubserver import FakeHub

    from fuse_models import write_config
    from fusion import host as plugins
    from fusion.fuse.pipeline import run_fuse

    root = _copy_case(case, tmp_path)
    hub = FakeHub(tmp_path / "hub-repos").start()
    try:
        sha = hub.commit("org/source-b", root / "source_b")
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        importlib.reload(huggingface_hub.constants)
        plugins.reset()
        config = write_config(root, sources=("source_a",))
        config.write_text(config.read_text().replace("  - model: ./source_a", "  - model: org/source-b@main"))
        report = run_fuse(config, root / "out", until="fuse", echo=lambda _m: None)
    finally:
        hub.stop()
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
        plugins.reset()
    assert report["sources"][0]["reference"] == "org/source-b@main" and sha in report["sources"][0]["path"]
    assert report["sources"][0]["name"] == "source-b"
    cov = report["alignment"]["source-b"]["positions"]
    assert cov["exact"] > cov["fallback"] > 0
