"""Real sizes without weights: the config.json values of Llama-3.1-8B, Qwen2.5-7B,
Qwen2.5-VL-7B-Instruct and llava-1.5-7b, instantiated on the meta device, written as checkpoints
whose headers are real and whose data is a sparse hole, then recognised, fully covered and planned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusion.api.architecture import part_of  # noqa: E402
from fusion.api.dtypes import from_name  # noqa: E402
from fusion.checkpoint import open_checkpoint, read_safetensors_header  # noqa: E402
import fusion  # noqa: E402
import yaml  # noqa: E402
from fusion.models import detect  # noqa: E402
from vlm_models import LAYOUTS, hub_name, rewrite_layout, text_config, vlm_class, vlm_config  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "real_configs"
FAMILY = {"Qwen2.5-VL-7B-Instruct": "qwen2_5_vl", "llava-1.5-7b-hf": "llava"}
SPEC = {"Llama-3.1-8B": "llama", "Qwen2.5-7B": "qwen2", "Qwen2.5-VL-7B-Instruct": "qwen2_vl",
        "llava-1.5-7b-hf": "llava"}


def meta_model(config: dict):
    with torch.device("meta"):
        return getattr(transformers, config["architectures"][0])(transformers.AutoConfig.for_model(**config))


def write_sparse(folder: Path, config: dict, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Path:
    """A safetensors checkpoint with a real header and zero-filled (sparse) data: planning reads
    only headers, so real sizes cost no disk."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": from_name(dtype).code, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def checkpoint_of(root: Path, name: str, layout: str | None = None, config: dict | None = None) -> Path:
    config = config or json.loads((CONFIGS / f"{name}.json").read_text())
    model = meta_model(config)
    dtype = getattr(torch, config.get("torch_dtype", "bfloat16"))
    family = FAMILY.get(name)
    tensors = {(hub_name(n, family, layout) if family else n): (tuple(p.shape), dtype)
               for n, p in model.state_dict().items()}
    if config.get("tie_word_embeddings"):  # a tied head is not saved
        tensors.pop("lm_head.weight", None)
    return write_sparse(root / f"{name}-{layout or 'hub'}", config, tensors)


def test_hub_names_are_what_save_pretrained_writes(tmp_path):
    """The renaming used below matches transformers' own save_pretrained, layout by layout."""
    for family, layouts in LAYOUTS.items():
        model = vlm_class(family)(vlm_config(family, text_config(family)))
        for layout in layouts:
            folder = tmp_path / f"{family}-{layout}"
            model.save_pretrained(folder)
            rewrite_layout(folder, family, layout)
            saved = set(read_safetensors_header(folder / "model.safetensors"))
            assert {hub_name(n, family, layout) for n in model.state_dict()} == saved, (family, layout)


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Qwen2.5-7B", "Qwen2.5-VL-7B-Instruct", "llava-1.5-7b-hf"])
def test_real_configs_are_recognised_and_fully_covered(tmp_path, name):
    family = FAMILY.get(name)
    for layout in LAYOUTS[family] if family else [None]:
        folder = checkpoint_of(tmp_path, name, layout)
        ckpt = open_checkpoint(folder, name)
        spec = detect(ckpt.config)
        assert spec is not None and spec.name == SPEC[name]
        roles = {n: spec.classify(n) for n in ckpt.tensors}
        assert all(roles.values()), [n for n, r in roles.items() if r is None][:5]
        # llava-1.5's text_config leaves num_hidden_layers to Llama's default: the plan counts layers then
        assert spec.num_layers(ckpt.config) in (None, 1 + max(r.layer for r in roles.values() if r.layer is not None))
        parts = {part_of(r.role) for r in roles.values()}
        assert parts == ({"language_model", "vision_tower", "projector"} if family else {"language_model"})
        if family is None:
            continue
        # the language model lines up, name for name and shape for shape, with the text CausalLM of
        # its family built from its own settings (nested text_config or, for Qwen2.5-VL, top level)
        settings = {k: v for k, v in spec.text_config_of(ckpt.config).items() if k != "vision_config"}
        kind = "qwen2" if family == "qwen2_5_vl" else "llama"
        text = meta_model(settings | {"architectures": [f"{kind.capitalize()}ForCausalLM"], "model_type": kind})
        lm = {r.canonical: ckpt.tensors[n].shape for n, r in roles.items() if part_of(r.role) == "language_model"}
        expected = {n.removeprefix("model."): tuple(p.shape) for n, p in text.state_dict().items()}
        assert lm == expected, (layout, set(lm) ^ set(expected))


def test_llava_language_model_has_the_names_of_llama(tmp_path):
    llama = open_checkpoint(checkpoint_of(tmp_path, "Llama-3.1-8B"), "llama")
    llava = open_checkpoint(checkpoint_of(tmp_path, "llava-1.5-7b-hf", "original"), "llava")
    canon = [{detect(c.config).classify(n).canonical for n in c.tensors
              if part_of(detect(c.config).classify(n).role) == "language_model"} for c in (llama, llava)]
    assert canon[0] == canon[1] and len(canon[0]) == 291


def test_viscodex_plan_at_real_size(tmp_path):
    """Qwen2.5-7B base, Qwen2.5-VL-7B-Instruct and a Qwen2.5-Coder-7B-shaped model: every language
    tensor merged, the vision tower and projector carried, nothing left out."""
    base = checkpoint_of(tmp_path, "Qwen2.5-7B")
    vlm = checkpoint_of(tmp_path, "Qwen2.5-VL-7B-Instruct", "original")
    code = checkpoint_of(tmp_path / "coder", "Qwen2.5-7B")
    recipe = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
              f"  - model: {vlm}\n    parameters: {{weight: 0.7}}\n  - model: {code}\n    parameters: {{weight: 0.3}}\n"
              f"layout_from: {vlm}\n")
    with fusion.plan(yaml.safe_load(recipe), base_dir=tmp_path) as plan:
        names = list(read_safetensors_header(vlm / "model.safetensors"))
        assert [t.name for t in plan.tensors] == names
        merged = [t for t in plan.tensors if t.action == "merge"]
        assert len(merged) == 339 and all(part_of(t.role) == "language_model" for t in merged)
        assert {t.role for t in plan.tensors if t.action == "carry"} == {"vision_tower", "projector"}
        assert all({k: t.params[k] for k in ("weight", "lambda", "normalize")} ==
                   {"weight": [0.7, 0.3], "lambda": 1.0, "normalize": False} for t in merged)
        text = plan.render()
        headings = [line.split(",")[0] for line in text.splitlines() if line.startswith("== ")]
        assert headings == ["== language model: 339 tensors", "== vision tower: 385 tensors", "== projector: 5 tensors"]
        assert "== vision tower: 385 tensors, 0 merged; 385 carried" in text
        assert "== projector: 5 tensors, 0 merged; 5 carried" in text
        assert f"{sum(t.nbytes for t in plan.tensors) / 1e6:,.1f} MB" in text


def test_llava_plan_at_real_size_carries_the_image_token_rows(tmp_path):
    """llava-1.5-7b on a vicuna-7b-v1.5-shaped Llama (32000 tokens): 64 rows only LLaVA has."""
    llava_config = json.loads((CONFIGS / "llava-1.5-7b-hf.json").read_text())
    vicuna = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
              "rms_norm_eps": 1e-05, "max_position_embeddings": 4096, "torch_dtype": "float16"}
    base = checkpoint_of(tmp_path, "vicuna-7b-v1.5", config=vicuna)
    llava = checkpoint_of(tmp_path, "llava-1.5-7b-hf", "transformers4.52", config=llava_config)
    recipe = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {llava}\nlayout_from: {llava}\n"
    with fusion.plan(yaml.safe_load(recipe), base_dir=tmp_path) as plan:
        vocab = {t.name: t for t in plan.tensors if t.role in ("embedding", "lm_head")}
        assert set(vocab) == {"model.language_model.embed_tokens.weight", "lm_head.weight"}
        assert all(t.rows == 32000 and t.shape == (32064, 4096) for t in vocab.values())
        assert sum(t.action == "merge" for t in plan.tensors) == 291
        assert {t.role for t in plan.tensors if t.action == "carry"} == {"vision_tower", "projector"}
        assert any("rows 32000..32063 (64) carried" in n for n in plan.notices)
