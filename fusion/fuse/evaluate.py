"""Held-out loss: the token-mean cross-entropy of a pivot-vocabulary model on the response
tokens of held-out data, with the output layer applied a bounded number of positions at a time."""

from __future__ import annotations

from .data import Example, encode
from .represent import HEAD_CHUNK, body, input_device, logits_of


def heldout_loss(model, tokenizer, examples: list[Example], max_length: int, batch_size: int) -> float | None:
    """Token-mean cross-entropy on the response tokens of ``examples`` (None without any)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(tokenizer, e, max_length) for e in examples]
    decoder = body(model)
    first = input_device(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b:b + batch_size]
            width = max(len(i) for i, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            where = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, (seq, resp) in enumerate(batch):
                ids[r, :len(seq)] = torch.from_numpy(seq)
                mask[r, :len(seq)] = 1
                where[r, :len(seq) - 1] = torch.from_numpy(resp[1:])
            gold = torch.zeros_like(ids)
            gold[:, :-1] = ids[:, 1:]
            hidden = decoder(input_ids=ids.to(first), attention_mask=mask.to(first), use_cache=False).last_hidden_state
            h, g = hidden[where.to(hidden.device)], gold[where]
            for a in range(0, h.shape[0], HEAD_CHUNK):
                lg = logits_of(model, h[a:a + HEAD_CHUNK]).float()
                y = g[a:a + HEAD_CHUNK].to(lg.device)
                total += float((torch.logsumexp(lg, -1) - lg.gather(-1, y[:, None])[:, 0]).sum())
            count += int(where.sum())
    return total / count if count else None
