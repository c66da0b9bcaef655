"""Checkpoint I/O: safetensors headers, pytorch_model.bin through weights_only, the sharded writer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from checkpoints import Shape, load_folder, random_tensors, save_checkpoint
from fusion.checkpoint import open_checkpoint, read_safetensors_header
from fusion.api.errors import CheckpointError, FusionError
from fusion.writer import ShardedWriter, atomic_folder, parse_size


def test_bin_checkpoint_reads_like_safetensors(tmp_path):
    shape = Shape(family="llama")
    tensors = random_tensors(shape, "float16", 0)
    save_checkpoint(tmp_path / "st", shape, "float16", tensors)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    st, pt = open_checkpoint(tmp_path / "st", "a"), open_checkpoint(tmp_path / "bin", "b")
    assert pt.format == "bin" and set(pt.tensors) == set(st.tensors)
    for name in st.tensors:
        assert st.tensors[name].shape == pt.tensors[name].shape and st.tensors[name].dtype == pt.tensors[name].dtype
        assert torch.equal(st.read(name), pt.read(name))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(Shape().config("float32")))
    torch.save({"model.embed_tokens.weight": _Exploit()}, folder / "pytorch_model.bin", pickle_protocol=2)
    with pytest.raises(CheckpointError, match="Python objects besides tensors, which fusion never unpickles"):
        open_checkpoint(folder, "models[0]")
    assert not (tmp_path / "PWNED").exists()


def test_header_validation_catches_truncation(tmp_path):
    shape = Shape()
    save_checkpoint(tmp_path / "m", shape, "bfloat16", random_tensors(shape, "bfloat16", 0))
    path = tmp_path / "m" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_safetensors_header(path)


@pytest.mark.parametrize("shard_size,expected_files", [(10**9, 1), (200, None)])
def test_writer_shards_like_transformers(tmp_path, shard_size, expected_files):
    tensors = {f"t{i}": torch.randn(5, 7 + i).to(torch.bfloat16) for i in range(6)}
    entries = [(n, "BF16", tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, entries, shard_size)
    for n, t in tensors.items():
        writer.write(n, t)
    files = writer.finish()
    if expected_files == 1:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
        for f in files:  # no shard exceeds the limit unless one tensor alone does
            infos = read_safetensors_header(tmp_path / f)
            assert sum(i.nbytes for i in infos.values()) <= shard_size or len(infos) == 1
        assert set(index["weight_map"]) == set(tensors)
    with open(tmp_path / files[0], "rb") as f:  # data starts 8-byte aligned, metadata says pt
        n = int.from_bytes(f.read(8), "little")
        assert n % 8 == 0 and json.loads(f.read(n))["__metadata__"] == {"format": "pt"}
    assert all(torch.equal(load_folder(tmp_path)[n], t) for n, t in tensors.items())


def test_writer_refuses_out_of_order_and_wrong_dtype(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", "F32", (2,)), ("b", "F32", (2,))], 10**9)
    with pytest.raises(RuntimeError, match="out of plan order"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="planned F32"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with atomic_folder(tmp_path / "out", force=False) as tmp:
            (tmp / "model.safetensors").write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(FusionError, match="already exists"):
        with atomic_folder(tmp_path / "out", force=False):
            pass
    with atomic_folder(tmp_path / "out", force=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1234", 1234)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(FusionError, match="not a size"):
        parse_size("lots")


def test_released_tensors_read_back_unchanged(tmp_path):
    shape = Shape(vocab=4096, heads=4, head_dim=16)
    save_checkpoint(tmp_path / "m", shape, "float32", random_tensors(shape, "float32", 0))
    ckpt = open_checkpoint(tmp_path / "m", "m")
    t = ckpt.read("model.embed_tokens.weight")
    assert t.shape == (4096, 64) and t.untyped_storage().nbytes() == t.numel() * 4
    expected = t.clone()
    ckpt.release("model.embed_tokens.weight")
    assert torch.equal(ckpt.read("model.embed_tokens.weight"), expected)  # pages come back from the file
    del t
    ckpt.close()
