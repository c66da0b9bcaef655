"""The examples run: the VisCodex recipe parses, and its tiny stand-in plans, merges and loads."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

import fusion

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_viscodex_recipe_is_valid():
    config = fusion.load(EXAMPLES / "viscodex.yaml")  # reading a config checks it against its strategy
    assert config.notices == []
    assert config.layout_from == "Qwen/Qwen2.5-VL-7B-Instruct" and config.base_model == "Qwen/Qwen2.5-7B"
    assert [(m.reference, m.parameters["weight"]) for m in config.models] == [
        ("Qwen/Qwen2.5-VL-7B-Instruct", 0.7), ("Qwen/Qwen2.5-Coder-7B-Instruct", 0.3)]


def test_tiny_viscodex_runs(tmp_path):
    transformers = pytest.importorskip("transformers")
    from click.testing import CliRunner

    from fusion.cli import cli

    def run(*args):
        result = CliRunner().invoke(cli, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    runpy.run_path(str(EXAMPLES / "tiny_viscodex.py"), run_name="tiny").get("main")(str(tmp_path / "tiny"))
    recipe = str(tmp_path / "tiny" / "viscodex.yaml")
    plan = run("plan", recipe)
    assert "== vision tower: 25 tensors, 0 merged; 25 carried from models[0] (./Qwen2.5-VL)" in plan
    summary = run("merge", recipe, "-o", str(tmp_path / "tiny" / "merged"), "--no-card")
    assert "27 tensors merged, 30 carried" in summary and "rows 128..135 (8) carried" in summary
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "tiny" / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
