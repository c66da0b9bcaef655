"""Representations: one teacher-forced pass of a model over the fusion data.

Per position t (predicting token t+1): the top-k logits and their token ids. Per sequence: the
mean cross-entropy against the gold tokens over response targets. Stored as safetensors with a
key of everything they depend on, so a re-run with the same inputs loads instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import load_arrays, save_arrays
from .data import Example, encode

VERSION = 2


@dataclass
class Representations:
    lengths: np.ndarray  # [N] tokens per sequence
    input_ids: np.ndarray  # [T] all sequences concatenated
    response: np.ndarray  # [T] bool: the token is a response token (a training target)
    offsets: np.ndarray  # [T, 2] each token's [start, end) characters in the sequence's text
    topk_ids: np.ndarray  # [T, k] position t's top-k next-token ids
    topk_logits: np.ndarray  # [T, k]
    ce: np.ndarray  # [N] mean CE over response targets (NaN when a sequence has none)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def span(self, i: int) -> slice:
        return slice(int(self.starts[i]), int(self.starts[i + 1]))

    def save(self, path: Path, key: str) -> None:
        arrays = {name: getattr(self, name) for name in
                  ("lengths", "input_ids", "offsets", "topk_ids", "topk_logits", "ce")}
        arrays["response"] = self.response.astype(np.uint8)
        save_arrays(path, arrays, key)

    @classmethod
    def load(cls, path: Path, key: str) -> "Representations | None":
        """The cached representations at ``path`` if they were made from the same inputs."""
        arrays = load_arrays(path, key)
        if arrays is None:
            return None
        arrays["response"] = arrays["response"].astype(bool)
        return cls(**arrays)


def cache_key(model_fingerprint: str, examples: list[Example], top_k: int, max_length: int) -> str:
    from ..version import __version__

    h = hashlib.sha256(json.dumps({"version": [VERSION, __version__], "model": model_fingerprint, "top_k": top_k,
                                   "max_length": max_length}).encode())
    for e in examples:
        h.update(json.dumps([e.text, e.spans, e.chat]).encode())
    return h.hexdigest()


def compute(model, tokenizer, examples: list[Example], *, top_k: int, max_length: int, batch_size: int,
            device: str, progress=None) -> Representations:
    import torch

    encoded = [encode(tokenizer, e, max_length, with_offsets=True) for e in examples]
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(top_k, vocab)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_out, logits_out, ce_out = [], [], []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b:b + batch_size]
            width = max(len(ids) for ids, *_ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (seq, *_) in enumerate(batch):
                ids[r, :len(seq)] = torch.from_numpy(seq)
                mask[r, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            values, indices = logits.topk(k, dim=-1)
            for r, (seq, response, _) in enumerate(batch):
                n = len(seq)
                ids_out.append(indices[r, :n].to("cpu", torch.int32).numpy())
                logits_out.append(values[r, :n].float().cpu().numpy())
                targets = torch.from_numpy(response[1:])
                if n > 1 and bool(targets.any()):
                    # one sequence at a time in float32: no batch-sized copy of the vocabulary axis
                    lg = logits[r, : n - 1].float()
                    gold = torch.from_numpy(seq[1:]).to(device)
                    nll = (torch.logsumexp(lg, -1) - lg.gather(-1, gold[:, None])[:, 0]).cpu()
                    ce_out.append(float(nll[targets].mean()))
                    del lg
                else:
                    ce_out.append(float("nan"))
            del logits
            if progress is not None:
                progress(len(batch))
    return Representations(
        lengths=np.array([len(e[0]) for e in encoded], dtype=np.int64),
        input_ids=np.concatenate([e[0] for e in encoded]) if encoded else np.zeros(0, np.int64),
        response=np.concatenate([e[1] for e in encoded]) if encoded else np.zeros(0, bool),
        offsets=np.concatenate([e[2] for e in encoded]) if encoded else np.zeros((0, 2), np.int64),
        topk_ids=np.concatenate(ids_out) if ids_out else np.zeros((0, k), np.int32),
        topk_logits=np.concatenate(logits_out).astype(np.float32) if logits_out else np.zeros((0, k), np.float32),
        ce=np.array(ce_out, dtype=np.float32),
    )
