"""Hostile input to `fusion fuse`: data with nothing to learn, data that is not JSON lines, and an
empty -o are refused in one line before anything is written (no OUT/cache, no OUT/targets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from fuse_models import make_model, make_tokenizer  # noqa: E402
from test_cli_errors import assert_error, call_cli  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """An untrained tiny pivot and source with tokenizers: enough to reach the data."""
    root = tmp_path_factory.mktemp("fuse-models")
    for name, kind, family, seed in (("pivot", "byte", "llama", 0), ("source", "meta", "qwen2", 1)):
        tokenizer = make_tokenizer(root / name, kind, 300)
        make_model(root / name, family, tokenizer, seed).save_pretrained(root / name)
    return root


def scene(root: Path, models: Path, data: str) -> Path:
    (root / "data.jsonl").write_text(data)
    (root / "fuse.yaml").write_text(f"pivot: {models / 'pivot'}\nsources: [{models / 'source'}]\n"
                                    f"data: data.jsonl\n")
    return root / "fuse.yaml"


CASES = {
    "every record empty": ('{"text": ""}\n{"text": ""}\n', ["data.jsonl", "no record has any text to learn from"]),
    "not JSON lines": ("this is not json\n", ["data.jsonl:1", "not valid JSON"]),
    "a record of the wrong shape": (json.dumps({"question": "?"}) + "\n", ["data.jsonl:1", "messages"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_is_refused_before_the_output_exists(tmp_path, models, case, capsys):
    data, mentions = CASES[case]
    config = scene(tmp_path, models, data)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_error(call_cli(capsys, "fuse", config, "-o", tmp_path / "out", "-q"), *mentions)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no out/cache, no out/targets


def test_an_empty_output_name_is_refused(tmp_path, models, monkeypatch, capsys):
    config = scene(tmp_path, models, '{"text": "hello there"}\n')
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_error(call_cli(capsys, "fuse", config, "-o", "", "-q"), "output folder is an empty name")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
