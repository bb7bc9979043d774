"""GGUF tokenizers rebuilt as tokenizer.json: real vocabularies (llama.cpp's vocab-only test files) encode like
transformers' own GGUF tokenizer and like llama.cpp's expected ids; unsupported ones are one-line errors."""

import json
import lzma
from pathlib import Path
from types import SimpleNamespace

import pytest

from hpc_llama.checkpoint import gguf_tokenizer
from hpc_llama.errors import HpcLlamaError
from hpc_llama.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")

DATA = Path(__file__).parent / "data" / "gguf-vocab"
SEPARATOR = "\n__ggml_vocab_test__\n"  # between llama.cpp's test strings; each string is followed by one


def rebuilt(tok: dict) -> bytes:
    return gguf_tokenizer.tokenizer_json(tok, "test.gguf").encode()


def read_vocab_tests(name: str) -> tuple[list[str], list[list[int]]]:
    """llama.cpp's test strings for a vocabulary and the ids it expects for each (no BOS)."""
    raw = (DATA / f"{name}.inp").read_text(encoding="utf-8")
    assert raw.endswith(SEPARATOR)
    texts = raw[:-len(SEPARATOR)].split(SEPARATOR)
    lines = (DATA / f"{name}.out").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(texts)
    return texts, [[int(i) for i in line.split()] for line in lines]


@pytest.fixture(scope="module", params=["llama-spm", "qwen2"])
def vocab(request, tmp_path_factory):
    """A real tokenizer three ways: ours (from the metadata as hpc_llama reads it), transformers' GGUF one,
    and llama.cpp's expected ids for its test strings."""
    from transformers import AutoTokenizer, Qwen2Tokenizer

    from hpc_llama.checkpoint.gguf import _tokenizer_fields, read_header

    name = f"ggml-vocab-{request.param}.gguf"
    # The class AutoTokenizer picks for the file. For a qwen2 file AutoTokenizer first reads the whole config
    # through the gguf package's reader (10-40 s here); asked directly, the class builds the same tokenizer.
    reference = {"llama-spm": AutoTokenizer, "qwen2": Qwen2Tokenizer}[request.param]
    where = tmp_path_factory.mktemp(request.param)
    (where / name).write_bytes(lzma.decompress((DATA / f"{name}.xz").read_bytes()))
    tok = _tokenizer_fields(read_header(str(where / name))[0], name)
    texts, expected = read_vocab_tests(name)
    spec = rebuilt(tok)
    return SimpleNamespace(name=request.param, tok=tok, texts=texts, expected=expected, spec=json.loads(spec),
                           ours=Tokenizer(spec, len(tok["tokens"])),
                           ref=reference.from_pretrained(str(where), gguf_file=name))


# transformers builds Llama 2's SentencePiece tokenizer with a Metaspace pre-tokenizer, which puts no '▁' in
# front of a text that already starts with a space; llama.cpp does (as SentencePiece's dummy prefix does):
# ' Hello' is [29871, 15043] there, [15043] here. A tokenizer.json whose normalizer always prepends '▁' (as
# Llama 2's own has it) gives llama.cpp's ids for all 46 texts; we follow transformers.
DISAGREE_WITH_LLAMA_CPP = {"llama-spm": lambda text: text.startswith(" "), "qwen2": lambda text: False}


def test_vocab_tests_are_read_whole(vocab):
    assert len(vocab.texts) == 46 and vocab.texts[0] == "ied 4 ½ months" and "" in vocab.texts
    assert sum(map(len, vocab.expected)) > 300


def test_encodes_like_transformers_gguf_tokenizer(vocab):
    for text in vocab.texts:
        assert vocab.ours.encode(text) == vocab.ref.encode(text, add_special_tokens=False), text
        # with the file's own special tokens: BOS in front for SentencePiece, nothing for Qwen2
        assert vocab.ours.encode(text, special=True) == vocab.ref.encode(text), text
    if vocab.name == "llama-spm":  # control tokens in the text are matched whole, and no '▁' goes after one
        assert vocab.ours.encode("<s>hi</s>", special=True) == vocab.ref.encode("<s>hi</s>") == [1, 1, 2918, 2]


def test_encodes_like_llama_cpp_where_transformers_does(vocab):
    disagree = [text for text, want in zip(vocab.texts, vocab.expected)
                if vocab.ref.encode(text, add_special_tokens=False) != want]
    assert disagree == [t for t in vocab.texts if DISAGREE_WITH_LLAMA_CPP[vocab.name](t)]
    for text, want in zip(vocab.texts, vocab.expected):
        if text not in disagree:
            assert vocab.ours.encode(text) == want, text


def test_decodes_like_transformers(vocab):
    for text in vocab.texts:
        ids = vocab.ours.encode(text)
        ours, ref = vocab.ours.decode(ids), vocab.ref.decode(ids)
        assert ours == ref, text
        assert (ours == text) == (vocab.ref.decode(vocab.ref.encode(text, add_special_tokens=False)) == text)
    if vocab.name == "llama-spm":  # the leading space of the 15 texts above is lost both ways
        assert sum(vocab.ours.decode(vocab.ours.encode(t)) != t for t in vocab.texts) == 15
    else:
        assert all(vocab.ours.decode(vocab.ours.encode(t)) == t for t in vocab.texts)


def test_same_vocabulary_merges_and_special_tokens_as_transformers(vocab):
    ours = vocab.spec
    ref = json.loads(vocab.ref.backend_tokenizer.to_str())
    assert ours["model"]["vocab"] == ref["model"]["vocab"]
    assert ours["model"]["merges"] == ref["model"]["merges"]  # for SentencePiece: derived from the scores
    assert ({t["content"]: (t["id"], t["special"]) for t in ours["added_tokens"]}
            == {t["content"]: (t["id"], t["special"]) for t in ref["added_tokens"]})
    assert (ours["model"]["byte_fallback"], ours["model"]["fuse_unk"]) == (vocab.name == "llama-spm",) * 2


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

    from hpc_llama.checkpoint.gguf import _tokenizer_fields, read_header

    path = write_vocab_gguf(tmp_path / "v.gguf", json.loads(open(tokenizer_json).read()), **flags)
    tok = _tokenizer_fields(read_header(str(path))[0], str(path))
    ours = Tokenizer(rebuilt(tok), len(tok["tokens"]))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    for text in ("def main():\n    pass", "", "<s>x</s>"):
        assert ours.encode(text, special=True) == ref.encode(text), text
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    bos, eos = flags.get("add_bos_token", False), flags.get("add_eos_token", False)
    assert ours.encode("", special=True) == [1] * bos + [2] * eos


def test_sentencepiece_adds_bos_unless_told_not_to():
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "a", "\u2581a"]
    tok = {"model": "llama", "tokens": tokens, "scores": [0.0] * 259 + [-1.0, -2.0, -3.0],
           "token_type": [2, 3, 3] + [6] * 256 + [1] * 3, "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}
    ours = Tokenizer(rebuilt(tok), len(tokens))
    assert ours.encode("a a", special=True) == [1, 261, 261]
    assert ours.encode("a\u00e9") == [261, 3 + 0xC3, 3 + 0xA9]  # é is not in the vocabulary: its UTF-8 bytes
    assert ours.decode(ours.encode("a\u00e9 a")) == "a\u00e9 a"
    ours = Tokenizer(rebuilt(dict(tok, add_bos_token=False)), len(tokens))
    assert ours.encode("a a", special=True) == [261, 261]


def test_added_tokens_as_transformers_adds_them():
    """Control tokens and the named BOS/EOS/UNK/PAD are special, user-defined ones plain added tokens; in a
    byte-level vocabulary none spelled outside the byte alphabet (a llama.cpp mislabel no text can reach)."""
    tokens = ["a", "b", "ab", "<eos>", "<ctl>", "<user>", "<c t l>", "<u s e r>", "\u0120x"]
    tok = {"model": "gpt2", "tokens": tokens, "token_type": [1, 1, 1, 1, 3, 4, 3, 4, 3], "merges": ["a b"],
           "eos_token_id": 3}
    added = {t["content"]: (t["id"], t["special"]) for t in json.loads(rebuilt(tok))["added_tokens"]}
    assert added == {"<eos>": (3, True), "<ctl>": (4, True), "<user>": (5, False), "\u0120x": (8, True)}
    tok = dict(tok, model="llama", scores=[0.0] * len(tokens))
    added = {t["content"]: (t["id"], t["special"]) for t in json.loads(rebuilt(tok))["added_tokens"]}
    assert added == {"<eos>": (3, True), "<ctl>": (4, True), "<user>": (5, False), "<c t l>": (6, True),
                     "<u s e r>": (7, False), "\u0120x": (8, True)}


BASE = {"model": "gpt2", "pre": "default", "tokens": ["a", "b", "ab"], "token_type": [1, 1, 1], "merges": ["a b"]}


@pytest.mark.parametrize("change, message", [
    ({"model": "bert"}, "m.gguf: GGUF tokenizer model 'bert' is not supported (byte-level BPE 'gpt2', SentencePiece "
                        "'llama'); convert the HF original instead"),
    ({"pre": "deepseek-coder"}, "m.gguf: GGUF pre-tokenizer 'deepseek-coder' is not supported (default, gpt2, smollm, "
                                "llama-bpe, qwen2, deepseek-r1-qwen)"),
    ({"model": "llama", "pre": "llama-bpe", "scores": [0.0] * 3},
     "m.gguf: GGUF pre-tokenizer 'llama-bpe' is not supported with the SentencePiece model 'llama' (default)"),
    ({"model": "llama", "merges": None}, "m.gguf: GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges "
                                         "nor tokenizer.ggml.scores"),
    ({"model": "llama", "merges": None, "scores": [0.0, 1.0]},
     "m.gguf: GGUF metadata tokenizer.ggml.scores is not a list of 3 finite numbers (one per token)"),
    ({"merges": ["a b c d", "ab"]}, "m.gguf: GGUF tokenizer.ggml.merges has an entry that is not two tokens"),
    ({"add_eos_token": 1, "eos_token_id": 2}, "m.gguf: GGUF metadata tokenizer.ggml.add_eos_token is not a bool"),
])
def test_unsupported_tokenizer_is_one_line(change, message):
    with pytest.raises(HpcLlamaError) as e:
        gguf_tokenizer.tokenizer_json(dict(BASE, **change), "m.gguf")
    assert str(e.value) == message
