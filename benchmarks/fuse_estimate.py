"""The cost model of `fusion fuse` for FuseChat-2.0's recipe: OpenChat-3.5-7B as the pivot, five
sources up to Qwen1.5-72B, 95k conversations of up to 2,048 tokens, 8 GPUs of 80 GB.

No weights are needed: the script writes header-only model folders (config.json and the
safetensors headers, as the Hub resolver does for a plan) with the shapes transformers gives
each model's config, typed in below from the models' config.json files, then prints
``fusion fuse --estimate``'s table for them. InternLM2 is written in its Llama layout (the
"llama-old" conversion FuseChat used), which has the same shapes.

    .venv/bin/python benchmarks/fuse_estimate.py [--sequences 95000] [--tokens 2048] [--world-size 8]
                                                 [--gpu-memory 80GB] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32002)
MODELS = {
    "openchat_3.5 (pivot)": ("mistral", MISTRAL_7B),
    "Starling-LM-7B-alpha": ("mistral", MISTRAL_7B),
    "Nous-Hermes-2-SOLAR-10.7B": ("llama", dict(MISTRAL_7B, num_hidden_layers=48)),
    "internlm2-chat-20b": ("llama", dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48,
                                         num_attention_heads=48, num_key_value_heads=8, vocab_size=92544)),
    "Mixtral-8x7B-Instruct-v0.1": ("mixtral", dict(MISTRAL_7B, vocab_size=32000, num_local_experts=8,
                                                   num_experts_per_tok=2)),
    "Qwen1.5-72B-Chat": ("qwen2", dict(hidden_size=8192, intermediate_size=24576, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=64, vocab_size=152064)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=95000)
    ap.add_argument("--tokens", type=float, default=2048, help="mean tokens per sequence (2048: all full length)")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--gpu-memory", default="80GB")
    ap.add_argument("--batch", type=int, default=4, help="sequences per GPU per micro-step (FuseChat: 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from fuse_models import header_folder

    from fusion.fuse.estimate import Recipe, estimate_json, render, shape_of
    from fusion.writer import parse_size

    with tempfile.TemporaryDirectory() as tmp:
        shapes = [shape_of(header_folder(Path(tmp) / f"m{i}", kind, **config), name)
                  for i, (name, (kind, config)) in enumerate(MODELS.items())]
    recipe = Recipe(args.sequences, args.tokens, batch=args.batch, world=args.world_size,
                    gpu_memory=float(parse_size(args.gpu_memory)),
                    notes=["every sequence taken at its full length: an upper bound on disk and compute",
                           "token counts as the pivot's tokenizer makes them; each source's tokenizer differs"])
    print(estimate_json(shapes[0], shapes[1:], recipe) if args.json else render(shapes[0], shapes[1:], recipe))


if __name__ == "__main__":
    main()
