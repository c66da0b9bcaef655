"""Property tests across backbones: LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL of random widths,
depths, heads and vocabularies, in a random Hub key layout, merged with text models of their family
(tied or not) and checked tensor by tensor."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

import fusion  # noqa: E402
from test_merge_properties import assert_within_rounding  # noqa: E402
from vlm_models import LAYOUTS, file_tensors, hub_name, language_pairs, text_config, vlm_class, vlm_config  # noqa: E402


def random_checkpoint(folder: Path, model, names, gen: torch.Generator, like: dict | None = None) -> dict:
    """Random weights for ``model``'s parameters saved under ``names`` (internal → file name);
    with ``like`` (file name → tensor), a fine-tune: those values plus noise on the common rows."""
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json_string())
    out = {}
    for internal, p in model.state_dict().items():
        t = torch.randn(p.shape, generator=gen) * 0.05
        source = like.get(internal) if like else None
        if source is not None:
            rows = min(t.shape[0], source.shape[0]) if t.dim() else None
            t[:rows] = source[:rows].float() + torch.randn(t[:rows].shape, generator=gen) * 0.01
        out[names(internal)] = t.to(torch.bfloat16)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return out


@given(
    family=st.sampled_from(list(LAYOUTS)),
    layout_pick=st.integers(0, 2),
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    kv_div=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 8]),
    intermediate=st.integers(2, 12),
    vocab=st.integers(8, 40),
    extra_rows=st.integers(0, 5),
    tied=st.tuples(st.booleans(), st.booleans()),
    weights=st.tuples(*[st.floats(-0.5, 1.5).map(lambda x: round(x, 2))] * 2),
    lam=st.floats(0, 1.5).map(lambda x: round(x, 2)),
    seed=st.integers(0, 2**16),
)
def test_vlm_backbone_merge_equals_formula(family, layout_pick, layers, heads, kv_div, head_dim, intermediate,
                                           vocab, extra_rows, tied, weights, lam, seed):
    layout = LAYOUTS[family][layout_pick % len(LAYOUTS[family])]
    kv = heads // kv_div if heads % kv_div == 0 else heads
    sizes = dict(hidden=heads * head_dim, layers=layers, heads=heads, kv_heads=kv, intermediate=intermediate)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        text = transformers.AutoModelForCausalLM.from_config(text_config(family, vocab=vocab, tied=tied[0], **sizes))
        code = transformers.AutoModelForCausalLM.from_config(text_config(family, vocab=vocab, tied=tied[1], **sizes))
        vlm = vlm_class(family)(vlm_config(family, text_config(family, vocab=vocab + extra_rows, **sizes)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = random_checkpoint(root / "base", text, lambda n: n, gen)
        base_full = dict(base, **({"lm_head.weight": base["model.embed_tokens.weight"]} if tied[0] else {}))
        code_state = random_checkpoint(root / "code", code, lambda n: n, gen, like=base_full)
        as_text = {v: base_full[t] for v, t in language_pairs(vlm)}  # the VLM's language model: a fine-tune
        vlm_files = random_checkpoint(root / "vlm", vlm, lambda n: hub_name(n, family, layout), gen, like=as_text)
        recipe = (f"merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                  f"  - model: ./vlm\n    parameters: {{weight: {weights[0]}}}\n"
                  f"  - model: ./code\n    parameters: {{weight: {weights[1]}}}\n"
                  f"parameters: {{lambda: {lam}}}\nlayout_from: ./vlm\n")
        (root / "m.yaml").write_text(recipe)
        fusion.merge(root / "m.yaml", root / "out", force=True)
        out = file_tensors(root / "out")

        assert list(out) == list(vlm_files) or set(out) == set(vlm_files)
        language = {hub_name(v, family, layout): t for v, t in language_pairs(vlm)}
        code_full = dict(code_state, **({"lm_head.weight": code_state["model.embed_tokens.weight"]} if tied[1] else {}))
        for name, value in vlm_files.items():
            if name not in language:  # vision tower and projector: bit for bit
                assert torch.equal(out[name], value), name
                continue
            b, c = base_full[language[name]], code_full[language[name]]
            rows = b.shape[0] if b.dim() else None
            ref = b.double() + lam * (weights[0] * (value[:rows].double() - b.double())
                                      + weights[1] * (c.double() - b.double()))
            assert_within_rounding(out[name][:rows], ref, [b, c, value], name)
            if rows is not None and rows < value.shape[0]:
                assert torch.equal(out[name][rows:], value[rows:]), name
