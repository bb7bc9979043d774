"""Tiny models: random HF Llamas (the numerical reference) and the flags of the tiny training model."""

from __future__ import annotations

import torch

# Tiny reference configurations in HF's own field names. Each exercises a
# different part of the architecture.
HF_CONFIGS = {
    # Llama 2 style: multi-head attention, default rope.
    "llama2": dict(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                   max_position_embeddings=256, rope_theta=10000.0),
    # Llama 3 style: grouped-query attention, theta 500000 and llama3 rope scaling
    # (original context 32 so the scaling changes frequencies the tests reach).
    "llama3": dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                   max_position_embeddings=512, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Tied embeddings, head_dim not equal to hidden/heads, linear rope scaling.
    "tied": dict(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                 max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Biases on attention and MLP projections (some Llama derivatives).
    "bias": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 max_position_embeddings=256, attention_bias=True, mlp_bias=True),
    # Llama 3.2: llama3 rope scaling (factor 32) with tied embeddings.
    "llama32": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                    max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Mistral: a sliding window (16) shorter than the sequences the tests use, head_dim apart.
    "mistral": dict(model_type="mistral", vocab_size=320, hidden_size=64, intermediate_size=160,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                    rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0, sliding_window=16),
    # Qwen2.5: biases on q/k/v only, tied embeddings, the window on its top layers only.
    "qwen2": dict(model_type="qwen2", vocab_size=320, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=True,
                  use_sliding_window=True, sliding_window=12, max_window_layers=2),
    # Qwen3: per-head q/k RMSNorm, head_dim apart from hidden/heads, untied.
    "qwen3": dict(model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=1000000.0,
                  tie_word_embeddings=False),
}
FAMILIES = ("llama32", "mistral", "qwen2", "qwen3")
"""The configs of the families other than Llama 2/3 (each its own HF class)."""

# The tiny model of configs/tiny-train.yaml, smaller still, so a training step takes milliseconds.
TINY = ["--config", "tiny-train", "--set", "model.vocab_size=512", "--set", "model.dim=64",
        "--set", "train.seq_len=64", "--set", "train.micro_batch=4", "--set", "train.global_batch=16",
        "--set", "train.warmup_steps=5", "--set", "train.lr=0.003"]


def hf_config(name: str, **overrides):
    """The transformers config object of one of HF_CONFIGS (Llama unless it names its model_type)."""
    from transformers import AutoConfig

    kw = dict(HF_CONFIGS[name], **overrides)
    return AutoConfig.for_model(kw.pop("model_type", "llama"), **kw)


def make_hf_model(name: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random model of the family's own transformers class (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides)).to(dtype).eval()
    # HF initialises norms to one and biases to zero; random ones make the parity tests see them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model
