"""Build tiny stand-ins for the VisCodex recipe (a Qwen2.5 text base, a code fine-tune of it and a
Qwen2.5-VL whose language model is another fine-tune) and a config that merges them.

    python examples/tiny_viscodex.py tiny      # needs transformers
    fusion plan tiny/viscodex.yaml
    fusion merge tiny/viscodex.yaml -o tiny/merged
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as T

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
VLM_VOCAB, TEXT_VOCAB = 136, 128  # the VLM's extra rows hold its image and video tokens


def fine_tune(model, like: dict, seed: int) -> None:
    """Make ``model`` a fine-tune of the text model ``like``: its values plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    names = {n: n for n in like}
    if hasattr(model.model, "language_model"):  # the VLM's language model lines up with model.*
        names = {f"model.language_model.{n[len('model.'):]}": n for n in like if n.startswith("model.")}
        names["lm_head.weight"] = "lm_head.weight"
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, source in names.items():
            p = params[name]
            rows = min(p.shape[0], like[source].shape[0])
            p[:rows] = like[source][:rows] + torch.randn(p[:rows].shape, generator=gen) * 0.02


def main(folder: str) -> None:
    root = Path(folder)
    torch.manual_seed(0)
    base = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=TEXT_VOCAB, **TEXT)).to(torch.bfloat16)
    base.save_pretrained(root / "Qwen2.5-base")
    like = {n: p.detach().clone() for n, p in base.named_parameters()}
    code = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=TEXT_VOCAB, **TEXT)).to(torch.bfloat16)
    fine_tune(code, like, 1)
    code.save_pretrained(root / "Qwen2.5-Coder")
    vlm = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VLM_VOCAB, bos_token_id=132, eos_token_id=132, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **TEXT),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], window_size=8),
        image_token_id=128, video_token_id=129, vision_start_token_id=130, vision_end_token_id=131)).to(torch.bfloat16)
    fine_tune(vlm, like, 2)
    vlm.save_pretrained(root / "Qwen2.5-VL")
    recipe = (Path(__file__).parent / "viscodex.yaml").read_text()
    for hub, local in [("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL"), ("Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen2.5-Coder"),
                       ("Qwen/Qwen2.5-7B", "Qwen2.5-base")]:
        recipe = recipe.replace(hub, f"./{local}")
    (root / "viscodex.yaml").write_text(recipe)
    print(f"wrote {root}/: Qwen2.5-base, Qwen2.5-Coder, Qwen2.5-VL and viscodex.yaml")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
