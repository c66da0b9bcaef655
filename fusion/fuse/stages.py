"""The three heavy stages of ``fusion fuse``, each spread over the run's processes:

1. represent: every process scores its chunks of the data for each model and writes them as it
   goes (a model larger than one GPU is scored by groups of GPUs, see
   :func:`fusion.fuse.models.placement`);
2. fuse: alignment and fusion per chunk (:mod:`fusion.fuse.targets`);
3. train: every process trains on its share of each batch (DDP or FSDP2), reading the chunks
   memory-mapped; process 0 writes the target.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..api.errors import FusionError
from .parallel import barrier

if TYPE_CHECKING:
    from .pipeline import Model, Run


def scoring_dtype(run: "Run", folder: Path) -> str:
    """``representations.dtype``; ``auto``: the stored dtype on GPUs, float32 on CPU (where
    half-precision matmuls are slow)."""
    from .models import stored_dtype

    asked = run.config.representations.dtype
    if asked != "auto":
        return asked
    return (stored_dtype(folder) or "float32") if run.device.startswith("cuda") else "float32"


def represent(run: "Run") -> None:
    """Stage 1: every model's top-k logits and sequence cross-entropies, chunk by chunk."""
    from . import models
    from .reading import pivot_reading, source_reading
    from .represent import cache_key, head_matches, score
    from .shards import Layout, Store

    t0 = time.perf_counter()
    cfg = run.config.representations
    layout = Layout(len(run.train_set), cfg.chunk_size)
    reused = 0
    for m in [run.pivot] + run.sources:
        m.reading = pivot_reading(m.tokenizer) if m is run.pivot else source_reading(m.tokenizer, run.pivot.tokenizer)
        dtype = scoring_dtype(run, m.folder)
        m.key = cache_key(models.fingerprint(m.folder), m.reading, run.train_set, cfg.top_k, cfg.max_length, dtype,
                          cfg.store_dtype)
        m.store = Store(run.cache / f"represent-{m.name}", m.key, layout)
        if run.main_process:
            m.store.prepare()
        barrier()
        missing = set(m.store.missing())
        barrier()  # every process has looked before any writes: they agree on what was missing
        reused += not missing
        weights = models.weight_info(m.folder)
        place = models.placement(weights.parameters * models.DTYPE_BYTES[dtype], run.rank, run.size,
                                 run.local_rank, run.local_size, run.gpu_memory)
        index = place.index(run.rank)
        todo = [] if index is None else [c for c in layout.share(index, len(place.scorers)) if c in missing]
        if missing:
            run.say(f"representations: {m.label} {m.reference} ({len(missing)} of {layout.chunks} chunks, "
                    f"{len(place.scorers)} scoring process(es), {place.gpus_per_copy} device(s) each)")
        if todo:
            model = models.load_model(m.folder, m.label, dtype, place.device, device_map=place.device_map,
                                      max_memory=place.max_memory)
            full = not head_matches(model, m.reading, run.train_set[layout.range(todo[0])[0]])
            with run.bar(sum(b - a for a, b in map(layout.range, todo)), f"scoring {m.name}", "seq") as bar:
                for c in todo:
                    a, b = layout.range(c)
                    reps = score(model, m.reading, run.train_set[a:b], top_k=cfg.top_k, max_length=cfg.max_length,
                                 batch_size=cfg.batch_size, progress=bar.update, full_forward=full)
                    m.store.write(c, reps.arrays(cfg.store_dtype))
            del model
            _free()
        barrier()
        if run.main_process and m.store.missing():
            raise FusionError(f"representations of {m.label}: chunks {m.store.missing()[:5]} were not written; "
                              f"run the command again")
    total = 1 + len(run.sources)
    run.stage("represent", t0, computed=total - reused, reused=reused,
              note=f"{total - reused} computed, {reused} reused ({layout.chunks} chunk(s) each)")


def _set_dtype(config: Path, dtype: str) -> None:
    data = json.loads(config.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in data or key == "dtype":
            data[key] = dtype
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fuse(run: "Run") -> None:
    """Stage 2: align each source's distributions to the pivot and fuse them per sequence."""
    from ..host import alignments, fusion_functions
    from .parallel import cpus
    from .targets import build
    from .tokens import surface_strings

    t0 = time.perf_counter()
    c = run.config
    reused = 0
    run.report["alignment"], run.report["fusion"] = {}, {}
    pivot_tokens = surface_strings(run.pivot.tokenizer)
    layout = run.pivot.store.layout
    workers = run.workers or _default_workers(run, layout.chunks, cpus())
    for s in run.sources:
        run.say(f"alignment and fusion: {s.label} {s.reference}")
        with run.bar(None, f"aligning {s.name}", "chunk") as bar:
            info = build(cache=run.cache, name=s.name, pivot=run.pivot.store, source=s.store,
                         pivot_tokens=pivot_tokens, source_tokens=surface_strings(s.tokenizer),
                         alignment=alignments()[c.alignment], counterparts=s.reading.counterparts,
                         function=fusion_functions()[c.fusion_function], fallback=c.fallback,
                         store_dtype=c.representations.store_dtype, rank=run.rank, size=run.size,
                         workers=workers, carry=c.carry, progress=lambda: bar.update(1))
        s.fused_key = fused_store(run, s).key
        if info is not None:
            reused += info["reused"]
            run.report["alignment"][s.name] = info["coverage"]
            run.report["fusion"][s.name] = info["fusion"]
    total = len(run.sources)
    run.stage("fuse", t0, note=f"{total - reused} computed, {reused} reused"
                               + (f" ({workers} worker processes)" if run.size == 1 and workers > 1 else ""))


#: below this many pivot positions one process aligns faster than starting a pool (about 25 µs
#: a position against a few seconds to start the workers)
POOL_POSITIONS = 200_000


def _default_workers(run: "Run", chunks: int, cpus: int) -> int:
    if run.size > 1 or chunks < 2:
        return 1
    from .shards import Sequences

    positions = int(Sequences(run.pivot.store, "pivot representations").column("lengths").sum())
    return min(cpus, chunks) if positions >= POOL_POSITIONS else 1


def fused_store(run: "Run", s: "Model"):
    from ..host import alignments, fusion_functions
    from .targets import stores

    c = run.config
    return stores(run.cache, s.name, run.pivot.store, s.store, alignments()[c.alignment], s.reading.counterparts,
                  fusion_functions()[c.fusion_function], c.fallback, c.representations.store_dtype, c.carry)[2]


def target_folder(run: "Run", s: "Model") -> Path:
    return run.output / "targets" / f"{run.pivot.name}-{s.name}"


def train(run: "Run") -> None:
    """Stage 3: distil each source's fused targets into a copy of the pivot (on every process)."""
    from ..writer import atomic_folder, copy_support_files
    from . import models
    from . import train as trainer
    from .distributions import targets_key
    from .packing import packing_supported
    from .report import target_card
    from .shards import Sequences

    t0 = time.perf_counter()
    c, tcfg = run.config, run.config.training
    pad = run.pivot.tokenizer.pad_token_id if run.pivot.tokenizer.pad_token_id is not None else 0
    run.report["training"] = {}
    reused = 0
    pivot = Sequences(run.pivot.store, "pivot representations")
    lengths, counts = pivot.column("lengths"), pivot.column("targets")
    usable = np.flatnonzero(counts > 0)
    row_tokens = (tcfg.max_length or c.representations.max_length) if tcfg.packing else None
    if row_tokens and not packing_supported():
        row_tokens = None
        run.report["notes"].append("this transformers cannot read packed sequences from position ids (4.54 or "
                                   "later can), so every training row holds one sequence")
    parameters = models.weight_info(run.pivot.folder).parameters
    strategy = trainer.choose_strategy(tcfg, run.size, parameters, run.device)
    for s in run.sources:
        target = target_folder(run, s)
        store = fused_store(run, s)
        key = targets_key("target", store.key, asdict(tcfg), run.size, row_tokens)
        record = target / "fuse.json"
        done = json.loads(record.read_text()) if record.is_file() else {}
        if done.get("key") == key:
            reused += 1
            run.report["training"][s.name] = {"curve": done["curve"], "reused": True, "strategy": done.get("strategy")}
            s.target_key = key
            continue
        run.say(f"training: {run.pivot.name} on {s.name} ({tcfg.epochs} epoch(s), {run.size} process(es), "
                f"{strategy})")
        fused = Sequences(store, "fused targets", lengths=lengths)
        # FSDP shards the copy held in CPU memory block by block onto the GPU; DDP holds it whole there
        lm = models.load_model(run.pivot.folder, "pivot", "float32", "cpu" if strategy == "fsdp" else run.device)
        with run.bar(None, f"training on {s.name}", "step") as bar:
            def step(entry: dict) -> None:
                bar.update(1)
                bar.set_postfix_str(f"loss {entry['loss']:.4f}", refresh=False)

            curve, net = trainer.distil(lm, pivot, fused, usable, lengths, tcfg, run.device, strategy=strategy,
                                        row_tokens=row_tokens, pad_id=pad, on_step=step)
        state = trainer.full_state_dict(lm, tcfg.dtype)
        if run.main_process:
            with atomic_folder(target, force=True) as tmp:
                lm.save_pretrained(tmp, state_dict=state)
                _set_dtype(tmp / "config.json", tcfg.dtype)  # the weights' dtype, not the trained copy's
                copy_support_files(run.pivot.folder, tmp, exclude=("config.json", "generation_config.json"))
                (tmp / "README.md").write_text(target_card(run.pivot.reference, s.reference, c.text, asdict(tcfg),
                                                           c.alignment, c.fusion_function))
                (tmp / "fuse.json").write_text(json.dumps({"key": key, "curve": curve, "strategy": strategy},
                                                          indent=2) + "\n")
        run.report["training"][s.name] = {"curve": curve, "reused": False, "strategy": strategy}
        s.target_key = key
        del lm, net, state, fused
        _free()
        barrier()
    total = len(run.sources)
    run.stage("train", t0, note=f"{total - reused} trained, {reused} reused ({strategy})")
    run.report["outputs"] += [str(target_folder(run, s).relative_to(run.output)) for s in run.sources]
