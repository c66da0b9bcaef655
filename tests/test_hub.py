"""The Hub resolver (fusion.plugins.hub) against a local Hub on 127.0.0.1.

huggingface_hub fixes HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported,
into ``huggingface_hub.constants``. In-process tests therefore set the environment variables the
way a user would and re-run that module (``importlib.reload``), so every derived value (cache,
token path, URL template, offline flag) is computed by huggingface_hub itself; the variables and
the module are restored afterwards. One test runs fresh Python processes to show the variables
are honoured with no reload at all, and one runs the real ``fusion merge`` command.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fusion
from fusion import host as plugins
from fusion.host import BUILTINS
from fusion.plugins import hub as hub_resolver
from fusion.resolve import ResolveOptions, resolve

from hubserver import FakeHub

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

PLUGIN = "fusion.plugins.hub"
REPO_ROOT = Path(__file__).resolve().parent.parent

# What a merge needs from a repository: the weights and the files a model folder needs to load.
SUPPORT = {
    "config.json": json.dumps({"do_sample": False}),
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}),
    "tokenizer_config.json": json.dumps({"tokenizer_class": "Qwen2Tokenizer"}),
    "special_tokens_map.json": json.dumps({"eos_token": "<|endoftext|>"}),
    "vocab.json": json.dumps({"a": 0}),
    "merges.txt": "#version: 0.2\n",
    "added_tokens.json": json.dumps({"<|endoftext|>": 31}),
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
}
# What it must never download: training state, pictures, docs, other formats, sub-folders.
EXTRAS = {
    "training_args.bin": b"\x80" * 4096,
    "optimizer.pt": b"\x00" * (2 * 1024 * 1024),
    "scheduler.pt": b"\x01" * 64,
    "rng_state.pth": b"\x02" * 64,
    "assets/architecture.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 256,
    "README.md": "# tiny\n",
    ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "onnx/model.onnx": b"onnx" * 64,
    "original/consolidated.safetensors": b"\x00" * 128,
    "checkpoint-500/model.safetensors": b"\x00" * 128,
}


# --------------------------------------------------------------------------------------------
# a real tiny model, laid out like a Qwen2 checkpoint


def qwen2_config(layers: int = 1) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8,
        "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": layers, "vocab_size": 32, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def qwen2_tensors(seed: int, layers: int = 1) -> dict[str, "torch.Tensor"]:
    from fusion.demo import qwen2_tensor_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = qwen2_tensor_shapes(qwen2_config(layers))
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_model(folder: Path, seed: int, *, extras: bool = True) -> dict[str, "torch.Tensor"]:
    """A loadable model folder: config, model.safetensors, tokenizer files (and junk)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = qwen2_tensors(seed)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    files = {**SUPPORT, "config.json": json.dumps(qwen2_config())}
    if extras:
        files.update(EXTRAS)
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
    return tensors


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --------------------------------------------------------------------------------------------
# fixtures


def _reload_hf_constants() -> None:
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


_HF_VARS = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN", "XDG_CACHE_HOME")


@pytest.fixture
def hub(tmp_path):
    server = FakeHub(tmp_path / "hub-repos").start()
    yield server
    server.stop()


@pytest.fixture
def hf_env(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake Hub, with a fresh HF_HOME; yields a setter for more."""
    for var in _HF_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    _reload_hf_constants()

    def setenv(**values: str | None) -> None:
        for k, v in values.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)
        _reload_hf_constants()

    yield setenv
    monkeypatch.undo()
    _reload_hf_constants()


@pytest.fixture
def cache(tmp_path, hf_env) -> Path:
    return tmp_path / "hf-home" / "hub"


@pytest.fixture(autouse=True)
def with_hub_resolver(monkeypatch):
    """The plugin host with the Hub resolver, whether or not it is a built-in yet."""
    if PLUGIN not in BUILTINS:
        monkeypatch.setattr(plugins, "_local_plugins", [*plugins._local_plugins, PLUGIN])
    plugins.reset()
    yield
    plugins.reset()


def fetch(reference: str, **options) -> tuple[Path, ResolveOptions]:
    import huggingface_hub.constants

    # Never the real Hub: every test talks to 127.0.0.1 only.
    assert huggingface_hub.constants.ENDPOINT.startswith("http://127.0.0.1:")
    opts = ResolveOptions(**options)
    return resolve(reference, opts, "models[0].model").folder, opts


def failure(reference: str, **options) -> str:
    with pytest.raises(fusion.FusionError) as info:
        fetch(reference, **options)
    message = str(info.value)
    # The host names the config entry first; the resolver's sentence follows.
    assert message.startswith("models[0].model: "), message
    message = message.removeprefix("models[0].model: ")
    # One sentence that names the reference: no line breaks, no second sentence.
    assert reference in message, message
    assert "\n" not in message and ". " not in message.rstrip("."), message
    assert message.endswith("."), message
    return message


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def model_requests(hub: FakeHub) -> list:
    """Requests about models (not huggingface_hub's once-a-day agent registry fetch)."""
    return [r for r in hub.requests if not r.path.startswith("/api/agent-harnesses")]


@pytest.fixture
def tiny(hub, tmp_path):
    """org/tiny: one commit on main with a real Qwen2-shaped model, support files and junk."""
    tensors = write_model(tmp_path / "src-tiny", seed=1)
    sha = hub.commit("org/tiny", tmp_path / "src-tiny")
    return sha, tensors


# --------------------------------------------------------------------------------------------
# resolving


def test_non_hub_references_are_left_to_the_next_resolver(hub, hf_env):
    opts = ResolveOptions()
    for reference in ["./model", "/abs/model", "org/name/extra", "~/models/x", "just-a-name", "../..@main"]:
        assert hub_resolver.resolve_model(reference, opts) is None, reference
    assert hub.requests == [] and opts.resolved == {}


@pytest.mark.parametrize("reference", ["org/na--me", "org/.hidden", "org/.."])
def test_names_the_hub_cannot_have_are_refused(hub, hf_env, reference):
    """Shaped like org/name but not a name the Hub allows: the Hub resolver is asked last, so
    nothing else claimed it either; it says why instead of suggesting a resolver plugin."""
    assert fusion.looks_like_hub_name(reference)
    with pytest.raises(fusion.FusionError, match="neither a local folder nor a valid Hub model name"):
        hub_resolver.resolve_model(reference, ResolveOptions())
    assert hub.requests == []


def test_resolves_a_hub_name_to_a_cached_snapshot(hub, cache, tiny):
    sha, tensors = tiny
    folder, opts = fetch("org/tiny")

    assert folder == cache / "models--org--tiny" / "snapshots" / sha
    assert_same_tensors(load_file(str(folder / "model.safetensors")), tensors)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    assert opts.resolved == {"org/tiny": {"repo": "org/tiny", "revision": "main", "commit": sha}}
    assert (cache / "models--org--tiny" / "refs" / "main").read_text() == sha
    # The commit the model info named is what the files were fetched from, never "main".
    assert {p.split("/", 1)[0] for p in hub.file_requests()} == {sha}


def test_only_what_a_merge_needs_is_requested(hub, cache, tiny):
    folder, _ = fetch("org/tiny")

    wanted = {"model.safetensors", *SUPPORT}
    assert hub.fetched_paths("GET") == wanted
    assert hub.fetched_paths() == wanted  # not even a HEAD for the rest
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == wanted
    paths = [r.path for r in model_requests(hub)]
    assert paths[0] == "/api/models/org/tiny/revision/main"
    assert all(r.status in (200, 206) for r in model_requests(hub))


def test_sharded_safetensors_fetch_exactly_the_indexed_shards(hub, cache, tmp_path):
    tensors = qwen2_tensors(seed=3)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    src = tmp_path / "src"
    src.mkdir()
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / shard))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps(qwen2_config()))
    # A second copy of the same weights in another layout, as Mistral's repositories carry.
    save_file(tensors, str(src / "consolidated.safetensors"))
    hub.commit("org/sharded", src)

    folder, _ = fetch("org/sharded")

    assert hub.fetched_paths("GET") == {"model.safetensors.index.json", *shards, "config.json"}
    merged: dict = {}
    for shard in shards:
        merged.update(load_file(str(folder / shard)))
    assert_same_tensors(merged, tensors)


def test_pytorch_weights_when_there_are_no_safetensors(hub, cache, tmp_path):
    tensors = qwen2_tensors(seed=4)
    buf = tmp_path / "pytorch_model.bin"
    torch.save(tensors, buf)
    hub.commit("org/legacy", {"pytorch_model.bin": buf, "config.json": json.dumps(qwen2_config()),
                              "training_args.bin": b"\x80" * 100, "optimizer.pt": b"\x00" * 100,
                              "tokenizer.model": b"\x0a" * 10})
    folder, _ = fetch("org/legacy")
    assert hub.fetched_paths() == {"pytorch_model.bin", "config.json", "tokenizer.model"}
    assert_same_tensors(torch.load(folder / "pytorch_model.bin", weights_only=True), tensors)

    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    hub.commit("org/legacy-sharded", {
        "pytorch_model.bin.index.json": json.dumps(index),
        "pytorch_model-00001-of-00002.bin": b"1" * 10, "pytorch_model-00002-of-00002.bin": b"2" * 10,
        "config.json": "{}", "training_args.bin": b"\x80" * 10,
    })
    hub.clear_requests()
    fetch("org/legacy-sharded")
    assert hub.fetched_paths() == {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                                   "pytorch_model-00002-of-00002.bin", "config.json"}


def test_revision_pinning_branch_tag_and_commit(hub, cache, tmp_path):
    t1 = write_model(tmp_path / "v1", seed=11, extras=False)
    c1 = hub.commit("org/pinned", tmp_path / "v1")
    hub.set_tag("org/pinned", "v1.0", c1)
    t2 = write_model(tmp_path / "v2", seed=12, extras=False)
    c2 = hub.commit("org/pinned", tmp_path / "v2")  # main moves on
    t3 = write_model(tmp_path / "v3", seed=13, extras=False)
    c3 = hub.commit("org/pinned", tmp_path / "v3", branch="feature/longer-context", parent=c1)

    cases = {
        "org/pinned": ("main", c2, t2),
        "org/pinned@main": ("main", c2, t2),
        "org/pinned@v1.0": ("v1.0", c1, t1),
        f"org/pinned@{c1}": (c1, c1, t1),
        f"org/pinned@{c1[:10]}": (c1[:10], c1, t1),
        "org/pinned@feature/longer-context": ("feature/longer-context", c3, t3),
    }
    opts = ResolveOptions()
    for reference, (revision, commit, tensors) in cases.items():
        folder = resolve(reference, opts, "models[0].model").folder
        assert folder.name == commit, reference
        assert_same_tensors(load_file(str(folder / "model.safetensors")), tensors)
        assert opts.resolved[reference] == {"repo": "org/pinned", "revision": revision, "commit": commit}
    refs = cache / "models--org--pinned" / "refs"
    assert (refs / "main").read_text() == c2
    assert (refs / "v1.0").read_text() == c1
    assert (refs / "feature" / "longer-context").read_text() == c3


def test_second_resolve_makes_no_request(hub, cache, tiny):
    sha, _ = tiny
    folder, opts = fetch("org/tiny")

    hub.clear_requests()
    assert resolve("org/tiny", opts, "base_model").folder == folder  # same run: already pinned
    assert fetch(f"org/tiny@{sha}")[0] == folder  # a commit never changes: cache only
    assert fetch("org/tiny", offline=True)[0] == folder
    assert hub.requests == []

    # A branch in a new run: one question (where does main point now?) and no file request.
    assert fetch("org/tiny")[0] == folder
    assert [(r.method, r.path) for r in hub.requests] == [("GET", "/api/models/org/tiny/revision/main")]


def test_a_moved_branch_fetches_only_what_changed(hub, cache, tmp_path, tiny):
    old, _ = tiny
    fetch("org/tiny")
    src = tmp_path / "src-tiny"
    new_tensors = qwen2_tensors(seed=99)
    save_file(new_tensors, str(src / "model.safetensors"))
    new = hub.commit("org/tiny", src)
    hub.clear_requests()

    folder, opts = fetch("org/tiny")

    assert folder.name == new != old
    assert opts.resolved["org/tiny"]["commit"] == new
    assert_same_tensors(load_file(str(folder / "model.safetensors")), new_tensors)
    assert hub.fetched_paths("GET") == {"model.safetensors"}  # unchanged blobs are reused


def test_offline_option_uses_the_cache_with_no_request(hub, cache, tiny):
    sha, tensors = tiny
    folder, _ = fetch("org/tiny")
    hub.stop()  # nothing to talk to
    hub.clear_requests()

    got, opts = fetch("org/tiny", offline=True)
    assert got == folder
    assert opts.resolved == {"org/tiny": {"repo": "org/tiny", "revision": "main", "commit": sha}}
    assert_same_tensors(load_file(str(got / "model.safetensors")), tensors)
    assert hub.requests == []


def test_offline_env_var_uses_the_cache_with_no_request(hub, cache, hf_env, tiny):
    sha, _ = tiny
    folder, _ = fetch("org/tiny")
    hub.clear_requests()
    hf_env(HF_HUB_OFFLINE="1")

    assert fetch("org/tiny")[0] == folder
    assert fetch(f"org/tiny@{sha}")[0] == folder
    message = failure("org/tiny@v2")
    assert message == (
        f"Hub model 'org/tiny@v2' is not in the cache {cache} and offline mode is on (--offline or "
        f"HF_HUB_OFFLINE=1); run once without offline mode to download it, or point "
        f"--cache-dir/HF_HUB_CACHE at the cache that has it."
    )
    assert hub.requests == []


def test_offline_without_the_model_in_cache(hub, cache, tiny):
    message = failure("org/tiny", offline=True)
    assert "is not in the cache" in message and "offline mode is on" in message
    assert hub.requests == []


def test_offline_with_a_partly_downloaded_model(hub, cache, tiny):
    folder, _ = fetch("org/tiny")
    # What an interrupted first download leaves: neither the blob nor the snapshot's link to it.
    (folder / "model.safetensors").resolve().unlink()
    (folder / "model.safetensors").unlink()
    hub.clear_requests()
    message = failure("org/tiny", offline=True)
    assert message == (
        f"Hub model 'org/tiny' is only partly cached in {cache} (commit {tiny[0][:12]}, missing "
        f"model.safetensors) and offline mode is on (--offline or HF_HUB_OFFLINE=1); run once "
        f"without offline mode to finish the download."
    )
    assert hub.requests == []
    # Online, the missing file is fetched again and nothing else.
    fetch("org/tiny")
    assert hub.fetched_paths("GET") == {"model.safetensors"}
    assert_same_tensors(load_file(str(folder / "model.safetensors")), tiny[1])


def test_cache_dir_option(hub, cache, tmp_path, tiny):
    other = tmp_path / "elsewhere"
    folder, _ = fetch("org/tiny", cache_dir=str(other))
    assert folder.is_relative_to(other)
    assert not (cache / "models--org--tiny").exists()
    hub.clear_requests()
    assert fetch("org/tiny", cache_dir=str(other), offline=True)[0] == folder
    assert hub.requests == []


def test_a_local_folder_wins_over_the_hub(hub, cache, tmp_path, tiny):
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    folder, opts = fetch("org/tiny", base_dir=tmp_path)
    assert folder == local.resolve()
    assert hub.requests == [] and opts.resolved == {}


def test_tree_listing_is_paginated_like_the_hub(tmp_path, hf_env, cache, monkeypatch):
    server = FakeHub(tmp_path / "paged", page_size=2).start()
    try:
        hf_env(HF_ENDPOINT=server.url)
        write_model(tmp_path / "src", seed=5)
        server.commit("org/paged", tmp_path / "src")
        folder, _ = fetch("org/paged")
        tree_pages = [r for r in server.requests if "/tree/" in r.path]
        assert len(tree_pages) > 5  # many files, two per page, all followed
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# failures: one sentence each, saying what, where and how to fix


def test_repository_not_found(hub, cache):
    message = failure("org/missing")
    assert message == (
        f"Hub model 'org/missing' was not found at {hub.url} and is not a local folder either; "
        f"check the name, or if the repository is private authenticate with `hf auth login` (or "
        f"`huggingface-cli login`) or by setting HF_TOKEN."
    )


def test_revision_not_found(hub, cache, tiny):
    message = failure("org/tiny@v9")
    assert message == (
        f"Hub model 'org/tiny@v9': revision 'v9' does not exist in org/tiny at {hub.url}; use an "
        f"existing branch, tag or commit hash (see {hub.url}/org/tiny/tree/main)."
    )
    assert "does not exist" in failure("org/tiny@" + "0" * 40)


def test_private_repository_needs_a_token(hub, cache, hf_env, tmp_path):
    write_model(tmp_path / "src", seed=6, extras=False)
    hub.create_repo("org/private", private=True, readers=("alice",))
    hub.commit("org/private", tmp_path / "src")
    hub.add_token("hf_alice", "alice")

    assert "was not found" in failure("org/private")  # the Hub hides private repositories
    hf_env(HF_TOKEN="hf_alice")
    hub.clear_requests()
    folder, _ = fetch("org/private")
    assert (folder / "model.safetensors").is_file()
    assert all(r.headers.get("authorization") == "Bearer hf_alice" for r in model_requests(hub))


def test_gated_repository(hub, cache, hf_env, tmp_path):
    write_model(tmp_path / "src", seed=7, extras=False)
    hub.create_repo("org/gated", gated=True, readers=("alice",))
    hub.commit("org/gated", tmp_path / "src")
    hub.add_token("hf_alice", "alice")
    hub.add_token("hf_bob", "bob")

    assert failure("org/gated") == (
        f"Hub model 'org/gated' is gated and no token was sent; accept its conditions at "
        f"{hub.url}/org/gated and authenticate with `hf auth login` (or `huggingface-cli login`) "
        f"or by setting HF_TOKEN."
    )
    hf_env(HF_TOKEN="hf_bob")
    assert failure("org/gated") == (
        f"Hub model 'org/gated' is gated and the token in use has no access to it; request access "
        f"at {hub.url}/org/gated, then run again."
    )
    hf_env(HF_TOKEN="hf_alice")
    folder, _ = fetch("org/gated")
    assert (folder / "model.safetensors").is_file()


def test_rejected_token(hub, cache, hf_env, tiny):
    hf_env(HF_TOKEN="hf_expired")
    assert failure("org/tiny") == (
        f"The Hub at {hub.url} rejected the access token while fetching 'org/tiny'; renew it with "
        f"`hf auth login` (or `huggingface-cli login`) or by setting HF_TOKEN."
    )


def test_repository_without_weights(hub, cache):
    sha = hub.commit("org/gguf-only", {"config.json": "{}", "README.md": "hi",
                                       "tiny.Q4_K_M.gguf": b"GGUF" * 10, "adapter_model.safetensors": b"x"})
    assert failure("org/gguf-only") == (
        f"Hub model 'org/gguf-only' has no weights fusion can read at commit {sha[:12]} (fusion "
        f"needs a full model's top-level *.safetensors or pytorch_model*.bin files, and it has only "
        f"adapter_model.safetensors, tiny.Q4_K_M.gguf); choose a repository or revision with "
        f"safetensors or PyTorch weights."
    )
    assert hub.fetched_paths() == set()  # decided from the listing: nothing downloaded


def test_no_network_and_not_cached(hub, cache, hf_env, tiny):
    endpoint = dead_endpoint()
    hf_env(HF_ENDPOINT=endpoint)
    assert failure("org/tiny") == (
        f"Hub model 'org/tiny' is not in the cache {cache} and the Hub at {endpoint} cannot be "
        f"reached (connection refused); check the network connection (and HF_ENDPOINT or proxy "
        f"settings) and run again."
    )


def test_no_network_but_cached_suggests_offline(hub, cache, hf_env, tiny):
    sha, _ = tiny
    fetch("org/tiny")
    endpoint = dead_endpoint()
    hf_env(HF_ENDPOINT=endpoint)
    assert failure("org/tiny") == (
        f"The Hub at {endpoint} cannot be reached (connection refused) to check revision 'main' of "
        f"'org/tiny', which is cached at commit {sha[:12]}; run with --offline (or "
        f"HF_HUB_OFFLINE=1) to use the cached copy."
    )
    assert fetch(f"org/tiny@{sha}")[0].name == sha  # a cached commit needs no network at all


def test_hub_unavailable(hub, cache, tiny):
    hub.fail_next_request("/api/models/org/tiny/revision/main", 503)
    assert failure("org/tiny") == (
        f"Hub model 'org/tiny' is not in the cache {cache} and the Hub at {hub.url} cannot be "
        f"reached (HTTP 503); check the network connection (and HF_ENDPOINT or proxy settings) "
        f"and run again."
    )


def test_interrupted_download_resumes_on_the_next_run(hub, cache, tiny):
    sha, tensors = tiny
    hub.fail_next_get("org/tiny", "model.safetensors", status=500)
    message = failure("org/tiny")
    assert message == (
        f"Downloading Hub model 'org/tiny' from {hub.url} stopped before it finished (HTTP 500); "
        f"run the same command again to resume, the files already downloaded are kept in {cache}."
    )
    # downloads run in parallel: files still in flight when the shard failed may be missing
    done = hub.fetched_paths("GET") - {"model.safetensors"}
    assert done <= set(SUPPORT)

    hub.clear_requests()
    folder, _ = fetch("org/tiny")
    missing = {"model.safetensors"} | (set(SUPPORT) - done)
    assert hub.fetched_paths("GET") == missing  # only what was missing
    assert_same_tensors(load_file(str(folder / "model.safetensors")), tensors)


def test_connection_lost_mid_file_resumes_with_a_range_request(hub, cache, tiny, monkeypatch):
    import huggingface_hub.constants

    _, tensors = tiny
    # huggingface_hub counts bytes in 10 MB chunks, so a cut inside the first chunk restarts from
    # zero; smaller chunks make a few-KB file behave like a big one.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    hub.fail_next_get("org/tiny", "model.safetensors", cut_after=1100)
    folder, _ = fetch("org/tiny")
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.status for r in gets] == [200, 206]
    assert gets[0].headers.get("range") is None
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 1100 and resumed_at % 256 == 0
    assert_same_tensors(load_file(str(folder / "model.safetensors")), tensors)


def test_invalid_revision_text(hub, cache, tiny):
    message = failure("org/tiny@../../etc")
    assert "invalid revision" in message
    assert hub.requests == []


# --------------------------------------------------------------------------------------------
# the environment variables, in fresh processes (no reload of huggingface_hub)


_SCRIPT = textwrap.dedent("""
    import json, sys
    import fusion
    from fusion import host as plugins
    from fusion.host import BUILTINS
    from fusion.resolve import ResolveOptions, resolve
    if %(plugin)r not in BUILTINS:
        plugins.add_local_plugin(%(plugin)r)
    out = {}
    for ref in sys.argv[1:]:
        opts = ResolveOptions()
        try:
            out[ref] = {"path": str(resolve(ref, opts, "models[0].model").folder), "pinned": opts.resolved[ref]}
        except fusion.FusionError as exc:
            out[ref] = {"error": str(exc).removeprefix("models[0].model: ")}
    print(json.dumps(out))
""") % {"plugin": PLUGIN}


def _run_fresh(env: dict[str, str], *refs: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *refs], env=env, capture_output=True,
                          text=True, timeout=60, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_environment_variables_in_a_fresh_process(hub, tmp_path, tiny):
    sha, _ = tiny
    write_model(tmp_path / "src-private", seed=8, extras=False)
    hub.create_repo("org/private", private=True, readers=("alice",))
    hub.commit("org/private", tmp_path / "src-private")
    hub.add_token("hf_alice", "alice")
    hub_cache = tmp_path / "custom-hub-cache"
    env = {k: v for k, v in os.environ.items() if k not in _HF_VARS}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(hub_cache),
               HF_TOKEN="hf_alice", HF_HUB_DISABLE_TELEMETRY="1")

    online = _run_fresh(env, "org/tiny", "org/private")
    assert online["org/tiny"]["path"] == str(hub_cache / "models--org--tiny" / "snapshots" / sha)
    assert online["org/tiny"]["pinned"] == {"repo": "org/tiny", "revision": "main", "commit": sha}
    assert Path(online["org/private"]["path"], "model.safetensors").is_file()
    private = [r for r in hub.requests if "/org/private/" in r.path]
    assert private and all(r.headers.get("authorization") == "Bearer hf_alice" for r in private)
    assert not (tmp_path / "home" / "hub").exists()  # HF_HUB_CACHE wins over HF_HOME

    hub.clear_requests()
    offline = _run_fresh({**env, "HF_HUB_OFFLINE": "1"}, "org/tiny", "org/private", "org/other")
    assert offline["org/tiny"]["path"] == online["org/tiny"]["path"]
    assert offline["org/private"]["path"] == online["org/private"]["path"]
    assert "is not in the cache" in offline["org/other"]["error"]
    assert hub.requests == []


# --------------------------------------------------------------------------------------------
# end to end: `fusion merge` by Hub name gives what the same merge of local folders gives


def test_merge_by_hub_name_equals_merge_of_local_folders(hub, tmp_path, hf_env, capsys):
    from fusion.cli import main as fusion_main

    base, ft1, ft2 = (tmp_path / "local" / n for n in ("base", "ft1", "ft2"))
    write_model(base, seed=21)
    write_model(ft1, seed=22)
    write_model(ft2, seed=23)
    c_base = hub.commit("org/base", base)
    hub.set_tag("org/base", "v1", c_base)
    c1 = hub.commit("org/ft1", ft1)
    hub.commit("org/ft1", {"config.json": "{}"})  # main moves on: the pinned commit must be used
    c2 = hub.commit("org/ft2", ft2, branch="dev")

    def config(base_ref: str, refs: list[str]) -> str:
        models = "\n".join(f"  - model: {r}\n    parameters: {{weight: {w}}}" for r, w in zip(refs, (0.3, 0.7)))
        return (f"merge_method: task_arithmetic\nbase_model: {base_ref}\nmodels:\n{models}\n"
                f"parameters: {{lambda: 0.8}}\ndtype: float32\n")

    (tmp_path / "local.yaml").write_text(config(str(base), [str(ft1), str(ft2)]))
    (tmp_path / "hub.yaml").write_text(config("org/base@v1", [f"org/ft1@{c1}", "org/ft2@dev"]))
    (tmp_path / "bad.yaml").write_text(config("org/base@v1", ["org/ft1@no-such-branch", "org/ft2@dev"]))
    plugin_args = [] if PLUGIN in BUILTINS else ["--plugin", PLUGIN]

    def tensors(folder: Path) -> dict:
        out: dict = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(shard)))
        return out

    # The reference: the same merge of local folders (in this process, to keep the test fast).
    fusion_main([*plugin_args, "merge", str(tmp_path / "local.yaml"), "-o", str(tmp_path / "out-local"),
                 "--quiet"])
    expected = tensors(tmp_path / "out-local")
    assert expected

    # By Hub name, with the real command in a fresh process that only has the environment.
    env = {k: v for k, v in os.environ.items() if k not in _HF_VARS}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1")

    def merge_command(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "fusion", *plugin_args, "merge", *args, "--quiet"],
                              env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr

    merge_command(str(tmp_path / "hub.yaml"), "-o", str(tmp_path / "out-hub"))
    assert_same_tensors(tensors(tmp_path / "out-hub"), expected)
    assert hub.fetched_paths() and not hub.fetched_paths() & set(EXTRAS)
    assert (tmp_path / "home" / "hub" / "models--org--ft1" / "snapshots" / c1).is_dir()
    # The output says which commits were merged.
    recorded = "".join(p.read_text() for p in (tmp_path / "out-hub").iterdir() if p.suffix in (".json", ".md"))
    assert all(c in recorded for c in (c_base, c1, c2))

    # Offline, from the cache: no request at all, same result.
    hub.clear_requests()
    merge_command(str(tmp_path / "hub.yaml"), "-o", str(tmp_path / "out-offline"), "--offline")
    assert hub.requests == []
    assert_same_tensors(tensors(tmp_path / "out-offline"), expected)

    # A Hub failure is one clear line and exit code 1 (in this process, HF_* pointing at the hub).
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        fusion_main([*plugin_args, "merge", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "out-bad")])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: models[0]: Hub model 'org/ft1@no-such-branch': revision 'no-such-branch' "
                                "does not exist in org/ft1")
    assert not (tmp_path / "out-bad").exists()


# --------------------------------------------------------------------------------------------
# plans and dry runs read the weights' headers remotely


def _sharded_repo(hub: FakeHub, tmp_path: Path, repo: str, seed: int) -> tuple[str, dict, int]:
    """A two-shard Qwen2 model with support files and junk; returns (commit, tensors, bytes a
    merge downloads: the weights, the index and the support files)."""
    src = tmp_path / f"src-{seed}"
    write_model(src, seed=seed)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(src / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    needed = [*shards, "model.safetensors.index.json", *SUPPORT]
    return hub.commit(repo, src), tensors, sum((src / f).stat().st_size for f in needed)


def test_plan_of_hub_models_reads_only_the_headers(hub, tmp_path, hf_env, capsys):
    from fusion.cli import main as fusion_main

    c_base, base, base_bytes = _sharded_repo(hub, tmp_path, "org/base", seed=31)
    c_ft, _, ft_bytes = _sharded_repo(hub, tmp_path, "org/ft", seed=32)
    (tmp_path / "m.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\n"
        f"models:\n  - model: org/ft@{c_ft}\n    parameters: {{weight: 0.5}}\n")

    def plan(*extra: str) -> str:
        capsys.readouterr()
        fusion_main(["plan", str(tmp_path / "m.yaml"), *extra])
        return capsys.readouterr().out

    text = plan()
    # Every tensor is planned, and the download a merge would make is announced, to the byte.
    for name in base:
        assert f"\n{name} " in text, name
    total = (base_bytes + ft_bytes) / 1e6
    assert f"to download: {total:,.1f} MB for 2 Hub model(s)" in text, text
    # No weight file came down: each safetensors request was a small Range read of the header.
    weight_gets = [r for r in model_requests(hub) if r.method == "GET" and r.path.endswith(".safetensors")]
    assert len(weight_gets) == 4
    assert all(r.status == 206 and r.headers.get("range", "").startswith("bytes=0-") for r in weight_gets)
    assert hub.fetched_paths("GET") - {"config.json", "model.safetensors.index.json",
                                       *(r.path.split("/")[-1] for r in weight_gets)} == set()
    assert not (tmp_path / "hf-home" / "hub" / "models--org--ft" / "snapshots" / c_ft
                / "model-00001-of-00002.safetensors").exists()

    # Again, and offline: the headers are cached; the branch is asked where it points, nothing else.
    hub.clear_requests()
    assert plan() == text
    assert [r.path for r in model_requests(hub)] == ["/api/models/org/base/revision/main"]
    hub.clear_requests()
    assert plan("--offline") == text
    assert model_requests(hub) == []

    # The JSON plan says the same, per model.
    data = json.loads(plan("--json", "--offline"))
    assert sum(data["download_bytes"].values()) == base_bytes + ft_bytes

    # merge --dry-run prints the same plan and writes nothing; the merge itself downloads.
    capsys.readouterr()
    fusion_main(["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out"), "--dry-run"])
    assert capsys.readouterr().out == text
    assert not (tmp_path / "out").exists()
    fusion_main(["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out"), "--quiet"])
    merged = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    assert sorted(merged) == sorted(base)
    # Once downloaded, plans come from the snapshot and announce no download.
    assert "to download" not in plan("--offline")


def test_plan_of_a_hub_model_with_only_bin_weights_downloads_them(hub, tmp_path, hf_env, capsys):
    from fusion.cli import main as fusion_main

    src = tmp_path / "src"
    tensors = write_model(src, seed=41, extras=False)
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    hub.commit("org/old", src)
    (tmp_path / "m.yaml").write_text("merge_method: linear\nmodels:\n  - model: org/old\n")
    fusion_main(["plan", str(tmp_path / "m.yaml")])
    text = capsys.readouterr().out
    assert "to download" not in text and "model.embed_tokens.weight" in text
    assert "pytorch_model.bin" in hub.fetched_paths("GET")


def test_plan_of_a_missing_hub_model_is_one_clear_error(hub, tmp_path, hf_env, capsys):
    from fusion.cli import main as fusion_main

    (tmp_path / "m.yaml").write_text("merge_method: linear\nmodels:\n  - model: org/nothing\n")
    with pytest.raises(SystemExit) as exited:
        fusion_main(["plan", str(tmp_path / "m.yaml")])
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: models[0]: Hub model 'org/nothing' was not found at"), err
    assert "\n" not in err
