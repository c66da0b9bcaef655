"""Training rows: the sequences of a micro-batch packed back to back into rows of up to
``row_tokens`` tokens, each sequence with its own position ids (0, 1, ...), so that it attends
only to itself. A micro-batch holds the same sequences packed or not, so packing changes what
padding costs, not what is learned: the loss is the same mean over the same target positions.

transformers reads the restarts of the position ids as sequence boundaries and builds a
block-causal mask (no attention mask is passed). Rows are right-padded; under a causal mask
padding after the real tokens changes none of their outputs, and the loss skips it. The sparse
fused targets make packing cheap: a row carries only m target ids and probabilities per token.
"""

from __future__ import annotations

import math

import numpy as np

from .shards import Sequences


def packing_supported() -> bool:
    """Whether this transformers finds packed sequences from the position ids (4.54 and later)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def pack(sequences: list[int], lengths: np.ndarray, row_tokens: int) -> list[list[int]]:
    """The sequences of one micro-batch in as few rows of at most ``row_tokens`` tokens as first
    fit, longest first, finds (a sequence longer than a row gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(sequences, key=lambda i: (-int(lengths[i]), i)):
        n = int(lengths[i])
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_tokens - n)
    return rows


def batches(items: list, rank: int, size: int, batch: int) -> list[list]:
    """This process's micro-batches: every process gets the same number (the items wrap)."""
    per_step = batch * size
    steps = max(1, math.ceil(len(items) / per_step))
    padded = [items[i % len(items)] for i in range(steps * per_step)] if items else []
    return [padded[s * per_step:(s + 1) * per_step][rank::size] for s in range(steps)]


def collate(rows: list[list[int]], pivot: Sequences, fused: Sequences, pad_id: int, device: str):
    """Tensors for one micro-batch: input ids, position ids, the target positions, their gold
    tokens and their fused target distributions (ids −1 pad)."""
    import torch

    pieces = [[(pivot.get(i, "input_ids", "response"), fused.get(i, "ids", "probs")) for i in row] for row in rows]
    width = max(sum(len(p[0][0]) for p in row) for row in pieces)
    m = max(int(f[0].shape[1]) for row in pieces for _, f in row)
    R = len(rows)
    ids = np.full((R, width), pad_id, dtype=np.int64)
    pos = np.tile(np.arange(width, dtype=np.int64), (R, 1))
    where = np.zeros((R, width), dtype=bool)
    gold = np.zeros((R, width), dtype=np.int64)
    tid = np.full((R, width, m), -1, dtype=np.int64)
    tprob = np.zeros((R, width, m), dtype=np.float32)
    for r, row in enumerate(pieces):
        at = 0
        for (seq, response), (f_ids, f_probs) in row:
            n = len(seq)
            ids[r, at:at + n] = seq
            pos[r, at:at + n] = np.arange(n)
            where[r, at:at + n - 1] = response[1:].astype(bool)
            gold[r, at:at + n - 1] = seq[1:]
            tid[r, at:at + n, :f_ids.shape[1]] = f_ids
            tprob[r, at:at + n, :f_probs.shape[1]] = f_probs
            at += n
        if at < width:  # padding continues the last sequence's positions: causal, so it changes nothing
            pos[r, at:] = np.arange(at, width) - at + (pos[r, at - 1] + 1 if at else 0)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return t(ids), t(pos), t(where), t(gold), t(tid), t(tprob)
