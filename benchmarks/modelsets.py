"""Synthetic model sets for the benchmarks: a bf16 base model and fine-tunes of it, with the
tensor names and shapes of a real checkpoint (Qwen2 layout) and random values.

Fine-tunes are the base plus small random task vectors rounded to bf16, as in real fine-tunes:
many deltas are a few ulps, so magnitudes tie often and some entries do not change at all.
A set is written once per folder and reused (a `.complete` marker says it was finished).

    .venv/bin/python benchmarks/modelsets.py qwen2-0.5b /tmp/sets/qwen2-0.5b
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = {
    # Tiny: a smoke test that runs in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    # Qwen2-0.5B / Qwen2.5-0.5B: 494M parameters, a tied 151936×896 embedding, ~1 GB in bf16.
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True),
    # Qwen2.5-7B: 7.6B parameters, ~15 GB in bf16 per model.
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False),
}
MODELS = ("base", "ft1", "ft2", "ft3")


def config_for(shape: str) -> dict:
    from fusion.demo import TINY_QWEN2

    return dict(TINY_QWEN2, **SHAPES[shape], torch_dtype="bfloat16", max_position_embeddings=32768)


def make_set(shape: str, folder: Path, fine_tunes: int = 3, seed: int = 0) -> dict[str, Path]:
    """Write (or reuse) base + ``fine_tunes`` models under ``folder``; return their folders."""
    import torch
    from safetensors.torch import save_file

    from fusion.demo import qwen2_tensor_shapes

    folder = Path(folder)
    names = MODELS[: fine_tunes + 1]
    paths = {n: folder / n for n in names}
    if (folder / ".complete").is_file() and all((p / "config.json").is_file() for p in paths.values()):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    config = config_for(shape)
    shapes = qwen2_tensor_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    for p in paths.values():
        p.mkdir(parents=True)
        (p / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # One shard per ~2 GB, so a 7B-shaped model is sharded like a real one.
    shard, shard_bytes, index, n_shard = {n: {} for n in names}, 0, {}, 1

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shard
        for n in names:
            save_file(shard[n], str(paths[n] / f"model-{n_shard:05d}.safetensors"), metadata={"format": "pt"})
        shard, shard_bytes, n_shard = {n: {} for n in names}, 0, n_shard + 1

    for tname, tshape in shapes.items():
        if tname.endswith("norm.weight"):
            base = torch.ones(tshape, dtype=torch.bfloat16)
        else:
            base = (torch.randn(tshape, generator=gen) * 0.02).to(torch.bfloat16)
        shard["base"][tname] = base
        for k, n in enumerate(names[1:]):
            delta = torch.randn(tshape, generator=gen) * (0.0005 * (k + 1))
            shard[n][tname] = (base.float() + delta).to(torch.bfloat16)
        index[tname] = n_shard
        shard_bytes += base.numel() * 2
        if shard_bytes > 2 * 10**9:
            flush()
    if shard_bytes:
        flush()
    total = n_shard - 1
    for n in names:
        files = {}
        for i in range(1, total + 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (paths[n] / f"model-{i:05d}.safetensors").rename(paths[n] / final)
            files[i] = final
        weight_map = {t: files[i] for t, i in index.items()}
        (paths[n] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / ".complete").write_text(shape + "\n")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--fine-tunes", type=int, default=3)
    args = ap.parse_args()
    for name, path in make_set(args.shape, args.folder, args.fine_tunes).items():
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"{name}: {path} ({size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
