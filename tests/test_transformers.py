"""Real formats: tiny models built with transformers' config classes and save_pretrained, merged
through the CLI, load back into transformers and run a forward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints import load_folder  # noqa: E402

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def build(folder, family: str, tied: bool, seed: int, base_state=None, shard: str = "40KB"):
    cfg = FAMILIES[family](
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tied,
        head_dim=8,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    if base_state is not None:  # a "fine-tune": the base plus a small task vector
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name].float() + torch.randn(p.shape) * 0.01)
    model.save_pretrained(folder, max_shard_size=shard)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fusion", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", False), ("qwen2", True), ("qwen3", False)])
def test_merged_model_loads_and_runs(tmp_path, family, tied):
    base = build(tmp_path / "base", family, tied, 0)
    ft1 = build(tmp_path / "ft1", family, tied, 1, base)
    ft2 = build(tmp_path / "ft2", family, tied, 2, base, shard="1GB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()  # really sharded
    (tmp_path / "merge.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
        "  - model: ./ft1\n    parameters: {weight: 0.7}\n  - model: ./ft2\n    parameters: {weight: 0.3}\n")
    result = run_cli("merge", "merge.yaml", "-o", "out", "--shard-size", "50KB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout

    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = load_folder(tmp_path / "out")
    for name, b in base.items():
        if name not in merged:  # a tied lm_head is not saved
            assert tied and name == "lm_head.weight"
            continue
        bf = b.float()
        expected = bf + 0.7 * (ft1[name].float() - bf) + 0.3 * (ft2[name].float() - bf)
        torch.testing.assert_close(merged[name].float(), expected.to(torch.bfloat16).float(),
                                   rtol=2 ** -7, atol=1e-6, msg=name)
    with torch.no_grad():
        logits = model(torch.arange(10).unsqueeze(0)).logits
    assert logits.shape == (1, 10, 96) and torch.isfinite(logits).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model_relation: merge" in card and "task_arithmetic" in card
