"""The stages of ``fusion fuse``: represent → fuse → train → merge → evaluate → report.

Every stage's product is keyed by everything it depends on and written atomically, so a re-run
of an interrupted (or finished) run reuses what is already there and redoes only the rest.
Under torchrun, process 0 does the representations, fusion, merge and report; every process
trains.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from ..errors import FusionError
from ..resolve import ResolveOptions, looks_like_hub_name, resolve
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


def _check_output(output: Path, folders: list[tuple[str, Path]]) -> None:
    out = output.absolute().resolve()
    for label, folder in folders:
        folder = folder.resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise FusionError(f"output folder {output} overlaps the model {label}; "
                              f"inputs are never modified: choose another -o")


def _free() -> None:
    gc.collect()


def run_fuse(config_path: str | Path, output: Path, *, until: str | None = None, force: bool = False,
             offline: bool = False, cache_dir: str | None = None,
             echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run (or resume) pairwise fusion; returns the report on process 0, None on the others."""
    from . import models, train
    from .models import transformers

    transformers()  # fail early, with the install hint, when the extra is missing
    if until is not None and until not in STAGES:
        raise FusionError(f"--until {until!r} is unknown; use one of {', '.join(STAGES)}")
    config = load_fuse_config(config_path)
    distributed = train.init_distributed()
    rank, size = train.world()
    lead = rank == 0
    say = echo if lead else (lambda _msg: None)
    started = time.perf_counter()
    stages: dict[str, dict[str, Any]] = {}

    # resolve: the same folders on every process (process 0 first, so a download happens once)
    options = ResolveOptions(base_dir=config.base_dir, offline=offline, cache_dir=cache_dir)
    if not lead:
        train.barrier()
    pivot_dir = resolve(config.pivot, options, "pivot")
    source_dirs = [resolve(ref, options, f"sources[{i}].model") for i, ref in enumerate(config.sources)]
    if lead:
        train.barrier()
    names = unique_names([config.pivot] + config.sources)
    pivot_name, source_names = names[0], names[1:]
    _check_output(output, [("pivot", pivot_dir)] + [(f"sources[{i}]", d) for i, d in enumerate(source_dirs)])
    cache = output / "cache"
    if lead:
        if force and output.exists():
            for sub in ("cache", "targets", "merged"):
                shutil.rmtree(output / sub, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        (output / "targets").mkdir(exist_ok=True)
    train.barrier()

    from .data import load_examples, split

    pivot_tok = models.load_tokenizer(pivot_dir, "pivot")
    source_toks = [models.load_tokenizer(d, f"sources[{i}]") for i, d in enumerate(source_dirs)]
    examples = load_examples(config.data, pivot_tok)
    if config.eval_data is not None:
        train_set, heldout = examples, load_examples(config.eval_data, pivot_tok)
    else:
        train_set, heldout = split(examples, config.eval_fraction, config.training.seed)
    device = models.device()
    reps_cfg = config.representations
    report: dict[str, Any] = {
        "pivot": {"reference": config.pivot, "path": str(pivot_dir), "name": pivot_name},
        "sources": [{"reference": r, "path": str(d), "name": n}
                    for r, d, n in zip(config.sources, source_dirs, source_names)],
        "data": {"file": str(config.data), "train": len(train_set), "heldout": len(heldout)},
        "alignment_method": config.alignment, "fallback": config.fallback,
        "fusion_function": config.fusion_function, "training_config": asdict(config.training),
        "merge": {"method": config.merge_method, "parameters": config.merge_parameters},
        "processes": size, "device": device, "stages": stages, "notes": [], "output": str(output),
        "outputs": [], "config": config.text,
    }

    # 1. representations
    from .represent import Representations, cache_key, compute

    t0 = time.perf_counter()
    keys, reused = [], 0
    for label, folder, tok, name in [("pivot", pivot_dir, pivot_tok, pivot_name)] + [
            (f"sources[{i}]", d, t, n) for i, (d, t, n) in enumerate(zip(source_dirs, source_toks, source_names))]:
        key = cache_key(models.fingerprint(folder), train_set, reps_cfg.top_k, reps_cfg.max_length)
        keys.append(key)
        path = cache / f"represent-{name}.safetensors"
        if not lead:
            continue
        if Representations.load(path, key) is not None:
            reused += 1
            continue
        say(f"representations: {label} ({len(train_set)} sequences)")
        model = models.load_model(folder, label, "float32", device)
        reps = compute(model, tok, train_set, top_k=reps_cfg.top_k, max_length=reps_cfg.max_length,
                       batch_size=reps_cfg.batch_size, device=device)
        reps.save(path, key)
        del model, reps
        _free()
    stages["represent"] = {"seconds": time.perf_counter() - t0, "reused": reused,
                           "computed": len(keys) - reused,
                           "note": f"{len(keys) - reused} computed, {reused} reused"}
    train.barrier()
    if until == "represent":
        return _finish(report, output, started, lead, say)

    # 2. alignment and fused target distributions
    from ..plugins import alignments, fusion_functions
    from .align import surface_strings
    from .distributions import FusedTargets, align, fuse, targets_key

    t0 = time.perf_counter()
    pivot_reps = Representations.load(cache / f"represent-{pivot_name}.safetensors", keys[0])
    pivot_tokens = surface_strings(pivot_tok)
    fused_keys, reused = [], 0
    report["alignment"], report["fusion"] = {}, {}
    for i, (name, tok) in enumerate(zip(source_names, source_toks)):
        key = targets_key("fused", keys[0], keys[i + 1], config.alignment, config.fallback, config.fusion_function)
        fused_keys.append(key)
        path, info_path = cache / f"fused-{name}.safetensors", cache / f"fused-{name}.json"
        if not lead:
            continue
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if info.get("key") == key and FusedTargets.load(path, key) is not None:
            reused += 1
        else:
            say(f"alignment and fusion: {name}")
            source_reps = Representations.load(cache / f"represent-{name}.safetensors", keys[i + 1])
            aligned = align(pivot_reps, source_reps, pivot_tokens, surface_strings(tok),
                            alignments()[config.alignment], config.fallback)
            fused = fuse(pivot_reps, aligned, source_reps.ce, fusion_functions()[config.fusion_function])
            w = fused.weights
            info = {"key": key, "coverage": aligned.coverage, "fusion": {
                "pivot_chosen": int((w[:, 0] >= w[:, 1]).sum()), "source_chosen": int((w[:, 1] > w[:, 0]).sum()),
                "source_weight_mean": float(w[:, 1].mean()) if len(w) else 0.0}}
            fused.save(path, key)
            info_path.write_text(json.dumps(info, indent=2))
        report["alignment"][name] = info["coverage"]
        report["fusion"][name] = info["fusion"]
    stages["fuse"] = {"seconds": time.perf_counter() - t0, "note": f"{len(fused_keys) - reused} computed, "
                                                                      f"{reused} reused"}
    train.barrier()
    if until == "fuse":
        return _finish(report, output, started, lead, say)

    # 3. distillation of each source into a copy of the pivot
    from ..engine import SIDE_FILES
    from ..writer import atomic_folder
    from .report import target_card

    t0 = time.perf_counter()
    if pivot_reps is None:
        pivot_reps = Representations.load(cache / f"represent-{pivot_name}.safetensors", keys[0])
    report["training"] = {}
    target_dirs, reused = [], 0
    tcfg = config.training
    pad = pivot_tok.pad_token_id if pivot_tok.pad_token_id is not None else 0
    for i, name in enumerate(source_names):
        target = output / "targets" / f"{pivot_name}-{name}"
        target_dirs.append(target)
        key = targets_key("target", fused_keys[i], asdict(tcfg), size)
        record = target / "fuse.json"
        done = json.loads(record.read_text()) if record.is_file() else {}
        if done.get("key") == key:
            reused += 1
            report["training"][name] = {"curve": done["curve"], "reused": True}
            continue
        say(f"training: {pivot_name} on {name} ({tcfg.epochs} epoch(s), {size} process(es))")
        fused = FusedTargets.load(cache / f"fused-{name}.safetensors", fused_keys[i])
        model = models.load_model(pivot_dir, "pivot", "float32", device)
        curve = train.distil(model, pivot_reps, fused, tcfg, device, pad_id=pad)
        if lead:
            import torch

            model.to(getattr(torch, tcfg.dtype))
            with atomic_folder(target, force=True) as tmp:
                model.save_pretrained(tmp)
                for side in SIDE_FILES:
                    if side != "generation_config.json" and (pivot_dir / side).is_file():
                        shutil.copyfile(pivot_dir / side, tmp / side)
                (tmp / "README.md").write_text(target_card(config.pivot, config.sources[i], config.text,
                                                           asdict(tcfg), config.alignment, config.fusion_function))
                (tmp / "fuse.json").write_text(json.dumps({"key": key, "curve": curve}, indent=2) + "\n")
        report["training"][name] = {"curve": curve, "reused": False}
        del model, fused
        _free()
        train.barrier()
    stages["train"] = {"seconds": time.perf_counter() - t0, "note": f"{len(target_dirs) - reused} trained, "
                                                                       f"{reused} reused"}
    if not lead:
        return None
    report["outputs"] += [str(d.relative_to(output)) for d in target_dirs]
    if until == "train":
        return _finish(report, output, started, lead, say, heldout=(heldout, pivot_dir, target_dirs, None, config))

    # 4. merge the targets in parameter space
    t0 = time.perf_counter()
    merged = _merge(config, pivot_dir, target_dirs, output, report)
    stages["merge"] = {"seconds": time.perf_counter() - t0}
    return _finish(report, output, started, lead, say, heldout=(heldout, pivot_dir, target_dirs, merged, config))


def _merge(config: FuseConfig, pivot_dir: Path, target_dirs: list[Path], output: Path,
           report: dict[str, Any]) -> Path | None:
    from ..config import parse_config
    from ..engine import run_merge
    from ..plan import build_plan
    from ..plugins import get_strategy
    from .report import merged_note

    strategy = get_strategy(config.merge_method)
    if len(target_dirs) < 2 and strategy.base != "unused":
        report["notes"].append("one source, so there is nothing to merge: the target is the result")
        return None
    import yaml

    doc: dict[str, Any] = {"merge_method": config.merge_method}
    if strategy.base != "unused":
        doc["base_model"] = str(pivot_dir.resolve())
    doc["models"] = [{"model": str(d.resolve())} for d in target_dirs]
    if config.merge_parameters:
        doc["parameters"] = config.merge_parameters
    text = yaml.safe_dump(doc, sort_keys=False)
    plan = build_plan(parse_config(text), ResolveOptions(base_dir=output, offline=True))
    merged = output / "merged"
    try:
        summary = run_merge(plan, merged, force=True, progress=False)
    finally:
        plan.close()
    card = merged / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + merged_note([str(d.relative_to(output)) for d in target_dirs]))
    report["outputs"].append("merged")
    report["merge"]["tensors"] = {"merged": summary.merged, "carried": summary.carried}
    return merged


def _finish(report: dict[str, Any], output: Path, started: float, lead: bool, say,
            heldout=None) -> dict[str, Any] | None:
    from .report import plot, write_report

    if not lead:
        return None
    if heldout is not None:
        t0 = time.perf_counter()
        report["heldout_loss"] = _evaluate(*heldout)
        report["stages"]["evaluate"] = {"seconds": time.perf_counter() - t0}
    if report.get("training") and plot(report, output / "loss.png"):
        report["outputs"].append("loss.png")
    report["seconds"] = time.perf_counter() - started
    report["outputs"] += ["report.json", "report.md"]
    say(write_report(report, output))
    return report


def _evaluate(examples, pivot_dir: Path, target_dirs: list[Path], merged: Path | None,
              config: FuseConfig) -> dict[str, Any]:
    from . import models
    from .train import heldout_loss

    if not examples:
        return {}
    device = models.device()
    tok = models.load_tokenizer(pivot_dir, "pivot")
    args = (tok, examples, config.representations.max_length, config.representations.batch_size, device)

    def loss(folder: Path, label: str) -> float | None:
        model = models.load_model(folder, label, "float32", device)
        value = heldout_loss(model, *args)
        del model
        _free()
        return value

    out: dict[str, Any] = {"pivot": loss(pivot_dir, "pivot"),
                           "targets": {d.name: loss(d, d.name) for d in target_dirs}}
    if merged is not None:
        out["merged"] = loss(merged, "merged")
    return out

