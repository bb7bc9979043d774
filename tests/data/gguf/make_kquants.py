"""Make the K-quant GGUF fixtures beside this file with llama.cpp's own quantizer.

The gguf package cannot write K-quants, so these files come from llama.cpp:
a tiny random model per entry of MODELS (seeded numpy, written as F32 by the
gguf package the way llama.cpp's HF converter writes its architecture: for
llama, Q/K rows permuted) is quantized by `llama_model_quantize` into each of
its mixes. The F32 sources are not checked in (2 MB each);
`source_tensors(model)` regenerates one from its seed, and the manifest's
`models.<arch>.source_sha256` says whether it still does.

The manifest (kquants.json) also holds, per tensor, the sha256 of llama.cpp's
own dequantization (ggml's `to_float` for the tensor's type), so the tests can
hold `gguf.quants.dequantize` to llama.cpp without llama.cpp installed; and
llama_cpp_logits.npz holds the logits llama.cpp itself computes from each file
(and from its F32 source) for PROMPT, float32 KV cache, so the tests can show
that we read the files as llama.cpp does (Q/K row order included). On a
quantized file ggml's matmul also rounds the activations to 8 bits, so the
npz holds too llama.cpp's logits from an F32 file of its own dequantization of
each quantized one: the same weights without that rounding.

Shape: every row is a whole number of K-quant blocks (256), so no tensor falls
back to a 32-block type: dim 256, ffn 256, heads of 128 (llama and qwen2: 2 on
1 KV head; qwen3: 4 on 1). One layer keeps the files small (llama's ten 3.5 MB
together, qwen2's two and qwen3's one 1.1 MB); with one layer llama.cpp's
`use_more_bits` holds for layer 0, so the _M mixes still give it more bits.

Made with llama-cpp-python 0.3.36 (the llama.cpp vendored in it, built from the
sdist on CPU: about 12 minutes on 2 cores), gguf 0.19.0, numpy 2.4.6, Python
3.11, in a venv of its own that the tests do not need (the manifest records the
versions). Quantization is deterministic: a second run gave identical bytes.

    python -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install llama-cpp-python==0.3.36 numpy gguf==0.19.0
    /tmp/llcpp/bin/python tests/data/gguf/make_kquants.py
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, FFN, N_LAYERS = 256, 256, 1
CONTEXT = 256
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: pad, bos, eos
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "r")]
K_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
MANIFEST = "kquants.json"
LOGITS = "llama_cpp_logits.npz"
"""llama.cpp's own logits for PROMPT, by `logits_key(arch, ftype[, dequantized])` (ftype "F32": the source)."""
PROMPT = [1, 126, 136, 200, 251, 12, 40, 217, 250, 68, 84, 229]  # BOS, then random ids


@dataclass(frozen=True)
class Tiny:
    """One tiny model: its GGUF architecture, seed, attention shape, and the mixes llama.cpp makes of it."""

    arch: str
    seed: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    ftypes: tuple[str, ...]
    tied: bool = False
    """No output.weight: the head is token_embd (llama.cpp then quantizes token_embd as the output)."""
    qkv_bias: bool = False
    """Qwen2's biases on the q, k and v projections."""
    qk_norm: bool = False
    """Qwen3's per-head RMSNorm of q and k (attn_q_norm, attn_k_norm: head_dim weights each)."""


# llama: untied, Q/K rows permuted, all ten mixes. qwen2 and qwen3 as their small released models are:
# tied, theta 1e6, eps 1e-6; Qwen2 with q/k/v biases, Qwen3 with q/k norms and heads of 128 that are not
# dim / n_heads (4 x 128 on dim 256, as Qwen3-0.6B's 16 x 128 on 1024), so only attention.key_length
# gives head_dim. Q4_K_M is the mix people run; Q6_K (every matrix in one type) only for qwen2: qwen3's
# would add 0.5 MB for no type its Q4_K_M file lacks.
MODELS = {
    "llama": Tiny("llama", 20261201, n_heads=2, n_kv_heads=1, head_dim=128, rope_theta=10000.0, norm_eps=1e-5,
                  ftypes=K_MIXES),
    "qwen2": Tiny("qwen2", 20261202, n_heads=2, n_kv_heads=1, head_dim=128, rope_theta=1e6, norm_eps=1e-6,
                  ftypes=("Q4_K_M", "Q6_K"), tied=True, qkv_bias=True),
    "qwen3": Tiny("qwen3", 20261203, n_heads=4, n_kv_heads=1, head_dim=128, rope_theta=1e6, norm_eps=1e-6,
                  ftypes=("Q4_K_M",), tied=True, qk_norm=True),
}


def file_name(arch: str, ftype: str) -> str:
    return f"tiny-{arch}-{ftype}.gguf"


def logits_key(arch: str, ftype: str, dequantized: bool = False) -> str:
    """dequantized: llama.cpp's logits from an F32 file of its own dequantization of the ftype file."""
    return f"{arch}-{ftype}" + ("-dequantized" if dequantized else "")


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, in byte order (what a byte-level BPE's first 256 tokens are)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tokenizer() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types (3 control, 1 normal) and merges of a minimal byte-level BPE."""
    tokens = SPECIALS + byte_tokens() + [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


VOCAB = len(tokenizer()[0])


def source_tensors(m: Tiny) -> dict[str, np.ndarray]:
    """The F32 ground truth of model `m` by GGUF name, in HF row order (Q/K not permuted), shape (out, in)."""
    rng = np.random.default_rng(m.seed)

    def linear(n_out, n_in):  # unit-variance activations in, O(1) out: logits far above fp32 rounding
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n=DIM):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):  # as large as the projection's output, so a bias dropped or misplaced shows in the logits
        return (0.5 * rng.standard_normal(n)).astype(np.float32)

    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    # A tied embedding is also the head: rows of norm 1 keep its logits O(1), as linear() does for an output.
    embd = rng.standard_normal((VOCAB, DIM)) / (np.sqrt(DIM) if m.tied else 1)
    out = {"token_embd.weight": embd.astype(np.float32)}
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = norm()
        out[p + "attn_q.weight"] = linear(q, DIM)
        out[p + "attn_k.weight"] = linear(kv, DIM)
        out[p + "attn_v.weight"] = linear(kv, DIM)
        if m.qkv_bias:
            out[p + "attn_q.bias"], out[p + "attn_k.bias"], out[p + "attn_v.bias"] = bias(q), bias(kv), bias(kv)
        if m.qk_norm:
            out[p + "attn_q_norm.weight"], out[p + "attn_k_norm.weight"] = norm(m.head_dim), norm(m.head_dim)
        out[p + "attn_output.weight"] = linear(DIM, q)
        out[p + "ffn_norm.weight"] = norm()
        out[p + "ffn_gate.weight"] = linear(FFN, DIM)
        out[p + "ffn_up.weight"] = linear(FFN, DIM)
        out[p + "ffn_down.weight"] = linear(DIM, FFN)
    out["output_norm.weight"] = norm()
    if not m.tied:
        out["output.weight"] = linear(VOCAB, DIM)
    return out


def source_sha256(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(tensors[name], "<f4").tobytes())
    return h.hexdigest()


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order, as its HF-to-GGUF converter writes it (tests/test_gguf.py's `_permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_source(path: str, m: Tiny, tensors: dict[str, np.ndarray], permuted: bool = False) -> None:
    """Model `m` as F32 GGUF, with the keys and row order llama.cpp's converter gives its architecture.

    permuted: the tensors are in llama.cpp's row order already (read from one of its files)."""
    import gguf

    w = gguf.GGUFWriter(path, m.arch)
    w.add_name(f"tiny-{m.arch}-kquants")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(N_LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)
    if m.arch == "llama":  # conversion/llama.py's LlamaModel adds these; the Qwen2/Qwen3 converters do not
        w.add_rope_dimension_count(m.head_dim)
        w.add_vocab_size(VOCAB)
    if m.arch == "qwen3":  # base.py's TextModel, for an HF config with head_dim (every Qwen3's)
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    tokens, types, merges = tokenizer()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    for name, a in tensors.items():
        if m.arch == "llama" and not permuted and name.endswith("attn_q.weight"):  # only llama's rope
            a = permute(a, m.n_heads)                                                # rotates adjacent pairs
        elif m.arch == "llama" and not permuted and name.endswith("attn_k.weight"):
            a = permute(a, m.n_kv_heads)
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def llama_cpp_dequantize(lib, raw: np.ndarray, type_id: int, n: int) -> np.ndarray:
    """ggml's own `to_float` for a GGML type (ggml-base's reference dequantization), via ctypes."""
    import ctypes

    class Traits(ctypes.Structure):  # struct ggml_type_traits, ggml.h
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]

    lib.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = lib.ggml_get_type_traits(type_id).contents
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)(traits.to_float)
    src = np.ascontiguousarray(raw)
    out = np.empty(n, np.float32)
    to_float(src.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out


def describe(path: str, lib) -> dict:
    """Per tensor: its type and the sha256 of llama.cpp's dequantization of its stored bytes (float32, LE)."""
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(path).tensors:
        n = int(np.prod(t.shape))
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            out[t.name] = {"type": t.tensor_type.name}
            continue
        deq = llama_cpp_dequantize(lib, np.asarray(t.data), int(t.tensor_type), n)
        out[t.name] = {"type": t.tensor_type.name, "llama_cpp_dequant_sha256": hashlib.sha256(deq.tobytes()).hexdigest()}
    return out


def write_dequantized(path: str, quantized: str, m: Tiny, lib) -> None:
    """An F32 GGUF of llama.cpp's own dequantization (ggml's to_float) of every tensor of `quantized`."""
    from gguf import GGUFReader

    tensors = {}
    for t in GGUFReader(quantized).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        raw = np.asarray(t.data)
        if t.tensor_type.name != "F32":
            raw = llama_cpp_dequantize(lib, raw, int(t.tensor_type), int(np.prod(shape)))
        tensors[t.name] = raw.reshape(shape)
    write_source(path, m, tensors, permuted=True)


def llama_cpp_logits(path: str) -> np.ndarray:
    """(len(PROMPT), VOCAB) logits of llama.cpp's own forward pass over PROMPT, with a float32 KV cache."""
    import llama_cpp

    llm = llama_cpp.Llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    try:
        llm.eval(PROMPT)
        return np.array(llm.scores[:len(PROMPT)], np.float32)
    finally:
        llm.close()


def main() -> None:
    import ctypes

    import llama_cpp

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml_base = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    manifest = {"made_with": {"llama_cpp_python": llama_cpp.__version__, "gguf": _version("gguf"),
                              "numpy": np.__version__, "python": sys.version.split()[0]},
                "models": {}, "files": {}}
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, m in MODELS.items():
            tensors = source_tensors(m)
            manifest["models"][arch] = {"seed": m.seed, "source_sha256": source_sha256(tensors)}
            src = os.path.join(tmp, file_name(arch, "F32"))
            write_source(src, m, tensors)
            logits[logits_key(arch, "F32")] = llama_cpp_logits(src)
            for ftype in m.ftypes:
                name = file_name(arch, ftype)
                out = os.path.join(HERE, name)
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
                params.nthread = 2
                rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params))
                if rc != 0:
                    raise SystemExit(f"llama_model_quantize {arch} {ftype} failed: {rc}")
                manifest["files"][name] = {"arch": arch, "ftype": ftype, "bytes": os.path.getsize(out),
                                           "sha256": sha256_file(out), "tensors": describe(out, ggml_base)}
                logits[logits_key(arch, ftype)] = llama_cpp_logits(out)
                dequantized = os.path.join(tmp, name)
                write_dequantized(dequantized, out, m, ggml_base)
                logits[logits_key(arch, ftype, dequantized=True)] = llama_cpp_logits(dequantized)
    np.savez(os.path.join(HERE, LOGITS), **logits)
    with open(os.path.join(HERE, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    for name, rec in manifest["files"].items():
        types = sorted({t["type"] for t in rec["tensors"].values()})
        print(f"{name:32} {rec['bytes']:8d} {' '.join(types)}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
