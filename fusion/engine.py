"""Executing a plan: stream one tensor at a time (read → merge → cast → write), then the files
around the weights (config, tokenizer, provenance, model card).

Memory stays bounded by the largest tensor times the number of inputs: each input is a view into
a memory map whose pages are released once the tensor is written.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .checkpoint import DTYPES, Checkpoint
from .errors import FusionError, MergeError
from .plan import Plan, TensorPlan
from .writer import ShardedWriter, atomic_folder

#: Files copied from the layout model besides the weights (when present).
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
)
KERNELS = ("auto", "c", "torch")


@dataclass
class Summary:
    output: Path
    merged: int = 0
    carried: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    kernel: str = "torch"
    files: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)

    def text(self) -> str:
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds > 0 else 0.0
        lines = [f"wrote {self.output}: {self.merged} tensors merged, {self.carried} carried, "
                 f"{self.bytes_written / 1e6:,.1f} MB in {len(self.files)} file(s), "
                 f"{self.seconds:.2f} s ({rate:,.0f} MB/s, {self.kernel} kernel)"]
        lines += [f"note: {n}" for n in self.notices]
        return "\n".join(lines)


def select_kernel(plan: Plan, kernel: str) -> tuple[str, Callable]:
    """The function that merges one tensor: the strategy's torch reference for now.

    A compiled kernel for a strategy plugs in here; ``auto`` picks it when it is built.
    """
    if kernel not in KERNELS:
        raise FusionError(f"--kernel {kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    if kernel == "c":
        raise FusionError("the C kernels are not built in this installation; use --kernel torch or auto")
    return "torch", plan.strategy.merge


#: Elements per chunk for elementwise strategies: bounds the float32 working set per input.
CHUNK_ELEMENTS = 1 << 21


def _row_chunks(shape: tuple[int, ...], rows: int, elementwise: bool) -> list:
    """Index expressions that split the merged rows into chunks (one chunk unless elementwise)."""
    if not shape:
        return [...]  # a scalar
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:]))) if elementwise else max(rows, 1)
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)] or [slice(0, 0)]


def _merge_one(tp: TensorPlan, fn: Callable, elementwise: bool, layout: Checkpoint) -> Any:
    import torch

    rows = tp.rows if tp.rows is not None else (tp.shape[0] if tp.shape else 0)
    views = [model.checkpoint.read(info.name) for model, info in tp.merge_sources]
    full = torch.empty(tp.shape, dtype=getattr(torch, DTYPES[tp.dtype][0]))
    out = full[:rows] if tp.rows is not None else full  # merged rows; the rest are carried below
    for sl in _row_chunks(tp.shape, rows, elementwise):
        # fresh float32 copies: inputs are read-only maps and strategies may work in place
        chunk = [v[sl].to(torch.float32, copy=True) for v in views]
        base, inputs = (chunk[0], chunk[1:]) if tp.base else (None, chunk)
        try:
            result = fn(base, inputs, tp.params)
        except FusionError as exc:
            raise MergeError(f"tensor {tp.name}: {exc}") from None
        target = out[sl]
        if not isinstance(result, torch.Tensor) or result.shape != target.shape:
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise MergeError(f"strategy returned {got} for tensor {tp.name}, expected shape {list(target.shape)}")
        target.copy_(result)
        del chunk, base, inputs, result
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise MergeError(f"merged tensor {tp.name} has {bad} non-finite values (inf/NaN) in {tp.dtype}; "
                         f"check the weights and lambda, or the input models")
    if tp.rows is not None and tp.rows < tp.shape[0]:
        full[tp.rows:] = layout.read(tp.name)[tp.rows:]
    return full


def execute(plan: Plan, folder: Path, *, shard_size: int, kernel: str = "auto",
            progress: bool = True) -> Summary:
    """Write the plan's tensors into ``folder`` (an empty, temporary folder)."""
    import torch  # noqa: F401  (imported here so its start-up is not timed as merging)
    from tqdm import tqdm

    kernel_name, fn = select_kernel(plan, kernel)
    summary = Summary(output=folder, kernel=kernel_name, notices=list(plan.notices))
    writer = ShardedWriter(folder, [(t.name, t.dtype, t.shape) for t in plan.tensors], shard_size)
    total = sum(t.nbytes for t in plan.tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=True if not progress else None, desc="merging",
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()
    try:
        for i, tp in enumerate(plan.tensors):
            if tp.action == "carry":
                model, info = tp.carry_from
                out = model.checkpoint.read(info.name)
                summary.carried += 1
            else:
                out = _merge_one(tp, fn, plan.strategy.elementwise, plan.layout.checkpoint)
                summary.merged += 1
            writer.write(tp.name, out)
            del out
            for model, info in tp.merge_sources + ([tp.carry_from] if tp.carry_from else []):
                model.checkpoint.release(info.name)
            bar.update(tp.nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(plan.tensors)} tensors", refresh=False)
        summary.files = writer.finish()
    finally:
        bar.close()
    summary.bytes_written = total
    summary.seconds = time.perf_counter() - start
    return summary


def write_side_files(plan: Plan, folder: Path) -> None:
    """config.json (dtype updated), tokenizer/processor files and generation config."""
    source = plan.layout.folder
    config = dict(plan.layout.checkpoint.config)
    if plan.config.out_dtype:
        name = DTYPES[plan.config.out_dtype][0]
        # transformers 5 writes "dtype", older versions "torch_dtype": update what is there
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def provenance(plan: Plan) -> dict[str, Any]:
    """Machine-readable record of what was merged, for reproducing the merge exactly."""
    from . import __version__

    resolved = plan.resolve_options.resolved
    return {
        "fusion_version": __version__,
        "merge_method": plan.strategy.name,
        "inputs": [{
            "label": m.label, "reference": m.reference, "path": str(m.folder),
            "architecture": m.spec.name, "revision": resolved.get(m.reference),
        } for m in plan.inputs],
        "config": plan.config.text,
    }


def check_output(plan: Plan, output: Path) -> None:
    """Never write into, or replace, an input model's folder."""
    out = output.absolute().resolve()
    for m in plan.inputs:
        folder = m.folder.resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise FusionError(f"output folder {output} overlaps the input model {m.label}; "
                              f"inputs are never modified: choose another -o")


def run_merge(plan: Plan, output: Path, *, force: bool = False, shard_size: int = 5 * 10**9,
              kernel: str = "auto", progress: bool = True, card: bool = True) -> Summary:
    """Execute ``plan`` into ``output`` atomically: a failed run leaves nothing behind."""
    from .card import model_card

    output = Path(output)
    check_output(plan, output)
    select_kernel(plan, kernel)  # fail before creating anything
    with atomic_folder(output, force) as tmp:
        summary = execute(plan, tmp, shard_size=shard_size, kernel=kernel, progress=progress)
        write_side_files(plan, tmp)
        (tmp / "fusion.json").write_text(json.dumps(provenance(plan), indent=2) + "\n")
        if card:
            (tmp / "README.md").write_text(model_card(plan, plan.resolve_options.resolved))
    summary.output = output
    return summary
