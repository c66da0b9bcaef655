"""Published mergekit recipes run as published (tests/recipes/, each file's header names its
source), against tiny stand-ins of the same family and depth: each merges, loads in
transformers with no missing or unexpected keys and a vocabulary that fits its embedding, and
`fusion plan` succeeds; the few that fusion refuses (typos and misplaced keys that mergekit
ignores silently) are refused with every problem at once and nothing written."""

from __future__ import annotations

import pytest

import fusion
from fusion.pipeline import write

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from recipe_models import corpus, localized  # noqa: E402

RECIPES = corpus()


def test_the_corpus_covers_every_method_and_key():
    assert len(RECIPES) >= 30
    methods = {r.data.get("merge_method") for r in RECIPES}
    assert methods >= {"linear", "task_arithmetic", "ties", "sce", "slerp", "nuslerp", "multislerp", "karcher",
                       "model_stock", "nearswap", "arcee_fusion", "passthrough", "dare_linear", "dare_ties",
                       "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
    texts = "\n".join(r.body for r in RECIPES)
    for key in ("slices:", "layer_range", "modules:", "tokenizer_source: union", "tokenizer_source: base",
                "tokens:", "force: true", "kind: \"model_token\"", "kind: \"zero\"", "chat_template: auto",
                "chat_template: chatml", "int8_mask", "name:", "normalize: 1.0", "out_dtype"):
        assert key in texts, key
    assert all(r.header.get("source", "").startswith("https://") for r in RECIPES)
    assert sum(not r.expected_problems for r in RECIPES) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_runs_as_published(recipe, standins, tmp_path):
    config = tmp_path / f"{recipe.name}.yaml"
    config.write_text(localized(recipe, standins), encoding="utf-8")
    out = tmp_path / "merged"
    if recipe.expected_problems:
        with pytest.raises(fusion.FusionError) as refused:
            fusion.merge(config, out)
        lines = str(refused.value).splitlines()
        assert len(lines) == len(recipe.expected_problems), lines
        for path in recipe.expected_problems:
            assert any(line.startswith(path) or path in line for line in lines), (path, lines)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [config.name]
        return
    with fusion.plan(config) as plan:  # `fusion plan`, then the merge of that plan
        text = plan.render()
        stacked = not plan.layers.identity
        summary = write(plan, out, card=False)
    assert ("output layers:" in text) == stacked
    assert summary.merged > 0
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    rows = model.get_input_embeddings().weight.shape[0]
    assert model.config.vocab_size == rows
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= rows and max(tokenizer.get_vocab().values()) < rows
    if stacked:
        assert model.config.num_hidden_layers == plan.layers.num_layers
    with torch.no_grad():
        ids = tokenizer("the water", return_tensors="pt").input_ids
        assert torch.isfinite(model(ids).logits).all()
