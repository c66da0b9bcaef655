"""One Hub resolution: the reference, where it is cached, and the huggingface_hub calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fusion
import fusion.api.modelfiles

from . import http
from .cache import FULL_COMMIT, NotCached, RepoCache, checksum
from .errors import Translator
from .files import IndexMismatch, escape_glob, select_files


class HubModel:
    """One resolution: the reference, where the cache is, and the huggingface_hub calls."""

    def __init__(self, reference: str, repo_id: str, revision: str, options: fusion.ResolveOptions):
        from huggingface_hub import constants

        self.reference = reference
        self.repo_id = repo_id
        self.revision = revision
        self.options = options
        # Read at call time: huggingface_hub fixes these from the environment when imported.
        self.endpoint = constants.ENDPOINT
        cache_dir = fusion.expand_user(options.cache_dir or constants.HF_HUB_CACHE, "cache folder")
        self.cache_dir = str(cache_dir.resolve())
        offline_now = getattr(constants, "is_offline_mode", None)
        self.offline = bool(options.offline) or bool(
            offline_now() if offline_now is not None else constants.HF_HUB_OFFLINE
        )
        self.cache = RepoCache(repo_id, self.cache_dir)
        self.errors = Translator(reference, repo_id, revision, self.endpoint, self.cache)

    # -- entry point -------------------------------------------------------------------------

    def resolve(self) -> Path:
        http.install()
        with http.quiet():
            return self._resolve()

    def _resolve(self) -> Path:
        prior = self.options.resolved.get(self.reference)
        if isinstance(prior, dict) and prior.get("repo") == self.repo_id and prior.get("commit"):
            # resolved earlier in this run: the same commit, found locally with no request
            try:
                return self.cache.snapshot(prior["commit"])[0]
            except NotCached:
                stub = self.cache.header_folder(prior["commit"])
                if not self.options.weights and stub.is_dir():
                    return stub
        if not self.options.weights:
            folder, commit = self.headers()
        elif self.offline:
            try:
                folder, commit = self.cache.snapshot(self.revision)
            except NotCached as exc:
                raise self.errors.offline_error(exc) from None
        elif FULL_COMMIT.fullmatch(self.revision):
            # A commit never changes: when its files are all cached there is nothing to ask.
            try:
                folder, commit = self.cache.snapshot(self.revision)
            except NotCached:
                folder, commit = self.download()
        else:
            folder, commit = self.download()
        self.options.resolved[self.reference] = {
            "repo": self.repo_id, "revision": self.revision, "commit": commit,
        }
        return folder

    # -- network -----------------------------------------------------------------------------

    def model_info(self, files_metadata: bool = False) -> Any:
        """The revision's commit and file list (with sizes when ``files_metadata``): one request."""
        from huggingface_hub import HfApi

        with self.errors.translating(self.errors.metadata_error):
            info = HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=files_metadata)
        self.cache.write_ref(self.revision, info.sha)
        return info

    def download(self, info: Any = None) -> tuple[Path, str]:
        from huggingface_hub import snapshot_download

        info = info or self.model_info(files_metadata=True)
        commit = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
        snapshot = self.cache.storage / "snapshots" / commit
        cached = {f for f in files if (snapshot / f).is_file()}  # checked when they were fetched
        with self.errors.translating(self.errors.download_error):
            weights, support = self.needed_files(files, commit)
            wanted = weights + support
            folder = Path(snapshot_download(
                self.repo_id,
                revision=commit,
                cache_dir=self.cache_dir,
                allow_patterns=[escape_glob(f) for f in wanted],
            ))
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            # snapshot_download falls back to the cache when the Hub becomes unreachable midway.
            raise fusion.FusionError(
                f"Downloading Hub model {self.reference!r} from {self.endpoint} stopped before "
                f"{', '.join(missing[:3])} arrived; run the same command again to resume, the "
                f"files already downloaded are kept in {self.cache_dir}."
            )
        self.verify(folder, [f for f in wanted if f not in cached], info, commit)
        return folder, commit

    def verify(self, folder: Path, names: list[str], info: Any, commit: str) -> None:
        """Check each downloaded file against the digest the Hub lists for it (sha256 for Git
        LFS files, the Git blob id for the others): a file altered on the way, with its size
        intact, is removed from the cache and refused."""
        listed = {s.rfilename: s for s in (info.siblings or [])}
        for name in names:
            sibling = listed.get(name)
            lfs = getattr(sibling, "lfs", None)
            kind, want = ("sha256", lfs.sha256) if lfs is not None and getattr(lfs, "sha256", None) \
                else ("git", getattr(sibling, "blob_id", None))
            if not want:
                continue  # the Hub gave no digest (an old server): nothing to compare with
            got = checksum(folder / name, kind)
            if got != want:
                self.cache.discard(folder / name)
                raise fusion.FusionError(
                    f"Hub model {self.reference!r}: {name} downloaded from {self.endpoint} does not match "
                    f"the {'sha256' if kind == 'sha256' else 'Git blob id'} the Hub lists for it "
                    f"({got[:12]} instead of {want[:12]} at commit {commit[:12]}), so it was removed from "
                    f"the cache; run again, and if it happens again something on the way alters the file."
                )

    def read_json(self, name: str, commit: str) -> Any:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.repo_id, name, revision=commit, cache_dir=self.cache_dir)
        try:
            return fusion.api.modelfiles.load_json(Path(path), f"Hub model {self.reference!r}")
        except fusion.FusionError:
            raise fusion.FusionError(
                f"Hub model {self.reference!r}: {name} at commit {commit[:12]} is not valid "
                f"JSON; pick another revision or report it to the model's authors."
            ) from None

    def needed_files(self, files: list[str], commit: str) -> tuple[list[str], list[str]]:
        """(weights, support files) of ``commit`` that a merge needs, or a clear error."""
        try:
            weights, support = select_files(files, lambda name: self.read_json(name, commit))
        except IndexMismatch as exc:
            lists = "shards outside the repository" if exc.unsafe else "shards the repository does not have"
            raise fusion.FusionError(
                f"Hub model {self.reference!r}: {exc.index} at commit {commit[:12]} lists {lists} "
                f"({', '.join(map(repr, exc.missing[:3]))}); pick another revision or report it to the "
                f"model's authors."
            ) from None
        if not weights:
            raise self.errors.no_weights_error(files, commit)
        return weights, support

    def headers(self) -> tuple[Path, str]:
        """A folder to plan from: the complete snapshot when cached, else a header-only folder."""
        if self.offline or FULL_COMMIT.fullmatch(self.revision):
            try:
                return self.cache.snapshot(self.revision)
            except NotCached as exc:
                commit = self.cache.cached_commit(self.revision)
                # write_header_folder renames a complete folder into place: present means whole
                stub = self.cache.header_folder(commit or "-")
                if commit and stub.is_dir():
                    return stub, commit
                if self.offline:
                    raise self.errors.offline_error(exc) from None
        from huggingface_hub import HfApi

        info = self.model_info(files_metadata=True)
        commit = info.sha
        try:
            return self.cache.snapshot(commit)
        except NotCached:
            pass
        stub = self.cache.header_folder(commit)
        if stub.is_dir():
            return stub, commit
        sizes = {s.rfilename: s.size or 0 for s in (info.siblings or [])}
        with self.errors.translating(self.errors.download_error):
            weights, support = self.needed_files(list(sizes), commit)
            shards = [f for f in weights if f.endswith(".safetensors")]
            if not shards:
                return self.download(info)  # .bin headers are pickles: only the file itself tells the shapes
            config = self.read_json("config.json", commit) if "config.json" in sizes else {}
            headers = {}
            for name in shards:
                meta = HfApi().parse_safetensors_file_metadata(self.repo_id, name, revision=commit)
                headers[name] = (sizes.get(name, 0), {
                    t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                    for t, i in meta.tensors.items()
                })
        to_fetch = sum(sizes.get(f, 0) for f in weights + support)
        fusion.write_header_folder(stub, config, headers, source=f"{self.repo_id}@{commit}",
                                   download_bytes=to_fetch)
        return stub, commit
