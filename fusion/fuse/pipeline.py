"""The stages of ``fusion fuse``: represent → fuse → train → merge → evaluate → report.

Every stage's product is keyed by everything it depends on and written atomically, so a re-run
of an interrupted (or finished) run reuses what is already there and redoes only the rest.
Under torchrun, process 0 scores the data, fuses, merges and reports; every process trains.
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

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def cache(self) -> Path:
        return self.output / "cache"

    @property
    def score_dtype(self) -> str:
        # float32 on CPU (bf16 matmuls are slow there); the training dtype on GPUs, for memory
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
             progress: bool = True) -> dict[str, Any] | None:
    """Run (or resume) pairwise fusion; returns the report on process 0, None on the others."""
    from . import train
    from .models import transformers

    transformers()  # fail early, with the install hint, when the extra is missing
    if until is not None and until not in STAGES:
        raise FusionError(f"--until {until!r} is unknown; use one of {', '.join(STAGES)}")
    started = time.perf_counter()
    config = load_fuse_config(config_path)
    train.init_distributed()
    run = _open(config, Path(output), force, ResolveOptions(base_dir=config.base_dir, offline=offline,
                                                            cache_dir=cache_dir), echo)
    run.progress = progress
    _represent(run)
    if until != "represent":
        _fuse(run)
    if until not in ("represent", "fuse"):
        _train(run)
    if not run.main_process:
        return None
    merged = None
    if until is None or until == "merge":
        merged = _merge(run)
    if until not in ("represent", "fuse"):
        _evaluate(run, merged)
    return _finish(run, started)


def _open(config: FuseConfig, output: Path, force: bool, options: ResolveOptions, echo) -> Run:
    """Resolve the models (process 0 first, so a download happens once), load tokenizers and data."""
    from ..writer import check_output
    from . import models, train
    from .data import load_examples, split

    rank, size = train.world()
    if rank:
        train.barrier()
    refs = [("pivot", config.pivot)] + [(f"sources[{i}].model", r) for i, r in enumerate(config.sources)]
    resolved = [resolve(ref, options, where) for where, ref in refs]
    if not rank:
        train.barrier()
    entries = [Model(r, name) for r, name in zip(resolved, unique_names([r for _, r in refs]))]
    check_output(output, [(f"{m.label} ({m.reference})", m.folder) for m in entries])
    if not rank:
        if force:
            for sub in ("cache", "targets", "merged"):
                shutil.rmtree(output / sub, ignore_errors=True)
        (output / "cache").mkdir(parents=True, exist_ok=True)
        (output / "targets").mkdir(exist_ok=True)
    train.barrier()
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
    run.report = {
        "pivot": {"reference": pivot.reference, "path": str(pivot.folder), "name": pivot.name},
        "sources": [{"reference": s.reference, "path": str(s.folder), "name": s.name} for s in sources],
        "data": {"file": str(config.data), "train": len(train_set), "heldout": len(heldout)},
        "alignment_method": config.alignment, "fallback": config.fallback,
        "fusion_function": config.fusion_function, "training_config": asdict(config.training),
        "merge": {"method": config.merge_method, "parameters": config.merge_parameters},
        "processes": size, "device": run.device, "stages": {}, "notes": [], "output": str(output),
        "outputs": [], "config": config.text,
    }
    if any(e.chat for e in examples) and not getattr(pivot.tokenizer, "chat_template", None):
        run.report["notes"].append("the pivot has no chat template, so conversations were written as "
                                   "'role: content' lines")
    return run


def _represent(run: Run) -> None:
    """Stage 1: every model's top-k logits and sequence cross-entropies over the data."""
    from . import models, train
    from .represent import Representations, cache_key, compute

    t0 = time.perf_counter()
    cfg = run.config.representations
    reused = 0
    for m in [run.pivot] + run.sources:
        m.key = cache_key(models.fingerprint(m.folder), run.train_set, cfg.top_k, cfg.max_length)
        path = run.cache / f"represent-{m.name}.safetensors"
        if not run.main_process:
            continue
        if Representations.load(path, m.key) is not None:
            reused += 1
            continue
        run.say(f"representations: {m.label} {m.reference} ({len(run.train_set)} sequences)")
        model = models.load_model(m.folder, m.label, run.score_dtype, run.device)
        with run.bar(len(run.train_set), f"scoring {m.name}", "seq") as bar:
            reps = compute(model, m.tokenizer, run.train_set, top_k=cfg.top_k, max_length=cfg.max_length,
                           batch_size=cfg.batch_size, device=run.device, progress=bar.update)
        reps.save(path, m.key)
        del model, reps
        gc.collect()
    total = 1 + len(run.sources)
    run.stage("represent", t0, computed=total - reused, reused=reused,
              note=f"{total - reused} computed, {reused} reused")
    train.barrier()


def _load_reps(run: Run, m: Model):
    from .represent import Representations

    reps = Representations.load(run.cache / f"represent-{m.name}.safetensors", m.key)
    if reps is None:
        raise FusionError(f"the cached representations of {m.label} in {run.cache} disappeared during the run; "
                          f"run the command again")
    return reps


def _fused_key(run: Run, s: Model) -> str:
    from .distributions import targets_key

    c = run.config
    return targets_key("fused", run.pivot.key, s.key, c.alignment, c.fallback, c.fusion_function)


def _fuse(run: Run) -> None:
    """Stage 2: align each source's distributions to the pivot and fuse them per sequence."""
    from ..host import alignments, fusion_functions
    from . import train
    from .tokens import surface_strings
    from .distributions import FusedTargets, align, fuse

    t0 = time.perf_counter()
    c = run.config
    reused = 0
    run.report["alignment"], run.report["fusion"] = {}, {}
    pivot_reps = pivot_tokens = None
    for s in run.sources:
        if not run.main_process:
            continue
        key = _fused_key(run, s)
        path, info_path = run.cache / f"fused-{s.name}.safetensors", run.cache / f"fused-{s.name}.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("key") == key and FusedTargets.load(path, key) is not None:
            reused += 1
        else:
            run.say(f"alignment and fusion: {s.label} {s.reference}")
            if pivot_reps is None:
                pivot_reps, pivot_tokens = _load_reps(run, run.pivot), surface_strings(run.pivot.tokenizer)
            source_reps = _load_reps(run, s)
            aligned = align(pivot_reps, source_reps, pivot_tokens, surface_strings(s.tokenizer),
                            alignments()[c.alignment], c.fallback)
            fused = fuse(pivot_reps, aligned, source_reps.ce, fusion_functions()[c.fusion_function])
            w = fused.weights
            info = {"key": key, "coverage": aligned.coverage, "fusion": {
                "pivot_chosen": int((w[:, 0] >= w[:, 1]).sum()), "source_chosen": int((w[:, 1] > w[:, 0]).sum()),
                "source_weight_mean": float(w[:, 1].mean()) if len(w) else 0.0}}
            fused.save(path, key)
            info_path.write_text(json.dumps(info, indent=2))
        run.report["alignment"][s.name] = info["coverage"]
        run.report["fusion"][s.name] = info["fusion"]
    total = len(run.sources)
    run.stage("fuse", t0, note=f"{total - reused} computed, {reused} reused")
    train.barrier()


def _target(run: Run, s: Model) -> Path:
    return run.output / "targets" / f"{run.pivot.name}-{s.name}"


def _train(run: Run) -> None:
    """Stage 3: distil each source's fused targets into a copy of the pivot (on every process)."""
    import torch

    from ..writer import atomic_folder, copy_support_files
    from . import models, train
    from .distributions import FusedTargets, targets_key
    from .report import target_card

    t0 = time.perf_counter()
    c, tcfg = run.config, run.config.training
    pad = run.pivot.tokenizer.pad_token_id if run.pivot.tokenizer.pad_token_id is not None else 0
    run.report["training"] = {}
    reused = 0
    pivot_reps = None
    for i, s in enumerate(run.sources):
        target = _target(run, s)
        fused_key = _fused_key(run, s)
        key = targets_key("target", fused_key, asdict(tcfg), run.size)
        record = target / "fuse.json"
        done = json.loads(record.read_text()) if record.is_file() else {}
        if done.get("key") == key:
            reused += 1
            run.report["training"][s.name] = {"curve": done["curve"], "reused": True}
            continue
        run.say(f"training: {run.pivot.name} on {s.name} ({tcfg.epochs} epoch(s), {run.size} process(es))")
        if pivot_reps is None:
            pivot_reps = _load_reps(run, run.pivot)
        fused = FusedTargets.load(run.cache / f"fused-{s.name}.safetensors", fused_key)
        if fused is None:
            raise FusionError(f"the fused targets of {s.label} are missing from {run.cache}; run the command again")
        model = models.load_model(run.pivot.folder, "pivot", "float32", run.device)
        with run.bar(None, f"training on {s.name}", "step") as bar:
            def step(entry: dict) -> None:
                bar.update(1)
                bar.set_postfix_str(f"loss {entry['loss']:.4f}", refresh=False)

            curve = train.distil(model, pivot_reps, fused, tcfg, run.device, pad_id=pad, on_step=step)
        if run.main_process:
            model.to(getattr(torch, tcfg.dtype))
            with atomic_folder(target, force=True) as tmp:
                model.save_pretrained(tmp)
                copy_support_files(run.pivot.folder, tmp, exclude=("config.json", "generation_config.json"))
                (tmp / "README.md").write_text(target_card(run.pivot.reference, s.reference, c.text, asdict(tcfg),
                                                           c.alignment, c.fusion_function))
                (tmp / "fuse.json").write_text(json.dumps({"key": key, "curve": curve}, indent=2) + "\n")
        run.report["training"][s.name] = {"curve": curve, "reused": False}
        del model, fused
        gc.collect()
        train.barrier()
    total = len(run.sources)
    run.stage("train", t0, note=f"{total - reused} trained, {reused} reused")
    run.report["outputs"] += [str(_target(run, s).relative_to(run.output)) for s in run.sources]


def _merge(run: Run) -> Path | None:
    """Stage 4: merge the targets with the configured strategy, the pivot as base."""
    from ..host import get_strategy
    from ..pipeline import merge
    from .report import merged_note

    t0 = time.perf_counter()
    c = run.config
    strategy = get_strategy(c.merge_method)
    targets = [_target(run, s) for s in run.sources]
    if len(targets) < 2 and strategy.base != "unused":
        run.report["notes"].append("one source, so there is nothing to merge: the target is the result")
        run.stage("merge", t0, note="skipped")
        return None
    doc: dict[str, Any] = {"merge_method": c.merge_method}
    if strategy.base != "unused":
        doc["base_model"] = str(run.pivot.folder.resolve())
    doc["models"] = [{"model": str(t.resolve())} for t in targets]
    if c.merge_parameters:
        doc["parameters"] = c.merge_parameters
    merged = run.output / "merged"
    summary = merge(doc, merged, force=True, offline=True, base_dir=run.output)
    card = merged / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + merged_note([str(t.relative_to(run.output)) for t in targets]))
    run.report["outputs"].append("merged")
    run.report["merge"]["tensors"] = {"merged": summary.merged, "carried": summary.carried}
    run.stage("merge", t0)
    return merged


def _evaluate(run: Run, merged: Path | None) -> None:
    """Held-out loss of the pivot, every target and the merged model."""
    from . import models
    from .train import heldout_loss

    if not run.heldout:
        run.report["notes"].append("no held-out data, so no held-out loss (set eval_data)")
        return
    t0 = time.perf_counter()
    cfg = run.config.representations

    def loss(folder: Path, label: str) -> float | None:
        model = models.load_model(folder, label, run.score_dtype, run.device)
        value = heldout_loss(model, run.pivot.tokenizer, run.heldout, cfg.max_length, cfg.batch_size, run.device)
        del model
        gc.collect()
        return value

    held: dict[str, Any] = {"pivot": loss(run.pivot.folder, "pivot"), "targets": {}}
    for s in run.sources:
        target = _target(run, s)
        held["targets"][target.name] = loss(target, target.name)
    if merged is not None:
        held["merged"] = loss(merged, "merged")
    run.report["heldout_loss"] = held
    run.stage("evaluate", t0)


def _finish(run: Run, started: float) -> dict[str, Any]:
    from .report import plot, write_report

    if run.report.get("training") and plot(run.report, run.output / "loss.png"):
        run.report["outputs"].append("loss.png")
    run.report["seconds"] = time.perf_counter() - started
    run.report["outputs"] += ["report.json", "report.md"]
    run.say(write_report(run.report, run.output))
    return run.report
