"""The stages of ``fusion fuse``: represent → fuse → train → merge → evaluate → report.

Every stage's product is keyed by everything it depends on and written atomically (the heavy
stages chunk by chunk), so a re-run of an interrupted (or finished) run reuses what is already
there and redoes only the rest. Under torchrun, every process scores, aligns and trains its share
(:mod:`fusion.fuse.stages`); process 0 merges, evaluates and reports.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..api.errors import FusionError
from ..api.resolver import ResolveOptions, looks_like_hub_name
from ..resolve import ResolvedModel, resolve
from .config import FuseConfig, load_fuse_config

STAGES = ("represent", "fuse", "train", "merge")


def short_name(reference: str) -> str:
    ref = reference.split("@", 1)[0].rstrip("/")
    name = ref.rsplit("/", 1)[-1] if looks_like_hub_name(reference) else Path(ref).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def unique_names(references: list[str]) -> list[str]:
    names: list[str] = []
    for ref in references:
        name, n = short_name(ref), 2
        while name in names:
            name, n = f"{short_name(ref)}_{n}", n + 1
        names.append(name)
    return names


@dataclass
class Model:
    """A model of the fusion: the resolved model and what the stages keep of it."""

    source: ResolvedModel
    name: str  # file-system name: targets/<pivot>-<source>, cache/represent-<name>
    tokenizer: Any = None
    key: str = ""  # of its representations
    reading: Any = None  # how it reads the data (fusion.fuse.reading.Reading)
    store: Any = None  # its representation chunks (fusion.fuse.shards.Store)
    fused_key: str = ""
    target_key: str = ""

    @property
    def label(self) -> str:
        """Where the config names it: "pivot", "sources[1]"."""
        return self.source.where.removesuffix(".model")

    @property
    def reference(self) -> str:
        return self.source.reference

    @property
    def folder(self) -> Path:
        return self.source.folder


@dataclass
class Run:
    config: FuseConfig
    output: Path
    pivot: Model
    sources: list[Model]
    train_set: list
    heldout: list
    device: str
    rank: int
    size: int
    say: Callable[[str], None]
    progress: bool = True
    report: dict[str, Any] = field(default_factory=dict)
    local_rank: int = 0
    local_size: int = 1
    workers: int | None = None  # alignment processes outside torchrun (None: one per CPU)
    gpu_memory: list[int] | None = None  # bytes of each GPU of this machine

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def cache(self) -> Path:
        return self.output / "cache"

    @property
    def eval_dtype(self) -> str:
        # float32 on CPU (half-precision matmuls are slow there); the training dtype on GPUs, for memory
        return self.config.training.dtype if self.device.startswith("cuda") else "float32"

    def bar(self, total: int | None, desc: str, unit: str):
        """A progress bar on process 0's terminal (none when quiet, redirected or on other processes)."""
        import sys

        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                    mininterval=0.5, disable=None if self.progress and self.main_process else True)

    def stage(self, name: str, started: float, **extra: Any) -> None:
        self.report["stages"][name] = {"seconds": time.perf_counter() - started, **extra}


def run_fuse(config_path: str | Path, output: Path, *, until: str | None = None, force: bool = False,
             offline: bool = False, cache_dir: str | None = None, echo: Callable[[str], None] = print,
             progress: bool = True, workers: int | None = None) -> dict[str, Any] | None:
    """Run (or resume) pairwise fusion; returns the report on process 0, None on the others.

    ``workers`` > 1 aligns on that many spawned processes (outside torchrun), which import the
    calling script's main module: a script that calls this needs ``if __name__ == "__main__":``.
    """
    from . import stages
    from .models import transformers
    from .parallel import init_distributed

    transformers()  # fail early, with the install hint, when the extra is missing
    if until is not None and until not in STAGES:
        raise FusionError(f"--until {until!r} is unknown; use one of {', '.join(STAGES)}")
    started = time.perf_counter()
    config = load_fuse_config(config_path)
    init_distributed()
    run = _open(config, Path(output), force, ResolveOptions(base_dir=config.base_dir, offline=offline,
                                                            cache_dir=cache_dir), echo)
    run.progress, run.workers = progress, workers
    stages.represent(run)
    if until != "represent":
        stages.fuse(run)
    if until not in ("represent", "fuse"):
        stages.train(run)
    if not run.main_process:
        return None
    merged, merge_key = None, ""
    if until is None or until == "merge":
        merged, merge_key = _merge(run)
    if until not in ("represent", "fuse"):
        _evaluate(run, merged, merge_key)
    return _finish(run, started)


def _open(config: FuseConfig, output: Path, force: bool, options: ResolveOptions, echo) -> Run:
    """Resolve the models (process 0 first, so a download happens once), load tokenizers and data."""
    from ..writer import check_output
    from . import models
    from .data import load_examples, split
    from .parallel import barrier, local, world

    rank, size = world()
    if rank:
        barrier()
    refs = [("pivot", config.pivot)] + [(f"sources[{i}].model", r) for i, r in enumerate(config.sources)]
    resolved = [resolve(ref, options, where) for where, ref in refs]
    if not rank:
        barrier()
    entries = [Model(r, name) for r, name in zip(resolved, unique_names([r for _, r in refs]))]
    check_output(output, [(f"{m.label} ({m.reference})", m.folder) for m in entries])
    if not rank:
        if force:
            for sub in ("cache", "targets", "merged"):
                shutil.rmtree(output / sub, ignore_errors=True)
        (output / "cache").mkdir(parents=True, exist_ok=True)
        (output / "targets").mkdir(exist_ok=True)
    barrier()
    for m in entries:
        m.tokenizer = models.load_tokenizer(m.folder, m.label)
    pivot, sources = entries[0], entries[1:]
    examples = load_examples(config.data, pivot.tokenizer)
    if config.eval_data is not None:
        train_set, heldout = examples, load_examples(config.eval_data, pivot.tokenizer)
    else:
        train_set, heldout = split(examples, config.eval_fraction, config.training.seed)
    quiet = lambda _m: None  # noqa: E731  (only process 0 talks)
    run = Run(config, output, pivot, sources, train_set, heldout, models.device(), rank, size,
              quiet if rank else echo)
    run.local_rank, run.local_size = local()
    run.gpu_memory = models.gpu_memory()
    run.report = {
        "pivot": {"reference": pivot.reference, "path": str(pivot.folder), "name": pivot.name},
        "sources": [{"reference": s.reference, "path": str(s.folder), "name": s.name} for s in sources],
        "data": {"file": str(config.data), "train": len(train_set), "heldout": len(heldout)},
        "alignment_method": config.alignment, "fallback": config.fallback, "carry": config.carry,
        "fusion_function": config.fusion_function, "training_config": asdict(config.training),
        "merge": {"method": config.merge_method, "parameters": config.merge_parameters},
        "processes": size, "device": run.device, "stages": {}, "notes": [], "output": str(output),
        "outputs": [], "config": config.text,
    }
    if any(e.chat for e in examples) and not getattr(pivot.tokenizer, "chat_template", None):
        run.report["notes"].append("the pivot has no chat template, so conversations were written as "
                                   "'role: content' lines")
    return run


def _record(run: Run, name: str, key: str) -> dict | None:
    """A small stage's cached result (cache/<name>.json) if it was made from the inputs ``key``."""
    try:
        found = json.loads((run.cache / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return found if found.get("key") == key else None


def _keep(run: Run, name: str, record: dict) -> None:
    import os

    path = run.cache / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _merge(run: Run) -> tuple[Path | None, str]:
    """Stage 4: merge the targets with the configured strategy, the pivot as base (reused when
    the targets and the merge settings are unchanged)."""
    from ..host import get_strategy
    from ..pipeline import merge
    from .distributions import targets_key
    from .models import fingerprint
    from .report import merged_note
    from .stages import target_folder

    t0 = time.perf_counter()
    c = run.config
    strategy = get_strategy(c.merge_method)
    targets = [target_folder(run, s) for s in run.sources]
    key = targets_key("merge", fingerprint(run.pivot.folder), [s.target_key for s in run.sources], c.merge_method,
                      c.merge_parameters)
    if len(targets) < 2 and strategy.base != "unused":
        run.report["notes"].append("one source, so there is nothing to merge: the target is the result")
        run.stage("merge", t0, note="skipped")
        return None, key
    merged = run.output / "merged"
    done = _record(run, "merge", key)
    if done is not None and (merged / "config.json").is_file():
        run.report["outputs"].append("merged")
        run.report["merge"]["tensors"] = done["tensors"]
        run.stage("merge", t0, note="reused")
        return merged, key
    doc: dict[str, Any] = {"merge_method": c.merge_method}
    if strategy.base != "unused":
        doc["base_model"] = str(run.pivot.folder.resolve())
    doc["models"] = [{"model": str(t.resolve())} for t in targets]
    if c.merge_parameters:
        doc["parameters"] = c.merge_parameters
    summary = merge(doc, merged, force=True, offline=True, base_dir=run.output)
    card = merged / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + merged_note([str(t.relative_to(run.output)) for t in targets]))
    tensors = {"merged": summary.merged, "carried": summary.carried}
    _keep(run, "merge", {"key": key, "tensors": tensors})
    run.report["outputs"].append("merged")
    run.report["merge"]["tensors"] = tensors
    run.stage("merge", t0, note="computed")
    return merged, key


def _evaluate(run: Run, merged: Path | None, merge_key: str) -> None:
    """Held-out loss of the pivot, every target and the merged model (reused when they and the
    held-out data are unchanged)."""
    from . import models
    from .distributions import targets_key
    from .evaluate import heldout_loss
    from .stages import target_folder

    if not run.heldout:
        run.report["notes"].append("no held-out data, so no held-out loss (set eval_data)")
        return
    t0 = time.perf_counter()
    cfg = run.config.representations
    key = targets_key("evaluate", models.fingerprint(run.pivot.folder), [s.target_key for s in run.sources],
                      merge_key if merged is not None else None, [[e.text, e.spans] for e in run.heldout],
                      cfg.max_length, run.eval_dtype)
    done = _record(run, "evaluate", key)
    if done is not None:
        run.report["heldout_loss"] = done["heldout_loss"]
        run.stage("evaluate", t0, note="reused")
        return

    def loss(folder: Path, label: str) -> float | None:
        model = models.load_model(folder, label, run.eval_dtype, run.device)
        value = heldout_loss(model, run.pivot.tokenizer, run.heldout, cfg.max_length, cfg.batch_size)
        del model
        gc.collect()
        return value

    held: dict[str, Any] = {"pivot": loss(run.pivot.folder, "pivot"), "targets": {}}
    for s in run.sources:
        target = target_folder(run, s)
        held["targets"][target.name] = loss(target, target.name)
    if merged is not None:
        held["merged"] = loss(merged, "merged")
    _keep(run, "evaluate", {"key": key, "heldout_loss": held})
    run.report["heldout_loss"] = held
    run.stage("evaluate", t0, note="computed")


def _finish(run: Run, started: float) -> dict[str, Any]:
    from .report import plot, write_report

    if run.report.get("training") and plot(run.report, run.output / "loss.png"):
        run.report["outputs"].append("loss.png")
    run.report["seconds"] = time.perf_counter() - started
    run.report["outputs"] += ["report.json", "report.md"]
    run.say(write_report(run.report, run.output))
    return run.report
