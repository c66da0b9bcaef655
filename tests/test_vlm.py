"""Vision-language models: tiny LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL built with transformers,
saved in every Hub key layout, merged with text models of their family (the VisCodex recipe), loaded
back into transformers and run on an image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusion  # noqa: E402
from fusion.config import parse_config  # noqa: E402
from fusion.api.errors import ConfigError, MergeError  # noqa: E402
from vlm_models import (LAYOUTS, build_text, build_vlm, file_tensors, image_inputs, language_pairs,  # noqa: E402
                        text_config, vlm_class, vlm_config)

CASES = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts]
TEXT_VOCAB, VLM_VOCAB = 64, 72
W_VLM, W_CODE = 0.7, 0.3
PROCESSOR_FILES = {"preprocessor_config.json": '{"image_processor_type": "tiny"}\n',
                   "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n"}


def viscodex_yaml(vlm: str = "vlm", **extra) -> str:
    text = (f"merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
            f"  - model: ./{vlm}\n    parameters: {{weight: {W_VLM}}}\n"
            f"  - model: ./code\n    parameters: {{weight: {W_CODE}}}\n"
            f"layout_from: ./{vlm}\n")
    return text + "".join(f"{k}: {json.dumps(v)}\n" for k, v in extra.items())


def merge(root: Path, yaml_text: str, out: str = "out"):
    (root / "merge.yaml").write_text(yaml_text)
    with fusion.plan(root / "merge.yaml", weights=True) as plan:
        summary = fusion.pipeline.write(plan, root / out, shard_size=10_000)
    return plan, summary


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Per family: a text base and a code fine-tune of it; one of the two has tied embeddings."""
    made = {}
    for family in LAYOUTS:
        if family in made or family.replace("_next", "").replace("2_5", "2") in made:
            continue
        root = tmp_path_factory.mktemp(family)
        tie_base = family.startswith("qwen")
        base = build_text(root / "base", text_config(family, vocab=TEXT_VOCAB, tied=tie_base), 0)
        code = build_text(root / "code", text_config(family, vocab=TEXT_VOCAB, tied=not tie_base), 1, like=base)
        made[family] = (root, base, code)
    return made


def _text_pair(text_models, family):
    key = "llava" if family.startswith("llava") else "qwen2_vl"
    return text_models[key]


def _text_weight(state: dict, name: str) -> torch.Tensor:
    if name == "lm_head.weight" and name not in state:
        return state["model.embed_tokens.weight"]
    return state[name]


@pytest.mark.parametrize("family,layout", CASES)
def test_viscodex_merge_in_every_layout(tmp_path, text_models, family, layout):
    source_root, base, code = _text_pair(text_models, family)
    for name in ("base", "code"):
        (tmp_path / name).symlink_to(source_root / name)
    vlm = build_vlm(tmp_path / "vlm", family, vlm_config(family, text_config(family, vocab=VLM_VOCAB)), 2,
                    like=base, layout=layout)
    for name, text in PROCESSOR_FILES.items():
        (tmp_path / "vlm" / name).write_text(text)
    vlm_files = file_tensors(tmp_path / "vlm")

    plan, summary = merge(tmp_path, viscodex_yaml())
    out = tmp_path / "out"
    merged_files = file_tensors(out)

    # exactly the layout model's tensors, in its layout; vision tower and projector bit for bit
    assert list(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == list(vlm_files)
    assert set(merged_files) == set(vlm_files)
    parts = {t.name: t for t in plan.tensors}
    carried = [n for n, t in parts.items() if t.role in ("vision_tower", "projector")]
    assert carried and all(parts[n].action == "carry" for n in carried)
    for name in carried:
        assert merged_files[name].dtype == vlm_files[name].dtype and torch.equal(merged_files[name], vlm_files[name])
    assert sum(t.action == "merge" for t in plan.tensors) == len(vlm_files) - len(carried)
    assert summary.merged == len(vlm_files) - len(carried) and summary.carried == len(carried)
    assert any("rows 64..71 (8) carried from the layout model" in n for n in summary.notices), summary.notices
    for name, text in PROCESSOR_FILES.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text())["architectures"] == [vlm_class(family).__name__]

    # loads into transformers (through its key conversion for older layouts) with the formula's values
    model, info = vlm_class(family).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = model.state_dict()
    pairs = language_pairs(model)
    assert len(pairs) == len(plan.tensors) - len(carried)
    for vname, tname in pairs:
        b, c, v = _text_weight(base, tname).float(), _text_weight(code, tname).float(), vlm[vname].float()
        rows = min(b.shape[0], v.shape[0]) if b.dim() else None
        got = loaded[vname].float()
        expected = b + W_VLM * (v[:rows] - b) + W_CODE * (c - b)
        torch.testing.assert_close(got[:rows], expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6,
                                   msg=vname)
        if rows is not None and rows < v.shape[0]:  # rows only the vision-language model has
            assert torch.equal(loaded[vname][rows:], vlm[vname][rows:]), vname
    for name, value in vlm.items():
        if not any(name == v for v, _ in pairs):
            assert torch.equal(loaded[name], value), name

    with torch.no_grad():
        logits = model(**image_inputs(model, family)).logits
    assert logits.shape[-1] == VLM_VOCAB and torch.isfinite(logits).all()


def _two_vlms(root: Path, text_models, family: str, layouts: tuple[str, str]):
    source_root, base, _ = _text_pair(text_models, family)
    (root / "base").symlink_to(source_root / "base")
    config = vlm_config(family, text_config(family, vocab=VLM_VOCAB))
    a = build_vlm(root / "a", family, config, 3, like=base, layout=layouts[0])
    b = build_vlm(root / "b", family, config, 4, like=base, layout=layouts[1])
    return a, b


@pytest.mark.parametrize("family,layouts", [("llava_next", ("original", "transformers4.52")),
                                            ("qwen2_5_vl", ("transformers4.52", "original"))])
def test_vlm_with_vlm_merges_vision_only_when_asked(tmp_path, text_models, family, layouts):
    _two_vlms(tmp_path, text_models, family, layouts)
    a_files, b_files = file_tensors(tmp_path / "a"), file_tensors(tmp_path / "b")
    recipe = "merge_method: linear\nmodels:\n  - model: ./a\n  - model: ./b\nlayout_from: ./b\n"

    plan, _ = merge(tmp_path, recipe, "default")
    out = file_tensors(tmp_path / "default")
    assert set(out) == set(b_files)  # b's layout, although a is in the other one
    vision = [t.name for t in plan.tensors if t.role in ("vision_tower", "projector")]
    assert vision and all(torch.equal(out[n], b_files[n]) for n in vision)

    plan, _ = merge(tmp_path, recipe + "merge_parts: [language_model, vision_tower, projector]\n", "all")
    out = file_tensors(tmp_path / "all")
    assert all(t.action == "merge" for t in plan.tensors)
    by_canonical = {t.canonical: t.name for t in plan.tensors}
    a_names = {t.canonical: n for n, t in plan.models[0].roles.items()}
    for t in plan.tensors:
        expected = (a_files[a_names[t.canonical]].float() + b_files[t.name].float()) / 2
        torch.testing.assert_close(out[t.name].float(), expected.to(torch.bfloat16).float(), rtol=2 ** -7,
                                   atol=1e-6, msg=t.name)
    assert len(by_canonical) == len(b_files)

    plan, _ = merge(tmp_path, recipe + "merge_parts: [vision_tower]\n", "vision")
    out = file_tensors(tmp_path / "vision")
    for t in plan.tensors:
        assert (t.action == "merge") == (t.role == "vision_tower"), t.name
        if t.action == "carry":
            assert torch.equal(out[t.name], b_files[t.name]), t.name
    model = vlm_class(family).from_pretrained(tmp_path / "vision")
    with torch.no_grad():
        assert torch.isfinite(model(**image_inputs(model, family)).logits).all()


def test_vision_tower_of_a_text_model_is_an_error(tmp_path, text_models):
    source_root, base, _ = _text_pair(text_models, "qwen2_vl")
    for name in ("base", "code"):
        (tmp_path / name).symlink_to(source_root / name)
    build_vlm(tmp_path / "vlm", "qwen2_vl", vlm_config("qwen2_vl", text_config("qwen2_vl")), 2, like=base)
    config = parse_config(viscodex_yaml(merge_parts=["language_model", "projector"]), source=tmp_path / "m.yaml")
    with pytest.raises(MergeError, match=r"visual\.merger\..* is missing in base_model .*remove projector from "
                                         r"merge_parts"):
        fusion.plan(config).close()
    with pytest.raises(ConfigError, match=r"merge_parts\[1\].*unknown part 'vision'"):
        parse_config(viscodex_yaml(merge_parts=["language_model", "vision"]))


def test_text_layout_from_a_vlm(tmp_path, text_models):
    """The other direction: a VLM's language model merged into a text model's layout."""
    source_root, base, code = _text_pair(text_models, "llava")
    for name in ("base", "code"):
        (tmp_path / name).symlink_to(source_root / name)
    vlm = build_vlm(tmp_path / "vlm", "llava", vlm_config("llava", text_config("llava", vocab=VLM_VOCAB)), 2,
                    like=base, layout="original")
    recipe = viscodex_yaml().replace("layout_from: ./vlm", "layout_from: ./code")
    plan, summary = merge(tmp_path, recipe)
    assert set(file_tensors(tmp_path / "out")) == set(code) - {"lm_head.weight"}  # code is tied
    note = next(n for n in summary.notices if n.startswith("models[0] (./vlm) has"))
    assert "vision tower:" in note and "projector: 4" in note
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    embed = model.state_dict()["model.embed_tokens.weight"].float()
    b, c, v = base["model.embed_tokens.weight"].float(), code["model.embed_tokens.weight"].float(), \
        vlm["model.language_model.embed_tokens.weight"].float()
    expected = b + W_VLM * (v[:TEXT_VOCAB] - b) + W_CODE * (c - b)
    torch.testing.assert_close(embed, expected.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_unmatched_tensors_fail_unless_carried(tmp_path, text_models):
    """A Qwen2-VL language model has q/k/v biases a Llama lacks: an error, or carried when allowed."""
    source_root, base, _ = _text_pair(text_models, "llava")
    qwen_base = _text_pair(text_models, "qwen2_vl")[1]
    for name in ("base", "code"):
        (tmp_path / name).symlink_to(source_root / name)
    build_vlm(tmp_path / "vlm", "qwen2_vl", vlm_config("qwen2_vl", text_config("qwen2_vl")), 2, like=qwen_base)
    config = parse_config(viscodex_yaml(), source=tmp_path / "m.yaml")
    with pytest.raises(MergeError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias .* is missing in base_model "
                                         r".*carry_unmatched: true"):
        fusion.plan(config).close()
    plan, summary = merge(tmp_path, viscodex_yaml(carry_unmatched=True))
    biases = [t for t in plan.tensors if t.role == "layer" and t.name.endswith("proj.bias")]
    assert len(biases) == 6 and all(t.action == "carry" for t in biases)
    assert any(n.startswith("carry_unmatched: 6 tensors") for n in summary.notices)
    out, vlm_files = file_tensors(tmp_path / "out"), file_tensors(tmp_path / "vlm")
    assert all(torch.equal(out[t.name], vlm_files[t.name]) for t in biases)


def test_fusion_plan_groups_by_part(tmp_path, text_models):
    source_root, base, _ = _text_pair(text_models, "qwen2_vl")
    for name in ("base", "code"):
        (tmp_path / name).symlink_to(source_root / name)
    build_vlm(tmp_path / "vlm", "qwen2_5_vl", vlm_config("qwen2_5_vl", text_config("qwen2_vl", vocab=VLM_VOCAB)),
              2, like=base)
    (tmp_path / "merge.yaml").write_text(viscodex_yaml())
    result = subprocess.run([sys.executable, "-m", "fusion", "plan", "merge.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    headings = [line for line in text.splitlines() if line.startswith("== ")]
    assert [h.split(":")[0] for h in headings] == ["== language model", "== vision tower", "== projector"]
    assert headings[0].startswith("== language model: 27 tensors, 27 merged from base_model (./base), "
                                  "models[0] (./vlm), models[1] (./code); 0 carried")
    assert "0 merged; " in headings[1] and "carried from models[0] (./vlm)" in headings[1]
    assert "rows 64..71 (8) carried from the layout model" in text
    plan = json.loads(subprocess.run([sys.executable, "-m", "fusion", "plan", "merge.yaml", "--json"],
                                     cwd=tmp_path, capture_output=True, text=True).stdout)
    assert plan["parts"]["language_model"]["merged"] == 27 and plan["parts"]["projector"]["merged"] == 0
