"""Pairwise fusion at scale, the fast parts: how each model reads the data (its own BOS and
end-of-turn marker, offsets in the pivot's text), packed training rows, the chunked loss,
where big models are scored, and the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from fusion.fuse.data import format_chat

pytest.importorskip("transformers")

CONVERSATION = [{"role": "user", "content": "count from apple"}, {"role": "assistant", "content": " river stone"},
                {"role": "user", "content": "count from ocean"}, {"role": "assistant", "content": " ember"}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from fuse_models import make_split_tokenizer, make_word_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return make_split_tokenizer(root / "split"), make_word_tokenizer(root / "word")


def test_a_source_reads_the_conversation_as_its_own_template_writes_it(tokenizers):
    """The pivot's text, with the pivot's end-of-turn marker swapped for the source's and the
    source's BOS in front, tokenizes to exactly what the source's own chat template gives."""
    from fusion.fuse.reading import markers, read, source_reading

    pivot, source = tokenizers
    reading = source_reading(source, pivot)
    assert reading.replace == {"<|end|>": "</s>"}
    assert reading.counterparts == {source.eos_token_id: pivot.convert_tokens_to_ids("<|end|>")}
    assert (markers(source).end_of_turn, markers(source).bos_in_chat) == ("</s>", True)
    example = format_chat(pivot, CONVERSATION)
    ids, response, offsets = read(reading, example.text, example.spans, example.chat, 128)
    own = source.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids.tolist() == source(own, add_special_tokens=False)["input_ids"]
    # offsets are in the pivot's text: a copied token covers its own characters there, the
    # source's "</s>" covers the pivot's "<|end|>", its BOS nothing
    tokens = source.convert_ids_to_tokens(ids.tolist())
    assert tokens[0] == "<s>" and offsets[0].tolist() == [0, 0]
    for token, (a, b) in zip(tokens, offsets.tolist()):
        if token == "</s>":
            assert example.text[a:b] == "<|end|>"
        elif token not in ("<s>",):
            assert example.text[a:b].replace(" ", "▁").endswith(token.lstrip("▁")) or token == "▁", (token, a, b)
    # the responses, with their end-of-turn markers, are what is learned, on both readings
    learned = "".join(example.text[a:b] for (a, b), r in zip(offsets.tolist(), response) if r)
    assert learned == " river stone<|end|>\n ember<|end|>\n"


def test_the_pivot_reads_its_own_rendering_unchanged(tokenizers):
    from fusion.fuse.data import encode

    pivot, _ = tokenizers
    example = format_chat(pivot, CONVERSATION)
    ids, response, offsets = encode(pivot, example, 128, with_offsets=True)
    assert ids.tolist() == pivot(example.text, add_special_tokens=False)["input_ids"]
    assert [example.text[a:b] for a, b in offsets.tolist()[:2]] == ["<|user|>", "c"]


def test_a_bos_in_the_pivot_template_is_replaced_by_the_sources_own(tmp_path, tokenizers):
    """A pivot whose template starts with its BOS and a source without any BOS (Qwen-like)."""
    from fusion.fuse.reading import pivot_reading, read, source_reading

    import transformers

    pivot_fine, word = tokenizers
    word.save_pretrained(tmp_path / "p")
    pivot = transformers.AutoTokenizer.from_pretrained(tmp_path / "p")
    pivot.chat_template = "{{ bos_token }}" + pivot_fine.chat_template  # the pivot now: "<s>" first
    example = format_chat(pivot, CONVERSATION)
    assert example.text.startswith("<s><|user|>")
    ids, _, offsets = read(pivot_reading(pivot), example.text, example.spans, True, 128)
    assert ids[:1].tolist() == [pivot.bos_token_id] and (ids == pivot.bos_token_id).sum() == 1
    ids, _, offsets = read(source_reading(pivot_fine, pivot), example.text, example.spans, True, 128)
    assert pivot_fine.convert_ids_to_tokens(ids.tolist())[:2] == ["<|user|>", "c"]  # no BOS of its own
    assert offsets[0].tolist() == [3, 11]  # after the pivot's BOS, which it does not read


def test_end_of_turn_markers_from_the_template(tmp_path, tokenizers):
    from fusion.fuse.reading import markers

    import transformers

    pivot, word = tokenizers
    assert markers(pivot).end_of_turn == "<|end|>" and markers(pivot).end_of_turn_id == pivot.eos_token_id
    word.save_pretrained(tmp_path / "w")
    plain = transformers.AutoTokenizer.from_pretrained(tmp_path / "w")
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [done]\n{% endfor %}"
    m = markers(plain)
    assert (m.end_of_turn, m.end_of_turn_id, m.bos_in_chat, m.bos_in_text) == ("[done]", None, False, True)
    plain.chat_template = None
    assert markers(plain).end_of_turn == plain.eos_token


def _tiny_llama(vocab: int = 40, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, vocab_size=vocab, max_position_embeddings=64)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_packed_rows_give_each_sequence_what_it_gives_alone():
    import torch

    from fusion.fuse.packing import packing_supported
    from fusion.fuse.represent import body

    if not packing_supported():
        pytest.skip("this transformers does not read packed sequences from position ids")
    model = _tiny_llama()
    a, b = torch.randint(0, 40, (7,)), torch.randint(0, 40, (5,))
    row = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        # no cache: transformers reads packed sequences only from a forward without one
        packed = body(model)(input_ids=row, position_ids=pos, use_cache=False).last_hidden_state[0]
        alone = [body(model)(input_ids=x[None], use_cache=False).last_hidden_state[0] for x in (a, b)]
    assert torch.allclose(packed[:7], alone[0], atol=1e-5) and torch.allclose(packed[7:], alone[1], atol=1e-5)
    with torch.no_grad():  # without the restart, b would attend to a: the mask is not a no-op
        leaked = body(model)(input_ids=row, position_ids=torch.arange(12)[None], use_cache=False).last_hidden_state[0]
    assert not torch.allclose(leaked[7:], alone[1], atol=1e-3)


def test_packing_first_fit_keeps_every_sequence_once_within_the_row_length():
    from fusion.fuse.packing import batches, pack

    lengths = np.array([5, 9, 3, 7, 2, 8, 4])
    rows = pack(list(range(7)), lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(lengths[r].sum() <= 10 for r in rows) and len(rows) == 4  # 38 tokens: 4 rows of ≤ 10
    assert pack([0, 1], np.array([12, 3]), 10) == [[0], [1]]  # a longer sequence gets a row alone
    shares = [batches(list(range(5)), r, 2, 2) for r in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]


def test_the_chunked_loss_equals_the_full_log_softmax_and_its_gradients():
    import torch

    from fusion.fuse.loss import Distiller

    model = _tiny_llama(seed=1)
    ids = torch.randint(0, 40, (2, 9))
    pos = torch.arange(9).repeat(2, 1)
    where = torch.rand(2, 9) > 0.3
    where[:, -1] = False
    gold = torch.roll(ids, -1, 1)
    tid = torch.randint(-1, 40, (2, 9, 3))
    tprob = torch.rand(2, 9, 3)
    lm, kd = Distiller(model, chunk=4)(ids, pos, where, gold, tid, tprob)
    (lm + kd).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    n = where.sum()
    ref_lm = -(logp.gather(-1, gold[..., None])[..., 0] * where).sum() / n
    p = torch.where(tid >= 0, tprob, torch.zeros_like(tprob))
    ref_kd = -((p * logp.gather(-1, tid.clamp(min=0))).sum(-1) * where).sum() / n
    (ref_lm + ref_kd).backward()
    assert float(lm.detach()) == pytest.approx(float(ref_lm.detach()), rel=1e-5)
    assert float(kd.detach()) == pytest.approx(float(ref_kd.detach()), rel=1e-5)
    for g, param in zip(grads, model.parameters()):
        assert torch.allclose(g, param.grad, atol=1e-6)


def test_a_model_spread_by_a_device_map_scores_as_when_loaded_whole(tmp_path, tokenizers):
    """The big-source path: accelerate's device_map (here its blocks offloaded to disk, their
    weights on the meta device until each runs) gives the representations of a whole model."""
    pytest.importorskip("accelerate")
    from fusion.fuse import models
    from fusion.fuse.reading import pivot_reading
    from fusion.fuse.represent import head_matches, score

    pivot, _ = tokenizers
    model = _tiny_llama(vocab=len(pivot), seed=2)
    model.save_pretrained(tmp_path / "m")
    pivot.save_pretrained(tmp_path / "m")
    examples = [format_chat(pivot, CONVERSATION), format_chat(pivot, CONVERSATION[:2])]
    whole = score(models.load_model(tmp_path / "m", "m"), pivot_reading(pivot), examples, top_k=3, max_length=64,
                  batch_size=2)
    spread = models.load_model(tmp_path / "m", "m", device_map="auto", max_memory={"cpu": 60_000},
                               offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(spread.hf_device_map.values())
    assert head_matches(spread, pivot_reading(pivot), examples[0])
    parts = score(spread, pivot_reading(pivot), examples, top_k=3, max_length=64, batch_size=2)
    assert np.array_equal(whole.topk_ids, parts.topk_ids)
    assert np.allclose(whole.topk_logits, parts.topk_logits, atol=1e-5) and np.allclose(whole.ce, parts.ce, atol=1e-5)


def test_models_larger_than_one_gpu_are_scored_by_groups_of_gpus():
    from fusion.fuse.models import placement

    GB = 10**9
    gpus = [80 * GB] * 8
    small = placement(15 * GB, 3, 8, 3, 8, gpus)  # a 7B in bf16: every process, its own GPU
    assert small.scorers == list(range(8)) and small.device == "cuda:3" and small.device_map is None
    big = placement(145 * GB, 5, 8, 5, 8, gpus)  # a 72B: 3 GPUs per copy (64 GB usable each), 2 copies
    assert big.gpus_per_copy == 3 and big.scorers == [0, 3] and big.device == "cuda:3"
    assert big.device_map == "auto" and sorted(big.max_memory) == [3, 4, 5]
    assert placement(145 * GB, 7, 8, 7, 8, gpus).index(7) is None  # GPU 7 is left out: it waits
    two_nodes = placement(145 * GB, 11, 16, 3, 8, gpus)
    assert two_nodes.scorers == [0, 3, 8, 11] and two_nodes.index(11) == 3
    huge = placement(900 * GB, 0, 8, 0, 8, gpus)  # more than the node: its GPUs and the CPU
    assert huge.scorers == [0] and huge.max_memory["cpu"] > 0
    assert placement(145 * GB, 1, 2, 1, 2, None).scorers == [0, 1]  # no GPU: every process, CPU
    alone = placement(145 * GB, 0, 1, 0, 1, gpus)  # one process, eight visible GPUs
    assert alone.scorers == [0] and alone.gpus_per_copy == 3


def test_the_estimate_for_a_7b_pivot_on_8_gpus(tmp_path):
    """FuseChat-2.0's shape: DDP needs 16 bytes a parameter on every GPU, more than an 80 GB GPU
    holds; FSDP over 8 fits; a 72B source needs several GPUs per copy."""
    from fuse_models import header_folder

    from fusion.fuse.estimate import Recipe, render, shape_of, training_memory

    pivot = shape_of(header_folder(tmp_path / "p", "mistral", hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   vocab_size=32002), "pivot")
    qwen = shape_of(header_folder(tmp_path / "q", "qwen2", hidden_size=8192, intermediate_size=24576,
                                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                                  vocab_size=152064), "qwen")
    assert pivot.parameters == pytest.approx(7.24e9, rel=0.01) and pivot.layers == 32
    assert qwen.parameters == pytest.approx(72.3e9, rel=0.01)
    recipe = Recipe(sequences=95000, tokens=2048, world=8)
    ddp, fsdp = training_memory(pivot, recipe, "ddp"), training_memory(pivot, recipe, "fsdp")
    assert ddp["state"] == 16 * pivot.parameters and ddp["total"] > 80e9
    assert fsdp["state"] == pytest.approx(ddp["state"] / 8) and fsdp["total"] < 0.9 * 80e9
    lines = render(pivot, [qwen], recipe).splitlines()
    ddp_line = next(line for line in lines if line.strip().startswith("DDP"))
    fsdp_line = next(line for line in lines if line.strip().startswith("FSDP over 8"))
    assert ddp_line.endswith("does not fit") and fsdp_line.endswith(" fits")
    qwen_line = next(line for line in lines if line.strip().startswith("qwen"))
    assert qwen_line.split()[-2:] == ["3", "2"]  # 145 GB of bf16 weights: 3 GPUs a copy, 2 copies


def test_fusion_fuse_estimate_reads_only_headers(tmp_path, capsys):
    """`fusion fuse CONFIG --estimate` on header-only folders (no weights, no tokenizer): no -o,
    nothing written, the world size and GPU memory it was asked for."""
    from fuse_models import header_folder

    from fusion.cli import main

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300)
    header_folder(tmp_path / "p", "llama", **small)
    header_folder(tmp_path / "s", "qwen2", **dict(small, vocab_size=500))
    (tmp_path / "d.jsonl").write_text('{"prompt": "count from apple", "response": "river stone"}\n' * 40)
    (tmp_path / "fuse.yaml").write_text("pivot: ./p\nsources: [./s]\ndata: d.jsonl\n")
    before = sorted(tmp_path.rglob("*"))
    main(["fuse", str(tmp_path / "fuse.yaml"), "--estimate", "--world-size", "4", "--gpu-memory", "24GB"])
    out = capsys.readouterr().out
    assert "36 sequences" in out  # 40 less the default tenth held out
    assert "4 process(es), 24.0 GB per GPU" in out and "FSDP over 4" in out
    assert "characters / 4" in out  # no tokenizer in a header-only folder
    assert sorted(tmp_path.rglob("*")) == before
    with pytest.raises(SystemExit) as stop:
        main(["fuse", str(tmp_path / "fuse.yaml")])
    assert stop.value.code == 1 and "--output" in capsys.readouterr().err
