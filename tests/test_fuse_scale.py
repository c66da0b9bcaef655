"""Pairwise fusion at scale, end to end on tiny models: knowledge through a source whose
tokenizer is coarser than the pivot's, scoring sharded over torchrun processes (the same chunks
as one process writes, resumed after a real signal), FSDP2 training against DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from fuse_models import copy_case  # noqa: E402

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def coarse_case(tmp_path_factory):
    from fuse_models import build_coarse_case, shared_case

    return shared_case(tmp_path_factory, "fuse-coarse-case", build_coarse_case, "coarse-heldout.jsonl")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from fuse_models import build_fusion_case, shared_case

    return shared_case(tmp_path_factory, "fuse-case", build_fusion_case, "heldout.jsonl")


def models_tokenizer(folder: Path):
    from fusion.fuse.models import load_tokenizer

    return load_tokenizer(folder, folder.name)


def _env(cwd: Path) -> dict[str, str]:
    """One thread per process, and torchrun's own temporary folders beside the test's (not in /tmp)."""
    (cwd.parent / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(cwd.parent / "tmp"))


def _torchrun(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = _env(cwd)
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "fusion", "fuse", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _chunks(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {p.name: load_file(str(p)) for p in sorted(folder.glob("chunk-*.safetensors"))}


@pytest.mark.slow
def test_knowledge_reaches_the_pivot_through_a_source_with_a_coarser_tokenizer(coarse_case, tmp_path):
    """The pivot splits every word in two; `coarse` reads each word as one token, with its own
    BOS and end-of-turn marker. With λ = 0 and the pivot's own distribution wherever nothing is
    carried, what the targets know of the pattern came through alignment: the coarse source's
    target gets about as far below the pivot as the same-tokenizer source's does."""
    from fuse_models import write_config

    from fusion.fuse.pipeline import run_fuse

    root = copy_case(coarse_case, tmp_path, ("fine_pivot", "fine_same", "coarse", "coarse-train.jsonl",
                                             "coarse-heldout.jsonl"))
    config = write_config(root, sources=("fine_same", "coarse"), pivot="fine_pivot", data="coarse-train.jsonl",
                          heldout="coarse-heldout.jsonl", max_length=96,
                          alignment="{method: statistics, fallback: pivot}")
    report = run_fuse(config, root / "out", echo=lambda _m: None, progress=False)
    held = report["heldout_loss"]
    same, coarse = held["targets"]["fine_pivot-fine_same"], held["targets"]["fine_pivot-coarse"]
    assert same < 0.5 * held["pivot"] and coarse < 0.5 * held["pivot"], held
    assert coarse - same < 0.25 * (held["pivot"] - same), held  # most of the way the same-vocabulary source goes
    positions = report["alignment"]["coarse"]["positions"]
    # each word's last piece takes the source's prediction of the next word (mapped through the
    # statistics map onto the next word's first piece); first pieces have nothing to take
    assert positions["mapped"] > 0.3 * sum(positions.values()) and positions["fallback"] > 0
    assert report["fusion"]["coarse"]["source_chosen"] > 0.8 * report["data"]["train"]

    # the cost model's disk for a model's representations is what was written
    from fusion.fuse.estimate import Recipe, measure_data, representation_bytes

    sequences, tokens, _ = measure_data(root / "coarse-train.jsonl", models_tokenizer(root / "fine_pivot"), 96)
    written = sum(p.stat().st_size for p in (root / "out" / "cache" / "represent-fine_pivot").glob("chunk-*"))
    assert representation_bytes(Recipe(sequences, tokens)) == pytest.approx(written, rel=0.05)

    # the coarse source scored with its own markers: far lower CE than reading the pivot's as text
    from fusion.fuse import models
    from fusion.fuse.data import load_examples
    from fusion.fuse.reading import Reading, markers, source_reading
    from fusion.fuse.represent import score

    pivot_tok = models.load_tokenizer(root / "fine_pivot", "pivot")
    tok = models.load_tokenizer(root / "coarse", "coarse")
    model = models.load_model(root / "coarse", "coarse")
    examples = load_examples(root / "coarse-heldout.jsonl", pivot_tok)
    own = score(model, source_reading(tok, pivot_tok), examples, top_k=2, max_length=96, batch_size=16)
    plain = score(model, Reading(tok, markers(pivot_tok)), examples, top_k=2, max_length=96, batch_size=16)
    assert float(np.mean(own.ce)) < 0.5 * float(np.mean(plain.ce))


@pytest.mark.slow
def test_sharded_scoring_equals_one_process_and_resumes_after_a_signal(case, tmp_path):
    """torchrun, two processes: killed by SIGTERM while scoring, run again, it scores only the
    chunks still missing and trains with FSDP2 in bf16; its representations, alignments and fused
    targets equal, file for file, those of one process (and its pool of alignment workers)."""
    from fuse_models import write_config

    from fusion.fuse.pipeline import run_fuse

    records = (case / "train.jsonl").read_text() * 2  # 96 sequences: 48 chunks a model
    runs = {}
    for name in ("sharded", "single"):
        root = copy_case(case, tmp_path / name, ("pivot", "source_b", "heldout.jsonl"))
        (root / "train.jsonl").write_text(records)
        runs[name] = write_config(root, sources=("source_b",), epochs=1, representations=", chunk_size: 2",
                                  training=", strategy: fsdp", lm_loss_weight=0.5)
        runs[name].write_text(runs[name].read_text().replace("dtype: float32", "dtype: bfloat16"))
    sharded = runs["sharded"].parent
    scored = sharded / "out" / "cache" / "represent-pivot"
    run = _torchrun(str(runs["sharded"]), "-o", "out", "-q", cwd=sharded, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(scored.glob("chunk-*.safetensors"))) < 4 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if run.poll() is not None:
        pytest.fail(f"torchrun ended before it was signalled: {run.communicate()[1][-3000:]}")
    os.killpg(run.pid, signal.SIGTERM)  # torchrun and both workers, mid-stage
    run.communicate(timeout=120)
    assert run.returncode != 0
    before = {p.name: p.stat().st_mtime_ns for p in scored.glob("chunk-*.safetensors")}
    assert 4 <= len(before) < 48, len(before)

    again = _torchrun(str(runs["sharded"]), "-o", "out", "--until", "train", cwd=sharded)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in scored.glob("chunk-*.safetensors")}
    assert len(after) == 48 and all(after[n] == t for n, t in before.items())  # not scored again
    assert not list(scored.glob(".*tmp*"))
    report = json.loads((sharded / "out" / "report.json").read_text())
    assert report["processes"] == 2 and report["training"]["source_b"]["strategy"] == "fsdp"
    curve = report["training"]["source_b"]["curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    target = sharded / "out" / "targets" / "pivot-source_b"
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert next(model.parameters()).dtype == torch.bfloat16

    single = runs["single"].parent
    report = run_fuse(runs["single"], single / "out", until="fuse", echo=lambda _m: None, progress=False, workers=2)
    assert "2 worker processes" in report["stages"]["fuse"]["note"]
    for store in ("represent-pivot", "represent-source_b", "align-source_b", "fused-source_b"):
        a, b = _chunks(sharded / "out" / "cache" / store), _chunks(single / "out" / "cache" / store)
        assert list(a) == list(b) and len(a) == 48, store
        for name in a:
            assert a[name].keys() == b[name].keys()
            for key in a[name]:
                assert np.array_equal(a[name][key], b[name][key], equal_nan=True), (store, name, key)


TRAIN_BOTH = """
import json, sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fusion.fuse import models, train
from fusion.fuse.config import Training
from fusion.fuse.parallel import init_distributed, world
from fusion.fuse.shards import Layout, Sequences, Store

cache, pivot_folder, pivot_key, fused_key, out = sys.argv[1:6]
init_distributed()
rank, size = world()
layout = Layout(48, 8)
pivot = Sequences(Store(Path(cache) / "represent-pivot", pivot_key, layout), "pivot")
lengths, counts = pivot.column("lengths"), pivot.column("targets")
fused = Sequences(Store(Path(cache) / "fused-source_b", fused_key, layout), "fused", lengths=lengths)
cfg = Training(lm_loss_weight=0.5, epochs=4, learning_rate=3e-3, batch_size=8, warmup_ratio=0.1, dtype="float32")
result = {}
for strategy in ("ddp", "fsdp"):
    lm = models.load_model(Path(pivot_folder), "pivot")
    curve, _ = train.distil(lm, pivot, fused, np.flatnonzero(counts > 0), lengths, cfg, "cpu",
                            strategy=strategy, row_tokens=64)
    state = train.full_state_dict(lm, "float32")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/{strategy}.safetensors")
        result[strategy] = curve
if rank == 0:
    Path(out, "curves.json").write_text(json.dumps(result))
"""


@pytest.mark.slow
def test_fsdp2_training_gives_the_ddp_result(case, tmp_path):
    """Two CPU processes (gloo) through torchrun train the same target with DDP and with FSDP2
    (``fully_shard`` per block, packed rows, gradient checkpointing): the same loss curve and the
    same weights, gathered from the shards, within float error."""
    import transformers
    from safetensors.torch import load_file

    from fuse_models import write_config

    from fusion.fuse.pipeline import run_fuse

    root = copy_case(case, tmp_path, ("pivot", "source_b", "train.jsonl", "heldout.jsonl"))
    config = write_config(root, sources=("source_b",), representations=", chunk_size: 8")
    run_fuse(config, root / "out", until="fuse", echo=lambda _m: None, progress=False)
    cache = root / "out" / "cache"
    keys = [json.loads((cache / store / "manifest.json").read_text())["key"]
            for store in ("represent-pivot", "fused-source_b")]
    (root / "both.py").write_text(TRAIN_BOTH)
    env = _env(root)
    result = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(root / "both.py"),
                             str(cache), str(root / "pivot"), *keys, str(root)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curves = json.loads((root / "curves.json").read_text())
    ddp_curve, fsdp_curve = curves["ddp"], curves["fsdp"]
    assert len(ddp_curve) == 4 * 3  # each step takes 8 sequences on each process: 48 sequences → 3 steps
    assert ddp_curve[-1]["loss"] < 0.8 * ddp_curve[0]["loss"]
    assert [e["loss"] for e in fsdp_curve] == pytest.approx([e["loss"] for e in ddp_curve], rel=1e-5)
    ddp, fsdp = load_file(str(root / "ddp.safetensors")), load_file(str(root / "fsdp.safetensors"))
    assert fsdp.keys() == ddp.keys()
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < 1e-5
    pivot = transformers.AutoModelForCausalLM.from_pretrained(root / "pivot").state_dict()
    assert fsdp.keys() == pivot.keys() and all(fsdp[k].shape == pivot[k].shape for k in pivot)
    assert max(float((fsdp[k] - pivot[k]).abs().max()) for k in pivot) > 1e-3  # it did train
