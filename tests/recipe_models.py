"""Tiny stand-ins for the models published recipes name, and the corpus of those recipes.

Each recipe in tests/recipes/ starts with `#` header lines (its source, the family and depth of
its models, what fusion is expected to do) and then holds the recipe as published. Its models
are replaced by tiny models of the same architecture and depth, built with transformers' config
classes and `save_pretrained`: the base model of a family, and fine-tunes of it (the base plus
seeded noise), with a tokenizer of the family's style. Models a recipe's tokenizer keys need to
differ get added tokens (and the embedding rows for them).

The benchmark (benchmarks/compare_mergekit.py --recipes) uses the same stand-ins.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parent / "recipes"
HEADER_END = "# (everything below this comment header is verbatim as published)"

#: family → (transformers config class, chat-token style, tied embeddings, extra config)
FAMILIES = {
    "llama2": ("LlamaConfig", "llama2", False, {}),
    "llama3": ("LlamaConfig", "llama3", False, {}),
    "llama3-tied": ("LlamaConfig", "llama3", True, {}),
    "mistral": ("MistralConfig", "mistral", False, {"head_dim": 8, "num_attention_heads": 4}),
    "qwen2": ("Qwen2Config", "chatml", False, {}),
    "qwen3": ("Qwen3Config", "chatml", False, {"head_dim": 8}),
}
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or "
         "had by not word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find").split()
SPECIALS = {
    "llama2": ["<s>", "</s>"],
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["<s>", "</s>", "[INST]", "[/INST]"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
TEMPLATES = {
    "llama2": "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
              "' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
    "llama3": "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
              "\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
               "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
}
#: tokens a fine-tune of another style adds when a recipe's tokenizer keys need vocabularies to differ
CHATML = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class StandIn:
    family: str
    layers: int
    index: int  # 0: the family's base model; i > 0: its i-th fine-tune
    extra: tuple[str, ...] = ()  # added tokens beyond the family's vocabulary

    @property
    def name(self) -> str:
        # no "+" or "@": mergekit reads them as a LoRA or a revision in a model reference
        tail = "-with-" + "-".join(re.sub(r"\W+", "_", t).strip("_") for t in self.extra) if self.extra else ""
        return f"{self.family}-{self.layers}/{'base' if self.index == 0 else f'ft{self.index}'}{tail}"


def _tokenizer(style: str, extra: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = SPECIALS[style]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=specials[0],
                                   eos_token=specials[-1] if style == "chatml" else specials[1],
                                   additional_special_tokens=specials[2:])
    fast.add_special_tokens({"additional_special_tokens": specials[2:] + [t for t in extra if t not in specials]})
    fast.chat_template = TEMPLATES[style]
    return fast


def build(standin: StandIn, folder: Path, root: Path) -> None:
    """Write one stand-in (deterministic: its weights depend only on what it stands in for).
    The family's base is a transformers model saved with `save_pretrained`; the others are its
    tensors plus seeded noise, with rows for their added tokens."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    cls_name, style, tied, extra_cfg = FAMILIES[standin.family]
    tokenizer = _tokenizer(style, standin.extra)
    base = StandIn(standin.family, standin.layers, 0)
    if standin != base:
        source = standin_folder(root, base)
        config = json.loads((source / "config.json").read_text())
        weights = load_file(source / "model.safetensors")
        gen = torch.Generator().manual_seed(standin.index)
        if standin.index:
            weights = {k: (v.float() + torch.randn(v.shape, generator=gen) * 0.01).to(v.dtype)
                       for k, v in sorted(weights.items())}
        rows = max(config["vocab_size"], len(tokenizer))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in weights and rows > weights[name].shape[0]:
                new = torch.randn(rows - weights[name].shape[0], weights[name].shape[1], generator=gen) * 0.02
                weights[name] = torch.cat([weights[name], new.to(weights[name].dtype)])
        config["vocab_size"] = rows
        folder.mkdir(parents=True)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for extra in ("generation_config.json",):
            if (source / extra).is_file():
                (folder / extra).write_bytes((source / extra).read_bytes())
        tokenizer.save_pretrained(folder)
        return
    vocab = len(tokenizer)
    if style == "chatml":
        vocab = -(-vocab // 16) * 16  # Qwen pads its embedding beyond the tokenizer
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=standin.layers, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    cfg.update(extra_cfg)
    torch.manual_seed(1000 * standin.layers + len(standin.family))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**cfg))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def standin_folder(root: Path, standin: StandIn) -> Path:
    """The stand-in's folder under ``root``, built on first use (safe across processes)."""
    from filelock import FileLock

    folder = root / standin.name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
            build(standin, tmp, root)
            os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


@dataclass
class Recipe:
    path: Path
    header: dict[str, str]
    body: str  # the recipe as published
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def family(self) -> tuple[str, int]:
        family, layers = self.header["stand-ins"].split()
        return family, int(layers)

    @property
    def expected_problems(self) -> list[str]:
        """Config paths fusion is expected to refuse the recipe for (empty: it merges)."""
        value = self.header.get("fusion", "merges")
        return [] if value == "merges" else [p.strip() for p in value.removeprefix("refuses:").split(",")]


def load_recipe(path: Path) -> Recipe:
    text = path.read_text(encoding="utf-8")
    head, _, body = text.partition(HEADER_END + "\n")
    header = {}
    for line in head.splitlines():
        key, _, value = line.lstrip("# ").partition(":")
        header.setdefault(key.strip(), value.strip())
    try:
        data = yaml.safe_load(body) or {}
    except yaml.YAMLError:  # a multi-document file: fusion refuses it, as mergekit-yaml does
        data = {}
    return Recipe(path, header, body, data if isinstance(data, dict) else {})


def corpus() -> list[Recipe]:
    return [load_recipe(p) for p in sorted(RECIPES.glob("*.yaml"))]


def references(data: dict) -> list[str]:
    """Every model reference in a recipe, in the order it appears (the base model first)."""
    refs = [data.get("base_model")]
    for entry in data.get("models") or ():
        refs.append(entry.get("model") if isinstance(entry, dict) else entry)
    layered = data.get("slices") or ((data.get("modules") or {}).get("default") or {}).get("slices") or ()
    for s in layered:
        refs += [s.get("base_model")] + [src.get("model") for src in s.get("sources") or ()]
    tokenizer = data.get("tokenizer") or {}
    source = data.get("tokenizer_source") or tokenizer.get("source")
    refs.append(source if source not in ("base", "union") else None)
    for entry in (tokenizer.get("tokens") or {}).values():
        src = (entry or {}).get("source")
        refs.append(src.get("model") if isinstance(src, dict) else src)
    return [r.strip() for r in dict.fromkeys(refs) if isinstance(r, str) and r.strip()]


def standins(recipe: Recipe) -> dict[str, StandIn]:
    """The stand-in of each model the recipe names. The base model (else the first model) is
    the family's base, the others its fine-tunes in order; with tokenizer keys, a model a token
    entry names gets that token, and otherwise the last model gets the ChatML tokens, so that
    the vocabularies really differ."""
    family, layers = recipe.family
    data = recipe.data
    refs = references(data)
    extra: dict[str, list[str]] = {r: [] for r in refs}
    tokenizer = data.get("tokenizer") if isinstance(data.get("tokenizer"), dict) else {}
    has_tokenizer = "tokenizer" in data or "tokenizer_source" in data
    for token, entry in (tokenizer.get("tokens") or {}).items():
        src = (entry or {}).get("source")
        model = src.get("model") if isinstance(src, dict) else src
        if isinstance(model, str) and model.strip() in extra:
            wanted = src.get("token") if isinstance(src, dict) else token
            if wanted and wanted not in SPECIALS[FAMILIES[family][1]]:
                extra[model.strip()].append(wanted)
    if has_tokenizer and not any(extra.values()) and len(refs) > 1:
        extra[refs[-1]] = [t for t in CHATML if t not in SPECIALS[FAMILIES[family][1]]] or ["<|tool|>"]
    base = data.get("base_model").strip() if isinstance(data.get("base_model"), str) else None
    order = ([base] if base else []) + [r for r in refs if r != base]
    return {ref: StandIn(family, layers, i if base else i + 1, tuple(extra[ref])) for i, ref in enumerate(order)}


def localized(recipe: Recipe, root: Path) -> str:
    """The recipe text with every model reference replaced by its stand-in's folder."""
    text = recipe.body
    folders = {ref: standin_folder(root, s) for ref, s in standins(recipe).items()}
    # longest first, so that a name inside another name is not replaced in it
    for ref in sorted(folders, key=len, reverse=True):
        quoted = json.dumps(str(folders[ref]))
        text = re.sub(rf"(?<![\w./-]){re.escape(ref)}(?![\w./-])|\"{re.escape(ref)}\"|'{re.escape(ref)}'",
                      lambda _: quoted, text)
    return text


def write_config(folder: Path, body: str, **models: Path) -> Path:
    """``folder/merge.yaml``: ``body`` dedented, each ``{NAME}`` in it the quoted folder ``models[NAME]``
    (a folder's path may hold characters YAML reads otherwise)."""
    path = Path(folder) / "merge.yaml"
    path.write_text(textwrap.dedent(body).format(**{k: json.dumps(str(v)) for k, v in models.items()}))
    return path
