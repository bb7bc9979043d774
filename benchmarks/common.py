"""What every benchmark script shares: where results go and how they are written."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_gguf_writer(path: str, file_type, *, n_layers: int, context: int, dim: int, ffn_dim: int, n_heads: int,
                      n_kv_heads: int, head_dim: int, vocab: int, rope_theta: float = 10000.0, norm_eps: float = 1e-5):
    """A gguf.GGUFWriter for a llama-architecture file, its shape keys written as llama.cpp's converter writes them."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_file_type(file_type)
    w.add_block_count(n_layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(norm_eps)
    w.add_vocab_size(vocab)
    return w


def save_result(result: dict, path: str, show: bool = True) -> None:
    """Write a benchmark's result as JSON (the ratios docs/performance.md quotes), and print it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if show:
        print(json.dumps(result, indent=1))
