"""Fusion data: JSONL records → text formatted with the pivot's chat template, plus the character
spans of the responses (the only tokens any loss is computed on: prompts are masked)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.errors import FusionError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    text: str
    spans: list[tuple[int, int]]  # character spans of the responses
    chat: bool  # formatted by the chat template (so its BOS, if any, is in the text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FusionError(f"cannot read data file {str(path)!r}: {exc}; give a UTF-8 JSONL file") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FusionError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise FusionError(f"{path}:{n}: each line must be a JSON object with `messages`, "
                              f"`prompt`/`response` or `text`")
        records.append((n, record))
    if not records:
        raise FusionError(f"data file {str(path)!r} has no records; add JSONL lines with `messages`, "
                          f"`prompt`/`response` or `text`")
    return records


def _messages(record: dict, where: str) -> list[dict[str, str]] | None:
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs
        ):
            raise FusionError(f"{where}: `messages` must be a list of {{role, content}} with role "
                              f"system, user or assistant and text content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise FusionError(f"{where}: the conversation has no assistant message, so there is nothing to learn; "
                              f"add one or drop the line")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise FusionError(f"{where}: `prompt` and `response` must both be strings")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    if isinstance(record.get("text"), str):
        return None
    raise FusionError(f"{where}: a record needs `messages`, `prompt`/`response` or `text`")


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    # no template: a plain transcript, so prompt and response stay distinguishable
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def format_chat(tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render with the template; each assistant turn (with its end-of-turn marker) is a response span."""
    full = _render(tokenizer, messages)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if full.startswith(upto) and upto.startswith(before) and len(before) >= pos:
            spans.append((len(before), len(upto)))
            pos = len(upto)
            continue
        # a template that is not prefix-stable: find the response text itself
        start = full.find(m["content"], pos)
        if start < 0:
            raise FusionError("the pivot's chat template drops or rewrites assistant messages, so responses "
                              "cannot be located; use `prompt`/`response` or `text` records")
        spans.append((start, start + len(m["content"])))
        pos = start + len(m["content"])
    return Example(full, spans, chat=True)


def load_examples(path: Path, tokenizer) -> list[Example]:
    """The records of a data file as examples; records with nothing to learn (empty text, empty
    responses) are left out, and a file with none left is refused in one sentence."""
    out = []
    for n, record in read_jsonl(path):
        messages = _messages(record, f"{path}:{n}")
        if messages is None:
            example = Example(record["text"], [(0, len(record["text"]))], chat=False)
        else:
            example = format_chat(tokenizer, messages)
        if any(end > start for start, end in example.spans):
            out.append(example)
    if not out:
        raise FusionError(f"{path}: no record has any text to learn from (every `text`, response or "
                          f"assistant message is empty); fill in the data")
    return out


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a reproducible ``fraction`` of the examples (at least one, when asked for any)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def encode(tokenizer, example: Example, max_length: int, with_offsets: bool = False):
    """The pivot's reading of ``example``: token ids and, per token, whether it belongs to a
    response (and so is a training target); with ``with_offsets`` also each token's [start, end)
    characters in the text. Sources read through :func:`fusion.fuse.reading.read`."""
    from .reading import pivot_reading, read

    ids, response, offsets = read(pivot_reading(tokenizer), example.text, example.spans, example.chat, max_length)
    return (ids, response, offsets) if with_offsets else (ids, response)
