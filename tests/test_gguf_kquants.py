"""K-quant GGUF files made by llama.cpp itself (tests/data/gguf, see make_kquants.py there), read by us.

The gguf package cannot write K-quants, so test_gguf.py cannot make them; these
files were quantized by llama.cpp's `llama_model_quantize` from a seeded random
F32 Llama that `make_kquants.source_tensors()` regenerates. Per file: the
tensor types are llama.cpp's mix; each tensor we read is `gguf.quants.dequantize`
of its bytes with the Q/K rows put back, and that dequantization is llama.cpp's
own, bit for bit (hashes in the manifest); the error against the F32 source is
what its bit width allows; our logits equal transformers' GGUF loader, and are
llama.cpp's own up to llama.cpp's quantization of activations.
"""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from helpers.run import run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
_spec = importlib.util.spec_from_file_location("make_kquants", os.path.join(DATA, "make_kquants.py"))
kq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kq)
with open(os.path.join(DATA, kq.MANIFEST)) as _f:
    MANIFEST = json.load(_f)

# llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) for this model, as (default type, {role: type}):
# one layer, so use_more_bits() holds for layer 0 and the _M mixes give attn_v and ffn_down more bits;
# 2 heads on 1 KV head (n_gqa 2 < 4: Q2_K's attn_v is Q3_K, not Q4_K); an untied output, which takes
# Q6_K in every K mix. Norms stay F32.
MIXES = {
    "Q2_K": ("Q2_K", {"attn_v": "Q3_K", "attn_output": "Q3_K", "ffn_down": "Q3_K", "output": "Q6_K"}),
    "Q3_K_S": ("Q3_K", {"output": "Q6_K"}),
    "Q3_K_M": ("Q3_K", {"attn_v": "Q5_K", "attn_output": "Q4_K", "ffn_down": "Q4_K", "output": "Q6_K"}),
    "Q3_K_L": ("Q3_K", {"attn_v": "Q5_K", "attn_output": "Q5_K", "ffn_down": "Q5_K", "output": "Q6_K"}),
    "Q4_K_S": ("Q4_K", {"attn_v": "Q5_K", "output": "Q6_K"}),
    "Q4_K_M": ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}),
    "Q5_K_S": ("Q5_K", {"output": "Q6_K"}),
    "Q5_K_M": ("Q5_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}),
    "Q6_K": ("Q6_K", {}),
    "Q8_0": ("Q8_0", {}),
}

# Relative RMS error of a dequantized tensor against its F32 source (Gaussian weights, no imatrix), per
# stored type, as (low, high): measured over every tensor of that type in all ten files, min-max (count):
# Q2_K 0.2948-0.2988 (5), Q3_K 0.1501-0.1521 (21), Q4_K 0.0709-0.0719 (15), Q5_K 0.0359-0.0363 (19),
# Q6_K 0.0176-0.0179 (21), Q8_0 0.00533-0.00539 (9): about halved by each bit. The ranges below are those
# widened by 10% each way; they do not overlap, so a tensor's error names its bit width.
RELATIVE_ERROR = {"F32": (0.0, 0.0), "Q2_K": (0.265, 0.33), "Q3_K": (0.135, 0.167), "Q4_K": (0.064, 0.079),
                  "Q5_K": (0.032, 0.04), "Q6_K": (0.0158, 0.0197), "Q8_0": (0.0048, 0.0059)}


def _path(ftype):
    return os.path.join(DATA, kq.file_name(ftype))


def _role(gguf_name):
    return gguf_name.split(".")[-2]  # blk.0.attn_v.weight -> attn_v, output.weight -> output


def _relative_error(got, want):
    return float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2) / np.mean(want.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def source():
    tensors = kq.source_tensors()
    assert kq.source_sha256(tensors) == MANIFEST["source_sha256"], "numpy no longer draws the recorded source"
    return tensors


@pytest.fixture(scope="module")
def source_gguf(source, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kq") / "tiny-llama-F32.gguf")
    kq.write_source(path, source)
    return path


def test_fixtures_are_the_recorded_files():
    assert sorted(MANIFEST["files"]) == sorted(kq.file_name(f) for f in kq.FTYPES) == sorted(
        f for f in os.listdir(DATA) if f.endswith(".gguf"))
    for name, rec in MANIFEST["files"].items():
        with open(os.path.join(DATA, name), "rb") as f:
            data = f.read()
        assert len(data) == rec["bytes"] and hashlib.sha256(data).hexdigest() == rec["sha256"], name


@pytest.mark.parametrize("ftype", kq.FTYPES)
def test_tensor_types_are_llama_cpps_mix(ftype):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.gguf import our_name

    default, special = MIXES[ftype]
    with open_checkpoint(_path(ftype)) as r:
        got = {t.name: r.info(our_name(t.name)).attrs["gguf_type"] for t in gguf.GGUFReader(_path(ftype)).tensors}
    want = {name: "F32" if _role(name).endswith("norm") else special.get(_role(name), default) for name in got}
    assert got == want
    assert len(got) == 12 and len(set(got.values()) - {"F32"}) == 1 + len(set(special.values()) - {default})


@pytest.mark.parametrize("ftype", kq.FTYPES)
def test_tensors_are_llama_cpps_dequantization(ftype, source):
    """Bit for bit what llama.cpp dequantizes, Q/K rows unpermuted, and within the type's error of the source."""
    from gguf.quants import dequantize

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.gguf import our_name, unpermute

    recorded = MANIFEST["files"][kq.file_name(ftype)]["tensors"]
    with open_checkpoint(_path(ftype)) as r:
        for t in gguf.GGUFReader(_path(ftype)).tensors:
            got = r.read(our_name(t.name)).numpy()
            kind = t.tensor_type.name
            if kind == "F32":
                stored = np.asarray(t.data).reshape(got.shape)
            else:
                stored = dequantize(np.asarray(t.data), t.tensor_type).reshape(got.shape)
                assert hashlib.sha256(stored.astype("<f4").tobytes()).hexdigest() == \
                    recorded[t.name]["llama_cpp_dequant_sha256"], f"{t.name}: not llama.cpp's dequantization"
            if t.name.endswith("attn_q.weight"):
                stored = unpermute(stored, kq.N_HEADS)
            elif t.name.endswith("attn_k.weight"):
                stored = unpermute(stored, kq.N_KV_HEADS)
            assert np.array_equal(got, stored), t.name
            low, high = RELATIVE_ERROR[kind]
            assert low <= _relative_error(got, source[t.name]) <= high, (t.name, kind)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q4_K_M", "Q6_K"])
def test_logits_equal_transformers_gguf_loader(ftype):
    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    ref = LlamaForCausalLM.from_pretrained(DATA, gguf_file=kq.file_name(ftype), dtype=torch.float32).eval()
    with open_checkpoint(_path(ftype)) as r:
        ours = load_slice(r)
    ids = torch.randint(3, kq.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ftype", ("F32",) + kq.FTYPES)
def test_logits_are_llama_cpps_own(ftype, source_gguf):
    """llama.cpp's own forward pass over the same file (recorded by make_kquants.py, float32 KV cache).

    On the F32 source they agree to 2.2e-6 (max abs; logits are O(1)): the Q/K row order is llama.cpp's.
    On quantized files ggml's CPU matmul also rounds the activations to 8 bits (Q8_K / Q8_0), so they
    differ by 0.034 (Q8_0) to 0.051 (Q3_K_L) — while the same files differ from the F32 source's logits
    by 0.035 (Q8_0), 0.15 (Q6_K), 0.52 (Q4_K_M) and 1.5 (Q2_K).
    """
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    with open_checkpoint(source_gguf if ftype == "F32" else _path(ftype)) as r:
        model = load_slice(r)
    with torch.no_grad():
        ours = model(torch.tensor([kq.PROMPT]))[0].numpy()
    theirs = np.load(os.path.join(DATA, kq.LOGITS))[ftype]
    assert np.abs(ours - theirs).max() <= (1e-5 if ftype == "F32" else 0.08)


def test_score_reads_a_k_quant_file(tmp_path):
    """`score` on Q4_K_M, end to end: the log-likelihoods transformers' GGUF loader gives the same tokens."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    name = kq.file_name("Q4_K_M")
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
