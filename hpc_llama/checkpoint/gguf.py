"""llama.cpp's GGUF, read for Llama-architecture models.

A GGUF file is one more checkpoint format: every job can read it, and each
rank dequantizes only the tensors of its own layers. Quantized tensors
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants) become float32; F32, F16 and
BF16 keep their dtype. Two things differ from an HF checkpoint and are undone
here, the one place that knows about them:

- llama.cpp stores the rows of the Q and K projections permuted, so that its
  rotary embedding can rotate adjacent pairs; our rotary layout (HF's) rotates
  the two halves of each head. `unpermute` puts the rows back.
- The tokenizer is a list of tokens, merges and token types inside the file;
  `tokenizer_json` rebuilds the `tokenizer.json` that `tokenizers` reads, and
  the chat template goes into `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import HpcLlamaError
from ..model.llama import ModelConfig
from .base import TableReader
from .hf import hf_config_from_model
from .tensors import TensorInfo, numpy_view

# GGUF tensor names -> ours.
_LAYER_PARTS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# Kept as stored; anything else listed here is dequantized to float32.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# End-of-turn tokens by name. GGUF files of chat models often name only one EOS
# (SmolLM2-Instruct's is <|im_start|>); llama.cpp also stops at these, and so do we.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# Pre-tokenizers by tokenizer.ggml.pre, as llama.cpp defines them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe")


def our_name(gguf_name: str) -> str | None:
    """Our name for a GGUF tensor; None for one we do not know."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_PARTS:
        return f"layers.{parts[1]}.{_LAYER_PARTS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (pair, 2) back to (2, half)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint(TableReader):
    """A GGUF file of a Llama-architecture model, read tensor by tensor."""

    def __init__(self, path: str):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise HpcLlamaError("reading GGUF needs the gguf package: pip install gguf") from None
        self.path, self.format = path, "gguf"
        try:
            self._r = GGUFReader(path)
        except (ValueError, OSError, IndexError) as e:
            raise HpcLlamaError(f"{path}: not a readable GGUF file ({e})") from None
        self.meta = {k: _value(f) for k, f in self._r.fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise HpcLlamaError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self._tensors, infos = {}, {}
        for t in self._r.tensors:
            name = our_name(t.name)
            if name is None:
                if t.name == "rope_freqs.weight":
                    raise HpcLlamaError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1 style) "
                                        f"are not supported")
                raise HpcLlamaError(f"{path}: unexpected tensor {t.name!r} in a Llama GGUF")
            kind = t.tensor_type.name
            if kind not in _PLAIN and kind not in QUANTIZED:
                raise HpcLlamaError(f"{path}: tensor {t.name} has quantization type {kind}, which is not "
                                    f"supported (F32, F16, BF16, {', '.join(QUANTIZED)})")
            dtype = _PLAIN.get(kind, "float32")
            shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
            nbytes = int(np.prod(shape)) * (2 if dtype in ("float16", "bfloat16") else 4)
            self._tensors[name] = t
            infos[name] = TensorInfo(name, shape, dtype, nbytes, path, int(t.data_offset),
                                           attrs={"gguf_type": kind})
        self._set_table(infos)
        self.tokenizer = _tokenizer_fields(self._r)
        self.config = self._model_config()
        self.hf_config = hf_config_from_model(self.config)

    def _model_config(self) -> ModelConfig:
        m = self.meta

        def need(key):
            if f"llama.{key}" not in m:
                raise HpcLlamaError(f"{self.path}: GGUF metadata lacks llama.{key}")
            return m[f"llama.{key}"]

        n_heads = int(need("attention.head_count"))
        dim = int(need("embedding_length"))
        vocab = m.get("llama.vocab_size") or self._infos["tok_embeddings.weight"].shape[0]
        scaling = None
        kind = m.get("llama.rope.scaling.type")
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(m["llama.rope.scaling.factor"])}
        elif kind not in (None, "none"):
            raise HpcLlamaError(f"{self.path}: rope scaling {kind!r} is not supported (none or linear)")
        head_dim = m.get("llama.attention.key_length") or m.get("llama.rope.dimension_count") or dim // n_heads
        try:
            return ModelConfig(
                vocab_size=int(vocab), dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
                n_kv_heads=int(m.get("llama.attention.head_count_kv", n_heads)), head_dim=int(head_dim),
                ffn_dim=int(need("feed_forward_length")),
                norm_eps=float(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(m.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
                max_seq_len=int(m.get("llama.context_length", 2048)),
                tie_embeddings="output.weight" not in self._infos,
                attention_bias="layers.0.attention.wq.bias" in self._infos,
                mlp_bias="layers.0.feed_forward.w1.bias" in self._infos,
                bos_id=self.tokenizer.get("bos_token_id"), eos_ids=self._eos_ids())
        except (TypeError, ValueError) as e:
            raise HpcLlamaError(f"{self.path}: invalid model metadata: {e}") from None

    def _eos_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        ids = [tok[k] for k in ("eos_token_id", "eot_token_id") if tok.get(k) is not None]
        tokens, types = tok.get("tokens") or [], tok.get("token_type") or []
        ids += [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and t in _END_OF_TURN]
        return tuple(dict.fromkeys(int(i) for i in ids))

    def read_into(self, name: str, out: torch.Tensor, verify: bool = True) -> None:
        from gguf.quants import dequantize

        info = self._check_out(name, out)
        t = self._tensors[name]
        kind = info.attrs["gguf_type"]
        if kind in _PLAIN:
            data = np.asarray(t.data).view(numpy_view(out).dtype).reshape(info.shape)
        else:
            data = dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape)
        cfg = self.config
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            data = unpermute(data, cfg.n_heads)
        elif name.endswith(("attention.wk.weight", "attention.wk.bias")):
            data = unpermute(data, cfg.n_kv_heads)
        numpy_view(out)[...] = data

    def assets(self) -> dict[str, bytes]:
        tok = self.tokenizer
        if not tok.get("tokens"):
            return {}
        out = {"tokenizer.json": tokenizer_json(tok, self.path).encode()}
        tokens = tok["tokens"]

        def token(key):
            i = tok.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                  "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
                  "add_bos_token": bool(tok.get("add_bos_token", True)),
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if tok.get("chat_template"):
            config["chat_template"] = tok["chat_template"]
        out["tokenizer_config.json"] = json.dumps(config, indent=1).encode()
        eos = list(self.config.eos_ids)
        out["generation_config.json"] = json.dumps(
            {"bos_token_id": self.config.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}).encode()
        return out

    def fingerprint(self) -> str:
        import xxhash

        st = os.stat(self.path)
        return xxhash.xxh3_64(f"gguf:{os.path.abspath(self.path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()

    def close(self):
        self._r = None


def _value(field):
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def _tokenizer_fields(reader) -> dict:
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml."):]] = _value(f)
        elif key == "tokenizer.chat_template":
            out["chat_template"] = _value(f)
    return out


def tokenizer_json(tok: dict, path: str = "") -> str:
    """The tokenizer.json of a GGUF's byte-level BPE tokenizer (llama.cpp's 'gpt2' model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = tok.get("model"), tok.get("pre") or "default"
    if kind != "gpt2":
        raise HpcLlamaError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                            f"convert the HF original instead")
    if pre not in PRE_TOKENIZERS:
        raise HpcLlamaError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = tok["tokens"]
    types = tok.get("token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in tok.get("merges") or []]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    if pre == "smollm":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False), byte_level])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return bpe.to_str()
