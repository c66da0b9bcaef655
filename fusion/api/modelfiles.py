"""The files of a model folder: what a resolver downloads and what the output takes from the
layout model besides the weights (one list, so that nothing downloaded is left behind), and the
one rule for reading any file of a model folder: nothing is read from outside it.

A model folder is untrusted input: an index may name ``../../etc/passwd`` as a shard and a
tokenizer file may be a symlink to a secret. :func:`contained` is the check every reader of a
model folder's files goes through; :func:`load_json` reads its JSON files with bounded size and
nesting.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError

#: Top-level files a model folder needs to load, tokenize and process input.
SUPPORT_FILES = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
})
#: Top-level file name patterns of the same (``vocab.json``, ``chat_template.jinja``, tiktoken files).
SUPPORT_GLOBS = ("vocab.*", "chat_template.*", "*.tiktoken")
#: Folders whose files belong with them (transformers ≥ 4.54 keeps extra chat templates here).
SUPPORT_FOLDERS = ("additional_chat_templates",)
#: The largest JSON file of a model folder read (config, index, header manifest): the index of a
#: model with a million tensors is about 100 MB.
MAX_JSON_BYTES = 256 << 20


#: The support files that make up a tokenizer (with its chat templates): replaced together when
#: the output gets a tokenizer of its own.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "merges.txt",
})


def is_tokenizer_file(path: str) -> bool:
    """Whether the support file ``path`` belongs to the tokenizer (or its chat templates)."""
    folder, _, name = path.rpartition("/")
    if folder:
        return folder == "additional_chat_templates"
    return name in TOKENIZER_FILES or any(fnmatch.fnmatchcase(name, g) for g in SUPPORT_GLOBS)


def is_support_file(path: str) -> bool:
    """Whether ``path`` (relative to the model folder, ``/``-separated) is a support file."""
    folder, _, name = path.rpartition("/")
    if folder:
        return folder in SUPPORT_FOLDERS and bool(name)
    return name in SUPPORT_FILES or any(fnmatch.fnmatchcase(name, g) for g in SUPPORT_GLOBS)


def model_root(folder: Path) -> Path:
    """Where the files of a model folder may lead (through symlinks): the folder itself, or for
    a snapshot of the Hugging Face cache (``<cache>/models--org--name/snapshots/<commit>``, whose
    files link to ``../../blobs/<hash>``) the folder of that repository."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def is_safe_name(name: Any) -> bool:
    """A relative ``/``-separated file name that stays below its folder (no ``..``, no root)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and bool(parts)


def contained(folder: Path, name: str, label: str, named_by: Path | None = None) -> Path:
    """``folder / name`` if it stays inside the model folder once every symlink is followed
    (links into the folder's Hugging Face cache repository are fine); else a CheckpointError.

    ``label`` names the model in the message (``models[1] (./ft)``), ``named_by`` the file that
    gave the name (an index)."""
    folder = Path(folder)
    if not is_safe_name(name):
        raise CheckpointError(
            f"{label}: {named_by or folder} names the file {name!r}, which is not a path inside the model "
            f"folder; fusion reads nothing outside a model folder: fix {named_by.name if named_by else 'it'}")
    path = folder / name
    root = model_root(folder)
    real = path.resolve()
    if real != root and root not in real.parents:
        raise CheckpointError(
            f"{label}: {path} leads to {real}, outside the model folder; fusion reads nothing outside a "
            f"model folder: replace the link with the file itself")
    return path


def load_json(path: Path, label: str, *, limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON file ``path`` of a model folder (UTF-8, at most ``limit`` bytes, nesting
    Python can parse), or a CheckpointError that says what is wrong with it."""
    fix = "fix it or download the model again"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read {path} ({exc.strerror or exc}); check the file and "
                              f"its permissions") from None
    if len(raw) > limit:
        raise CheckpointError(f"{label}: {path} is larger than {limit >> 20} MB, which no JSON file of a "
                              f"model folder is; {fix}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{label}: {path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                              f"{exc.start}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{label}: {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno}); {fix}") from None
    except RecursionError:
        raise CheckpointError(f"{label}: {path} is nested too deeply to be a model file; {fix}") from None


def support_files(folder: Path, label: str | None = None) -> list[str]:
    """The support files present in a local model folder, as relative paths; a CheckpointError
    when one of them leads outside the folder (see :func:`contained`)."""
    folder = Path(folder)
    found = [p.name for p in folder.iterdir() if p.is_file() and is_support_file(p.name)]
    for sub in SUPPORT_FOLDERS:
        if (folder / sub).is_dir():
            found += [f"{sub}/{p.name}" for p in (folder / sub).iterdir() if p.is_file()]
    for name in found:
        contained(folder, name, label or str(folder))
    return sorted(found)
