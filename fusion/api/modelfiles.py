"""The files of a model folder besides its weights: what a resolver downloads and what the
output takes from the layout model. One list, so that nothing downloaded is left behind."""

from __future__ import annotations

import fnmatch
from pathlib import Path

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


def support_files(folder: Path) -> list[str]:
    """The support files present in a local model folder, as relative paths."""
    folder = Path(folder)
    found = [p.name for p in folder.iterdir() if p.is_file() and is_support_file(p.name)]
    for sub in SUPPORT_FOLDERS:
        if (folder / sub).is_dir():
            found += [f"{sub}/{p.name}" for p in (folder / sub).iterdir() if p.is_file()]
    return sorted(found)
