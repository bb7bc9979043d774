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
}

# The tiny model of configs/tiny-train.yaml, smaller still, so a training step takes milliseconds.
TINY = ["--config", "tiny-train", "--set", "model.vocab_size=512", "--set", "model.dim=64",
        "--set", "train.seq_len=64", "--set", "train.micro_batch=4", "--set", "train.global_batch=16",
        "--set", "train.warmup_steps=5", "--set", "train.lr=0.003"]


def make_hf_model(name: str, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIGS[name])).to(dtype).eval()
    # HF initialises norms to one; random norms make the parity tests see them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model
