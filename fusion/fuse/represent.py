"""Representations: one teacher-forced pass of a model over the fusion data.

Per position t (predicting token t+1): the top-k logits and their token ids. Per sequence: the
mean cross-entropy against the gold tokens over response targets. Each model reads the data its
own way (:mod:`fusion.fuse.reading`). The output layer is applied to a bounded number of
positions at a time, so no batch × length × vocabulary array of logits is ever made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .data import Example
from .reading import Reading, read

VERSION = 3
#: positions put through the output layer at once when scoring (memory: this × vocabulary floats)
HEAD_CHUNK = 2048


@dataclass
class Representations:
    """The representations of consecutive sequences (one chunk, or a hand-made test case)."""

    lengths: np.ndarray  # [N] tokens per sequence
    input_ids: np.ndarray  # [T] all sequences concatenated
    response: np.ndarray  # [T] bool: the token is a response token (a training target)
    offsets: np.ndarray  # [T, 2] each token's [start, end) characters in the pivot's text of the sequence
    topk_ids: np.ndarray  # [T, k] position t's top-k next-token ids
    topk_logits: np.ndarray  # [T, k]
    ce: np.ndarray  # [N] mean CE over response targets (NaN when a sequence has none)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def span(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))

    def arrays(self, logits_dtype: str = "float16") -> dict[str, np.ndarray]:
        targets = np.array([int(self.response[self.span(i)][1:].sum()) for i in range(len(self))], dtype=np.int32)
        return {"lengths": self.lengths.astype(np.int32), "input_ids": self.input_ids.astype(np.int32),
                "response": self.response.astype(np.uint8), "offsets": self.offsets.astype(np.int32),
                "topk_ids": self.topk_ids.astype(np.int32), "topk_logits": self.topk_logits.astype(logits_dtype),
                "ce": self.ce.astype(np.float32), "targets": targets}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Representations":
        names = ("lengths", "input_ids", "response", "offsets", "topk_ids", "topk_logits", "ce")
        values = {n: arrays[n] for n in names}
        values["response"] = values["response"].astype(bool)
        return cls(**values)


def cache_key(model_fingerprint: str, reading: Reading, examples: list[Example], top_k: int, max_length: int,
              dtype: str, logits_dtype: str) -> str:
    from ..version import __version__

    how = {"version": [VERSION, __version__], "model": model_fingerprint, "top_k": top_k, "max_length": max_length,
           "dtype": dtype, "logits_dtype": logits_dtype, "pivot_bos": reading.pivot_bos,
           "replace": sorted(reading.replace.items()), "bos": [reading.uses_bos(True), reading.uses_bos(False)]}
    h = hashlib.sha256(json.dumps(how).encode())
    for e in examples:
        h.update(json.dumps([e.text, e.spans, e.chat]).encode())
    return h.hexdigest()


def logits_of(model, hidden):
    """The output layer on ``hidden`` as the model's own forward applies it (with the logit
    scalings some architectures add after it)."""
    import torch

    head = model.get_output_embeddings()
    if head.weight.device.type != "meta":  # offloaded by accelerate: its hook brings both together
        hidden = hidden.to(head.weight.device)
    logits = head(hidden)
    cfg = model.config
    if getattr(cfg, "logit_scale", None):  # Cohere
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):  # Granite
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def body(model):
    """The model without its output layer (the decoder that gives the last hidden states)."""
    inner = getattr(model, "base_model", None)
    return inner if inner is not None and inner is not model else model.model


def input_device(model):
    """Where the input ids go: the first device of an accelerate device map, else the model's."""
    import torch

    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        first = next(iter(mapping.values()))
        return torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)
    return next(body(model).parameters()).device


def score(model, reading: Reading, examples: list[Example], *, top_k: int, max_length: int, batch_size: int,
          progress=None, full_forward: bool = False) -> Representations:
    """``full_forward``: take the logits from the model's own forward (for an architecture whose
    output layer :func:`logits_of` does not reproduce; it makes batch × length × vocabulary)."""
    import torch

    encoded = [read(reading, e.text, e.spans, e.chat, max_length) for e in examples]
    k = min(top_k, model.get_output_embeddings().weight.shape[0])
    pad = reading.tokenizer.pad_token_id if reading.tokenizer.pad_token_id is not None else 0
    n = len(encoded)
    topk_ids: list = [None] * n
    topk_logits: list = [None] * n
    ce = np.full(n, np.nan, dtype=np.float32)
    order = sorted(range(n), key=lambda i: (-len(encoded[i][0]), i))  # like lengths together: less padding
    decoder = body(model)
    first = input_device(model)
    model.eval()
    with torch.no_grad():
        for b in range(0, n, batch_size):
            rows = order[b:b + batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq = encoded[i][0]
                ids[r, :len(seq)] = torch.from_numpy(seq)
                mask[r, :len(seq)] = 1
            if full_forward:
                hidden = model(input_ids=ids.to(first), attention_mask=mask.to(first), use_cache=False).logits
            else:
                hidden = decoder(input_ids=ids.to(first), attention_mask=mask.to(first),
                                 use_cache=False).last_hidden_state
            flat = hidden[mask.bool().to(hidden.device)]  # [positions, H or V], sequence after sequence
            gold = torch.zeros_like(ids)
            gold[:, :-1] = ids[:, 1:]
            gold = gold[mask.bool()]
            values, indices, nll = [], [], []
            for a in range(0, flat.shape[0], HEAD_CHUNK):
                piece = flat[a:a + HEAD_CHUNK]
                lg = (piece if full_forward else logits_of(model, piece)).float()
                v, ix = lg.topk(k, dim=-1)
                values.append(v.cpu())
                indices.append(ix.to("cpu", torch.int32))
                g = gold[a:a + HEAD_CHUNK].to(lg.device)
                nll.append((torch.logsumexp(lg, -1) - lg.gather(-1, g[:, None])[:, 0]).cpu())
                del lg
            values, indices, nll = torch.cat(values).numpy(), torch.cat(indices).numpy(), torch.cat(nll).numpy()
            pos = 0
            for i in rows:
                seq, response, _ = encoded[i]
                m = len(seq)
                topk_ids[i], topk_logits[i] = indices[pos:pos + m], values[pos:pos + m]
                targets = response[1:]
                if m > 1 and targets.any():
                    ce[i] = float(nll[pos:pos + m - 1][targets].astype(np.float64).mean())
                pos += m
            del hidden, flat
            if progress is not None:
                progress(len(rows))
    empty_k = np.zeros((0, k))
    return Representations(
        lengths=np.array([len(e[0]) for e in encoded], dtype=np.int64),
        input_ids=np.concatenate([e[0] for e in encoded]) if n else np.zeros(0, np.int64),
        response=np.concatenate([e[1] for e in encoded]) if n else np.zeros(0, bool),
        offsets=np.concatenate([e[2] for e in encoded]) if n else np.zeros((0, 2), np.int64),
        topk_ids=np.concatenate(topk_ids).astype(np.int32) if n else empty_k.astype(np.int32),
        topk_logits=np.concatenate(topk_logits).astype(np.float32) if n else empty_k.astype(np.float32),
        ce=ce,
    )


def head_matches(model, reading: Reading, example: Example) -> bool:
    """Whether the decoder + output layer path gives the model's own logits (checked on the first
    few tokens of one example): an architecture that transforms its logits in a way
    :func:`logits_of` does not know is then scored through its full forward instead."""
    import torch

    ids = read(reading, example.text, example.spans, example.chat, 16)[0]
    x = torch.from_numpy(ids)[None].to(input_device(model))
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits.float()
        mine = logits_of(model, body(model)(input_ids=x, use_cache=False).last_hidden_state).float()
    return bool(torch.allclose(full.to(mine.device), mine, rtol=1e-3, atol=1e-3))
