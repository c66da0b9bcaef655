"""Output tokenizers: `tokenizer_source: base | union | <model>`, the `tokenizer:` block with
`tokens` and `pad_to_multiple_of`, and `chat_template`; the output loads with AutoTokenizer and
AutoModelForCausalLM, its vocabulary size matches, and every embedding and lm_head row is the
one mergekit builds (a model's own row, else the token's entry, the only model that has it,
zeros, the base model's row, or the mean of the models that have it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fusion

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from recipe_models import StandIn, standin_folder, write_config  # noqa: E402


@pytest.fixture(scope="module")
def vocab_models(standins) -> dict[str, Path]:
    """A base and three fine-tunes whose vocabularies differ by added tokens:
    A (base) +<|extra|>; C +<|im_start|> <|im_end|>; D +<|im_start|> <|tool|> <|extra|>."""
    family = ("llama3", 4)
    return {"A": standin_folder(standins, StandIn(*family, 0, ("<|extra|>",))),
            "B": standin_folder(standins, StandIn(*family, 1)),
            "C": standin_folder(standins, StandIn(*family, 2, ("<|im_start|>", "<|im_end|>"))),
            "D": standin_folder(standins, StandIn(*family, 3, ("<|im_start|>", "<|tool|>", "<|extra|>")))}


def rows(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    weights = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    return weights, transformers.AutoTokenizer.from_pretrained(folder).get_vocab()


def merge(tmp_path: Path, models: dict[str, Path], body: str, **kw) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    fusion.merge(write_config(tmp_path, body, **models), tmp_path / "out", card=False, **kw)
    return tmp_path / "out"


UNION = """\
    merge_method: linear
    base_model: {A}
    models: [{{model: {A}}}, {{model: {C}}}, {{model: {D}}}]
    tokenizer_source: union
    out_dtype: float32
    """


def test_union_loads_and_builds_every_row_as_mergekit_does(vocab_models, tmp_path):
    out = merge(tmp_path, vocab_models, UNION, kernel="torch")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    merged, _ = rows(out)
    (a, va), (c, vc), (d, vd) = (rows(vocab_models[k]) for k in "ACD")
    assert model.config.vocab_size == len(vocab) == merged["model.embed_tokens.weight"].shape[0]
    # the base's vocabulary keeps its ids; the others' new tokens follow, in the models' order
    assert all(vocab[t] == i for t, i in va.items())
    assert sorted(set(vocab) - set(va), key=vocab.get) == ["<|im_start|>", "<|im_end|>", "<|tool|>"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e, ra, rc, rd = merged[name], a[name], c[name], d[name]

        def row(token):
            return e[vocab[token]]

        # every model has it: the average of the three rows
        assert torch.allclose(row("water"), (ra[va["water"]] + rc[vc["water"]] + rd[vd["water"]]) / 3, atol=1e-6)
        # only C has it: C's row, for every model
        assert torch.allclose(row("<|im_end|>"), rc[vc["<|im_end|>"]], atol=1e-6)
        assert torch.allclose(row("<|tool|>"), rd[vd["<|tool|>"]], atol=1e-6)
        # C and D have it, the base does not: their mean
        assert torch.allclose(row("<|im_start|>"), (rc[vc["<|im_start|>"]] + rd[vd["<|im_start|>"]]) / 2, atol=1e-6)
        # the base and D have it, C does not: C is given the base's row
        assert torch.allclose(row("<|extra|>"), (2 * ra[va["<|extra|>"]] + rd[vd["<|extra|>"]]) / 3, atol=1e-6)
    ids = tokenizer("<|im_start|> the water <|tool|>", return_tensors="pt").input_ids
    assert vocab["<|tool|>"] in ids[0].tolist() and torch.isfinite(model(ids).logits).all()


def test_padding_rows_are_each_models_mean_row(vocab_models, tmp_path):
    out = merge(tmp_path, vocab_models, """\
        merge_method: linear
        models: [{{model: {B}}}, {{model: {C}}}]
        tokenizer: {{source: union, pad_to_multiple_of: 32}}
        out_dtype: float32
        """, kernel="torch")
    merged, vocab = rows(out)
    embed = merged["model.embed_tokens.weight"]
    n = len(vocab)
    assert embed.shape[0] == -(-n // 32) * 32 > n
    assert json.loads((out / "config.json").read_text())["vocab_size"] == embed.shape[0]
    (b, vb), (c, vc) = rows(vocab_models["B"]), rows(vocab_models["C"])

    def permuted(weights, own):  # the model's rows in the output order, C's rows for its own tokens
        rows_ = [weights["model.embed_tokens.weight"][own[t]] if t in own
                 else c["model.embed_tokens.weight"][vc[t]] for t in sorted(vocab, key=vocab.get)]
        return torch.stack(rows_)

    mean = (permuted(b, vb).mean(0) + permuted(c, vc).mean(0)) / 2
    assert torch.allclose(embed[n], mean, atol=1e-6) and torch.equal(embed[n], embed[-1])
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_base_and_model_sources(vocab_models, tmp_path):
    out = merge(tmp_path / "base", vocab_models, """\
        merge_method: linear
        base_model: {B}
        models: [{{model: {B}}}, {{model: {C}}}]
        tokenizer_source: base
        """)
    assert rows(out)[1] == rows(vocab_models["B"])[1]
    out = merge(tmp_path / "model", vocab_models, """\
        merge_method: linear
        models: [{{model: {B}}}, {{model: {C}}}]
        tokenizer: {{source: {D}}}
        """)
    merged, vocab = rows(out)
    assert vocab == rows(vocab_models["D"])[1]
    assert merged["model.embed_tokens.weight"].shape[0] == len(vocab)
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_token_entries(vocab_models, tmp_path):
    """A model's row for a token, forced for every model; another token's row; zeros."""
    out = merge(tmp_path, vocab_models, """\
        merge_method: linear
        models: [{{model: {C}}}, {{model: {D}}}]
        tokenizer:
          source: union
          tokens:
            <|im_start|>: {{source: {C}, force: true}}
            <|renamed|>: {{source: {{kind: model_token, model: {D}, token: <|tool|>}}}}
            <|blank|>: {{source: {{kind: zero}}}}
        out_dtype: float32
        """, kernel="torch")
    merged, vocab = rows(out)
    (c, vc), (d, vd) = rows(vocab_models["C"]), rows(vocab_models["D"])
    e = merged["model.embed_tokens.weight"]
    assert torch.allclose(e[vocab["<|im_start|>"]], c["model.embed_tokens.weight"][vc["<|im_start|>"]], atol=1e-6)
    assert torch.allclose(e[vocab["<|renamed|>"]], d["model.embed_tokens.weight"][vd["<|tool|>"]], atol=1e-6)
    assert not e[vocab["<|blank|>"]].any()


def test_a_token_entry_naming_a_model_that_lacks_the_token_is_one_clear_error(vocab_models, tmp_path):
    with pytest.raises(fusion.MergeError, match=r"tokenizer.tokens.<\|tool\|>.source: .* has no token '<\|tool\|>'"):
        merge(tmp_path, vocab_models, """\
            merge_method: linear
            models: [{{model: {B}}}, {{model: {C}}}]
            tokenizer: {{tokens: {{<|tool|>: {{source: {C}}}}}}}
            """)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, expect", [
    ("chatml", "bundled:chatml"),
    ("'{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}'", "{% for m in messages %}{{ m.content }}{% endfor %}"),
    ("auto", "model:B"),
])
def test_chat_template(vocab_models, tmp_path, value, expect):
    out = merge(tmp_path, vocab_models, """\
        merge_method: linear
        models: [{{model: {B}}}, {{model: {C}}}]
        chat_template: """ + value + "\n")
    template = transformers.AutoTokenizer.from_pretrained(out).chat_template
    if expect.startswith("bundled:"):
        from fusion.config_tokenizer import bundled_templates

        assert template == bundled_templates()[expect.removeprefix("bundled:")]
        rendered = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
            [{"role": "user", "content": "the water"}], tokenize=False, add_generation_prompt=True)
        assert rendered == "<|im_start|>user\nthe water<|im_end|>\n<|im_start|>assistant\n"
    elif expect.startswith("model:"):
        assert template == transformers.AutoTokenizer.from_pretrained(vocab_models["B"]).chat_template
    else:
        assert template == expect
    assert rows(out)[1] == rows(vocab_models["B"])[1]  # the layout model's vocabulary, as it is


def test_without_tokenizer_keys_common_rows_merge_and_the_layout_keeps_its_own(vocab_models, tmp_path):
    out = merge(tmp_path, vocab_models, """\
        merge_method: linear
        models: [{{model: {C}}}, {{model: {B}}}]
        out_dtype: float32
        """)
    merged, vocab = rows(out)
    (b, _), (c, vc) = rows(vocab_models["B"]), rows(vocab_models["C"])
    assert vocab == vc
    e = merged["model.embed_tokens.weight"]
    n = b["model.embed_tokens.weight"].shape[0]
    assert torch.equal(e[n:], c["model.embed_tokens.weight"][n:])  # C's extra rows, carried
    assert torch.allclose(e[:n], (b["model.embed_tokens.weight"] + c["model.embed_tokens.weight"][:n]) / 2, atol=1e-6)


def test_added_tokens_past_the_models_vocab_size_are_left_out(vocab_models, tmp_path):
    """A tokenizer may know tokens its embedding has no row for: they are not part of its
    vocabulary, so the output's tokenizer does not have them either."""
    import shutil

    from safetensors.torch import save_file

    short = tmp_path / "short"
    shutil.copytree(vocab_models["D"], short)
    config = json.loads((short / "config.json").read_text())
    config["vocab_size"] -= 1  # the last added token, <|extra|>, has no row
    (short / "config.json").write_text(json.dumps(config))
    weights = load_file(short / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][:-1].clone()
    save_file(weights, short / "model.safetensors", metadata={"format": "pt"})
    out = merge(tmp_path, {"S": short, "B": vocab_models["B"]}, """\
        merge_method: linear
        base_model: {S}
        models: [{{model: {S}}}, {{model: {B}}}]
        tokenizer_source: base
        """)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert "<|extra|>" not in tokenizer.get_vocab() and "<|tool|>" in tokenizer.get_vocab()
    assert len(tokenizer) == config["vocab_size"] == transformers.AutoConfig.from_pretrained(out).vocab_size


def test_a_chat_template_for_a_layout_without_tokenizer_is_said(tmp_path):
    from fusion.demo import make_family

    make_family(tmp_path)  # tiny Qwen2 models without tokenizer files
    (tmp_path / "merge.yaml").write_text("merge_method: linear\nmodels: [./chat, ./code]\nchat_template: chatml\n")
    with fusion.plan(tmp_path / "merge.yaml") as plan:
        assert any(n.startswith("chat_template: models[0] (./chat) has no tokenizer") for n in plan.notices)
