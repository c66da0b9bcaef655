"""The Hugging Face cache of one repository, in its documented layout:
``<cache>/models--<org>--<name>/{refs,snapshots,blobs}``, plus fusion's header-only folders
for plans under ``fusion-headers/<commit>``. Nothing here makes a request."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from .files import IndexMismatch, select_files

FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
# Header-only folders for plans live beside huggingface_hub's snapshots, one per commit.
HEADERS_FOLDER = "fusion-headers"


def checksum(path: Path, kind: str) -> str:
    """The file's digest as the Hub lists it: ``sha256`` of the content (Git LFS files), or
    ``git`` (the Git blob id: sha1 of ``blob <size>\\0`` and the content) for the others."""
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class NotCached(Exception):
    def __init__(self, missing: list[str] | None = None, commit: str | None = None):
        super().__init__("not cached")
        self.missing = missing  # None: nothing of this revision is cached
        self.commit = commit


class RepoCache:
    def __init__(self, repo_id: str, cache_dir: str):
        from huggingface_hub import constants

        self.repo_id = repo_id
        self.cache_dir = cache_dir
        self.storage = Path(cache_dir) / constants.REPO_ID_SEPARATOR.join(["models", *repo_id.split("/")])

    def header_folder(self, commit: str) -> Path:
        return self.storage / HEADERS_FOLDER / commit

    def cached_commit(self, revision: str) -> str | None:
        if FULL_COMMIT.fullmatch(revision):
            return revision
        ref = self.storage / "refs" / revision
        try:
            return ref.read_text().strip() or None
        except OSError:
            return None

    def snapshot(self, revision: str) -> tuple[Path, str]:
        """The complete cached snapshot of ``revision``, without any request, or ``NotCached``."""
        commit = self.cached_commit(revision)
        if commit is None:
            raise NotCached()
        folder = self.storage / "snapshots" / commit
        if not folder.is_dir():
            raise NotCached(commit=commit)
        files = self.listing(commit, folder)

        def read_json(name: str) -> Any:
            try:
                return json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                raise NotCached([name], commit) from None

        try:
            weights, support = select_files(files, read_json)
        except IndexMismatch as exc:
            raise NotCached(exc.missing, commit) from None
        if not weights:
            raise NotCached([], commit)
        missing = [f for f in weights + support if not (folder / f).is_file()]
        if missing:
            raise NotCached(missing, commit)
        return folder, commit

    def listing(self, commit: str, folder: Path) -> list[str]:
        # The listing huggingface_hub saved when it downloaded this commit says what the repo
        # has, so a half-downloaded snapshot is recognised as such. A cache filled by another
        # tool (transformers, hf_hub_download) has no listing: then the files present are all
        # we know about.
        try:
            from huggingface_hub import get_cached_repo_tree
        except ImportError:  # older huggingface_hub
            get_cached_repo_tree = None
        if get_cached_repo_tree is not None:
            from huggingface_hub.errors import CachedRepoTreeNotFoundError

            try:
                entries = get_cached_repo_tree(self.repo_id, revision=commit, cache_dir=self.cache_dir)
                return [e.path for e in entries]
            except CachedRepoTreeNotFoundError:
                pass
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]

    def write_ref(self, revision: str, commit: str) -> None:
        # snapshot_download is given the commit hash (so the files come from exactly the commit
        # the model info named, even if the branch moves meanwhile); it then records no ref, so
        # record revision -> commit here, in the cache's documented layout, for offline use.
        if revision == commit:
            return
        ref = self.storage / "refs" / revision
        try:
            if ref.is_file() and ref.read_text() == commit:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)  # atomic: a concurrent reader never sees a partial ref
        except OSError:
            pass  # a read-only cache still works online; offline use then needs a commit hash

    def discard(self, path: Path) -> None:
        """Remove a cached file of a snapshot, and the blob it links to, so a re-run fetches it again."""
        blob = path.resolve()
        for p in (path, blob):
            try:
                p.unlink()
            except OSError:
                pass
