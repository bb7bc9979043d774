"""K-quant GGUF files made by llama.cpp itself (tests/data/gguf, see make_kquants.py there), read by us.

The gguf package cannot write K-quants, so test_gguf.py cannot make them; these
files were quantized by llama.cpp's `llama_model_quantize` from seeded random
F32 models that `make_kquants.source_tensors()` regenerates, one per
architecture in `make_kquants.MODELS`: llama (ten mixes), qwen2 (q/k/v biases,
tied; Q4_K_M, Q6_K) and qwen3 (q/k norms, heads of 128 on dim 256, tied;
Q4_K_M). Per file: the tensor types are
llama.cpp's mix; each tensor we read is `gguf.quants.dequantize` of its bytes
(Q/K rows put back for llama), and that dequantization is llama.cpp's own, bit
for bit (hashes in the manifest); the error against the F32 source is what its
bit width allows; our logits equal transformers' GGUF loader, and are
llama.cpp's own up to llama.cpp's quantization of activations (and to fp32
rounding without it: llama.cpp over its own dequantization of the file).
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from helpers.kquants import DATA, MANIFEST, kq
from helpers.run import run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")


FILES = [(arch, ftype) for arch, m in kq.MODELS.items() for ftype in m.ftypes]

# llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for these models, as (default type, {role: type}):
# one layer, so use_more_bits() holds for layer 0 and the _M mixes give attn_v and ffn_down more bits.
# llama: 2 heads on 1 KV head (n_gqa 2 < 4: Q2_K's attn_v is Q3_K, not Q4_K); an untied output, which
# takes Q6_K in every K mix. qwen2 and qwen3 are tied, and llama.cpp quantizes a tied token_embd as the
# output. Norms and biases stay F32.
_Q4_K_M = ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"})
MIXES = {
    ("llama", "Q2_K"): ("Q2_K", {"attn_v": "Q3_K", "attn_output": "Q3_K", "ffn_down": "Q3_K", "output": "Q6_K"}),
    ("llama", "Q3_K_S"): ("Q3_K", {"output": "Q6_K"}),
    ("llama", "Q3_K_M"): ("Q3_K", {"attn_v": "Q5_K", "attn_output": "Q4_K", "ffn_down": "Q4_K", "output": "Q6_K"}),
    ("llama", "Q3_K_L"): ("Q3_K", {"attn_v": "Q5_K", "attn_output": "Q5_K", "ffn_down": "Q5_K", "output": "Q6_K"}),
    ("llama", "Q4_K_S"): ("Q4_K", {"attn_v": "Q5_K", "output": "Q6_K"}),
    ("llama", "Q4_K_M"): _Q4_K_M,
    ("llama", "Q5_K_S"): ("Q5_K", {"output": "Q6_K"}),
    ("llama", "Q5_K_M"): ("Q5_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}),
    ("llama", "Q6_K"): ("Q6_K", {}),
    ("llama", "Q8_0"): ("Q8_0", {}),
    ("qwen2", "Q4_K_M"): ("Q4_K", {**_Q4_K_M[1], "token_embd": "Q6_K"}),
    ("qwen2", "Q6_K"): ("Q6_K", {}),
    ("qwen3", "Q4_K_M"): ("Q4_K", {**_Q4_K_M[1], "token_embd": "Q6_K"}),
}

# Relative RMS error of a dequantized tensor against its F32 source (Gaussian weights, no imatrix), per
# stored type, as (low, high): measured over every tensor of that type in all ten llama files, min-max
# (count): Q2_K 0.2948-0.2988 (5), Q3_K 0.1501-0.1521 (21), Q4_K 0.0709-0.0719 (15), Q5_K 0.0359-0.0363
# (19), Q6_K 0.0176-0.0179 (21), Q8_0 0.00533-0.00539 (9): about halved by each bit. The ranges below are
# those widened by 10% each way; they do not overlap, so a tensor's error names its bit width. The qwen
# files fall inside: Q4_K 0.0710-0.0716 (10), Q6_K 0.0176-0.0178 (14).
RELATIVE_ERROR = {"F32": (0.0, 0.0), "Q2_K": (0.265, 0.33), "Q3_K": (0.135, 0.167), "Q4_K": (0.064, 0.079),
                  "Q5_K": (0.032, 0.04), "Q6_K": (0.0158, 0.0197), "Q8_0": (0.0048, 0.0059)}

# Largest difference of our logits from llama.cpp's on a quantized file: ggml's CPU matmul rounds the
# activations to 8 bits (Q8_K / Q8_0), which we do not (llama.cpp's logits from the F32 file of its own
# dequantization differ from those by the same amounts, and from ours by at most 4.3e-6). Measured: llama 0.034 (Q8_0) to 0.051 (Q3_K_L);
# qwen2 0.082 (Q6_K) and 0.087 (Q4_K_M); qwen3 0.097 (Q4_K_M).
QUANTIZED_COMPUTE = {"llama": 0.08, "qwen2": 0.15, "qwen3": 0.15}


def _path(arch, ftype):
    return os.path.join(DATA, kq.file_name(arch, ftype))


def _role(gguf_name):
    return gguf_name.split(".")[-2]  # blk.0.attn_v.weight -> attn_v, output.weight -> output


def _relative_error(got, want):
    return float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2) / np.mean(want.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def sources():
    out = {}
    for arch, m in kq.MODELS.items():
        out[arch] = kq.source_tensors(m)
        assert kq.source_sha256(out[arch]) == MANIFEST["models"][arch]["source_sha256"], \
            f"numpy no longer draws the recorded {arch} source"
    return out


@pytest.fixture(scope="module")
def source_gguf(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")

    def path(arch):
        p = root / kq.file_name(arch, "F32")
        if not p.exists():
            kq.write_source(str(p), kq.MODELS[arch], sources[arch])
        return str(p)

    return path


def test_fixtures_are_the_recorded_files():
    assert sorted(MANIFEST["models"]) == sorted(kq.MODELS)
    assert sorted(MANIFEST["files"]) == sorted(kq.file_name(*f) for f in FILES) == sorted(
        f for f in os.listdir(DATA) if f.endswith(".gguf"))
    for arch, ftype in FILES:
        rec = MANIFEST["files"][kq.file_name(arch, ftype)]
        with open(_path(arch, ftype), "rb") as f:
            data = f.read()
        assert (rec["arch"], rec["ftype"]) == (arch, ftype)
        assert len(data) == rec["bytes"] and hashlib.sha256(data).hexdigest() == rec["sha256"], (arch, ftype)


@pytest.mark.parametrize("arch", list(kq.MODELS))
def test_config_is_the_architectures(arch):
    """What llama.cpp's metadata and tensors say: shape, head_dim, tying, biases, q/k norms, rope, eps."""
    from hpc_llama.checkpoint import open_checkpoint

    m = kq.MODELS[arch]
    with open_checkpoint(_path(arch, m.ftypes[0])) as r:
        c = r.config
    assert (c.model_type, c.vocab_size, c.dim, c.ffn_dim, c.n_layers) == (arch, kq.VOCAB, kq.DIM, kq.FFN, kq.N_LAYERS)
    assert (c.n_heads, c.n_kv_heads, c.head_dim) == (m.n_heads, m.n_kv_heads, m.head_dim)
    assert (c.tie_embeddings, c.qkv_bias, c.qk_norm) == (m.tied, m.qkv_bias, m.qk_norm)
    assert c.rope_theta == m.rope_theta and c.norm_eps == pytest.approx(m.norm_eps, rel=1e-6)  # stored as f32


@pytest.mark.parametrize("arch, ftype", FILES)
def test_tensor_types_are_llama_cpps_mix(arch, ftype, sources):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.gguf import our_name

    default, special = MIXES[arch, ftype]
    path = _path(arch, ftype)
    with open_checkpoint(path) as r:
        got = {t.name: r.info(our_name(t.name)).attrs["gguf_type"] for t in gguf.GGUFReader(path).tensors}
    assert sorted(got) == sorted(sources[arch])  # a tied model has no output.weight
    want = {name: "F32" if name.endswith(".bias") or _role(name).endswith("norm") else special.get(_role(name), default)
            for name in got}
    assert got == want
    assert len(set(got.values()) - {"F32"}) == 1 + len(set(special.values()) - {default})


@pytest.mark.parametrize("arch, ftype", FILES)
def test_tensors_are_llama_cpps_dequantization(arch, ftype, sources):
    """Bit for bit what llama.cpp dequantizes, Q/K rows unpermuted for llama only, and within the type's error
    of the source."""
    from gguf.quants import dequantize

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.gguf import our_name, unpermute

    m, path = kq.MODELS[arch], _path(arch, ftype)
    recorded = MANIFEST["files"][kq.file_name(arch, ftype)]["tensors"]
    with open_checkpoint(path) as r:
        for t in gguf.GGUFReader(path).tensors:
            got = r.read(our_name(t.name)).numpy()
            kind = t.tensor_type.name
            if kind == "F32":
                stored = np.asarray(t.data).reshape(got.shape)
            else:
                stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(got.shape)
                assert hashlib.sha256(stored.astype("<f4").tobytes()).hexdigest() == \
                    recorded[t.name]["llama_cpp_dequant_sha256"], f"{t.name}: not llama.cpp's dequantization"
            if arch == "llama" and t.name.endswith("attn_q.weight"):
                stored = unpermute(stored, m.n_heads)
            elif arch == "llama" and t.name.endswith("attn_k.weight"):
                stored = unpermute(stored, m.n_kv_heads)
            assert np.array_equal(got, stored), t.name
            low, high = RELATIVE_ERROR[kind]
            assert low <= _relative_error(got, sources[arch][t.name]) <= high, (t.name, kind)


@pytest.mark.parametrize("arch, ftype", [("llama", "Q2_K"), ("llama", "Q4_K_M"), ("llama", "Q6_K"),
                                         ("qwen2", "Q4_K_M"), ("qwen2", "Q6_K"), ("qwen3", "Q4_K_M")])
def test_logits_equal_transformers_gguf_loader(arch, ftype):
    """Qwen2ForCausalLM and Qwen3ForCausalLM too: transformers' loader takes Qwen3's head_dim from its
    config class (128), not from attention.key_length, so these heads are 128."""
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    ref = AutoModelForCausalLM.from_pretrained(DATA, gguf_file=kq.file_name(arch, ftype), dtype=torch.float32).eval()
    with open_checkpoint(_path(arch, ftype)) as r:
        assert r.hf_config["architectures"] == [type(ref).__name__]
        ours = load_slice(r)
    ids = torch.randint(3, kq.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4  # measured 0


@pytest.mark.parametrize("arch, ftype", [(arch, "F32") for arch in kq.MODELS] + FILES)
def test_logits_are_llama_cpps_own(arch, ftype, source_gguf):
    """llama.cpp's own forward pass over the same file (recorded by make_kquants.py, float32 KV cache), and
    for a quantized file over an F32 file of llama.cpp's own dequantization of it.

    On the F32 source they agree to 2.2e-6 (llama), 3.9e-6 (qwen2), 3.8e-6 (qwen3) (max abs; logits are
    O(1)): the Q/K row order, qwen2's biases, qwen3's q/k norms and head_dim are llama.cpp's.
    On quantized files ggml's CPU matmul also rounds the activations to 8 bits (QUANTIZED_COMPUTE) — while
    the same llama files differ from the F32 source's logits by 0.035 (Q8_0), 0.15 (Q6_K), 0.52 (Q4_K_M)
    and 1.5 (Q2_K); qwen2's by 0.21 (Q6_K) and 0.55 (Q4_K_M), qwen3's by 0.82 (Q4_K_M). Without that
    rounding, llama.cpp over its own dequantization of a quantized file, they agree as on F32: 2.0e-6 to
    3.1e-6 (llama), 3.3e-6 (qwen2), 4.3e-6 (qwen3): every tensor of every mix is read as llama.cpp reads it.
    """
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    with open_checkpoint(source_gguf(arch) if ftype == "F32" else _path(arch, ftype)) as r:
        model = load_slice(r)
    with torch.no_grad():
        ours = model(torch.tensor([kq.PROMPT]))[0].numpy()
    recorded = np.load(os.path.join(DATA, kq.LOGITS))
    theirs = recorded[kq.logits_key(arch, ftype)]
    assert np.abs(ours - theirs).max() <= (1e-5 if ftype == "F32" else QUANTIZED_COMPUTE[arch])
    if ftype != "F32":
        assert np.abs(ours - recorded[kq.logits_key(arch, ftype, dequantized=True)]).max() <= 1e-5


def test_score_reads_a_k_quant_file(tmp_path):
    """`score` on Q4_K_M, end to end: the log-likelihoods transformers' GGUF loader gives the same tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    name = kq.file_name("llama", "Q4_K_M")
    texts = ["the cat in there", "héllo wörld 2024"]
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_cli("score", "--model", os.path.join(DATA, name), "--input", docs, "--output", tmp_path / "s.jsonl",
            "--quiet", check=True)
    got = [json.loads(x) for x in open(tmp_path / "s.jsonl")]
    tok = AutoTokenizer.from_pretrained(DATA, gguf_file=name)
    ref = LlamaForCausalLM.from_pretrained(DATA, gguf_file=name, dtype=torch.float32).eval()
    assert len(got) == len(texts)
    for rec, text in zip(got, texts):
        ids = [1] + tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
        want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
        assert rec["n_tokens"] == len(ids) - 1
        assert abs(rec["loglik"] - want) <= 1e-4  # measured 1.1e-6 and 6.7e-7 on sums of about -70 and -109
