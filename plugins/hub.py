"""Resolve Hugging Face Hub model names (``org/name`` or ``org/name@revision``) to local snapshots.

The snapshot lives in the standard Hugging Face cache, so models already downloaded by
transformers or ``hf download`` are reused and what fusion downloads is reused by them. Only what
a merge needs is fetched: the weights in one format (safetensors, or PyTorch ``.bin`` when the
repository has no safetensors), the config and generation config, and the tokenizer/processor
files; training state, images, other weight formats and sub-folders are never requested.

huggingface_hub reads its environment itself (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``); this module therefore never copies its settings at import
time and creates its ``HfApi`` per call. ``ResolveOptions.offline`` and ``ResolveOptions.cache_dir``
are applied on top. What was pinned is recorded in ``options.resolved[reference]`` as
``{"repo": ..., "revision": ..., "commit": ...}`` so the output can say exactly what was merged.

For a plan or a dry run (``options.weights`` false) nothing heavy is downloaded: the config and
the weight index come down, and each safetensors file's header is read with a ``Range`` request;
they are kept as a header-only folder (:func:`fusion.write_header_folder`) in the repository's
cache folder, under ``fusion-headers/<commit>``, beside huggingface_hub's own ``snapshots``. A model
whose snapshot is already complete is planned from the snapshot.

Requests made: one model-info call per branch/tag reference (a branch can move, so it is always
asked where it points now), the file listing of a commit the first time it is seen, then one
HEAD+GET per file not yet in the cache. A full commit hash whose files are cached, a reference
resolved before with the same options, and offline mode make no request at all. Interrupted
downloads are left to huggingface_hub: files that completed stay in the cache and the next run
fetches only what is missing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import fusion
from fusion.api.modelfiles import is_support_file
from fusion.api.resolver import looks_like_hub_name

_FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
_DEFAULT_REVISION = "main"

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Header-only folders for plans live beside huggingface_hub's snapshots, one per commit.
HEADERS_FOLDER = "fusion-headers"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

# Weight formats fusion cannot read, named in the "no weights" error so the user sees why.
_OTHER_WEIGHTS = (".gguf", ".h5", ".msgpack", ".onnx", ".pth", ".pt", ".ckpt", ".ot", ".safetensors")


def _error(message: str) -> fusion.FusionError:
    return fusion.FusionError(message)


# trylast: a third-party resolver that claims some org/name references (a mirror, a registry)
# is asked before the Hub whatever the order plugins load in; local paths are asked first anyway.
@fusion.hookimpl(trylast=True)
def resolve_model(reference: str, options: fusion.ResolveOptions) -> str | None:
    """Download (or find in the cache) the Hub model ``reference`` and return its snapshot folder."""
    if not fusion.looks_like_hub_name(reference):
        return None
    repo_id, _, revision = reference.partition("@")
    if not _valid_repo_id(repo_id):
        return None  # not a name the Hub could have: let the host report the missing path
    revision = revision or _DEFAULT_REVISION
    if any(part in ("", ".", "..") for part in revision.split("/")):
        raise _error(
            f"Hub model {reference!r} has an invalid revision {revision!r}; give a branch, tag or "
            f"commit hash after '@'."
        )
    hub = _Hub(reference, repo_id, revision, options)
    return str(hub.resolve())


def _valid_repo_id(repo_id: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# which files a merge needs


def select_files(files: Iterable[str], read_json: Callable[[str], Any]) -> tuple[list[str], list[str]]:
    """Split a repository's file list into (weight files, support files) a merge needs.

    ``read_json(name)`` returns a parsed JSON file of the repository; it is only called for a
    weight index, whose ``weight_map`` names the exact shards (repositories such as Mistral's also
    carry a ``consolidated.safetensors`` copy of the same weights that must not be downloaded).
    """
    files = list(files)
    top = {f for f in files if "/" not in f}
    weights = _weight_files(top, set(files), read_json)
    support = sorted(f for f in files if is_support_file(f))
    return weights, support


def _weight_files(top: set[str], every: set[str], read_json: Callable[[str], Any]) -> list[str]:
    for index, single, suffix, prefix in (
        (SAFETENSORS_INDEX, "model.safetensors", ".safetensors", ""),
        (PYTORCH_INDEX, "pytorch_model.bin", ".bin", "pytorch_model"),
    ):
        if index in top:
            parsed = read_json(index)
            weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
            shards = sorted({v for v in (weight_map or {}).values() if isinstance(v, str)})
            missing = [s for s in shards if s not in every]
            if missing:
                raise _IndexMismatch(index, missing)
            if shards:
                return [index, *shards]
        if single in top:
            return [single]
        # Un-indexed shards or unusual names; a PEFT adapter is not a model to merge.
        found = sorted(
            f for f in top
            if f.endswith(suffix) and f.startswith(prefix) and not f.startswith("adapter_model")
        )
        if found:
            return found
    return []


class _IndexMismatch(Exception):
    def __init__(self, index: str, missing: list[str]):
        super().__init__(index)
        self.index = index
        self.missing = missing


def _escape_glob(name: str) -> str:
    # allow_patterns are fnmatch patterns; escape so each names exactly one file.
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------------------------
# resolution


class _NotCached(Exception):
    def __init__(self, missing: list[str] | None = None, commit: str | None = None):
        super().__init__("not cached")
        self.missing = missing  # None: nothing of this revision is cached
        self.commit = commit


class _Hub:
    """One resolution: the reference, where the cache is, and the huggingface_hub calls."""

    def __init__(self, reference: str, repo_id: str, revision: str, options: fusion.ResolveOptions):
        from huggingface_hub import constants

        self.reference = reference
        self.repo_id = repo_id
        self.revision = revision
        self.options = options
        # Read at call time: huggingface_hub fixes these from the environment when imported.
        self.endpoint = constants.ENDPOINT
        self.cache_dir = str(Path(options.cache_dir or constants.HF_HUB_CACHE).expanduser().resolve())
        offline_now = getattr(constants, "is_offline_mode", None)
        self.offline = bool(options.offline) or bool(
            offline_now() if offline_now is not None else constants.HF_HUB_OFFLINE
        )
        # The cache's documented layout: <cache>/models--<org>--<name>/{refs,snapshots,blobs}.
        sep = constants.REPO_ID_SEPARATOR
        self.storage = Path(self.cache_dir) / sep.join(["models", *repo_id.split("/")])

    # -- entry point -------------------------------------------------------------------------

    def resolve(self) -> Path:
        prior = self.options.resolved.get(self.reference)
        if isinstance(prior, dict) and prior.get("repo") == self.repo_id and prior.get("commit"):
            # resolved earlier in this run: the same commit, found locally with no request
            try:
                return self.from_cache(prior["commit"])[0]
            except _NotCached:
                stub = self.storage / HEADERS_FOLDER / prior["commit"]
                if not self.options.weights and stub.is_dir():
                    return stub
        if not self.options.weights:
            folder, commit = self.headers()
        elif self.offline:
            try:
                folder, commit = self.from_cache(self.revision)
            except _NotCached as exc:
                raise self._offline_error(exc) from None
        elif _FULL_COMMIT.fullmatch(self.revision):
            # A commit never changes: when its files are all cached there is nothing to ask.
            try:
                folder, commit = self.from_cache(self.revision)
            except _NotCached:
                folder, commit = self.download()
        else:
            folder, commit = self.download()
        self.options.resolved[self.reference] = {
            "repo": self.repo_id, "revision": self.revision, "commit": commit,
        }
        return folder

    # -- cache -------------------------------------------------------------------------------

    def cached_commit(self, revision: str) -> str | None:
        if _FULL_COMMIT.fullmatch(revision):
            return revision
        ref = self.storage / "refs" / revision
        try:
            return ref.read_text().strip() or None
        except OSError:
            return None

    def from_cache(self, revision: str) -> tuple[Path, str]:
        """The complete cached snapshot of ``revision``, without any request, or ``_NotCached``."""
        commit = self.cached_commit(revision)
        if commit is None:
            raise _NotCached()
        folder = self.storage / "snapshots" / commit
        if not folder.is_dir():
            raise _NotCached(commit=commit)
        files = self._cached_listing(commit, folder)

        def read_json(name: str) -> Any:
            try:
                return json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise _NotCached([name], commit) from None

        try:
            weights, support = select_files(files, read_json)
        except _IndexMismatch as exc:
            raise _NotCached(exc.missing, commit) from None
        if not weights:
            raise _NotCached([], commit)
        missing = [f for f in weights + support if not (folder / f).is_file()]
        if missing:
            raise _NotCached(missing, commit)
        return folder, commit

    def _cached_listing(self, commit: str, folder: Path) -> list[str]:
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

    def _write_ref(self, commit: str) -> None:
        # snapshot_download is given the commit hash (so the files come from exactly the commit
        # the model info named, even if the branch moves meanwhile); it then records no ref, so
        # record revision -> commit here, in the cache's documented layout, for offline use.
        if self.revision == commit:
            return
        ref = self.storage / "refs" / self.revision
        try:
            if ref.is_file() and ref.read_text() == commit:
                return
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)  # atomic: a concurrent reader never sees a partial ref
        except OSError:
            pass  # a read-only cache still works online; offline use then needs a commit hash

    # -- network -----------------------------------------------------------------------------

    def model_info(self, files_metadata: bool = False) -> Any:
        """The revision's commit and file list (with sizes when ``files_metadata``): one request."""
        from huggingface_hub import HfApi

        with self._translating(self._metadata_error):
            info = HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=files_metadata)
        self._write_ref(info.sha)
        return info

    def download(self, info: Any = None) -> tuple[Path, str]:
        from huggingface_hub import snapshot_download

        info = info or self.model_info()
        commit = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
        with self._translating(self._download_error):
            weights, support = self.needed_files(files, commit)
            wanted = weights + support
            folder = Path(snapshot_download(
                self.repo_id,
                revision=commit,
                cache_dir=self.cache_dir,
                allow_patterns=[_escape_glob(f) for f in wanted],
            ))
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            # snapshot_download falls back to the cache when the Hub becomes unreachable midway.
            raise _error(
                f"Downloading Hub model {self.reference!r} from {self.endpoint} stopped before "
                f"{', '.join(missing[:3])} arrived; run the same command again to resume, the "
                f"files already downloaded are kept in {self.cache_dir}."
            )
        return folder, commit

    def read_json(self, name: str, commit: str) -> Any:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.repo_id, name, revision=commit, cache_dir=self.cache_dir)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except ValueError:
            raise _error(
                f"Hub model {self.reference!r}: {name} at commit {commit[:12]} is not valid "
                f"JSON; pick another revision or report it to the model's authors."
            ) from None

    def needed_files(self, files: list[str], commit: str) -> tuple[list[str], list[str]]:
        """(weights, support files) of ``commit`` that a merge needs, or a clear error."""
        try:
            weights, support = select_files(files, lambda name: self.read_json(name, commit))
        except _IndexMismatch as exc:
            raise _error(
                f"Hub model {self.reference!r}: {exc.index} at commit {commit[:12]} lists shards "
                f"the repository does not have ({', '.join(exc.missing[:3])}); pick another "
                f"revision or report it to the model's authors."
            ) from None
        if not weights:
            raise self._no_weights_error(files, commit)
        return weights, support

    def headers(self) -> tuple[Path, str]:
        """A folder to plan from: the complete snapshot when cached, else a header-only folder."""
        if self.offline or _FULL_COMMIT.fullmatch(self.revision):
            try:
                return self.from_cache(self.revision)
            except _NotCached as exc:
                commit = self.cached_commit(self.revision)
                # write_header_folder renames a complete folder into place: present means whole
                stub = self.storage / HEADERS_FOLDER / (commit or "-")
                if commit and stub.is_dir():
                    return stub, commit
                if self.offline:
                    raise self._offline_error(exc) from None
        from huggingface_hub import HfApi

        info = self.model_info(files_metadata=True)
        commit = info.sha
        try:
            return self.from_cache(commit)
        except _NotCached:
            pass
        stub = self.storage / HEADERS_FOLDER / commit
        if stub.is_dir():
            return stub, commit
        sizes = {s.rfilename: s.size or 0 for s in (info.siblings or [])}
        with self._translating(self._download_error):
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

    # -- errors: one sentence each, naming the reference --------------------------------------

    @contextlib.contextmanager
    def _translating(self, translate: Callable[[BaseException], BaseException]) -> Iterator[None]:
        """Turn a huggingface_hub failure into fusion's one sentence; the cause stays visible
        with --debug, and what ``translate`` does not recognise keeps its traceback."""
        try:
            yield
        except fusion.FusionError:
            raise
        except Exception as exc:
            error = translate(exc)
            if error is exc:
                raise
            raise error from exc

    def _login_hint(self) -> str:
        return "`hf auth login` (or `huggingface-cli login`) or by setting HF_TOKEN"

    def _offline_error(self, exc: _NotCached) -> fusion.FusionError:
        why = "offline mode is on (--offline or HF_HUB_OFFLINE=1)"
        if exc.missing is None:
            return _error(
                f"Hub model {self.reference!r} is not in the cache {self.cache_dir} and {why}; run "
                f"once without offline mode to download it, or point --cache-dir/HF_HUB_CACHE at "
                f"the cache that has it."
            )
        if exc.missing:
            return _error(
                f"Hub model {self.reference!r} is only partly cached in {self.cache_dir} (commit "
                f"{exc.commit[:12]}, missing {', '.join(exc.missing[:3])}) and {why}; run once "
                f"without offline mode to finish the download."
            )
        return _error(
            f"Hub model {self.reference!r} is cached in {self.cache_dir} (commit {exc.commit[:12]}) "
            f"without any weights and {why}; run once without offline mode to download them."
        )

    def _unreachable_error(self, why: str) -> fusion.FusionError:
        try:
            _, commit = self.from_cache(self.revision)
        except _NotCached:
            return _error(
                f"Hub model {self.reference!r} is not in the cache {self.cache_dir} and the Hub at "
                f"{self.endpoint} cannot be reached ({why}); check the network connection (and "
                f"HF_ENDPOINT or proxy settings) and run again."
            )
        return _error(
            f"The Hub at {self.endpoint} cannot be reached ({why}) to check revision "
            f"{self.revision!r} of {self.reference!r}, which is cached at commit {commit[:12]}; "
            f"run with --offline (or HF_HUB_OFFLINE=1) to use the cached copy."
        )

    def _common_error(self, exc: BaseException) -> fusion.FusionError | None:
        from huggingface_hub import errors as hf

        name = self.reference
        if isinstance(exc, hf.GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
            status = _status(exc)
            if status == 403:
                return _error(
                    f"Hub model {name!r} is gated and the token in use has no access to it; request "
                    f"access at {self.endpoint}/{self.repo_id}, then run again."
                )
            return _error(
                f"Hub model {name!r} is gated and no token was sent; accept its conditions at "
                f"{self.endpoint}/{self.repo_id} and authenticate with {self._login_hint()}."
            )
        if isinstance(exc, hf.RepositoryNotFoundError):
            return _error(
                f"Hub model {name!r} was not found at {self.endpoint} and is not a local folder "
                f"either; check the name, or if the repository is private authenticate with "
                f"{self._login_hint()}."
            )
        if isinstance(exc, hf.RevisionNotFoundError):
            return _error(
                f"Hub model {name!r}: revision {self.revision!r} does not exist in "
                f"{self.repo_id} at {self.endpoint}; use an existing branch, tag or commit hash "
                f"(see {self.endpoint}/{self.repo_id}/tree/main)."
            )
        if isinstance(exc, hf.HfHubHTTPError) and _status(exc) == 401:
            return _error(
                f"The Hub at {self.endpoint} rejected the access token while fetching {name!r}; "
                f"renew it with {self._login_hint()}."
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            return _error(
                f"Hub model {name!r} cannot be written to the cache {self.cache_dir} "
                f"({os.strerror(exc.errno)}); free space there or set HF_HUB_CACHE (or --cache-dir) "
                f"to another folder."
            )
        return None

    def _metadata_error(self, exc: BaseException) -> BaseException:
        from huggingface_hub import errors as hf

        known = self._common_error(exc)
        if known is not None:
            return known
        if isinstance(exc, _transport_errors()):
            return self._unreachable_error(_short_reason(exc))
        if isinstance(exc, hf.HfHubHTTPError):
            status = _status(exc)
            if status is not None and status >= 500:
                return self._unreachable_error(f"HTTP {status}")
            return _error(
                f"The Hub at {self.endpoint} refused the request for {self.reference!r} (HTTP "
                f"{status}: {_server_message(exc)}); check the name and your access to it."
            )
        return exc  # not a user problem: keep the traceback

    def _download_error(self, exc: BaseException) -> BaseException:
        from huggingface_hub import errors as hf

        known = self._common_error(exc)
        if known is not None:
            return known
        if isinstance(exc, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, OSError)) or isinstance(
            exc, _transport_errors()
        ):
            return _error(
                f"Downloading Hub model {self.reference!r} from {self.endpoint} stopped before it "
                f"finished ({_short_reason(exc)}); run the same command again to resume, the files "
                f"already downloaded are kept in {self.cache_dir}."
            )
        return exc

    def _no_weights_error(self, files: list[str], commit: str) -> fusion.FusionError:
        others = sorted(f for f in files if f.endswith(_OTHER_WEIGHTS))
        has = f", and it has only {', '.join(others[:3])}" if others else ""
        return _error(
            f"Hub model {self.reference!r} has no weights fusion can read at commit {commit[:12]} "
            f"(fusion needs a full model's top-level *.safetensors or pytorch_model*.bin files{has}); "
            f"choose a repository or revision with safetensors or PyTorch weights."
        )


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    return (headers.get("X-Error-Message") or "no details").rstrip(".")


def _short_reason(exc: BaseException) -> str:
    """A few words on why a request failed; huggingface_hub's own messages span paragraphs."""
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    cause = exc.__cause__ or exc.__context__
    if type(exc).__name__ == "LocalEntryNotFoundError" and cause is not None:
        return _short_reason(cause)
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        return "connection refused"
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return type(exc).__name__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception classes meaning "the Hub could not be reached", for the HTTP library in use.

    huggingface_hub has used requests, httpx and httpx2 over its versions; only a library that is
    already imported can have raised, so nothing new is imported here.
    """
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)
        for n in names:
            cls = getattr(mod, n, None) if mod is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)
