"""A hostile or broken Hub (the loopback fake Hub of hubserver.py): an answer that never comes, a
body that never ends, bytes altered on the way with their size intact, file names that climb out
of the repository, and huggingface_hub's retry chatter. Each resolution runs in a thread that the
test waits for a bounded time, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import threading
import time

import pytest

import fusion
from hubserver import FakeHub  # noqa: F401
from test_hub import SUPPORT, cache, fetch, hf_env, hub, tiny, with_hub_resolver, write_model  # noqa: F401

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

#: What a test allows a bounded failure to take (the timeouts below are a fraction of it).
BOUND = 30.0


def bounded(reference: str, **options) -> tuple[str, float]:
    """Resolve in a thread; the FusionError's message and the seconds it took."""
    found: dict = {}

    def work() -> None:
        try:
            fetch(reference, **options)
            found["ok"] = True
        except fusion.FusionError as exc:
            found["error"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            found["other"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(BOUND)
    took = time.monotonic() - start
    assert not thread.is_alive(), f"resolving {reference} still runs after {BOUND} s"
    assert "error" in found, found
    message = found["error"]
    assert "\n" not in message and "Traceback" not in message, message
    return message, took


@pytest.fixture
def short_limits(monkeypatch):
    monkeypatch.setenv("FUSION_HUB_TIMEOUT", "0.5")
    monkeypatch.setenv("FUSION_HUB_MAX_METADATA", "1000000")


def test_hub_that_never_answers(hub, cache, tiny, short_limits):
    hub.stall_next_request("/api/models/org/tiny/revision/main")
    message, took = bounded("org/tiny")
    assert "'org/tiny'" in message and "cannot be reached (timed out)" in message, message
    assert took < BOUND / 2


def test_file_request_that_never_answers(hub, cache, tiny, short_limits):
    sha, _ = tiny
    hub.stall_next_request(f"/org/tiny/resolve/{sha}/model.safetensors", times=20)  # every retry too
    message, _ = bounded("org/tiny")
    assert "stopped before it finished" in message and "run the same command again" in message, message


def test_model_info_that_never_ends(hub, cache, tiny, short_limits):
    """Before, the endless body was read until the machine ran out of memory."""
    hub.endless_next_request("/api/models/org/tiny/revision/main")
    message, _ = bounded("org/tiny")
    assert "sent more than 1000000 bytes" in message and "'org/tiny'" in message, message
    assert "FUSION_HUB_MAX_METADATA" in message


def test_weights_altered_on_the_way(hub, cache, tiny, tmp_path):
    """Same size, other bytes: the sha256 the Hub lists catches it; the file leaves the cache and
    the next run, once the server is right again, downloads and checks it afresh."""
    sha, tensors = tiny
    good = (tmp_path / "src-tiny" / "model.safetensors").read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    hub.tamper("org/tiny", sha, "model.safetensors", bytes(bad))
    message, _ = bounded("org/tiny")
    assert "model.safetensors" in message and "does not match the sha256" in message, message
    assert "removed from the cache" in message
    blobs = list((cache / "models--org--tiny" / "blobs").iterdir())
    assert all(b.read_bytes() != bytes(bad) for b in blobs)

    hub.tamper("org/tiny", sha, "model.safetensors", good)
    folder, _ = fetch("org/tiny")
    got = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)


def test_small_file_altered_on_the_way(hub, cache, tiny):
    sha, _ = tiny
    text = SUPPORT["tokenizer_config.json"]
    hub.tamper("org/tiny", sha, "tokenizer_config.json", text.replace("Qwen2", "Evil2").encode())
    message, _ = bounded("org/tiny")
    assert "tokenizer_config.json" in message and "Git blob id" in message, message


def test_index_naming_files_outside_the_repository(hub, cache, tmp_path):
    src = tmp_path / "src"
    write_model(src, seed=3, extras=False)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    files = {p.name: p for p in src.iterdir()}
    files["../../escaped.safetensors"] = tmp_path / "escaped.safetensors"
    save_file(tensors, str(files["../../escaped.safetensors"]))
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": {n: "../../escaped.safetensors" for n in tensors}}).encode()
    hub.commit("org/escape", files)
    message, _ = bounded("org/escape")
    assert "lists shards outside the repository ('../../escaped.safetensors')" in message, message
    assert not any("escaped" in r.path for r in hub.requests)
    assert not (cache / "escaped.safetensors").exists() and not (cache.parent / "escaped.safetensors").exists()


@pytest.mark.parametrize("reference", ["org/..", "org/..@main", "a--b/c"])
def test_reference_that_no_hub_can_have(hub, cache, reference):
    message, _ = bounded(reference)
    assert "neither a local folder nor a valid Hub model name" in message, message
    assert hub.requests == []


def test_retries_leave_no_chatter(hub, cache, tiny, monkeypatch, capfd):
    """A connection cut twice mid-file: huggingface_hub resumes (warning each time, by
    default); the merge's own output is all that shows."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)
    for _ in range(2):
        hub.fail_next_get("org/tiny", "model.safetensors", cut_after=600)
    capfd.readouterr()
    folder, _ = fetch("org/tiny")
    assert (folder / "model.safetensors").is_file()
    out, err = capfd.readouterr()
    assert "Trying to resume" not in err and "Retry" not in err, err
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(gets) == 3  # the resumes did happen
