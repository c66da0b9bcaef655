"""huggingface_hub's failures as fusion's one sentence: what happened to which model, and what to do."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import fusion
from fusion.api.errors import os_error

from .cache import NotCached, RepoCache
from .http import MAX_METADATA_ENV, ResponseTooLarge
from .files import OTHER_WEIGHTS


class Translator:
    """The error sentences of one resolution (they name the reference, the Hub and the cache)."""

    def __init__(self, reference: str, repo_id: str, revision: str, endpoint: str, cache: RepoCache):
        self.reference, self.repo_id, self.revision = reference, repo_id, revision
        self.endpoint, self.cache = endpoint, cache

    @contextlib.contextmanager
    def translating(self, translate: Callable[[BaseException], BaseException]) -> Iterator[None]:
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

    def login_hint(self) -> str:
        return "`hf auth login` (or `huggingface-cli login`) or by setting HF_TOKEN"

    def offline_error(self, exc: NotCached) -> fusion.FusionError:
        why = "offline mode is on (--offline or HF_HUB_OFFLINE=1)"
        if exc.missing is None:
            return fusion.FusionError(
                f"Hub model {self.reference!r} is not in the cache {self.cache.cache_dir} and {why}; run "
                f"once without offline mode to download it, or point --cache-dir/HF_HUB_CACHE at "
                f"the cache that has it."
            )
        if exc.missing:
            return fusion.FusionError(
                f"Hub model {self.reference!r} is only partly cached in {self.cache.cache_dir} (commit "
                f"{exc.commit[:12]}, missing {', '.join(exc.missing[:3])}) and {why}; run once "
                f"without offline mode to finish the download."
            )
        return fusion.FusionError(
            f"Hub model {self.reference!r} is cached in {self.cache.cache_dir} (commit {exc.commit[:12]}) "
            f"without any weights and {why}; run once without offline mode to download them."
        )

    def unreachable_error(self, why: str) -> fusion.FusionError:
        try:
            _, commit = self.cache.snapshot(self.revision)
        except NotCached:
            return fusion.FusionError(
                f"Hub model {self.reference!r} is not in the cache {self.cache.cache_dir} and the Hub at "
                f"{self.endpoint} cannot be reached ({why}); check the network connection (and "
                f"HF_ENDPOINT or proxy settings) and run again."
            )
        return fusion.FusionError(
            f"The Hub at {self.endpoint} cannot be reached ({why}) to check revision "
            f"{self.revision!r} of {self.reference!r}, which is cached at commit {commit[:12]}; "
            f"run with --offline (or HF_HUB_OFFLINE=1) to use the cached copy."
        )

    def common_error(self, exc: BaseException) -> fusion.FusionError | None:
        from huggingface_hub import errors as hf

        name = self.reference
        if isinstance(exc, hf.GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
            status = http_status(exc)
            if status == 403:
                return fusion.FusionError(
                    f"Hub model {name!r} is gated and the token in use has no access to it; request "
                    f"access at {self.endpoint}/{self.repo_id}, then run again."
                )
            return fusion.FusionError(
                f"Hub model {name!r} is gated and no token was sent; accept its conditions at "
                f"{self.endpoint}/{self.repo_id} and authenticate with {self.login_hint()}."
            )
        if isinstance(exc, hf.RepositoryNotFoundError):
            return fusion.FusionError(
                f"Hub model {name!r} was not found at {self.endpoint} and is not a local folder "
                f"either; check the name, or if the repository is private authenticate with "
                f"{self.login_hint()}."
            )
        if isinstance(exc, hf.RevisionNotFoundError):
            return fusion.FusionError(
                f"Hub model {name!r}: revision {self.revision!r} does not exist in "
                f"{self.repo_id} at {self.endpoint}; use an existing branch, tag or commit hash "
                f"(see {self.endpoint}/{self.repo_id}/tree/main)."
            )
        if isinstance(exc, hf.HfHubHTTPError) and http_status(exc) == 401:
            return fusion.FusionError(
                f"The Hub at {self.endpoint} rejected the access token while fetching {name!r}; "
                f"renew it with {self.login_hint()}."
            )
        if isinstance(exc, ResponseTooLarge):
            return fusion.FusionError(
                f"The Hub at {self.endpoint} sent more than {exc.limit} bytes in answer to a request for "
                f"{name!r}, far more than such an answer holds; check HF_ENDPOINT (a proxy or mirror may "
                f"be broken), or raise {MAX_METADATA_ENV} if the answer is genuine."
            )
        disk = os_error(exc, f"Hub model {name!r} cannot be written to the cache {self.cache.cache_dir}",
                        "or set HF_HUB_CACHE (or --cache-dir) to another folder.")
        if disk is not None:
            return disk
        return None

    def metadata_error(self, exc: BaseException) -> BaseException:
        from huggingface_hub import errors as hf

        known = self.common_error(exc)
        if known is not None:
            return known
        if isinstance(exc, transport_errors()):
            return self.unreachable_error(short_reason(exc))
        if isinstance(exc, hf.HfHubHTTPError):
            status = http_status(exc)
            if status is not None and status >= 500:
                return self.unreachable_error(f"HTTP {status}")
            return fusion.FusionError(
                f"The Hub at {self.endpoint} refused the request for {self.reference!r} (HTTP "
                f"{status}: {server_message(exc)}); check the name and your access to it."
            )
        return exc  # not a user problem: keep the traceback

    def download_error(self, exc: BaseException) -> BaseException:
        from huggingface_hub import errors as hf

        known = self.common_error(exc)
        if known is not None:
            return known
        if isinstance(exc, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, OSError)) or isinstance(
            exc, transport_errors()
        ):
            return fusion.FusionError(
                f"Downloading Hub model {self.reference!r} from {self.endpoint} stopped before it "
                f"finished ({short_reason(exc)}); run the same command again to resume, the files "
                f"already downloaded are kept in {self.cache.cache_dir}."
            )
        return exc

    def no_weights_error(self, files: list[str], commit: str) -> fusion.FusionError:
        others = sorted(f for f in files if f.endswith(OTHER_WEIGHTS))
        has = f", and it has only {', '.join(others[:3])}" if others else ""
        return fusion.FusionError(
            f"Hub model {self.reference!r} has no weights fusion can read at commit {commit[:12]} "
            f"(fusion needs a full model's top-level *.safetensors or pytorch_model*.bin files{has}); "
            f"choose a repository or revision with safetensors or PyTorch weights."
        )


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def server_message(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    return (headers.get("X-Error-Message") or "no details").rstrip(".")


def short_reason(exc: BaseException) -> str:
    """A few words on why a request failed; huggingface_hub's own messages span paragraphs."""
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status}"
    cause = exc.__cause__ or exc.__context__
    if type(exc).__name__ == "LocalEntryNotFoundError" and cause is not None:
        return short_reason(cause)
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        return "connection refused"
    if isinstance(exc, TimeoutError) or "timeout" in type(exc).__name__.lower():
        return "timed out"
    if "Consistency check failed" in str(exc):  # huggingface_hub's size check of a download
        return "a file arrived with another size than the Hub lists"
    return type(exc).__name__


def transport_errors() -> tuple[type[BaseException], ...]:
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
