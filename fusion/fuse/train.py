"""Distillation of one source into a copy of the pivot: L = λ·CE(gold) + (1−λ)·CE(fused target)
over response targets; AdamW with linear warm-up and cosine decay, gradient clipping at 1.0.

Under ``torchrun`` every process trains on its share of each batch, either with
DistributedDataParallel (every process holds the whole model: small models) or with FSDP2
(``fully_shard``: parameters, gradients and optimizer state sharded over the processes, each
transformer block gathered only while it runs; bf16 compute with float32 master weights when
``training.dtype`` is bfloat16). Gradient checkpointing, packed rows and the chunked loss keep
activations small. The target is gathered back into one full checkpoint on process 0.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import numpy as np

from .config import Training
from .loss import Distiller, layer_classes
from .packing import batches, collate, pack
from .parallel import barrier, distributed, init_distributed, world  # noqa: F401  (re-exported)
from .shards import Sequences


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0, then cosine decay to 0 (the schedule FuseChat trains with)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(order: np.ndarray, rank: int, size: int, batch: int) -> list[np.ndarray]:
    """This process's micro-batches of sequences (every process gets the same number)."""
    return [np.array(b, dtype=np.int64) for b in batches([int(i) for i in order], rank, size, batch)]


def plan_epochs(usable: np.ndarray, lengths: np.ndarray, cfg: Training, row_tokens: int | None,
                rank: int, size: int) -> list[list[list[list[int]]]]:
    """Per epoch, this process's micro-batches, each a list of rows of sequence indices."""
    epochs = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + epoch).permutation(usable)
        micro = _batches(order, rank, size, cfg.batch_size)
        epochs.append([pack(m.tolist(), lengths, row_tokens) if row_tokens else [[int(i)] for i in m] for m in micro])
    return epochs


def choose_strategy(cfg: Training, size: int, parameters: int, device: str) -> str:
    """``auto``: FSDP where a whole copy per GPU (DDP, about 16 bytes per parameter with AdamW)
    would not fit the GPU, else DDP (and nothing to wrap with one process)."""
    if size <= 1:
        return "single"
    if cfg.strategy != "auto":
        return cfg.strategy
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return "fsdp" if 16 * parameters > 0.7 * total else "ddp"
    return "ddp"


def wrap(lm, strategy: str, cfg: Training, device: str):
    """The Distiller around ``lm``, wrapped for ``strategy`` (single, ddp or fsdp)."""
    import torch

    if cfg.gradient_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5's name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    net = Distiller(lm)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy() if cfg.dtype == "float32" else \
            MixedPrecisionPolicy(param_dtype=getattr(torch, cfg.dtype), reduce_dtype=torch.float32)
        blocks = layer_classes(lm)
        for module in lm.modules():
            if isinstance(module, blocks):
                fully_shard(module, mp_policy=policy)
        fully_shard(net, mp_policy=policy)
    return net


def distil(lm, pivot: Sequences, fused: Sequences, usable: np.ndarray, lengths: np.ndarray, cfg: Training,
           device: str, *, strategy: str = "single", row_tokens: int | None = None, pad_id: int = 0,
           on_step: Callable[[dict], None] | None = None) -> tuple[list[dict], object]:
    """Train ``lm`` (float32 weights) on the sequences ``usable``; returns the loss curve (one
    entry per optimizer step) and the trained module (wrapped; see :func:`full_state_dict`)."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    torch.manual_seed(cfg.seed)
    epochs = plan_epochs(usable, lengths, cfg, row_tokens, rank, size)
    net = wrap(lm, strategy, cfg, device)
    total = sum(math.ceil(len(micro) / cfg.gradient_accumulation_steps) for micro in epochs)
    warmup = math.ceil(cfg.warmup_ratio * total)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    autocast = cfg.dtype != "float32" and strategy != "fsdp"  # FSDP casts through its policy
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    curve: list[dict] = []
    step = 0
    net.train()
    for epoch, micro in enumerate(epochs):
        sums = np.zeros(3)
        for m, rows in enumerate(micro):
            last = (m + 1) % cfg.gradient_accumulation_steps == 0 or m == len(micro) - 1
            ids, pos, where, gold, tid, tprob = collate(rows, pivot, fused, pad_id, device)
            with _sync(net, strategy, last):
                with torch.autocast(device_type, dtype=getattr(torch, cfg.dtype), enabled=autocast):
                    lm_loss, kd = net(ids, pos, where, gold, tid, tprob)
                loss = cfg.lm_loss_weight * lm_loss + (1 - cfg.lm_loss_weight) * kd
                (loss / cfg.gradient_accumulation_steps).backward()
            sums += [float(loss.detach()), float(lm_loss.detach()), float(kd.detach())]
            if not last:
                continue
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            count = (m % cfg.gradient_accumulation_steps) + 1
            values = torch.tensor(sums / count, dtype=torch.float64)
            if size > 1 and distributed():  # the curve is the mean over processes
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
    net.eval()
    return curve, net


def _sync(net, strategy: str, last: bool):
    """Gradients are reduced across processes only on the micro-step that ends an accumulation."""
    if last:
        return nullcontext()
    if strategy == "ddp":
        return net.no_sync()
    if strategy == "fsdp":
        net.set_requires_gradient_sync(False)

        class _Restore:
            def __enter__(self):
                return None

            def __exit__(self, *exc):
                net.set_requires_gradient_sync(True)

        return _Restore()
    return nullcontext()


def full_state_dict(lm, dtype: str) -> dict | None:
    """The trained weights as plain CPU tensors in ``dtype``, gathered one tensor at a time from
    the processes' shards (every process must call this); None on processes other than 0."""
    import torch

    rank, _ = world()
    out = {} if rank == 0 else None
    target = getattr(torch, dtype)
    for name, value in lm.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if out is not None:
            out[name] = full.detach().to("cpu", target if full.is_floating_point() else full.dtype).clone()
        del full
    barrier()
    return out
