"""Tiny vision-language models built with transformers' config classes and save_pretrained, the
text CausalLM of their family, and re-keying of saved checkpoints into every Hub key layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file, save_file

from checkpoints import load_folder

#: family → the layouts found on the Hub; the first is what transformers 5's save_pretrained writes
LAYOUTS = {
    "llava": ("transformers5", "original", "transformers4.52"),
    "llava_next": ("transformers5", "original", "transformers4.52"),
    "qwen2_vl": ("original", "transformers4.52"),
    "qwen2_5_vl": ("original", "transformers4.52"),
}
IMAGE_TOKEN = 64  # the first row only the vision-language model has, as on the Hub
VISION_START = 65

# re-keying from what save_pretrained writes: (pattern, replacement) applied in order, first match wins
_REKEY = {
    ("llava", "original"): [(r"^vision_tower\.", "vision_tower.vision_model.")],
    ("llava", "transformers4.52"): [
        (r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
        (r"^vision_tower\.", "model.vision_tower.vision_model."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."), (r"^image_newline$", "model.image_newline"),
    ],
    ("qwen2_vl", "transformers4.52"): [(r"^model\.", "model.language_model."), (r"^visual\.", "model.visual.")],
}


# what save_pretrained writes for a parameter transformers 5 names internally
_SAVED = {
    "llava": [(r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
              (r"^model\.vision_tower\.", "vision_tower."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^model\.image_newline$", "image_newline")],
    "qwen2_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
}


def _kind(family: str) -> str:
    return "llava" if family.startswith("llava") else "qwen2_vl"


def hub_name(internal: str, family: str, layout: str) -> str:
    """The name a parameter of transformers' model has in a checkpoint of ``layout``."""
    for pattern, replacement in _SAVED[_kind(family)]:
        if re.search(pattern, internal):
            return rekey(re.sub(pattern, replacement, internal), family, layout)
    return rekey(internal, family, layout)


def rekey(name: str, family: str, layout: str) -> str:
    for pattern, replacement in _REKEY.get((_kind(family), layout), ()):
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def rewrite_layout(folder: Path, family: str, layout: str) -> None:
    """Rename the tensors of a single-file checkpoint saved by transformers into ``layout``."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rekey(n, family, layout): t for n, t in tensors.items()}, str(path), metadata={"format": "pt"})


def text_config(family: str, hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                intermediate: int = 32, vocab: int = 64, tied: bool = False) -> T.PretrainedConfig:
    cls = T.LlamaConfig if family.startswith("llava") else T.Qwen2Config
    return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               head_dim=hidden // heads, max_position_embeddings=128, tie_word_embeddings=tied)


def vlm_config(family: str, text: T.PretrainedConfig) -> T.PretrainedConfig:
    """A vision-language config around ``text`` (its language model's settings)."""
    if family.startswith("llava"):
        vision = T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=16, patch_size=4, projection_dim=8)
        if family == "llava":
            return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                 tie_word_embeddings=text.tie_word_embeddings)
        return T.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                 image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]],
                                 tie_word_embeddings=text.tie_word_embeddings)
    half = text.head_dim // 2  # multimodal rotary sections over (time, height, width)
    text_dict = {k: v for k, v in text.to_dict().items() if k not in ("architectures", "model_type")}
    text_dict["rope_scaling"] = {"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
    common = dict(text_config=text_dict, image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 2,
                  vision_start_token_id=VISION_START, vision_end_token_id=IMAGE_TOKEN + 3,
                  tie_word_embeddings=text.tie_word_embeddings)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=16, hidden_size=text.hidden_size, num_heads=2, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
        return T.Qwen2VLConfig(vision_config=vision, **common)
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=text.hidden_size, fullatt_block_indexes=[1], window_size=8)
    return T.Qwen2_5_VLConfig(vision_config=vision, **common)


VLM_CLASSES = {
    "llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def vlm_class(family: str):
    return getattr(T, VLM_CLASSES[family])


def language_pairs(vlm) -> list[tuple[str, str]]:
    """(VLM parameter, text-model parameter) names of the language backbone, as transformers names them."""
    pairs = [(f"model.language_model.{n}", f"model.{n}") for n, _ in vlm.model.language_model.named_parameters()]
    return pairs + [("lm_head.weight", "lm_head.weight")]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_text(folder: Path, config, seed: int, like: dict | None = None, scale: float = 0.02,
               dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A text CausalLM of the family; with ``like``, a fine-tune of it (``like`` plus noise)."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).to(dtype)
    if like is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                source = like.get(name, like["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
                p.copy_(source.float() + torch.randn(p.shape) * scale)
    model.save_pretrained(folder)
    return state(model)


def build_vlm(folder: Path, family: str, config, seed: int, like: dict, layout: str | None = None,
              scale: float = 0.02, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A vision-language model whose language backbone is a fine-tune of the text model ``like``
    (its rows beyond ``like``'s vocabulary are new), saved in ``layout``."""
    torch.manual_seed(seed)
    model = vlm_class(family)(config).to(dtype)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for vname, tname in language_pairs(model):
            source = like.get(tname)
            if source is None and tname == "lm_head.weight":
                source = like["model.embed_tokens.weight"]
            p = params[vname]
            rows = min(p.shape[0], source.shape[0]) if p.dim() else None
            target = p[:rows] if rows is not None else p
            target.copy_(source[:rows].float() + torch.randn(target.shape) * scale)
    model.save_pretrained(folder)
    if layout is not None:
        rewrite_layout(folder, family, layout)
    return state(model)


def image_inputs(model, family: str) -> dict:
    """A batch of one prompt with one image: pixel values plus as many image tokens as the model
    makes features from them."""
    torch.manual_seed(0)
    if family == "llava":
        pixels = {"pixel_values": torch.randn(1, 3, 16, 16)}
    elif family == "llava_next":
        pixels = {"pixel_values": torch.randn(1, 3, 3, 16, 16), "image_sizes": torch.tensor([[16, 32]])}
    else:
        grid = torch.tensor([[1, 4, 4]])
        pixels = {"pixel_values": torch.randn(16, 3 * 2 * 2 * 2), "image_grid_thw": grid}
    dtype = next(model.parameters()).dtype
    pixels["pixel_values"] = pixels["pixel_values"].to(dtype)
    with torch.no_grad():
        feats = model.model.get_image_features(**pixels)
    feats = getattr(feats, "pooler_output", feats)
    n = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0]
    prompt = [1, 5, 7] + ([VISION_START] if family.startswith("qwen") else [])
    ids = torch.tensor([prompt + [IMAGE_TOKEN] * n + [9, 11, 3]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    if family.startswith("qwen"):  # modality of each token, for the multimodal rotary positions
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    return inputs


# Every tensor of a saved model folder, sharded or not.
file_tensors = load_folder
