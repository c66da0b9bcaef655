"""Pairwise fusion (`fusion fuse`): config and data errors, plugins, and end-to-end runs on tiny
models with different tokenizers (knowledge transfer, resume); the units on hand-made cases are in
test_fuse_units.py, torchrun and FSDP in test_fuse_scale.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion.api.errors import ConfigError, FusionError
from fusion.api.vocab import VocabContext, pivot_index
from fusion.fuse.align import VocabMap

ROOT = Path(__file__).resolve().parent.parent


# -- config and data ---------------------------------------------------------------------------

def _config(tmp_path, text):
    from fusion.fuse.config import parse_fuse_config

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "fuse.yaml"
    path.write_text(text)
    return parse_fuse_config(text, source=path)


@pytest.mark.parametrize("text,path,line,words", [
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nepochs: 3\n", "epochs", 4, "unknown key"),
    ("pivot: ./p\nsources: [./s]\ndata: missing.jsonl\n", "data", 3, "does not exist"),
    ("pivot: ./p\nsources: []\ndata: d.jsonl\n", "sources", 2, "non-empty list"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: fuzzy\n", "alignment", 4, "min_ed"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nfusion_function: max\n", "fusion_function", 4, "avg_ce"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining:\n  lm_loss_weight: 1.5\n",
     "training.lm_loss_weight", 5, "out of range"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {epochs: 0}\n", "training.epochs", 4, "greater than 0"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {dtype: int8}\n", "training.dtype", 4, "bfloat16"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nmerge: {method: sce, parameters: {density: 0.5}}\n",
     "merge.parameters.density", 4, "select_topk"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nmerge: {method: nope}\n", "merge.method", 4, "ties"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nrepresentations: {store_dtype: bfloat16}\n",
     "representations.store_dtype", 4, "float16"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nrepresentations:\n  dtype: int4\n", "representations.dtype", 5, "auto"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {strategy: zero3}\n", "training.strategy", 4, "fsdp"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\ntraining: {packing: 1}\n", "training.packing", 4, "true or false"),
    ("pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: {method: exact, carry: more}\n", "alignment.carry", 4,
     "coarser"),
])
def test_config_errors_name_the_path_and_line(tmp_path, text, path, line, words):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, text)
    assert info.value.path == path and info.value.line == line, str(info.value)
    assert words in str(info.value)


def test_config_defaults_follow_fusechat(tmp_path):
    c = _config(tmp_path, "pivot: ./p\nsources:\n  - model: ./s\ndata: d.jsonl\nalignment: {method: min_ed, "
                          "fallback: gold}\n")
    assert (c.representations.top_k, c.alignment, c.fallback, c.fusion_function) == (10, "min_ed", "gold", "min_ce")
    t = c.training
    assert (t.lm_loss_weight, t.epochs, t.learning_rate, t.warmup_ratio) == (0.9, 3, 5e-6, 0.03)
    assert (c.merge_method, c.merge_parameters["select_topk"]) == ("sce", 0.1)


def test_every_fuse_setting_is_documented():
    from dataclasses import fields

    from fusion.fuse.config import RepresentationSettings, Training

    doc = (ROOT / "docs" / "fuse.md").read_text()
    for prefix, cls in (("representations", RepresentationSettings), ("training", Training)):
        for f in fields(cls):
            assert f"| `{prefix}.{f.name}` |" in doc, f"{prefix}.{f.name} is not in the table of docs/fuse.md"
    for key in ("alignment.fallback", "alignment.carry", "fusion_function"):
        assert f"| `{key}` |" in doc


def test_chat_formatting_masks_prompts(tmp_path):
    from fuse_models import make_tokenizer

    from fusion.fuse.data import encode, load_examples

    tok = make_tokenizer(tmp_path / "tok", "byte", 320)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "count from apple"}, {"role": "assistant", "content": "river stone"},
                      {"role": "user", "content": "count from ocean"}, {"role": "assistant", "content": "ember"}]},
        {"prompt": "count from tiger", "response": "maple"},
        {"text": "lotus raven"},
    ]) + "\n")
    chat, pr, text = load_examples(tmp_path / "d.jsonl", tok)
    learned = ["".join(chat.text[a:b] for a, b in chat.spans)]
    assert learned == ["river stone<|end|>\nember<|end|>\n"]
    ids, response = encode(tok, pr, 64)
    assert tok.decode(ids[response]) == "maple<|end|>\n"
    assert tok.decode(ids[~response]).startswith("<|user|>count from tiger")
    ids, response = encode(tok, text, 64)
    assert response.all()


def test_data_errors_name_file_and_line(tmp_path):
    from fusion.fuse.data import load_examples

    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(FusionError, match=r"d.jsonl:2: the conversation has no assistant message"):
        load_examples(tmp_path / "d.jsonl", None)
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(FusionError, match=r"d.jsonl:2: not valid JSON"):
        load_examples(tmp_path / "d.jsonl", None)


def test_without_transformers_fuse_says_how_to_install_and_merge_still_works(tmp_path):
    from fusion.demo import make_family

    make_family(tmp_path)
    (tmp_path / "merge.yaml").write_text("merge_method: task_arithmetic\nbase_model: ./base\n"
                                         "models:\n  - model: ./chat\n  - model: ./code\n")
    (tmp_path / "fuse.yaml").write_text("pivot: ./base\nsources: [./chat]\ndata: d.jsonl\n")
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from fusion.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
              "    raise\n")
    merged = subprocess.run([sys.executable, "-c", script, "merge", "merge.yaml", "-o", "out", "-q"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    fused = subprocess.run([sys.executable, "-c", script, "fuse", "fuse.yaml", "-o", "fused"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert fused.returncode == 1
    assert fused.stderr.strip() == ("error: `fusion fuse` needs transformers; install it with: "
                                    "pip install 'model-fusion[fuse]'")
    assert not (tmp_path / "fused").exists()


# -- end to end on tiny models -----------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The tiny models and data, built once per test run (shared by the xdist workers)."""
    from fuse_models import build_fusion_case, shared_case

    return shared_case(tmp_path_factory, "fuse-case", build_fusion_case, "heldout.jsonl")


def _copy_case(case: Path, tmp_path: Path) -> Path:
    from fuse_models import copy_case

    return copy_case(case, tmp_path, ("pivot", "source_a", "source_b", "train.jsonl", "heldout.jsonl"))


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_knowledge_transfer_through_aligned_distributions(case, tmp_path):
    """Distillation only (λ = 0): whatever the targets learn of the pattern came through the
    aligned source distributions, also from the source whose tokenizer differs from the pivot's."""
    import transformers

    from fuse_models import write_config
    from fusion.fuse.pipeline import run_fuse

    root = _copy_case(case, tmp_path)
    inputs = _mtimes(root)
    # unaligned positions learn the pivot's own distribution, so nothing of the pattern leaks in there
    config = write_config(root, lm_loss_weight=0.0, alignment="{method: statistics, fallback: pivot}")
    out = root / "out"
    messages = []
    report = run_fuse(config, out, echo=messages.append)
    held = report["heldout_loss"]
    pivot = held["pivot"]
    for name in ("pivot-source_a", "pivot-source_b"):
        assert held["targets"][name] < 0.6 * pivot, held
    assert held["merged"] < 0.6 * pivot, held

    # alignment: the shared vocabulary aligns exactly; the other one partly maps and falls back
    cov_a, cov_b = report["alignment"]["source_a"], report["alignment"]["source_b"]
    assert cov_a["positions"]["exact"] == sum(cov_a["positions"].values()) > 0
    assert cov_b["positions"]["exact"] > 0 and cov_b["positions"]["fallback"] > 0
    assert cov_b["topk_tokens"]["exact"] > 0
    # the sources know the pattern, the pivot does not: MinCE picks the sources
    for name in ("source_a", "source_b"):
        f = report["fusion"][name]
        assert f["source_chosen"] > 0.9 * report["data"]["train"], f
        curve = report["training"][name]["curve"]
        assert curve[-1]["distill_loss"] < 0.5 * curve[0]["distill_loss"]
        assert all(e["lm_loss"] >= 0 for e in curve)
    assert set(report["stages"]) == {"represent", "fuse", "train", "merge", "evaluate"}

    # the outputs: loadable models with cards, the report, the plot; inputs untouched
    for folder in (out / "targets" / "pivot-source_b", out / "merged"):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert model(**tok("count from apple", return_tensors="pt")).logits.shape[-1] == len(tok)
        assert "fusion" in (folder / "README.md").read_text()
    assert "source_b" in (out / "targets" / "pivot-source_b" / "README.md").read_text()
    assert "pairwise knowledge fusion" in (out / "merged" / "README.md").read_text()
    assert json.loads((out / "report.json").read_text())["heldout_loss"] == held
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "report.md").read_text()
    assert "held-out loss" in summary and "represent" in summary and "fallback" in summary
    assert _mtimes(root / "pivot") == {k[len("pivot/"):]: v for k, v in inputs.items() if k.startswith("pivot/")}

    # a second run reuses everything it can and gives the same result
    before = _mtimes(out / "cache")
    again = run_fuse(config, out, echo=lambda _m: None)
    assert again["stages"]["represent"]["reused"] == 3
    assert all(t["reused"] for t in again["training"].values())
    assert again["stages"]["merge"]["note"] == again["stages"]["evaluate"]["note"] == "reused"
    assert _mtimes(out / "cache") == before
    assert again["heldout_loss"]["targets"] == pytest.approx(held["targets"])
    assert again["heldout_loss"]["merged"] == pytest.approx(held["merged"])


@pytest.mark.slow
def test_interrupted_run_resumes_from_the_representations(case, tmp_path, monkeypatch, capsys):
    from fuse_models import write_config
    from fusion.cli import main
    from fusion.fuse import train

    root = _copy_case(case, tmp_path)
    config = write_config(root, sources=("source_b",), epochs=2, alignment="min_ed", function="avg_ce")
    out = root / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during training

    with monkeypatch.context() as m:
        m.setattr(train, "distil", interrupted)
        with pytest.raises(SystemExit) as stop:
            main(["fuse", str(config), "-o", str(out), "-q"])
    assert stop.value.code == 130
    assert "a re-run resumes" in capsys.readouterr().err
    cached = _mtimes(out / "cache")
    assert {"represent-pivot/chunk-00000.safetensors", "represent-source_b/chunk-00000.safetensors"} <= set(cached)
    assert not (out / "targets" / "pivot-source_b").exists()  # a target is complete or absent
    assert not list((out / "targets").iterdir())

    main(["fuse", str(config), "-o", str(out), "-q"])
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["represent"]["reused"] == 2 and report["stages"]["represent"]["computed"] == 0
    assert all(_mtimes(out / "cache")[name] == t for name, t in cached.items())
    assert report["training"]["source_b"]["curve"], report
    # avg_ce: both sides weigh in; softmax(exp(−CE)) never gives one side more than e/(1 + e) = 0.731
    assert 0.5 < report["fusion"]["source_b"]["source_weight_mean"] < 0.731
    assert "one source" in " ".join(report["notes"])

    # --until stops after a stage; representations are redone only when what they depend on changes
    write_config(root, sources=("source_b",), epochs=2, alignment="exact", function="avg_ce")
    main(["fuse", str(config), "-o", str(out), "--until", "fuse", "-q"])
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["represent"]["reused"] == 2 and "train" not in report["stages"]
    config.write_text(config.read_text().replace("top_k: 10", "top_k: 5"))
    main(["fuse", str(config), "-o", str(out), "--until", "represent", "-q"])
    assert json.loads((out / "report.json").read_text())["stages"]["represent"]["computed"] == 2


def test_a_plugin_adds_an_alignment_and_a_fusion_function(tmp_path, monkeypatch):
    """The docs/plugins.md examples, loaded as a local plugin file, work as built-ins do."""
    import re

    from fusion import host as pm

    doc = (ROOT / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(import fusion\n\nclass Lowercase.*?)```", doc, re.S).group(1)
    code += '''
class SourceOnly(fusion.FusionFunction):
    name = "source_only"
    description = "Always the aligned source distribution."

    def weights(self, ce):
        return [0.0, 1.0]

@fusion.hookimpl
def register_fusion_functions(register):
    register(SourceOnly())
'''
    (tmp_path / "my_plugin.py").write_text(code)
    monkeypatch.setattr(pm, "_local_plugins", [])
    pm.add_local_plugin(str(tmp_path / "my_plugin.py"))
    try:
        ctx = VocabContext([" The", " cat"], [" the", " CAT", " dog"], pivot_index([" The", " cat"]))
        vm = VocabMap(pm.alignments()["lowercase"], ctx)
        vm.build(np.array([0, 1, 2]))
        assert vm.table == {0: 0, 1: 1, 2: -1}
        c = _config(tmp_path, "pivot: ./p\nsources: [./s]\ndata: d.jsonl\nalignment: lowercase\n"
                              "fusion_function: source_only\n")
        assert (c.alignment, c.fusion_function) == ("lowercase", "source_only")
        info = next(i for i in pm.plugin_infos() if i.name == "my_plugin")
        assert (info.alignments, info.fusion_functions) == (["lowercase"], ["source_only"])
    finally:
        pm.reset()


def test_representations_match_the_model(case):
    """Top-k ids/logits are the model's own forward's (scored through the decoder and the output
    layer a few positions at a time), and the sequence CE is transformers' own masked loss, on
    the source's own reading of the pivot-rendered text."""
    import torch

    from fusion.fuse import models, represent
    from fusion.fuse.data import load_examples
    from fusion.fuse.reading import read, source_reading

    tok = models.load_tokenizer(case / "source_b", "source_b")
    model = models.load_model(case / "source_b", "source_b")
    pivot_tok = models.load_tokenizer(case / "pivot", "pivot")
    examples = load_examples(case / "heldout.jsonl", pivot_tok)[:5]
    reading = source_reading(tok, pivot_tok)
    old_chunk, represent.HEAD_CHUNK = represent.HEAD_CHUNK, 7  # several output-layer chunks per batch
    try:
        reps = represent.score(model, reading, examples, top_k=4, max_length=64, batch_size=3)
    finally:
        represent.HEAD_CHUNK = old_chunk
    assert represent.head_matches(model, reading, examples[0])
    assert len(reps) == 5 and reps.topk_ids.shape == (int(reps.lengths.sum()), 4)
    for i, e in enumerate(examples):
        ids, response, _ = read(reading, e.text, e.spans, e.chat, 64)
        assert (reps.input_ids[reps.span(i)] == ids).all() and (reps.response[reps.span(i)] == response).all()
        x = torch.from_numpy(ids)[None]
        with torch.no_grad():
            out = model(input_ids=x, labels=x.masked_fill(~torch.from_numpy(response)[None], -100))
        assert reps.ce[i] == pytest.approx(float(out.loss), rel=1e-4)
        top = out.logits[0].topk(4, -1)
        assert (reps.topk_ids[reps.span(i)] == top.indices.numpy()).all()
        assert np.allclose(reps.topk_logits[reps.span(i)], top.values.numpy(), atol=1e-4)


def test_cli_reports_a_bad_fuse_config_in_one_sentence(tmp_path, capsys):
    from fusion.cli import main

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "fuse.yaml").write_text("pivot: ./p\nsources: [./s]\ndata: d.jsonl\n"
                                        "training:\n  learning_rate: fast\n")
    with pytest.raises(SystemExit) as stop:
        main(["fuse", str(tmp_path / "fuse.yaml"), "-o", str(tmp_path / "out")])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: training.learning_rate (line 5): must be a number, not 'fast'"
    assert not (tmp_path / "out").exists()


def test_help_and_plugins_stay_light():
    code = """
import sys
from fusion.cli import main
main(["plugins"])
try:
    main(["fuse", "--help"])
except SystemExit:
    pass
heavy = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "alignment statistics" in result.stdout and "fusion function avg_ce" in result.stdout
    assert "--until" in result.stdout


@pytest.mark.slow
def test_a_source_named_by_its_hub_name(case, tmp_path, monkeypatch):
    """Models are named as everywhere else: a Hub name resolves (a local fake Hub) and is scored."""
    import importlib

    import huggingface_hub.constants
    from hubserver import FakeHub

    from fuse_models import write_config
    from fusion import host as plugins
    from fusion.fuse.pipeline import run_fuse

    root = _copy_case(case, tmp_path)
    hub = FakeHub(tmp_path / "hub-repos").start()
    try:
        sha = hub.commit("org/source-b", root / "source_b")
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        importlib.reload(huggingface_hub.constants)
        plugins.reset()
        config = write_config(root, sources=("source_a",))
        config.write_text(config.read_text().replace("  - model: ./source_a", "  - model: org/source-b@main"))
        report = run_fuse(config, root / "out", until="fuse", echo=lambda _m: None)
    finally:
        hub.stop()
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
        plugins.reset()
    assert report["sources"][0]["reference"] == "org/source-b@main" and sha in report["sources"][0]["path"]
    assert report["sources"][0]["name"] == "source-b"
    cov = report["alignment"]["source-b"]["positions"]
    assert cov["exact"] > cov["fallback"] > 0
