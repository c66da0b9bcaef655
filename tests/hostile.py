"""The hostile-input suite's common ground: a tiny real model family copied into each test's own
folder, the CLI run in-process, and the checks every refusal must pass.

A refusal (:meth:`Scene.refuses`) is: exit code 1 (or the one given), exactly one line on stderr
that starts with ``error:`` and names what it is told to, no traceback, nothing new in the
output's parent folder or the working folder, and every input file (models, config, plugins)
byte-identical, links included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

from test_cli_errors import Result, assert_error, call_cli, run_subprocess

REPO = Path(__file__).resolve().parent.parent


def digest(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots``: a file's sha256, a link's target, a folder's presence."""
    out: dict[str, str] = {}
    for root in roots:
        entries = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
        for p in entries:
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def env() -> dict[str, str]:
    drop = ("FUSION_DEBUG", "FUSION_LOAD_PLUGINS", "HF_HUB_VERBOSITY")
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out["PYTHONIOENCODING"] = "utf-8"
    return out


def fusion_cmd(*argv: Any) -> list[str]:
    return [sys.executable, "-m", "fusion", *map(str, argv)]


def one_line(result: Result, *mentions: str, code: int = 1, prefix: str = "error:") -> str:
    """Exit ``code``, one line on stderr starting with ``prefix`` naming each of ``mentions``."""
    line = assert_error(result, *mentions, code=code, prefix=prefix)
    if os.environ.get("HOSTILE_LOG"):  # every refusal's line, to read them all at once
        with open(os.environ["HOSTILE_LOG"], "a", encoding="utf-8") as fh:
            fh.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{line}\n")
    return line


# --- safetensors files, written byte by byte ---------------------------------------------------


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


class Scene:
    """One test's folders: ``models/`` (base, chat, code: copies of the family), ``outs/`` (the
    output's parent, empty), ``cwd/`` (the working folder, empty), and config files in ``root``."""

    def __init__(self, root: Path, family: Path, run):
        self.root = root
        self.models = root / "models"
        shutil.copytree(family, self.models, symlinks=True)
        self.outs = root / "outs"
        self.outs.mkdir()
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.run = run
        self.inputs: list[Path] = [self.models]

    @property
    def out(self) -> Path:
        return self.outs / "merged"

    def model(self, name: str) -> Path:
        return self.models / name

    def config(self, text: str, name: str = "merge.yaml") -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(text))
        self.inputs.append(path)
        return path

    def config_bytes(self, data: bytes, name: str = "merge.yaml") -> Path:
        path = self.root / name
        path.write_bytes(data)
        self.inputs.append(path)
        return path

    def ta(self, chat: str | Path = "chat", code: str | Path = "code", base: str | Path = "base",
           extra: str = "", name: str = "merge.yaml") -> Path:
        """task_arithmetic of chat and code over base (names of models/ or any path)."""
        ref = {k: (self.models / v if isinstance(v, str) and "/" not in v else v)
               for k, v in (("base", base), ("chat", chat), ("code", code))}
        return self.config(textwrap.dedent(f"""\
            merge_method: task_arithmetic
            base_model: {ref['base']}
            models:
              - model: {ref['chat']}
                parameters: {{weight: 0.7}}
              - model: {ref['code']}
                parameters: {{weight: 0.3}}
            """) + textwrap.dedent(extra), name)

    def plugin(self, name: str, source: str) -> Path:
        path = self.root / name
        path.write_text(textwrap.dedent(source))
        self.inputs.append(path)
        return path

    def refuses(self, *argv: Any, mentions: tuple[str, ...] = (), code: int = 1,
                prefix: str = "error:", subprocess: bool = False) -> str:
        """Run the CLI; check it refused cleanly and left everything as it was."""
        before = digest(*self.inputs)
        result = run_subprocess(*argv, cwd=self.cwd) if subprocess else self.run(*argv)
        line = one_line(result, *mentions, code=code, prefix=prefix)
        self.assert_untouched(before)
        return line

    def assert_untouched(self, before: dict[str, str]) -> None:
        assert digest(*self.inputs) == before, "an input changed"
        for folder in (self.outs, self.cwd):
            left = sorted(p.name for p in folder.iterdir())
            assert left == [], f"left behind in {folder}: {left}"


# --- fixtures (imported by the test modules) ------------------------------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Path:
    """base/, chat/, code/: a tiny bf16 Qwen2 (2 layers) and two fine-tunes; never modified."""
    from fusion.demo import make_family

    root = tmp_path_factory.mktemp("hostile-family")
    make_family(root)
    return root


@pytest.fixture
def scene(tmp_path, family, capsys, monkeypatch) -> Scene:
    """A fresh scene; ``scene.run(*argv)`` calls ``fusion.cli.main`` in-process from ``cwd/``."""
    from fusion import host as plugins

    monkeypatch.setattr(plugins, "_local_plugins", [])
    for var in ("FUSION_DEBUG", "FUSION_LOAD_PLUGINS", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    plugins.reset()

    def run(*argv: Any) -> Result:
        plugins.reset()  # each run loads its own --plugin
        monkeypatch.setattr(plugins, "_local_plugins", [])
        return call_cli(capsys, *argv)

    s = Scene(tmp_path, family, run)
    monkeypatch.chdir(s.cwd)
    yield s
    plugins.reset()
