"""Tiny models for pairwise-fusion tests: tokenizers trained offline with `tokenizers` (so the
pivot and one source have different vocabularies), Llama/Qwen2 models from transformers' config
classes, and a synthetic pattern the sources learn and the pivot does not know.

Two cases: :func:`build_fusion_case` (a source with the pivot's vocabulary and one whose
SentencePiece-style vocabulary splits the chat markers), and :func:`build_coarse_case`, where the
pivot splits every word in two and one source reads each word as one token, with its own BOS
and end-of-turn marker (the case where knowledge sits in one-to-many alignments)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "ember", "lotus", "raven",
         "frost", "amber"]
SPECIAL = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
#: the coarse source's own template: its BOS first, its EOS ends a turn
OWN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def pattern(start: int, length: int) -> dict:
    """The pattern: after "count from W", the words that follow W in the cycle."""
    words = [WORDS[(start + 1 + i) % len(WORDS)] for i in range(length)]
    return {"prompt": f"count from {WORDS[start]}", "response": " ".join(words)}


def shuffled(rng: random.Random, length: int) -> dict:
    """The same words in random order: the format without the pattern."""
    return {"prompt": f"count from {rng.choice(WORDS)}", "response": " ".join(rng.choice(WORDS) for _ in range(length))}


def corpus() -> list[str]:
    rng = random.Random(0)
    lines = [f"count from {w} " + " ".join(rng.choice(WORDS) for _ in range(8)) for w in WORDS for _ in range(8)]
    return lines + ["the quick brown fox jumps over the lazy dog"] * 4


def make_tokenizer(folder: Path, kind: str, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """kind 'byte': byte-level BPE (Ġ markers); 'meta': Metaspace BPE (▁ markers) without the chat
    markers as special tokens, so they split into pieces."""
    tok = Tokenizer(models.BPE(unk_token=None if kind == "byte" else "<unk>"))
    if kind == "byte":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "</s>"],
                                      show_progress=False)
    tok.train_from_iterator(corpus() + [" ".join(SPECIAL)] * 2, trainer)
    if kind == "byte":
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                                    additional_special_tokens=SPECIAL[1:])
    else:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                    unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_split_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE built by hand that writes every word of WORDS after a space as two tokens:
    its first three letters (with the space) and the rest (" apple" → " app" + "le")."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []

    def build(piece: str) -> None:  # left to right: ("Ġ", "a"), ("Ġa", "p"), ...
        for n in range(2, len(piece) + 1):
            pair = (piece[:n - 1], piece[n - 1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(piece[:n], len(vocab))

    for w in WORDS:
        build("Ġ" + w[:3])
    for w in WORDS:
        build(w[3:])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                                additional_special_tokens=SPECIAL[1:])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_word_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """Metaspace BPE that keeps every word whole, with a BOS it puts before every text and its own
    chat template (BOS first, EOS at the end of each turn; the role markers are plain text)."""
    from tokenizers import processors

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # as Llama's: the space marker only in front of the text, not after every special token
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(corpus() + [" ".join(SPECIAL)] * 2 + ["a line\nanother line\n"] * 2, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.chat_template = OWN_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, family: str, tokenizer, seed: int):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=128,
              tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def chat_text(tokenizer, record: dict) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]},
                                          {"role": "assistant", "content": record["response"]}], tokenize=False)


def train_lm(model, tokenizer, records: list[dict], steps: int, seed: int, lr: float = 3e-3) -> None:
    """Plain next-token training on whole chat texts (enough for a tiny model to learn the pattern)."""
    torch.manual_seed(seed)
    texts = [chat_text(tokenizer, r) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, min(16, len(texts))), return_tensors="pt", padding=True,
                          add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_fusion_case(root: Path, pivot_steps: int = 60, source_steps: int = 150) -> dict[str, Path]:
    """pivot (Llama, byte-level vocabulary) trained on shuffled words; source_a (Qwen2, same
    vocabulary) and source_b (Llama, a Metaspace vocabulary) trained on the pattern; fusion data."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    tok_p = make_tokenizer(root / "tok_p", "byte", 320)
    tok_b = make_tokenizer(root / "tok_b", "meta", 200)
    pattern_train = [pattern(rng.randrange(len(WORDS)), rng.randint(4, 8)) for _ in range(64)]
    noise = [shuffled(rng, rng.randint(4, 8)) for _ in range(64)]
    paths = _trained(root, [("pivot", "llama", tok_p, noise, pivot_steps, 0),
                            ("source_a", "qwen2", tok_p, pattern_train, source_steps, 1),
                            ("source_b", "llama", tok_b, pattern_train, source_steps, 2)])
    fuse_data = [pattern(rng.randrange(len(WORDS)), rng.randint(4, 8)) for _ in range(48)]
    heldout = [pattern(rng.randrange(len(WORDS)), rng.randint(5, 9)) for _ in range(16)]
    return {**paths, **_data_files(root, ("train.jsonl", fuse_data), ("heldout.jsonl", heldout))}


def _trained(root: Path, runs: list[tuple]) -> dict[str, Path]:
    """Each (name, family, tokenizer, records, steps, seed): a model trained on the records,
    saved with its tokenizer under ``root / name``."""
    paths = {}
    for name, family, tok, data, steps, seed in runs:
        model = make_model(root / name, family, tok, seed)
        train_lm(model, tok, data, steps, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def _data_files(root: Path, train: tuple[str, list[dict]], heldout: tuple[str, list[dict]]) -> dict[str, Path]:
    """The fusion data and the held-out data as JSONL files under ``root``."""
    for name, records in (train, heldout):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"data": root / train[0], "heldout": root / heldout[0]}


def header_folder(folder: Path, model_type: str, **config) -> Path:
    """A header-only model folder (config.json and safetensors headers, no weights, as the Hub
    resolver makes for a plan or an estimate) with the shapes transformers gives that config."""
    from fusion.api.resolver import write_header_folder

    cfg = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    data = cfg.to_dict()
    data["dtype"] = "bfloat16"
    return write_header_folder(folder, data, {"model.safetensors": (offset + 8, header)}, source=model_type,
                               download_bytes=offset)


def build_coarse_case(root: Path, pivot_steps: int = 60, source_steps: int = 150) -> dict[str, Path]:
    """fine_pivot (Llama) splits every word in two and was trained on shuffled words; fine_same
    (Qwen2, the same vocabulary) and coarse (Llama, every word one token, its own BOS and EOS, and
    trained with its own chat template) were trained on the pattern; fusion data (responses after
    a space, so that every word of them is split the same way)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    tok_f = make_split_tokenizer(root / "tok_f")
    tok_w = make_word_tokenizer(root / "tok_w")

    def spaced(record: dict) -> dict:
        return {"prompt": record["prompt"], "response": " " + record["response"]}

    pattern_train = [spaced(pattern(rng.randrange(len(WORDS)), rng.randint(4, 8))) for _ in range(64)]
    noise = [spaced(shuffled(rng, rng.randint(4, 8))) for _ in range(64)]
    paths = _trained(root, [("fine_pivot", "llama", tok_f, noise, pivot_steps, 3),
                            ("fine_same", "qwen2", tok_f, pattern_train, source_steps, 4),
                            ("coarse", "llama", tok_w, pattern_train, source_steps, 5)])
    fuse_data = [spaced(pattern(rng.randrange(len(WORDS)), rng.randint(4, 8))) for _ in range(48)]
    heldout = [spaced(pattern(rng.randrange(len(WORDS)), rng.randint(5, 9))) for _ in range(16)]
    return {**paths, **_data_files(root, ("coarse-train.jsonl", fuse_data), ("coarse-heldout.jsonl", heldout))}


def copy_case(src: Path, dst: Path, names) -> Path:
    """The named model folders and data files of a built case, copied into ``dst`` (a test's own,
    so that its runs write nothing into the shared case)."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (shutil.copytree if (src / name).is_dir() else shutil.copyfile)(src / name, dst / name)
    return dst


def shared_case(tmp_path_factory, name: str, build, last_file: str) -> Path:
    """A case built once per test run and shared by the xdist workers (their temp folders share
    the run's parent); ``last_file`` is what ``build`` writes last."""
    import os

    from filelock import FileLock

    torch.set_num_threads(1)  # two workers on two cores: more threads only contend
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(str(root) + ".lock"):
        if not (root / last_file).exists():
            build(root)
    return root


def write_config(root: Path, *, alignment: str = "statistics", function: str = "min_ce", lm_loss_weight: float = 0.0,
                 epochs: int = 8, sources: tuple[str, ...] = ("source_a", "source_b"), extra: str = "",
                 name: str = "fuse.yaml", pivot: str = "pivot", data: str = "train.jsonl",
                 heldout: str = "heldout.jsonl", max_length: int = 64, training: str = "",
                 representations: str = "") -> Path:
    text = f"""pivot: ./{pivot}
sources:
{"".join(f"  - model: ./{s}" + chr(10) for s in sources)}data: {data}
eval_data: {heldout}
representations: {{top_k: 10, max_length: {max_length}, batch_size: 16{representations}}}
alignment: {alignment}
fusion_function: {function}
training: {{lm_loss_weight: {lm_loss_weight}, epochs: {epochs}, learning_rate: 3.0e-3, batch_size: 8,
           warmup_ratio: 0.1, seed: 42, dtype: float32{training}}}
{extra}"""
    path = root / name
    path.write_text(text)
    return path


if __name__ == "__main__":  # python tests/fuse_models.py DIR: the tiny case and its config
    import sys

    torch.set_num_threads(1)
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "fuse-demo")
    build_fusion_case(target)
    print(f"wrote {write_config(target)}; run: fusion fuse {target / 'fuse.yaml'} -o {target / 'out'}")
