"""llama.cpp's GGUF, read for the llama, qwen2 and qwen3 architectures.

A GGUF file is one more checkpoint format: every job can read it, and each
rank dequantizes only the tensors of its own layers. Quantized tensors
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants) become float32; F32, F16 and
BF16 keep their dtype. Three things differ from an HF checkpoint and are undone
here, the one place that knows about them:

- For the llama architecture (Llama, Mistral, SmolLM2, TinyLlama...) llama.cpp
  stores the rows of the Q and K projections permuted, so that its rotary
  embedding can rotate adjacent pairs; our rotary layout (HF's) rotates the two
  halves of each head. `unpermute` puts the rows back. Qwen files keep HF's order.
- Llama 3.1/3.2's rope scaling is a tensor of per-frequency factors
  (`rope_freqs`) rather than metadata; `llama3_scaling` finds the llama3
  parameters that give exactly those factors, so the model is an ordinary
  llama3-scaled one (and exports as such).
- The tokenizer is a list of tokens, merges and token types inside the file;
  `gguf_tokenizer.tokenizer_json` rebuilds the `tokenizer.json` that `tokenizers`
  reads, and the chat template goes into `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..errors import HpcLlamaError
from ..model.llama import InvalidModelConfig, ModelConfig
from .base import TableReader, shown
from .gguf_tokenizer import CONTROL, tokenizer_json
from .hf import config_error, hf_config_from_model
from .tensors import DTYPES, TensorInfo, numpy_view, read_exact

# GGUF tensor names -> ours.
_LAYER_PARTS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
}
# general.architecture values read; each is also our model_type (llama.cpp writes Mistral as llama).
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}

# Kept as stored; anything else listed here is dequantized to float32.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Rows are read and dequantized this many output bytes at a time (whole heads when unpermuting): the gguf
# package's dequantize allocates its result and, before concatenating them, one piece per group of 16 rows,
# so its temporaries are twice what it is given. Given a piece, they never grow with the tensor.
PIECE_BYTES = 8 << 20

# End-of-turn tokens by name. GGUF files of chat models often name only one EOS
# (SmolLM2-Instruct's is <|im_start|>); llama.cpp also stops at these, and so do we.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>")



# Our ModelConfig fields -> the metadata keys they come from (under the architecture's prefix), so an
# error names the key in the file.
_GGUF_KEYS = {"vocab_size": "vocab_size", "dim": "embedding_length", "n_layers": "block_count",
              "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv",
              "head_dim": "attention.key_length", "ffn_dim": "feed_forward_length",
              "norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
              "rope_scaling": "rope.scaling", "max_seq_len": "context_length"}
_TOKEN_KEYS = {"bos_id": "tokenizer.ggml.bos_token_id", "eos_ids": "tokenizer.ggml.eos_token_id"}

# Limits on the Python objects a header makes us build (a string per token, a tuple per tensor) before
# anything is known about the model: far above real models (Llama 3.1 405B has 1138 tensors; Gemma 3's
# tokenizer has 3 arrays of 262144 entries), far below what a small file could claim.
MAX_TENSORS = 1 << 16
MAX_ARRAY_ITEMS = 1 << 21
"""Entries of all metadata arrays together."""
# GGUFValueType -> struct code (scalars), and the two kinds that are not scalars.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a GGUF file's tensor table."""

    name: str
    dims: tuple[int, ...]
    """As GGUF lists them: the fastest-varying dimension first."""
    kind: Any
    """gguf.GGMLQuantizationType."""
    offset: int
    """Of the first byte, from the start of the file."""
    nbytes: int


def read_header(path: str) -> tuple[dict, list[StoredTensor]]:
    """A GGUF file's metadata (key -> value) and tensor table, every count, length, shape and offset checked
    against the file's size before it is believed.

    Values are what the gguf package's `GGUFReader(path).fields[key].contents()` gives for the same file
    (int, float, bool, str, or a list of them; a text that is not UTF-8 reads as None), but only the header
    is read, in one walk, and an array of numbers becomes a list in one step rather than an object per entry:
    the package takes about 2 s over SmolLM2's 49,152-token vocabulary and 6-10 s over Qwen2's 151,936, this
    0.05 s and 0.15 s. The package also believes every count (an array claiming 2**63 entries past the end
    of the file keeps it looping and allocating), and so would we without the checks.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bad(what):
        return HpcLlamaError(f"{path}: corrupt GGUF file ({what})")

    def unreadable(what):
        return HpcLlamaError(f"{path}: not a readable GGUF file ({what})")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise bad("shorter than its header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        version = struct.unpack_from("<I", buf, 4)[0]
        order = "<" if version & 0xFFFF else ">"  # a file of the other byte order, as the gguf package guesses it
        if order == ">":
            version = struct.unpack_from(">I", buf, 4)[0]
        if version not in (2, 3):
            raise unreadable(f"version {version}, not 2 or 3")
        pos = 8
        budget = MAX_ARRAY_ITEMS

        def take(code):
            nonlocal pos
            n = struct.calcsize(code)
            if pos + n > size:
                raise bad("a field runs past the end of the file")
            (v,) = struct.unpack_from(order + code, buf, pos)
            pos += n
            return v

        def raw(n, what):
            nonlocal pos
            if n > size - pos:
                raise bad(f"{what} runs past the end of the file")
            pos += n
            return buf[pos - n:pos]

        def text(data):
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return None

        def value(kind, depth=0):
            # The value at pos, or None where the gguf package's contents() would raise (text that is not
            # UTF-8) or flattens what it holds (arrays of arrays, read by nothing here).
            nonlocal budget
            if kind in _SCALARS:
                return take(_SCALARS[kind])
            if kind == _STRING:
                return text(raw(take("Q"), "a string"))
            if kind != _ARRAY or depth >= 4:
                raise bad(f"unknown value type {kind}")
            item, n = take("I"), take("Q")
            budget -= n
            if budget < 0:
                raise bad(f"its metadata arrays hold over {MAX_ARRAY_ITEMS} entries")
            if item in _SCALARS:
                dtype = np.dtype(order + _SCALARS[item])
                return np.frombuffer(raw(n * dtype.itemsize, "an array"), dtype).tolist()
            if item == _STRING:
                strings = [raw(take("Q"), "an array") for _ in range(n)]
                try:
                    return [s.decode("utf-8") for s in strings]
                except UnicodeDecodeError:
                    return None
            for _ in range(n):
                value(item, depth + 1)
            return None

        n_tensors, n_kv = take("Q"), take("Q")
        if n_tensors > MAX_TENSORS:
            raise bad(f"it claims {n_tensors} tensors, more than {MAX_TENSORS}")
        meta, kinds = {}, {}
        for _ in range(n_kv):
            key = text(raw(take("Q"), "a key"))
            if key is None or key in meta:
                raise unreadable("a metadata key that is not UTF-8" if key is None else f"key {shown(key)} twice")
            kinds[key] = take("I")
            meta[key] = value(kinds[key])
        table = []
        for _ in range(n_tensors):
            name = text(raw(take("Q"), "a tensor name"))
            if name is None:
                raise unreadable("a tensor name that is not UTF-8")
            n_dims = take("I")
            if n_dims > 4:
                raise bad(f"tensor {shown(name)} has {n_dims} dimensions")
            dims = tuple(take("Q") for _ in range(n_dims))
            table.append((name, dims, take("I"), take("Q")))
        alignment = meta.get("general.alignment", 32)
        if "general.alignment" in meta and kinds["general.alignment"] != _UINT32:
            raise unreadable("general.alignment is not a uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise bad("general.alignment is not a power of two")
        start = pos + (-pos % alignment)
        tensors, names = [], set()
        for name, dims, kind, offset in table:
            try:
                kind = GGMLQuantizationType(kind)
                block, type_size = GGML_QUANT_SIZES[kind]
            except (ValueError, KeyError):
                raise bad(f"tensor {shown(name)} has unknown type {kind}") from None
            count = 1
            for d in dims:
                count *= d
            if dims and dims[0] % block:
                raise bad(f"tensor {shown(name)} has rows of {dims[0]}, not whole blocks of {block}")
            nbytes = count // block * type_size
            if start + offset + nbytes > size:
                raise bad(f"tensor {shown(name)} runs past the end of the file")
            if name in names:
                raise unreadable(f"tensor {shown(name)} twice")
            names.add(name)
            tensors.append(StoredTensor(name, dims, kind, start + offset, nbytes))
        return meta, tensors
    except struct.error:
        raise bad("truncated") from None
    finally:
        buf.close()


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


def llama3_scaling(cfg: ModelConfig, factors: np.ndarray) -> dict | None:
    """The llama3 rope_scaling whose frequencies are exactly inv_freq / factors (llama.cpp's rope_freqs).

    llama.cpp computes the factors from HF's llama3 parameters and keeps only them: 1 for short
    wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) between, where
    s = (old / wavelength - low) / (high - low). Two of the in-between factors give
    old / (high - low) and low / (high - low); with low = 1 (every Llama 3.x) that is all three.
    The result is checked: the frequencies it gives equal the file's to fp32 precision.
    """
    from ..model.llama import rope_frequencies

    base = rope_frequencies(replace(cfg, rope_scaling=None)).double().numpy()
    if not np.all(np.isfinite(factors)) or not np.all(factors > 0):
        raise ValueError("the factors must be positive and finite")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    wavelength = 2 * np.pi / base
    # s per in-between frequency, linear in 1 / wavelength: s = a / wavelength - b.
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    s = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    low, high = 1.0, 4.0  # Llama 3.x's own band, for what the factors leave open
    if middle.sum() >= 2:
        a, minus_b = np.polyfit(1 / wavelength[middle], s, 1)
        b = -minus_b
        old = round(a / b) if b > 0 else 8192  # low = 1 when the band's start allows it
        low, high = float(f"{b * old / a:.6g}"), float(f"{(b + 1) * old / a:.6g}")
    elif middle.sum() == 1:
        old = float(wavelength[middle][0] * (s[0] * (high - low) + low))
    else:
        # No frequency inside the band: any band between the last unscaled wavelength and the first
        # scaled one gives these factors (unscaled below old / high, scaled above old / low).
        above = 4 * float(wavelength[factors <= 1 + 1e-6].max(initial=0.0))
        below = float(wavelength[factors >= factor * (1 - 1e-6)].min())
        old = next((c for c in (8192, np.ceil(below) - 1) if above < c < below), (above + below) / 2)
    old = int(round(old)) if abs(old - round(old)) <= 1e-5 * old else float(old)  # fp32 factors: 31.9999993
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": high, "original_max_position_embeddings": old}
    try:
        got = rope_frequencies(replace(cfg, rope_scaling=scaling)).double().numpy()
    except InvalidModelConfig:  # the fit gave no valid band
        got = None
    if got is None or not np.allclose(got, base / factors, rtol=1e-5, atol=0):
        raise ValueError("the factors match no llama3 rope scaling (only llama3's per-frequency factors are "
                         "supported)")
    return scaling


class GGUFCheckpoint(TableReader):
    """A GGUF file of a llama, qwen2 or qwen3 architecture model, read tensor by tensor."""

    def __init__(self, path: str):
        try:
            import gguf.constants  # noqa: F401 -- tensor types and dequantization are the gguf package's
        except ImportError:
            raise HpcLlamaError("reading GGUF needs the gguf package: pip install gguf") from None
        self.path, self.format = path, "gguf"
        meta, tensors = read_header(path)
        self.meta = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise HpcLlamaError(f"{path}: GGUF architecture {shown(arch)} is not supported "
                                f"({', '.join(ARCHITECTURES)})")
        self.arch = arch
        experts = self.meta.get(f"{arch}.expert_count")
        if experts not in (None, 0):  # Mixtral-style files use the llama architecture with expert tensors
            raise HpcLlamaError(f"{path}: {arch}.expert_count {shown(experts)}: mixture of experts is not supported")
        # name -> (GGML type, byte offset, bytes) of what the file stores: tensors are read with pread, never
        # through a memory map, whose pages would stay in our RSS once touched (reading every tensor would
        # make the whole file resident).
        self._stored, infos, rope_freqs = {}, {}, None
        self._fd = self._assets = None
        for t in tensors:
            name = our_name(t.name)
            if name is None and t.name == "rope_freqs.weight" and arch == "llama":
                rope_freqs = t
                continue
            if name is None:
                raise HpcLlamaError(f"{path}: unexpected tensor {shown(t.name)} in a GGUF of architecture {arch}")
            kind = t.kind.name
            if kind not in _PLAIN and kind not in QUANTIZED:
                raise HpcLlamaError(f"{path}: tensor {t.name} has quantization type {kind}, which is not "
                                    f"supported (F32, F16, BF16, {', '.join(QUANTIZED)})")
            dtype = _PLAIN.get(kind, "float32")
            shape = tuple(reversed(t.dims))  # GGUF lists the fastest dimension first
            # Held by the file (read_header), up to the dequantization of a few bits into 32.
            nbytes = math.prod(shape) * (2 if dtype in ("float16", "bfloat16") else 4)
            self._stored[name] = (t.kind, t.offset, t.nbytes)
            infos[name] = TensorInfo(name, shape, dtype, nbytes, path, t.offset, attrs={"gguf_type": kind})
        self._set_table(infos)
        self.tokenizer = _tokenizer_fields(meta, path)
        self.config = self._model_config(rope_freqs)
        try:
            self.hf_config = hf_config_from_model(self.config)
        except HpcLlamaError as e:
            raise HpcLlamaError(f"{path}: {e}") from None

    def _key(self, key: str) -> str:
        return f"{self.arch}.{key}"

    def _model_config(self, rope_freqs) -> ModelConfig:
        m, key = self.meta, self._key

        def need(k):
            if key(k) not in m:
                raise HpcLlamaError(f"{self.path}: GGUF metadata lacks {key(k)}")
            return m[key(k)]

        scaling = None
        kind = m.get(key("rope.scaling.type"))
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": m.get(key("rope.scaling.factor"))}
        elif kind not in (None, "none"):
            raise HpcLlamaError(f"{self.path}: rope scaling {shown(kind)} is not supported (none or linear)")
        vocab = m.get(key("vocab_size"))
        if vocab is None and "tok_embeddings.weight" in self._infos:
            vocab = self._infos["tok_embeddings.weight"].shape[0]
        head_dim = m.get(key("attention.key_length")) or m.get(key("rope.dimension_count"))
        has = self._infos.__contains__
        # Biases: q/k/v ones alone are Qwen2's; the output projection's too is an attention bias.
        qkv_bias = has("layers.0.attention.wq.bias")
        attention_bias = has("layers.0.attention.wo.bias")
        try:
            cfg = ModelConfig(
                vocab_size=_integer(vocab), dim=_integer(need("embedding_length")),
                n_layers=_integer(need("block_count")), n_heads=_integer(need("attention.head_count")),
                n_kv_heads=_integer(m.get(key("attention.head_count_kv"))), head_dim=_integer(head_dim),
                ffn_dim=_integer(need("feed_forward_length")),
                norm_eps=_number(m.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
                rope_theta=_number(m.get(key("rope.freq_base"), 10000.0)), rope_scaling=scaling,
                max_seq_len=_integer(m.get(key("context_length"), 2048)),
                tie_embeddings="output.weight" not in self._infos,
                attention_bias=attention_bias, qkv_bias=qkv_bias and not attention_bias,
                mlp_bias=has("layers.0.feed_forward.w1.bias"), qk_norm=has("layers.0.attention.q_norm.weight"),
                model_type=self.arch,
                bos_id=self.tokenizer.get("bos_token_id"), eos_ids=self._eos_ids())
        except InvalidModelConfig as e:
            keys = {**{k: key(v) for k, v in _GGUF_KEYS.items()}, **_TOKEN_KEYS}
            raise config_error(self.path, e, keys) from None
        except (TypeError, ValueError) as e:
            raise HpcLlamaError(f"{self.path}: invalid model metadata: {e}") from None
        if rope_freqs is not None:
            if scaling is not None:
                raise HpcLlamaError(f"{self.path}: both {key('rope.scaling.type')} and rope_freqs scale the rope")
            factors = self._rope_factors(rope_freqs, cfg)
            try:
                cfg = replace(cfg, rope_scaling=llama3_scaling(cfg, factors))
            except (InvalidModelConfig, ValueError) as e:
                raise HpcLlamaError(f"{self.path}: rope_freqs: {e}") from None
        return cfg

    def _rope_factors(self, t: StoredTensor, cfg: ModelConfig) -> np.ndarray:
        if t.kind.name != "F32" or math.prod(t.dims) != cfg.head_dim // 2:
            raise HpcLlamaError(f"{self.path}: rope_freqs must be {cfg.head_dim // 2} F32 factors (one per rotary "
                                f"frequency), got {t.kind.name} of shape {list(t.dims)}")
        factors = np.empty(cfg.head_dim // 2, np.float32)
        read_exact(self._file(), t.offset, factors)
        return factors.astype(np.float64)

    def _eos_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        ids = [tok[k] for k in ("eos_token_id", "eot_token_id") if tok.get(k) is not None]
        tokens, types = tok.get("tokens") or [], tok.get("token_type") or []
        ids += [i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL and t in _END_OF_TURN]
        return tuple(dict.fromkeys(ids))

    def read_into(self, name: str, out: torch.Tensor, verify: bool = True) -> None:
        info = self._check_out(name, out)
        qtype, offset, _ = self._stored[name]
        dst = numpy_view(out)
        if qtype.name in _PLAIN and self._permuted_heads(name) is None:
            read_exact(self._file(), offset, dst)  # the stored bytes are the tensor
            return
        for where, piece in self._pieces(name, info):
            dst[where] = piece

    def read_pieces(self, name: str, verify: bool = True):
        """The tensor a bounded number of rows at a time (PIECE_BYTES of output; a 1-D one whole), in order.

        Each piece is valid until the next is asked for: copy it out, as `CastReader` does into its cast.
        """
        info = self.info(name)
        dtype = DTYPES[info.dtype][1]
        for where, piece in self._pieces(name, info):
            t = torch.from_numpy(piece)
            yield where, t.view(dtype) if t.dtype != dtype else t

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _permuted_heads(self, name: str) -> int | None:
        """The heads whose Q/K rows llama.cpp permuted in this tensor; None when it keeps HF's order."""
        if self.arch != "llama":  # only llama.cpp's llama architecture permutes Q and K
            return None
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            return self.config.n_heads
        if name.endswith(("attention.wk.weight", "attention.wk.bias")):
            return self.config.n_kv_heads
        return None

    def _pieces(self, name: str, info: TensorInfo):
        """(index, values) over the tensor, a bounded number of rows at a time, in HF's row order.

        Rows along the first dimension; a 1-D tensor (a norm, a bias) is one piece. When unpermuting,
        a piece is whole heads, since llama.cpp permutes rows within each head. Only this tensor's bytes
        are read.
        """
        from gguf.quants import dequantize

        qtype, offset, nbytes = self._stored[name]
        heads = self._permuted_heads(name)
        shape = info.shape
        rows = max(shape[0], 1) if len(shape) >= 2 else 1
        unit = rows // heads if heads and len(shape) >= 2 else 1  # rows that must stay together
        step = min(rows, max(1, PIECE_BYTES // max(info.nbytes // rows * unit, 1)) * unit)
        row_bytes = nbytes // rows
        buf = np.empty(step * row_bytes, np.uint8)
        plain = qtype.name in _PLAIN
        for r in range(0, rows, step):
            n = min(step, rows - r)
            raw = buf[:n * row_bytes]
            read_exact(self._file(), offset + r * row_bytes, raw)
            piece_shape = (n, *shape[1:]) if len(shape) >= 2 else shape
            if plain:
                piece = raw.view(DTYPES[info.dtype][0]).reshape(piece_shape)
            else:
                piece = dequantize(raw.reshape(n, row_bytes), qtype).reshape(piece_shape)
            if heads:
                piece = unpermute(piece, heads * n // rows)
            yield (slice(r, r + n) if len(shape) >= 2 else ...), piece

    def assets(self) -> dict[str, bytes]:
        # Built once: a job asks for several of these files (tokenizer, its config, the chat template),
        # and rebuilding the tokenizer from a large vocabulary takes a fraction of a second each time.
        if self._assets is None:
            self._assets = self._build_assets()
        return self._assets

    def _build_assets(self) -> dict[str, bytes]:
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
                  # transformers' default when the file does not say: SentencePiece adds BOS, byte-level BPE not
                  "add_bos_token": bool(tok.get("add_bos_token", tok.get("model") == "llama")),
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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _integer(v):
    """A metadata integer as a Python int (None stays None); anything else is left for ModelConfig to refuse."""
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v


def _number(v):
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) else v


# tokenizer.ggml.* keys and the Python type each must have.
_TOKENIZER_TYPES = {"model": str, "pre": str, "tokens": list, "token_type": list, "merges": list, "scores": list,
                    "bos_token_id": int, "eos_token_id": int, "eot_token_id": int, "unknown_token_id": int,
                    "padding_token_id": int, "add_bos_token": bool, "add_eos_token": bool,
                    "add_space_prefix": bool, "chat_template": str}


def _tokenizer_fields(meta: dict, path: str = "") -> dict:
    """The tokenizer's metadata (tokenizer.ggml.*, and the chat template), each value checked for its type."""
    out = {}
    for key, v in meta.items():
        if key.startswith("tokenizer.ggml."):
            out[key[len("tokenizer.ggml."):]] = v
        elif key == "tokenizer.chat_template":
            out["chat_template"] = v
    for key, kind in _TOKENIZER_TYPES.items():
        v = out.get(key)
        if v is None:
            continue
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
        if ok and key in ("tokens", "merges"):
            ok = all(isinstance(t, str) for t in v)
        elif ok and key == "token_type":
            ok = all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        elif ok and key == "scores":
            ok = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v)
        if not ok:
            name = "tokenizer.chat_template" if key == "chat_template" else f"tokenizer.ggml.{key}"
            raise HpcLlamaError(f"{path}: GGUF metadata {name} is not a {kind.__name__}"
                                f"{' of the right items' if kind is list else ''}")
    return out
