"""Distillation of one source into a copy of the pivot: L = λ·CE(gold) + (1−λ)·CE(fused target)
over response targets; AdamW with linear warm-up and cosine decay. Under ``torchrun`` every
process trains on its share of each batch with DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Callable

import numpy as np

from .config import Training
from .distributions import FusedTargets
from .represent import Representations


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> bool:
    """Join the process group torchrun set up; True when there is more than one process."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # the other processes wait at a barrier while process 0 scores the whole data set
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0, then cosine decay to 0 (the schedule FuseChat trains with)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(order: np.ndarray, rank: int, size: int, batch: int) -> list[np.ndarray]:
    """This process's micro-batches: every process gets the same number (the order wraps)."""
    per_step = batch * size
    steps = max(1, math.ceil(len(order) / per_step))
    padded = np.resize(order, steps * per_step)
    return [padded[s * per_step:(s + 1) * per_step][rank::size] for s in range(steps)]


def loss_terms(model, ids, mask, response, target_ids, target_probs):
    """Mean gold CE and mean CE against the fused target over the batch's response targets."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    where = (response[:, 1:] & mask[:, 1:].bool()).float()
    n = where.sum().clamp(min=1.0)
    gold = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    tid = target_ids[:, :-1]
    tp = torch.where(tid >= 0, target_probs[:, :-1], torch.zeros_like(target_probs[:, :-1]))
    fused = -(tp * logp.gather(-1, tid.clamp(min=0))).sum(-1)
    return (gold * where).sum() / n, (fused * where).sum() / n


def distil(model, reps: Representations, targets: FusedTargets, cfg: Training, device: str,
           pad_id: int = 0, on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` in place; returns the loss curve (one entry per optimizer step)."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    distributed = size > 1 and dist.is_initialized()
    torch.manual_seed(cfg.seed)
    usable = np.array([i for i in range(len(reps)) if reps.response[reps.span(i)][1:].any()], dtype=np.int64)
    if len(usable) == 0:
        return []
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    micro_per_epoch = max(1, math.ceil(len(usable) / (cfg.batch_size * size)))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    autocast = cfg.dtype != "float32"
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    curve: list[dict] = []
    step = 0
    net.train()
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(usable)
        micro = _batches(order, rank, size, cfg.batch_size)
        sums = np.zeros(3)
        for m, rows in enumerate(micro):
            ids, mask, response, tid, tprob = _collate(reps, targets, rows, pad_id, device)
            with torch.autocast(device_type, dtype=getattr(torch, cfg.dtype), enabled=autocast):
                lm, kd = loss_terms(net, ids, mask, response, tid, tprob)
            loss = cfg.lm_loss_weight * lm + (1 - cfg.lm_loss_weight) * kd
            (loss / cfg.gradient_accumulation_steps).backward()
            sums += [float(loss.detach()), float(lm.detach()), float(kd.detach())]
            last = m == len(micro) - 1
            if (m + 1) % cfg.gradient_accumulation_steps and not last:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            count = (m % cfg.gradient_accumulation_steps) + 1
            values = torch.tensor(sums / count, dtype=torch.float64)
            if distributed:  # the curve is the mean over processes (NCCL reduces on the GPU)
                values = values.to(device)
                dist.all_reduce(values)
                values = values.cpu() / size
            step += 1
            entry = {"step": step, "epoch": epoch + 1, "loss": float(values[0]), "lm_loss": float(values[1]),
                     "distill_loss": float(values[2]), "lr": lr}
            curve.append(entry)
            if on_step is not None:
                on_step(entry)
            sums[:] = 0
    model.eval()
    return curve


def _collate(reps: Representations, targets: FusedTargets, rows: np.ndarray, pad_id: int, device: str):
    import torch

    spans = [reps.span(int(i)) for i in rows]
    width = max(s.stop - s.start for s in spans)
    m = targets.ids.shape[1]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    tid = torch.full((len(rows), width, m), -1, dtype=torch.long)
    tprob = torch.zeros((len(rows), width, m), dtype=torch.float32)
    for r, s in enumerate(spans):
        n = s.stop - s.start
        ids[r, :n] = torch.from_numpy(reps.input_ids[s])
        mask[r, :n] = 1
        response[r, :n] = torch.from_numpy(reps.response[s])
        tid[r, :n] = torch.from_numpy(targets.ids[s].astype(np.int64))
        tprob[r, :n] = torch.from_numpy(targets.probs[s])
    return ids.to(device), mask.to(device), response.to(device), tid.to(device), tprob.to(device)


def heldout_loss(model, tokenizer, examples, max_length: int, batch_size: int, device: str) -> float | None:
    """Token-mean cross-entropy on the response tokens of ``examples`` (None without any)."""
    import torch

    from .data import encode

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode(tokenizer, e, max_length) for e in examples]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b:b + batch_size]
            width = max(len(i) for i, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            response = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, (seq, resp) in enumerate(batch):
                ids[r, :len(seq)] = torch.from_numpy(seq)
                mask[r, :len(seq)] = 1
                response[r, :len(seq)] = torch.from_numpy(resp)
            ids, mask, response = ids.to(device), mask.to(device), response.to(device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            where = response[:, 1:] & mask[:, 1:].bool()
            nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
            total += float(nll[where].sum())
            count += int(where.sum())
    return total / count if count else None
