"""Executing a plan: stream one tensor at a time (read → merge → cast → write) into a sharded
safetensors writer.

Memory stays bounded by the largest tensor times the number of inputs: each input is a view into
a memory map whose pages are released once the tensor is written.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .api.dtypes import DTYPES
from .api.errors import FusionError, MergeError
from .api.strategy import Strategy
from .checkpoint import Checkpoint
from .planner import Plan, TensorPlan
from .writer import ShardedWriter

KERNELS = ("auto", "c", "torch")


@dataclass
class Summary:
    output: Path
    merged: int = 0
    carried: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    kernel: str = "torch"
    threads: int | None = None
    files: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def text(self) -> str:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds > 0 else 0.0
        lines = [f"wrote {self.output}: {self.merged} tensors merged, {self.carried} carried, "
                 f"{self.bytes_written / 1e6:,.1f} MB in {len(self.files)} file(s), "
                 f"{self.seconds:.2f} s ({rate:,.0f} MB/s, {self.kernel} kernel"
                 + (f", {self.threads} threads)" if self.threads else ")")]
        lines += [f"note: {n}" for n in self.notices]
        return "\n".join(lines)


def select_kernel(plan: Plan, kernel: str) -> str:
    """Which kernels merge ``plan``: "c" (the strategy's compiled path) or "torch" (its reference).

    ``auto`` takes C when the extension is built and the strategy has a compiled path; ``c``
    insists on it and says why it cannot be had.
    """
    from .api import kernels

    if kernel not in KERNELS:
        raise FusionError(f"--kernel {kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    if kernel == "c":
        if not kernels.available():
            raise FusionError("--kernel c: the C kernels are not built in this installation (no C "
                              "compiler when fusion was installed); reinstall fusion where one is "
                              "available, or use --kernel auto or torch")
        if not plan.strategy.compiled:
            raise FusionError(f"--kernel c: strategy {plan.strategy.name!r} has no C kernel; "
                              f"use --kernel auto or torch")
        return "c"
    return "c" if kernels.available() and plan.strategy.compiled else "torch"


#: Elements per chunk for elementwise strategies: bounds the float32 working set per input.
CHUNK_ELEMENTS = 1 << 21


def _row_chunks(shape: tuple[int, ...], rows: int, elementwise: bool) -> list:
    """Index expressions that split the merged rows into chunks (one chunk unless elementwise)."""
    if not shape:
        return [...]  # a scalar
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:]))) if elementwise else max(rows, 1)
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)] or [slice(0, 0)]


def _non_finite(tp: TensorPlan, bad: int) -> MergeError:
    return MergeError(f"merged tensor {tp.name} has {bad} non-finite values (inf/NaN) in {tp.dtype}; "
                      f"check the weights and lambda, or the input models")


#: Inputs at least this large are streamed with their pages released as the kernels go, so that
#: resident memory does not grow with the largest tensor's inputs.
RELEASE_BYTES = 32 << 20


def _merge_one_c(tp: TensorPlan, strategy: Strategy, layout: Checkpoint, threads: int) -> Any:
    """Merge with the strategy's compiled path, from the memory-mapped inputs as stored into an
    output buffer (no float32 copies, no torch); the tensor's bytes, or None where the kernels
    cannot take it (a dtype they do not read, a pytorch_model.bin input)."""
    from .api import kernels

    sources = [(model.checkpoint, info) for model, info in tp.merge_sources]
    if not kernels.supports(DTYPES[tp.dtype].name) or any(
            ckpt.format != "safetensors" or not kernels.supports(DTYPES[info.dtype].name)
            for ckpt, info in sources) or (tp.rows is not None and (
                layout.format != "safetensors" or layout.tensors[tp.name].dtype != tp.dtype)):
        return None  # (rows carried from the layout model are copied as bytes: they need its dtype)
    rows = tp.rows if tp.rows is not None else (tp.shape[0] if tp.shape else 1)
    n = rows * math.prod(tp.shape[1:])  # the merged rows are a prefix of every input
    inputs = [ckpt.buffer(info.name, n) for ckpt, info in sources]
    full = kernels.empty(tp.nbytes)
    out = kernels.from_bytes(full, DTYPES[tp.dtype].name, n)
    # the inputs are read-only file maps: their pages may be dropped as they are read
    release = n * 2 >= RELEASE_BYTES
    base, inputs = (inputs[0], inputs[1:]) if tp.base else (None, inputs)
    try:
        bad = strategy.merge_compiled(out, base, inputs, tp.params, tp.context, threads=threads,
                                     release=release)
    except FusionError as exc:
        raise MergeError(f"tensor {tp.name}: {exc}") from None
    except Exception as exc:
        raise _plugin_failed(strategy, tp, exc) from exc
    if bad:
        raise _non_finite(tp, bad)
    merged = n * DTYPES[tp.dtype].size
    if merged < tp.nbytes:  # rows only the layout model has
        full[merged:] = layout.raw(tp.name)[merged:]
    return full


def _plugin_failed(strategy: Strategy, tp: TensorPlan, exc: Exception) -> MergeError:
    """A strategy that raised: a bug of the plugin that registered it, named with the tensor."""
    from .host import registered_by

    info = registered_by("strategy", strategy.name)
    plugin = f" of plugin {info.title}" if info is not None else ""
    detail = (str(exc).strip().splitlines() or [""])[0]
    return MergeError(f"strategy {strategy.name!r}{plugin} raised {type(exc).__name__}"
                      + (f" ({detail})" if detail else "") + f" on tensor {tp.name}; this is a bug in the "
                      f"plugin: report it to its authors (--debug shows the traceback)")


def _merge_one(tp: TensorPlan, strategy: Strategy, layout: Checkpoint) -> Any:
    import torch

    fn, elementwise = strategy.merge, strategy.elementwise

    rows = tp.rows if tp.rows is not None else (tp.shape[0] if tp.shape else 0)
    views = [model.checkpoint.read(info.name) for model, info in tp.merge_sources]
    full = torch.empty(tp.shape, dtype=getattr(torch, DTYPES[tp.dtype].name))
    out = full[:rows] if tp.rows is not None else full  # merged rows; the rest are carried below
    for sl in _row_chunks(tp.shape, rows, elementwise):
        # fresh float32 copies: inputs are read-only maps and strategies may work in place; the
        # rows of a built vocabulary are gathered from each model's own rows and defaults
        chunk = tp.vocab.gather(views, sl) if tp.vocab is not None else \
            [v[sl].to(torch.float32, copy=True) for v in views]
        base, inputs = (chunk[0], chunk[1:]) if tp.base else (None, chunk)
        try:
            context = tp.context if sl is ... or sl.start == 0 else \
                replace(tp.context, start=sl.start * math.prod(tp.shape[1:]))
            result = fn(base, inputs, tp.params, context)
        except FusionError as exc:
            raise MergeError(f"tensor {tp.name}: {exc}") from None
        except Exception as exc:
            raise _plugin_failed(strategy, tp, exc) from exc
        target = out[sl]
        if not isinstance(result, torch.Tensor) or result.shape != target.shape:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise MergeError(f"strategy returned {got} for tensor {tp.name}, expected shape {list(target.shape)}")
        target.copy_(result)
        del chunk, base, inputs, result
        if elementwise and isinstance(sl, slice) and tp.vocab is None:
            # the rows just merged are not read again: keep resident memory at a few chunks
            # instead of the whole tensor in every input (an embedding is ~300 MB per model)
            for model, info in tp.merge_sources:
                row = info.nbytes // max(1, info.shape[0])
                model.checkpoint.release(info.name, sl.start * row, sl.stop * row)
    if not bool(torch.isfinite(out).all()):
        raise _non_finite(tp, int((~torch.isfinite(out)).sum()))
    if tp.rows is not None and tp.rows < tp.shape[0]:
        full[tp.rows:] = layout.read(tp.name)[tp.rows:]
    return full


class _WriteBehind:
    """Writes each tensor on a second thread while the next one is merged (file writes and the C
    kernels release the GIL). At most one tensor waits to be written, so memory stays at two
    output tensors."""

    def __init__(self, writer: ShardedWriter) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fusion-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                name, tensor, done = item
                try:
                    if self.error is None:
                        self.writer.write(name, tensor)
                    del tensor
                    done()
                except BaseException as exc:  # re-raised in the merging thread
                    self.error = self.error or exc
            finally:
                self.queue.task_done()

    def put(self, name: str, tensor: Any, done: Callable[[], None]) -> None:
        self.queue.join()  # the previous tensor is written
        if self.error is not None:
            raise self.error
        self.queue.put((name, tensor, done))

    def close_quietly(self) -> None:
        """Stop after an error elsewhere: the queue drains without writing."""
        self.error = self.error or RuntimeError("stopped")
        self.queue.put(None)
        self.thread.join()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def execute(plan: Plan, folder: Path, *, shard_size: int, kernel: str = "auto",
            threads: int | None = None, progress: bool = True) -> Summary:
    """Write the plan's tensors into ``folder`` (an empty, temporary folder)."""
    from tqdm import tqdm

    from .api.kernels import default_threads

    kernel_name = select_kernel(plan, kernel)
    if kernel_name == "torch":
        import torch  # imported here so that its start-up is not timed as merging

        if threads:
            torch.set_num_threads(threads)
    threads = threads or default_threads()
    summary = Summary(output=folder, kernel=kernel_name, notices=list(plan.notices),
                      threads=threads if kernel_name == "c" else None)
    writer = ShardedWriter(folder, [(t.name, t.dtype, t.shape) for t in plan.tensors], shard_size)
    total = sum(t.nbytes for t in plan.tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=True if not progress else None, desc="merging",
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()
    behind = _WriteBehind(writer)
    fallback = 0
    try:
        for i, tp in enumerate(plan.tensors):
            sources = tp.merge_sources + ([tp.carry_from] if tp.carry_from else [])
            if i + 1 < len(plan.tensors):  # let the OS read the next tensor while this one merges
                nxt = plan.tensors[i + 1]
                for model, info in nxt.merge_sources + ([nxt.carry_from] if nxt.carry_from else []):
                    model.checkpoint.prefetch(info.name)
            if tp.action == "carry":
                model, info = tp.carry_from
                ckpt = model.checkpoint
                # the C path copies bytes and never needs torch
                out = ckpt.raw(info.name) if kernel_name == "c" and ckpt.format == "safetensors" \
                    else ckpt.read(info.name)
                summary.carried += 1
            else:
                out = None
                if kernel_name == "c" and tp.vocab is None:  # gathered vocabulary rows take the torch path
                    out = _merge_one_c(tp, plan.strategy, plan.layout.checkpoint, threads)
                    fallback += out is None
                if out is None:
                    out = _merge_one(tp, plan.strategy, plan.layout.checkpoint)
                summary.merged += 1

            def done(sources=sources, nbytes=tp.nbytes, i=i) -> None:
                for model, info in sources:
                    model.checkpoint.release(info.name)
                bar.update(nbytes)
                bar.set_postfix_str(f"{i + 1}/{len(plan.tensors)} tensors", refresh=False)

            behind.put(tp.name, out, done)
            del out
        behind.close()
        summary.files = writer.finish()
    finally:
        if behind.thread.is_alive():
            behind.close_quietly()
        bar.close()
    if fallback:
        summary.notices.append(f"{fallback} tensor(s) the C kernels cannot read (a dtype other than "
                               f"bf16/fp16/fp32, a pytorch_model.bin input, or vocabulary rows of the "
                               f"layout model carried into another dtype) were merged by the torch reference")
    summary.bytes_written = total
    summary.seconds = time.perf_counter() - start
    return summary
