"""The distillation loss, chunked: L = λ·CE(gold) + (1−λ)·CE(fused target) over the target
positions, with the output layer applied to ``chunk`` positions at a time.

Only the target positions' hidden states go through the output layer, a chunk at a time, and
each chunk is checkpointed: its float32 logits live only while that chunk's loss is computed
(and again, recomputed, during its backward). Memory for the loss is chunk × vocabulary floats
instead of batch × length × vocabulary.
"""

from __future__ import annotations

import torch

from .represent import body, logits_of

#: target positions whose logits are alive at once in the loss
LOSS_CHUNK = 1024


class Distiller(torch.nn.Module):
    """The pivot model with its loss in one forward, so that DDP and FSDP see one module (FSDP's
    root: the embedding and output layer stay gathered through the forward)."""

    def __init__(self, lm, chunk: int = LOSS_CHUNK):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, ids, position_ids, where, gold, target_ids, target_probs):
        """(mean gold CE, mean CE against the fused target) over the positions ``where``."""
        from torch.utils.checkpoint import checkpoint

        hidden = body(self.lm)(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
        h, g, ti, tp = hidden[where], gold[where], target_ids[where], target_probs[where]
        count = h.shape[0]
        if count == 0:  # keep every parameter in the graph, so gradient reductions stay in step
            h, g = hidden[:1, 0] * 0.0, gold[:1, 0]
            ti, tp = target_ids[:1, 0], torch.zeros_like(target_probs[:1, 0])
        lm = kd = hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, h.shape[0], self.chunk):
            b = a + self.chunk
            x, y = checkpoint(self._chunk, h[a:b], g[a:b], ti[a:b], tp[a:b], use_reentrant=False)
            lm, kd = lm + x, kd + y
        n = max(count, 1)
        return lm / n, kd / n

    def _chunk(self, h, gold, target_ids, target_probs):
        logits = logits_of(self.lm, h).float()
        lse = torch.logsumexp(logits, dim=-1)
        gold_nll = lse - logits.gather(-1, gold[:, None])[:, 0]
        picked = logits.gather(-1, target_ids.clamp(min=0))
        probs = torch.where(target_ids >= 0, target_probs, torch.zeros_like(target_probs))
        fused = (probs * (lse[:, None] - picked)).sum(-1)
        return gold_nll.sum(), fused.sum()


def layer_classes(lm) -> tuple[type, ...]:
    """The model's transformer block classes (transformers lists them as ``_no_split_modules``)."""
    names = set(getattr(lm, "_no_split_modules", None) or ())
    return tuple({type(m) for m in lm.modules() if type(m).__name__ in names})
