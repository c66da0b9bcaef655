"""Generated tiny checkpoints of the registered text architectures, in their real key layouts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ARCH = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    family: str = "qwen2"
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 4
    intermediate: int = 12
    vocab: int = 32
    tied: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def config(self, dtype: str) -> dict:
        arch, model_type = ARCH[self.family]
        cfg = {
            "architectures": [arch], "model_type": model_type, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied, "torch_dtype": dtype,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        }
        if self.family == "qwen3":
            cfg["head_dim"] = self.head_dim
        return cfg

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (self.intermediate, h), p + "mlp.up_proj.weight": (self.intermediate, h),
                p + "mlp.down_proj.weight": (h, self.intermediate),
            })
            if self.family == "qwen2":
                out.update({p + "self_attn.q_proj.bias": (h,), p + "self_attn.k_proj.bias": (kv,),
                            p + "self_attn.v_proj.bias": (kv,)})
            if self.family == "qwen3":
                out.update({p + "self_attn.q_norm.weight": (self.head_dim,),
                            p + "self_attn.k_norm.weight": (self.head_dim,)})
        out["model.norm.weight"] = (h,)
        if not self.tied:
            out["lm_head.weight"] = (self.vocab, h)
        return out


def random_tensors(shape: Shape, dtype: str, seed: int, like: dict | None = None,
                   scale: float = 0.01) -> dict[str, torch.Tensor]:
    """Random weights; with ``like``, a fine-tune of it (``like`` plus noise of ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shape.tensor_shapes().items():
        if like is not None:
            t = like[name].float() + torch.randn(s, generator=gen) * scale
        else:
            t = torch.randn(s, generator=gen) * 0.05
        out[name] = t.to(DTYPES[dtype])
    return out


def save_checkpoint(folder: Path, shape: Shape, dtype: str, tensors: dict[str, torch.Tensor],
                    shards: int = 1) -> Path:
    """Write config.json plus one safetensors file, or ``shards`` files with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape.config(dtype)))
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards = min(shards, len(names))
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder (sharded or not), fully loaded."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out
