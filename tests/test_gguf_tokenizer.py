"""GGUF tokenizers rebuilt as tokenizer.json: they encode like transformers' own GGUF tokenizer; unsupported ones
are one-line errors."""

import json

import pytest

from hpc_llama.checkpoint import gguf_tokenizer
from hpc_llama.errors import HpcLlamaError
from hpc_llama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")


def rebuilt(tok: dict) -> bytes:
    return gguf_tokenizer.tokenizer_json(tok, "test.gguf").encode()


def write_vocab_gguf(path, tok: dict, **flags):
    """A vocab-only GGUF of a tokenizer.json's byte-level BPE (no tensors), as transformers can read it."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 4),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 16)):
        add(value)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in flags.items():
        w.add_bool(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": True}])
def test_bos_and_eos_where_the_file_asks(tokenizer_json, tmp_path, flags):
    """add_bos_token / add_eos_token become the post-processor transformers builds (a byte-level vocabulary
    adds nothing unless asked); hpc_llama encodes without it and adds BOS itself."""
    from transformers import AutoTokenizer

    from hpc_llama.checkpoint.gguf import _tokenizer_fields

    path = write_vocab_gguf(tmp_path / "v.gguf", json.loads(open(tokenizer_json).read()), **flags)
    tok = _tokenizer_fields(gguf.GGUFReader(str(path)), str(path))
    ours = Tokenizer(rebuilt(tok), len(tok["tokens"]))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    for text in ("def main():\n    pass", "", "<s>x</s>"):
        assert ours.encode(text, special=True) == ref.encode(text), text
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    bos, eos = flags.get("add_bos_token", False), flags.get("add_eos_token", False)
    assert ours.encode("", special=True) == [1] * bos + [2] * eos


def test_added_tokens_as_transformers_adds_them():
    """Control tokens and the named BOS/EOS/UNK/PAD are special, user-defined ones plain added tokens; in a
    byte-level vocabulary none spelled outside the byte alphabet (a llama.cpp mislabel no text can reach)."""
    tokens = ["a", "b", "ab", "<eos>", "<ctl>", "<user>", "<c t l>", "<u s e r>", "\u0120x"]
    tok = {"model": "gpt2", "tokens": tokens, "token_type": [1, 1, 1, 1, 3, 4, 3, 4, 3], "merges": ["a b"],
           "eos_token_id": 3}
    added = {t["content"]: (t["id"], t["special"]) for t in json.loads(rebuilt(tok))["added_tokens"]}
    assert added == {"<eos>": (3, True), "<ctl>": (4, True), "<user>": (5, False), "\u0120x": (8, True)}


BASE = {"model": "gpt2", "pre": "default", "tokens": ["a", "b", "ab"], "token_type": [1, 1, 1], "merges": ["a b"]}


@pytest.mark.parametrize("change, message", [
    ({"model": "llama"}, "m.gguf: GGUF tokenizer model 'llama' is not supported (only byte-level BPE, 'gpt2'); "
                         "convert the HF original instead"),
    ({"pre": "deepseek-coder"}, "m.gguf: GGUF pre-tokenizer 'deepseek-coder' is not supported (default, gpt2, smollm, "
                                "llama-bpe)"),
    ({"merges": ["a b c d", "ab"]}, "m.gguf: GGUF tokenizer.ggml.merges has an entry that is not two tokens"),
    ({"add_eos_token": 1, "eos_token_id": 2}, "m.gguf: GGUF metadata tokenizer.ggml.add_eos_token is not a bool"),
])
def test_unsupported_tokenizer_is_one_line(change, message):
    with pytest.raises(HpcLlamaError) as e:
        gguf_tokenizer.tokenizer_json(dict(BASE, **change), "m.gguf")
    assert str(e.value) == message
