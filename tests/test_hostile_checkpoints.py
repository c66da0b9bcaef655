"""Hostile model folders against `fusion merge`: damaged or lying safetensors headers, indexes
and config.json files, files that lead outside the folder, pickles. Each is refused with one line
naming the file and what to do, leaves nothing behind and changes no input (:class:`Scene`);
the few controls show that what must keep working does."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hostile import Scene, family, one_line, scene, split_safetensors, write_safetensors  # noqa: F401

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

A = "model.layers.0.input_layernorm.weight"
B = "model.layers.0.post_attention_layernorm.weight"  # same shape and dtype as A
W = "model.layers.1.mlp.up_proj.weight"


def rewrite_header(scene: Scene, change, model: str = "code") -> str:
    path = scene.model(model) / "model.safetensors"
    header, data = split_safetensors(path)
    result = change(header)
    write_safetensors(path, header if result is None else result, data)
    return str(path)


# --- safetensors headers -------------------------------------------------------------------------

def _overlap(h):
    h[B]["data_offsets"] = [h[A]["data_offsets"][0] + 64, h[A]["data_offsets"][1] + 64]


def _duplicate(h):
    h[B]["data_offsets"] = list(h[A]["data_offsets"])


def _gap(h):
    h[B]["dtype"], h[B]["shape"] = "BF16", [32]
    h[B]["data_offsets"][1] -= 64


HEADERS = {
    # case: (change to the header, what the line names)
    "overlapping-offsets": (_overlap, "share data bytes"),
    "duplicate-offsets": (_duplicate, "share data bytes"),
    "bytes-of-no-tensor": (_gap, "belong to no tensor"),
    "dtype-is-a-list": (lambda h: h[A].update(dtype=["BF16"]), "not a dtype name"),
    "offsets-are-strings": (lambda h: h[A].update(data_offsets=[str(o) for o in h[A]["data_offsets"]]),
                            "not two whole numbers"),
    "offsets-are-null": (lambda h: h[A].update(data_offsets=None), "not two whole numbers"),
    "float-shape": (lambda h: h[W].update(shape=[float(d) for d in h[W]["shape"]]), "not a list of whole numbers"),
    "negative-shape": (lambda h: h[A].update(shape=[-64]), "not a list of whole numbers"),
    "entry-is-a-number": (lambda h: h.update({A: 5}), "not a JSON object"),
    "metadata-is-a-list": (lambda h: h.update(__metadata__=["pt"]), "__metadata__"),
    "header-is-a-list": (lambda h: [h], "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_damaged_header(scene, case):
    change, says = HEADERS[case]
    path = rewrite_header(scene, change)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(path, says, "download or save it again"))


def _raw_header(scene: Scene, raw: bytes) -> str:
    path = scene.model("code") / "model.safetensors"
    _, data = split_safetensors(path)
    write_safetensors(path, raw, data)
    return str(path)


def test_header_with_a_tensor_listed_twice(scene):
    path = scene.model("code") / "model.safetensors"
    header, data = split_safetensors(path)
    text = json.dumps(header)
    entry = json.dumps({A: header[A]})[1:-1]
    _raw_header(scene, (text[:-1] + ", " + entry + "}").encode())
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(str(path), f"{A!r} is listed twice"))


def test_header_in_utf16(scene):
    path = scene.model("code") / "model.safetensors"
    header, _ = split_safetensors(path)
    _raw_header(scene, json.dumps(header).encode("utf-16"))
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(str(path), "not UTF-8"))


def test_header_nested_100k_deep(scene):
    path = _raw_header(scene, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(path, "nested too deeply"))


def test_overlapping_tensors_used_to_merge_silently(scene):
    """The same overlap through `fusion plan`: refused there too, not planned from shared bytes."""
    rewrite_header(scene, _duplicate)
    scene.refuses("plan", scene.ta(), mentions=("share data bytes",))


# --- indexes of sharded checkpoints --------------------------------------------------------------


def shard(scene: Scene, model: str = "code") -> tuple[dict, dict]:
    """Split the model into two shards with an index; return the index data and the tensors."""
    folder = scene.model(model)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index, tensors


def write_index(scene: Scene, index, model: str = "code", raw: bytes | None = None) -> str:
    path = scene.model(model) / "model.safetensors.index.json"
    path.write_bytes(raw if raw is not None else json.dumps(index).encode())
    return str(path)


def test_index_naming_a_shard_outside_the_folder(scene):
    index, tensors = shard(scene)
    # a complete, valid checkpoint outside the model folder: it used to be read and merged
    outside = scene.root / "elsewhere.safetensors"
    save_file(tensors, str(outside), metadata={"format": "pt"})
    scene.inputs.append(outside)
    index["weight_map"] = {n: "../../elsewhere.safetensors" for n in index["weight_map"]}
    write_index(scene, index)
    scene.refuses("merge", scene.ta(), "-o", scene.out,
                  mentions=("models[1]", "model.safetensors.index.json names the file '../../elsewhere.safetensors'",
                            "not a path inside the model folder"))


def test_index_naming_an_absolute_path(scene):
    index, _ = shard(scene)
    index["weight_map"][W] = "/etc/passwd"
    write_index(scene, index)
    line = scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=("'/etc/passwd'", "not a path inside"))
    assert str(os.path.getsize("/etc/passwd")) not in line.split("'/etc/passwd'")[1]  # nothing read from it


def test_shard_that_is_a_symlink_out_of_the_folder(scene):
    index, _ = shard(scene)
    first = sorted(set(index["weight_map"].values()))[0]
    moved = scene.root / "moved.safetensors"
    shutil.move(scene.model("code") / first, moved)
    scene.inputs.append(moved)
    (scene.model("code") / first).symlink_to(moved)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(first, str(moved), "outside the model folder"))


@pytest.mark.parametrize("value", [5, None, ["a.safetensors"], ""], ids=["int", "null", "list", "empty"])
def test_index_value_of_the_wrong_type(scene, value):
    index, _ = shard(scene)
    index["weight_map"][W] = value
    path = write_index(scene, index)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(path, repr(W), "not a file name"))


@pytest.mark.parametrize("raw, says", [
    (b"[1, 2]", "not a valid index"),
    (b'{"weight_map": 7}', "not a valid index"),
    ('{"weight_map": {"é": "x"}}'.encode("latin-1"), "not UTF-8"),
    ('{"weight_map": {}}'.encode("utf-16"), "not UTF-8"),
    (b'{"weight_map": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
], ids=["list", "weight-map-int", "latin-1", "utf-16", "100k-deep"])
def test_index_that_is_not_an_index(scene, raw, says):
    shard(scene)
    path = write_index(scene, None, raw=raw)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=(path, says))


def test_pytorch_index_naming_a_shard_outside_the_folder(scene):
    folder = scene.model("code")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, scene.root / "outside.bin")
    scene.inputs.append(scene.root / "outside.bin")
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {n: "../../outside.bin" for n in tensors}}))
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=("'../../outside.bin'", "not a path inside"))


# --- config.json ---------------------------------------------------------------------------------


def edit_config(scene: Scene, model: str = "code", **changes) -> str:
    path = scene.model(model) / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("key, value, says", [
    ("architectures", 5, "not a list of class names"),
    ("architectures", [5], "not a list of class names"),
    ("model_type", ["qwen2"], "not a name"),
], ids=["architectures-int", "architectures-of-ints", "model-type-list"])
def test_config_json_with_wrong_types(scene, key, value, says):
    path = edit_config(scene, **{key: value})
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=("models[1]", path, says))


@pytest.mark.parametrize("raw, says", [
    ('{"model_type": "qwen2é"}'.encode("latin-1"), "not UTF-8"),
    ('{"model_type": "qwen2"}'.encode("utf-16"), "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_type": "qwen2",', "not valid JSON"),
], ids=["latin-1", "utf-16", "100k-deep", "truncated"])
def test_config_json_that_cannot_be_read(scene, raw, says):
    path = scene.model("code") / "config.json"
    path.write_bytes(raw)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=("models[1]", str(path), says))


def test_config_json_that_is_a_symlink_out_of_the_folder(scene):
    secret = scene.root / "secret.json"
    secret.write_text(json.dumps(json.loads((scene.model("code") / "config.json").read_text())))
    scene.inputs.append(secret)
    (scene.model("code") / "config.json").unlink()
    (scene.model("code") / "config.json").symlink_to(secret)
    scene.refuses("merge", scene.ta(), "-o", scene.out, mentions=("config.json", str(secret), "outside"))


@pytest.mark.parametrize("value", [10**12, -5, 1, 3, "2", 2.0, True], ids=str)
def test_num_hidden_layers_that_the_tensors_contradict(scene, value):
    """The family has 2 layers; any other count would put gradients at the wrong layers."""
    path = edit_config(scene, "base", num_hidden_layers=value)
    cfg = scene.ta(extra="parameters: {lambda: [0.5, 1.0]}\n")
    scene.refuses("merge", cfg, "-o", scene.out, mentions=("base_model", "num_hidden_layers", path))


def test_num_hidden_layers_of_a_merged_model_is_checked_too(scene):
    path = edit_config(scene, "chat", num_hidden_layers=7)
    scene.refuses("plan", scene.ta(), mentions=("models[0]", "num_hidden_layers = 7", "2 layers", path))


# --- side files (tokenizer, templates) ------------------------------------------------------------


def test_side_file_that_is_a_symlink_to_a_secret(scene):
    secret = scene.root / "shadow"
    secret.write_text("root:$6$secret:19000:0:99999:7:::\n")
    scene.inputs.append(secret)
    (scene.model("base") / "tokenizer.json").symlink_to(secret)
    cfg = scene.ta()
    line = scene.refuses("merge", cfg, "-o", scene.out, mentions=("base_model", "tokenizer.json", "outside"))
    assert "secret" not in line.split(str(secret))[-1]
    # the dry run says the same, before any weights are read
    scene.refuses("merge", cfg, "-o", scene.out, "--dry-run", mentions=("tokenizer.json", "outside"))


def test_template_folder_that_is_a_symlink_out(scene):
    elsewhere = scene.root / "templates"
    elsewhere.mkdir()
    (elsewhere / "tool_use.jinja").write_text("{{ messages }}")
    scene.inputs.append(elsewhere)
    (scene.model("base") / "additional_chat_templates").symlink_to(elsewhere, target_is_directory=True)
    scene.refuses("merge", scene.ta(), "-o", scene.out,
                  mentions=("additional_chat_templates/tool_use.jinja", "outside"))


def test_symlinks_that_stay_inside_the_folder_are_followed(scene):
    """Control: a side file linking to another file of the same folder is copied (as a file)."""
    base = scene.model("base")
    (base / "real").mkdir()
    (base / "real" / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer.json").symlink_to("real/tokenizer.json")
    res = scene.run("merge", scene.ta(), "-o", scene.out, "-q")
    assert res.code == 0, res
    copied = scene.out / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"version": "1.0"}'


# --- PyTorch .bin ------------------------------------------------------------------------------------


def test_legacy_pytorch_bin_is_read(scene):
    """A benign pre-zip pytorch_model.bin (torch < 1.6) cannot be memory-mapped; it is read with
    weights_only instead of being refused, and merges like the safetensors it came from."""
    expected = scene.run("merge", scene.ta(), "-o", scene.root / "from-safetensors", "-q")
    assert expected.code == 0, expected
    folder = scene.model("code")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    (folder / "model.safetensors").unlink()
    res = scene.run("merge", scene.ta(), "-o", scene.out, "-q")
    assert res.code == 0, res
    got = load_file(str(scene.out / "model.safetensors"))
    want = load_file(str(scene.root / "from-safetensors" / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_one_line(scene, legacy):
    folder = scene.model("code")
    (folder / "model.safetensors").unlink()
    torch.save({W: _Exploit()}, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    line = scene.refuses("merge", scene.ta(), "-o", scene.out,
                         mentions=(str(folder / "pytorch_model.bin"), "never unpickles", "safetensors"))
    assert "weights_only" not in line  # torch's advice to turn the protection off is not passed on
    assert not (scene.cwd / "PWNED").exists()


def test_state_dict_holding_something_else(scene):
    folder = scene.model("code")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "step": 5}, folder / "pytorch_model.bin")
    scene.refuses("merge", scene.ta(), "-o", scene.out,
                  mentions=("'step' of type int", "tensors only", "save_pretrained"))
