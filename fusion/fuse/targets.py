"""Stage 2 of `fusion fuse` over chunks: align each source to the pivot and fuse the two.

Pass 1 (per chunk, spread over the processes): which source position each pivot position takes,
and the aligned token pairs. Then one process builds the vocabulary map from every chunk's pairs
(the ``statistics`` map needs all of them). Pass 2 (per chunk): map, fall back and fuse. Each
pass writes one file per chunk, so an interrupted stage resumes with the chunks still missing;
changing only the fusion function or the fallback redoes pass 2 alone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..api.vocab import Alignment, FusionFunction, VocabContext, pivot_index
from .cache import load_arrays, save_arrays
from .distributions import apply_map, counter, fuse, positions, sequence_weights, targets_key, vocabulary
from .parallel import Workers, barrier
from .represent import Representations
from .shards import Store

#: the alignment chunks' layout, part of their store's key: chunks of another layout (from
#: another version of this stage) are made again instead of being read as done
ALIGN_FORMAT = 2
STAT_NAMES = (("positions", "exact"), ("positions", "mapped"), ("positions", "fallback"),
              ("topk_tokens", "exact"), ("topk_tokens", "mapped"), ("topk_tokens", "dropped"))
_state: dict[str, Any] = {}


def _init(state: dict[str, Any]) -> None:
    _state.clear()
    _state.update(state)


def _reps(store: Store, c: int, what: str) -> Representations:
    return Representations.from_arrays(store.require(c, what))


def _first_pass(c: int) -> None:
    s = _state
    out = positions(_reps(s["pivot"], c, "pivot representations"), _reps(s["source"], c, "source representations"),
                    s["pivot_tokens"], s["source_tokens"], s["pairs"])
    s["align"].write(c, out)


def _second_pass(c: int, weights: np.ndarray) -> None:
    s = _state
    if "table" not in s:  # built after the pool started: every worker reads it once
        vocab = load_arrays(s["vocab_path"], s["vocab_key"])
        s["table"], s["how"] = vocab["table"], vocab["how"]
    pivot, source = _reps(s["pivot"], c, "pivot representations"), _reps(s["source"], c, "source representations")
    first = s["align"].require(c, "alignment")
    aligned = apply_map(pivot, source, first["rows"], first["status"], first["finer"], s["table"], s["how"],
                        s["fallback"], s["carry"])
    fused = fuse(pivot, aligned, weights=weights)
    cov = aligned.coverage
    stats = np.array([cov[a][b] for a, b in STAT_NAMES], dtype=np.int64)
    s["fused"].write(c, {"ids": fused.ids.astype(np.int32), "probs": fused.probs.astype(s["store_dtype"]),
                         "weights": fused.weights.astype(np.float32), "stats": stats})


def stores(cache: Path, name: str, pivot: Store, source: Store, alignment: Alignment,
           counterparts: dict[int, int], function: FusionFunction, fallback: str,
           store_dtype: str, carry: str) -> tuple[Store, tuple[Path, str], Store]:
    """The alignment chunks, the vocabulary map file (and its key) and the fused chunks of one
    source, each keyed by what it is made from."""
    first = targets_key("align", ALIGN_FORMAT, pivot.key, source.key, alignment.uses_pairs)
    vocab = targets_key("vocab", first, alignment.name, sorted(counterparts.items()))
    fused = targets_key("fused", vocab, fallback, carry, function.name, store_dtype)
    return (Store(cache / f"align-{name}", first, pivot.layout), (cache / f"vocab-{name}.safetensors", vocab),
            Store(cache / f"fused-{name}", fused, pivot.layout))


def build(*, cache: Path, name: str, pivot: Store, source: Store, pivot_tokens: Sequence[str],
          source_tokens: Sequence[str], alignment: Alignment, counterparts: dict[int, int],
          function: FusionFunction, fallback: str, store_dtype: str, rank: int, size: int, workers: int,
          carry: str, progress: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Make (or reuse) the fused targets of one source; returns the summary on process 0."""
    first, (vocab_path, vocab_key), fused = stores(cache, name, pivot, source, alignment, counterparts, function,
                                                   fallback, store_dtype, carry)
    info_path = cache / f"fused-{name}.json"
    if rank == 0:
        first.prepare()
        fused.prepare()
    barrier()
    layout = pivot.layout
    vocab = load_arrays(vocab_path, vocab_key)
    reused = _info(info_path, fused.key) is not None and vocab is not None and not fused.missing()
    state = {"pivot": pivot, "source": source, "align": first, "fused": fused, "pivot_tokens": list(pivot_tokens),
             "source_tokens": list(source_tokens), "pairs": alignment.uses_pairs, "fallback": fallback,
             "store_dtype": store_dtype, "carry": carry, "vocab_path": vocab_path, "vocab_key": vocab_key}
    mine = layout.share(rank, size) if size > 1 else list(range(layout.chunks))
    todo = [c for c in mine if not first.done(c) and (vocab is None or not fused.done(c))]
    with Workers(workers if size == 1 else 1, _init, (state,)) as pool:
        pool.run(_first_pass, [(c,) for c in todo], progress)
        barrier()
        if vocab is None:
            if rank == 0:
                save_arrays(vocab_path, _build_vocab(first, pivot_tokens, source_tokens, alignment, counterparts),
                            vocab_key)
            barrier()
        todo = [c for c in mine if not fused.done(c)]
        pool.run(_second_pass, [(c, _weights(pivot, source, c, function)) for c in todo], progress)
    barrier()
    if rank != 0:
        return None
    info = _info(info_path, fused.key)
    if info is None:
        info = _summarise(fused, len(_counter_rows(first)))
        tmp = info_path.with_name(f".{info_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, info_path)
    info["reused"] = reused
    return info


def _weights(pivot: Store, source: Store, c: int, function: FusionFunction) -> np.ndarray:
    return sequence_weights(pivot.require(c, "pivot representations")["ce"],
                            source.require(c, "source representations")["ce"], function)


def _counter_rows(first: Store) -> np.ndarray:
    tables = [first.require(c, "alignment")["pairs"] for c in range(first.layout.chunks)]
    return np.unique(np.concatenate(tables)[:, :2], axis=0) if tables else np.zeros((0, 2))


def _build_vocab(first: Store, pivot_tokens, source_tokens, alignment: Alignment,
                 counterparts: dict[int, int]) -> dict[str, np.ndarray]:
    every: Counter = Counter()
    single: Counter = Counter()
    needed = []
    for c in range(first.layout.chunks):
        arrays = first.require(c, "alignment")
        every.update(counter(arrays["pairs"]))
        single.update(counter(arrays["one_to_one"]))
        needed.append(arrays["needed"])
    context = VocabContext(list(pivot_tokens), list(source_tokens), pivot_index(pivot_tokens), every, single,
                           dict(counterparts))
    ids = np.unique(np.concatenate(needed)) if needed else np.zeros(0, np.int32)
    table, how = vocabulary(alignment, context, ids, len(source_tokens))
    return {"table": table, "how": how}


def _info(path: Path, key: str) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("key") == key else None


def _summarise(fused: Store, vocabulary_pairs: int) -> dict[str, Any]:
    totals = np.zeros(len(STAT_NAMES), dtype=np.int64)
    weights = []
    for c in range(fused.layout.chunks):
        arrays = fused.require(c, "fused targets")
        totals += arrays["stats"]
        weights.append(np.array(arrays["weights"]))
    w = np.concatenate(weights) if weights else np.zeros((0, 2))
    coverage: dict[str, dict[str, int]] = {"positions": {}, "topk_tokens": {}}
    for (group, name), value in zip(STAT_NAMES, totals.tolist()):
        coverage[group][name] = int(value)
    coverage["vocabulary_pairs"] = vocabulary_pairs
    return {"key": fused.key, "coverage": coverage, "fusion": {
        "pivot_chosen": int((w[:, 0] >= w[:, 1]).sum()), "source_chosen": int((w[:, 1] > w[:, 0]).sum()),
        "source_weight_mean": float(w[:, 1].mean()) if len(w) else 0.0}}
