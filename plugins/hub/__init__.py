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

import fusion

from .resolver import HubModel

_DEFAULT_REVISION = "main"


# trylast: a third-party resolver that claims some org/name references (a mirror, a registry)
# is asked before the Hub whatever the order plugins load in; local paths are asked first anyway.
@fusion.hookimpl(trylast=True)
def resolve_model(reference: str, options: fusion.ResolveOptions) -> str | None:
    """Download (or find in the cache) the Hub model ``reference`` and return its snapshot folder."""
    if not fusion.looks_like_hub_name(reference):
        return None
    repo_id, _, revision = reference.partition("@")
    problem = _invalid_repo_id(repo_id)
    if problem:  # every other resolver, the local one included, has declined it already
        raise fusion.FusionError(
            f"{reference!r} is neither a local folder nor a valid Hub model name ({problem}); check "
            f"the path, or give a Hub name as org/name[@revision]."
        )
    revision = revision or _DEFAULT_REVISION
    if any(part in ("", ".", "..") for part in revision.split("/")):
        raise fusion.FusionError(
            f"Hub model {reference!r} has an invalid revision {revision!r}; give a branch, tag or "
            f"commit hash after '@'."
        )
    hub = HubModel(reference, repo_id, revision, options)
    return str(hub.resolve())


def _invalid_repo_id(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be a Hub repository (None when it can)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if any(part in (".", "..") for part in repo_id.split("/")):
        return "'.' and '..' are not names"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).strip().splitlines()[0].rstrip(".")
    return None
