"""`fusion demo`: a real merge on an embedded example, no network.

It writes a tiny Qwen2-shaped base model and two "fine-tunes" (the base plus small, structured
task vectors) as ordinary Hugging Face folders, merges them with task arithmetic through the same
code path as `fusion merge`, and checks every merged tensor against the formula.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

TINY_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}

DEMO_CONFIG = """\
# Task arithmetic: θ = θ_base + λ·(0.7·δ_chat + 0.3·δ_code), the VisCodex-style 0.7/0.3 split.
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./chat
    parameters: {weight: 0.7}
  - model: ./code
    parameters: {weight: 0.3}
parameters: {lambda: 1.0}
"""


def qwen2_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Qwen2ForCausalLM checkpoint, as transformers saves it."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def write_model(folder: Path, config: dict, tensors: dict) -> Path:
    """Save tensors and config.json as a Hugging Face model folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def make_family(root: Path, config: dict = TINY_QWEN2, seed: int = 0) -> dict[str, dict]:
    """A base model and two fine-tunes of it (base + scaled random task vectors)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config.get("torch_dtype", "float32"))
    base = {}
    for name, shape in qwen2_tensor_shapes(config).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            base[name] = torch.ones(shape).to(dtype)
        else:
            base[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    out = {"base": base}
    for k, tag in enumerate(("chat", "code")):
        out[tag] = {n: (t.float() + torch.randn(t.shape, generator=gen) * 0.002 * (k + 1)).to(dtype)
                    for n, t in base.items()}
    for tag, tensors in out.items():
        write_model(root / tag, config, tensors)
    return out


def run_demo(output: Path | None, progress: bool = True, echo: Callable[[str], None] = print) -> Path:
    import torch

    from .pipeline import merge

    keep = output is not None
    root = Path(output) if keep else Path(tempfile.mkdtemp(prefix="fusion-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    echo(f"1. writing a tiny Qwen2 base and two fine-tunes (bf16, {TINY_QWEN2['num_hidden_layers']} layers) to {root}")
    models = make_family(root)
    (root / "merge.yaml").write_text(DEMO_CONFIG)
    echo("2. merging them with task arithmetic (merge.yaml):")
    for line in DEMO_CONFIG.splitlines():
        echo(f"     {line}")
    out = root / "merged"
    summary = merge(root / "merge.yaml", out, force=True, progress=progress)
    echo("   " + summary.text().replace("\n", "\n   "))

    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    worst = 0.0
    for name, base in models["base"].items():
        b = base.float()
        expected = b + 1.0 * (0.7 * (models["chat"][name].float() - b) + 0.3 * (models["code"][name].float() - b))
        worst = max(worst, (merged[name].float() - expected.to(torch.bfloat16).float()).abs().max().item())
    echo(f"3. checked all {len(merged)} tensors against θ_base + 0.7·δ_chat + 0.3·δ_code: "
         f"max difference {worst:.3g} (bf16 rounding)")
    try:
        import transformers
    except ImportError:
        echo("4. (install transformers to also load the merged model and run it)")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            logits = model(torch.arange(8).unsqueeze(0)).logits
        echo(f"4. loaded {out} with transformers ({type(model).__name__}) and ran a forward pass: "
             f"logits {list(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
    if worst > 0.01:
        raise RuntimeError(f"the demo merge differs from the formula by {worst}")
    if keep:
        echo(f"the models, merge.yaml and the merged model are in {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return out
