"""Loading models and tokenizers with transformers (an optional extra), never running their code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..api.errors import FusionError


def transformers():
    try:
        import transformers as tf
    except ImportError:
        raise FusionError("`fusion fuse` needs transformers; install it with: pip install 'model-fusion[fuse]'") from None
    tf.utils.logging.disable_progress_bar()  # one bar per tiny load drowns the stage messages
    return tf


def load_tokenizer(folder: Path, label: str):
    tf = transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        raise FusionError(f"{label}: cannot load its tokenizer from {folder} ({type(exc).__name__}: {exc}); "
                          f"the model folder needs tokenizer files") from None
    if not getattr(tok, "is_fast", False):
        raise FusionError(f"{label}: its tokenizer has no fast (tokenizer.json) version, which token alignment "
                          f"needs for character offsets; add a tokenizer.json to the model folder")
    return tok


def load_model(folder: Path, label: str, dtype: str = "float32", device: str = "cpu"):
    import torch

    tf = transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise FusionError(f"{label}: cannot load it as a causal language model from {folder} "
                          f"({type(exc).__name__}: {exc}); check that it is a transformers model folder") from None
    return model.to(device=device, dtype=getattr(torch, dtype))


def device() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def fingerprint(folder: Path) -> str:
    """Identifies a model folder's contents cheaply: config, tokenizer and weight file sizes/times."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json" or path.name in ("tokenizer.model", "merges.txt"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin"):
            st = path.stat()
            h.update(json.dumps([path.name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()
