"""Loading models and tokenizers with transformers (an optional extra), never running their code.

Models load in the dtype they are stored in (or the one asked for) straight onto their device:
no float32 copy on the CPU first. A model larger than one GPU is spread over several with
accelerate's ``device_map`` (``pip install 'model-fusion[fuse]'`` brings accelerate).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..api.errors import FusionError
from ..api.resolver import HEADERS_FILE
from .cache import read_header

_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def stored_dtype(folder: Path) -> str | None:
    """The dtype config.json says the weights are stored in (``dtype`` or ``torch_dtype``)."""
    config = read_config(folder)
    text = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return text if text in DTYPE_BYTES else None


@dataclass
class WeightInfo:
    """What a model folder's safetensors headers say: parameter count and stored bytes."""

    parameters: int = 0
    stored_bytes: int = 0
    largest_layer: int = 0  # parameters of the largest decoder layer (model.layers.N.*)
    per_layer: dict = field(default_factory=dict)


def weight_info(folder: Path) -> WeightInfo:
    """Counted from the safetensors headers (of real files or of a header-only folder)."""
    folder = Path(folder)
    headers: list[dict] = []
    manifest = folder / HEADERS_FILE
    if manifest.is_file():
        try:
            headers = [e["header"] for e in json.loads(manifest.read_text())["files"].values()]
        except (OSError, ValueError, KeyError, TypeError):
            headers = []
    else:
        for path in sorted(folder.glob("*.safetensors")):
            found = read_header(path)
            if found is not None:
                headers.append(found[0])
    info = WeightInfo()
    for header in headers:
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            n = math.prod(entry.get("shape", [])) if entry.get("shape") else 1
            info.parameters += n
            info.stored_bytes += n * _BYTES.get(entry.get("dtype"), 2)
            parts = name.split(".")
            if "layers" in parts:
                i = parts.index("layers")
                if i + 1 < len(parts) and parts[i + 1].isdigit():
                    layer = int(parts[i + 1])
                    info.per_layer[layer] = info.per_layer.get(layer, 0) + n
    info.largest_layer = max(info.per_layer.values(), default=0)
    return info


def load_model(folder: Path, label: str, dtype: str = "float32", device: str = "cpu", *,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | None = None):
    """The model in ``dtype``, loaded onto ``device`` (or spread by ``device_map`` within
    ``max_memory``; weights that fit nowhere else go to ``offload_folder``)."""
    import torch

    tf = transformers()
    kwargs: dict = {"dtype": getattr(torch, dtype), "device_map": device_map or {"": device}}
    if max_memory:
        kwargs["max_memory"] = max_memory
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except ImportError as exc:
        raise FusionError(f"{label}: spreading it over several devices needs accelerate ({exc}); install it with: "
                          f"pip install 'model-fusion[fuse]'") from None
    except Exception as exc:
        raise FusionError(f"{label}: cannot load it as a causal language model from {folder} "
                          f"({type(exc).__name__}: {exc}); check that it is a transformers model folder") from None
    model.config.use_cache = False
    return model


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


@dataclass
class Placement:
    """Where one model is scored: which processes score (the others wait) and how it is loaded."""

    scorers: list[int]  # ranks that score this model, in chunk-assignment order
    device: str
    device_map: str | dict | None = None
    max_memory: dict | None = None
    gpus_per_copy: int = 1

    def index(self, rank: int) -> int | None:
        return self.scorers.index(rank) if rank in self.scorers else None


def placement(model_bytes: int, rank: int, size: int, local_rank: int, local_size: int,
              gpu_memory: list[int] | None, headroom: float = 0.8) -> Placement:
    """Spread the data over as many copies of the model as the GPUs hold.

    A model that fits ``headroom`` of one GPU's memory is scored by every process on its own
    GPU. A larger one takes g neighbouring GPUs of a node per copy (accelerate's ``device_map``
    over them); the first process of each group scores, the others wait. A model larger than a
    node's GPUs also takes the CPU's memory. Without GPUs every process scores on the CPU.
    ``gpu_memory`` lists the bytes of this node's GPUs; torchrun gives every node the same
    number of processes, numbered node by node.
    """
    if not gpu_memory:
        return Placement(list(range(size)), "cpu")
    gpu_free = gpu_memory
    per_gpu = int(min(gpu_free) * headroom)
    g = max(1, math.ceil(model_bytes / max(1, per_gpu)))
    if g == 1:
        return Placement(list(range(size)), f"cuda:{local_rank % len(gpu_free)}")
    width = min(local_size, len(gpu_free)) if size > 1 else len(gpu_free)
    if g > width:
        memory: dict = {i: per_gpu for i in range(len(gpu_free))}
        memory["cpu"] = max(0, model_bytes - per_gpu * len(gpu_free)) * 2
        return Placement([r for r in range(size) if r % local_size == 0], "cuda:0", "auto", memory, len(gpu_free))
    groups = width // g
    scorers = [r for r in range(size) if (r % local_size) % g == 0 and r % local_size < groups * g]
    start = min(local_rank // g, groups - 1) * g
    return Placement(scorers, f"cuda:{start}", "auto", {i: per_gpu for i in range(start, start + g)}, g)


def gpu_memory() -> list[int] | None:
    """Total bytes of each GPU of this machine (the same on every process, so every process
    makes the same placement), or None without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return None
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


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
