"""The Llama model in plain torch: Llama 2 and 3, Mistral, Qwen2/2.5 and Qwen3.

The families are one decoder with options for where they differ (`ModelConfig`):
biases on q/k/v only (Qwen2), a per-head RMSNorm on queries and keys (Qwen3), a
sliding attention window (Mistral, and Qwen2/3 where a config turns it on),
llama3 rope scaling and tied embeddings (Llama 3.1/3.2).

Nothing here knows about MPI, DeepSpeed, HDF5 or devices; parallelism wraps the
model from outside. A pipeline stage is the same `Transformer` with parts
missing: its layers are keyed by their *global* number, and the embedding, the
final norm and the output head exist only where asked for, so a slice has the
same parameter names as the whole model (`layers.17.attention.wq.weight`).

Attention rule (one rule for every mode): query i of row b may see key j when
key_pos[b, j] <= query_pos[b, i] (and key_mask[b, j] when a mask is given).
Packed rows add segments: segment 0 is a prefix every token of the row may
see, and a token of segment s > 0 sees that prefix and its own segment only,
so several continuations scored after one copy of their shared context never
see each other (their positions restart where the context ends).
A sliding window of w adds query_pos - key_pos < w on the layers that slide.
Without a cache the key positions are the input positions, so right-padded
batches need no mask at all; with a cache a key's slot *is* its position, so
rows of different lengths decode together without left padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from .projections import Linear, fuse

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""The families this model computes (HF model_type names)."""

MAX_DIM = (1 << 31) - 1
"""Largest size any dimension may claim: token ids and sizes travel as int32 in places."""


class InvalidModelConfig(ValueError):
    """A model config field out of range; `field` is our name for it, so a reader can name its own key."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_dim(name: str, value) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise InvalidModelConfig(name, f"must be an integer, got {_shown(value)}")
    if not 0 < value <= MAX_DIM:
        raise InvalidModelConfig(name, f"must be positive and at most {MAX_DIM}, got {value}")


def _check_positive(name: str, value) -> float:
    """A positive, finite real number (NaN and infinities fail every comparison but !=)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidModelConfig(name, f"must be a number, got {_shown(value)}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidModelConfig(name, f"must be positive and finite, got {value}")
    return float(value)


def _check_token(name: str, value, vocab_size: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise InvalidModelConfig(name, f"must be token ids in 0..{vocab_size - 1}, got {_shown(value)}")
    return int(value)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama model. Field names are ours; `hf_config` maps HF's."""

    vocab_size: int = 32000
    """Number of token ids."""
    dim: int = 4096
    """Width of the residual stream (HF hidden_size)."""
    n_layers: int = 32
    """Number of transformer blocks (HF num_hidden_layers)."""
    n_heads: int = 32
    """Query heads (HF num_attention_heads)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_heads."""
    ffn_dim: int = 11008
    """Hidden width of the SwiGLU feed-forward (HF intermediate_size)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (HF rms_norm_eps)."""
    rope_theta: float = 10000.0
    """Rotary base period."""
    rope_scaling: dict | None = None
    """None, or {"rope_type": "llama3"|"linear", "factor": ..., ...} as in HF."""
    max_seq_len: int = 4096
    """Longest sequence the model was trained for (HF max_position_embeddings)."""
    tie_embeddings: bool = False
    """The output head reuses the token embedding matrix."""
    attention_bias: bool = False
    """Biases on the q/k/v/o projections (some Llama derivatives)."""
    mlp_bias: bool = False
    """Biases on the feed-forward projections."""
    bos_id: int | None = 1
    """Beginning-of-sequence token id."""
    eos_ids: tuple[int, ...] = field(default=(2,))
    """End-of-sequence token ids (Llama 3 instruct models have several)."""
    layer_shapes: dict | None = None
    """{layer: {"n_heads": H, "ffn_dim": F}} for layers whose shape structured pruning changed."""
    lowrank: dict | None = None
    """{"layers.3.attention.wq": rank}: projections stored as two factors (low-rank factorisation)."""
    model_type: str = "llama"
    """The family (HF model_type) the model comes from and is exported as: llama, mistral, qwen2, qwen3."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections only, not on the output one (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each head of the queries and keys before rotary (Qwen3)."""
    sliding_window: int | None = None
    """A query sees only the keys fewer than this many positions before it (Mistral); None: all."""
    sliding_layers: tuple[int, ...] | None = None
    """The layers the window applies to; None means every layer (Qwen2/3 slide only their top layers)."""

    def __post_init__(self):
        # Every field is checked here, so a config from a file (config.json, GGUF metadata, YAML) that
        # would compute NaN or build absurd shapes is refused before anything is built from it.
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            _check_dim(name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check_dim("n_kv_heads", self.n_kv_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise InvalidModelConfig("dim", f"{self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _check_dim("head_dim", self.head_dim)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy integers become ints
        if self.n_heads % self.n_kv_heads:
            raise InvalidModelConfig("n_kv_heads", f"{self.n_kv_heads}: n_heads {self.n_heads} is not a multiple of it")
        if self.head_dim % 2:
            raise InvalidModelConfig("head_dim", f"{self.head_dim} must be even for rotary embeddings")
        object.__setattr__(self, "norm_eps", _check_positive("norm_eps", self.norm_eps))
        object.__setattr__(self, "rope_theta", _check_positive("rope_theta", self.rope_theta))
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.bos_id is not None:
            _check_token("bos_id", self.bos_id, self.vocab_size)
        if isinstance(self.eos_ids, Integral) and not isinstance(self.eos_ids, bool):
            object.__setattr__(self, "eos_ids", (self.eos_ids,))
        if not isinstance(self.eos_ids, (list, tuple)):
            raise InvalidModelConfig("eos_ids", f"must be a token id or a list of them, got {_shown(self.eos_ids)}")
        object.__setattr__(self, "eos_ids", tuple(_check_token("eos_ids", i, self.vocab_size) for i in self.eos_ids))
        if self.layer_shapes:
            self._check_layer_shapes()
        if self.model_type not in MODEL_TYPES:
            raise InvalidModelConfig("model_type", f"{_shown(self.model_type)} is not supported "
                                     f"({', '.join(MODEL_TYPES)})")
        if self.sliding_window is not None:
            _check_dim("sliding_window", self.sliding_window)
            object.__setattr__(self, "sliding_window", int(self.sliding_window))
        if self.sliding_layers is not None:
            if not isinstance(self.sliding_layers, (list, tuple)) or not all(
                    isinstance(i, Integral) and not isinstance(i, bool) and 0 <= i < self.n_layers
                    for i in self.sliding_layers):
                raise InvalidModelConfig("sliding_layers", f"must be layer numbers below {self.n_layers}, "
                                         f"got {_shown(self.sliding_layers)}")
            object.__setattr__(self, "sliding_layers", tuple(sorted({int(i) for i in self.sliding_layers})))
        if self.lowrank is not None and not isinstance(self.lowrank, dict):
            raise InvalidModelConfig("lowrank", f"must be a mapping, got {_shown(self.lowrank)}")
        for path, rank in (self.lowrank or {}).items():
            if not isinstance(rank, Integral) or isinstance(rank, bool) or not 0 < rank <= MAX_DIM:
                raise InvalidModelConfig("lowrank", f"rank of {_shown(path)} must be a positive integer, "
                                         f"got {_shown(rank)}")

    def _check_rope_scaling(self):
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise InvalidModelConfig("rope_scaling", f"must be a mapping, got {_shown(scaling)}")
        kind = scaling.get("rope_type", scaling.get("type"))
        need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}
        if not isinstance(kind, str) or kind not in need:
            raise InvalidModelConfig("rope_scaling", f"type {_shown(kind)} is not supported (llama3, linear)")
        missing = [k for k in need[kind] if k not in scaling]
        if missing:
            raise InvalidModelConfig("rope_scaling", f"of type {kind} lacks {', '.join(missing)}")
        for key in need[kind]:
            _check_positive(f"rope_scaling.{key}", scaling[key])
        if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            # the frequencies between the two bands are interpolated over high - low
            raise InvalidModelConfig("rope_scaling.high_freq_factor", f"{scaling['high_freq_factor']} must be "
                                     f"larger than low_freq_factor {scaling['low_freq_factor']}")

    def _check_layer_shapes(self):
        if not isinstance(self.layer_shapes, dict):
            raise InvalidModelConfig("layer_shapes", f"must be a mapping, got {_shown(self.layer_shapes)}")
        shapes = {}
        for k, v in self.layer_shapes.items():
            # JSON keys are strings; layers are numbers everywhere else.
            i = int(k) if isinstance(k, Integral) or (isinstance(k, str) and k.isdigit() and len(k) < 10) else -1
            if not 0 <= i < self.n_layers or not isinstance(v, dict) or set(v) - {"n_heads", "ffn_dim"}:
                raise InvalidModelConfig("layer_shapes", f"entry {_shown(k)}: {_shown(v)} (allowed: n_heads, "
                                         f"ffn_dim of an existing layer)")
            for name, n in v.items():
                _check_dim(f"layer_shapes.{i}.{name}", n)
            shapes[i] = {name: int(n) for name, n in v.items()}
        object.__setattr__(self, "layer_shapes", shapes)
        for i in shapes:
            h, f = self.layer_shape(i)
            if h % self.n_kv_heads:
                raise InvalidModelConfig("layer_shapes", f"layer {i}: {h} heads and ffn {f} (heads must be a "
                                         f"positive multiple of {self.n_kv_heads} kv heads, ffn positive)")

    def layer_shape(self, i: int) -> tuple[int, int]:
        """(query heads, ffn width) of layer i: the model's, unless structured pruning changed them."""
        shape = (self.layer_shapes or {}).get(i, {})
        return shape.get("n_heads", self.n_heads), shape.get("ffn_dim", self.ffn_dim)

    def slides(self, i: int) -> bool:
        """Whether layer i attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or i in self.sliding_layers)

    def projections(self, i: int) -> dict[str, tuple[int, int, bool]]:
        """Layer i's linear projections: name -> (in features, out features, bias)."""
        h, f = self.layer_shape(i)
        q, kv, d = h * self.head_dim, self.n_kv_heads * self.head_dim, self.dim
        ab, mb = self.attention_bias, self.mlp_bias
        qkv = ab or self.qkv_bias
        return {"attention.wq": (d, q, qkv), "attention.wk": (d, kv, qkv), "attention.wv": (d, kv, qkv),
                "attention.wo": (q, d, ab), "feed_forward.w1": (d, f, mb), "feed_forward.w2": (f, d, mb),
                "feed_forward.w3": (d, f, mb)}

    @property
    def n_params(self) -> int:
        """Parameter count of the whole model (a tied head counted once)."""
        return sum(layer_param_counts(self)) + embedding_params(self) * (1 if self.tie_embeddings else 2) + self.dim


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.dim


def layer_param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters in each transformer block (pruned or factorised blocks have fewer)."""
    lowrank = cfg.lowrank or {}
    counts = []
    for i in range(cfg.n_layers):
        n = 2 * cfg.dim + (2 * cfg.head_dim if cfg.qk_norm else 0)  # the norms
        for name, (n_in, n_out, bias) in cfg.projections(i).items():
            rank = lowrank.get(f"layers.{i}.{name}")
            n += (rank * (n_in + n_out) if rank else n_in * n_out) + (n_out if bias else 0)
        counts.append(n)
    return counts


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse rotary frequencies (head_dim/2,), fp32, with Llama 3 / linear scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the
    # band between them interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables (B, T, head_dim) for integer positions (B, T)."""
    freqs = positions[..., None].float() * rope_frequencies(cfg, positions.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, T, H, hd); the "rotate half" layout of HF checkpoints, so their
    # q/k weights are used unpermuted.
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LowRankLinear(nn.Module):
    """A projection stored as two factors, x -> b(a(x)): (in -> rank) then (rank -> out).

    Cheaper than the full matrix when rank * (in + out) < in * out.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, device=None):
        super().__init__()
        self.a = Linear(in_features, rank, bias=False, device=device)
        self.b = Linear(rank, out_features, bias=bias, device=device)

    def forward(self, x):
        return self.b(self.a(x))


def projection(cfg: ModelConfig, path: str, n_in: int, n_out: int, bias: bool, device=None) -> nn.Module:
    """The module for one projection: a Linear, or two factors where the config says so."""
    rank = (cfg.lowrank or {}).get(path)
    if rank:
        return LowRankLinear(n_in, n_out, rank, bias, device)
    return Linear(n_in, n_out, bias=bias, device=device)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device (as Linear does)."""

    def reset_parameters(self):
        if self.weight.device.type != "meta":
            super().reset_parameters()


_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        # Normalise in fp32 whatever the weights' dtype, as the reference does; torch's own
        # rms_norm gives the same bits in one call instead of five (weight included in fp32).
        if _RMS_NORM and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x.float()
        if _RMS_NORM:
            h = F.rms_norm(h, (h.shape[-1],), None, self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Keys and values of one layer: slot s of a row holds position s.

    `rows` gives a view of some rows; every view writes into the whole cache (`base`).
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, device=None, dtype=None):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.base, self.first, self.row_ids = self, 0, None

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Where tokens at `positions` (B, T) go: their flat slots in the whole cache, and the filled
        length after them. The same for every layer of a step, so a trunk asks once."""
        used = int(positions.max()) + 1
        length = self.base.k.shape[1]
        if used > length:
            raise ValueError(f"position {used - 1} is past the cache length {length}")
        rows = self.row_ids
        if rows is None:
            rows = torch.arange(self.first, self.first + positions.shape[0], device=positions.device)
        return (rows[:, None] * length + positions).reshape(-1), used

    def update(self, where: tuple[torch.Tensor, int], k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, T, kv, hd) at the slots `locate` gave; return the filled prefix of these rows."""
        slots, used = where
        whole = self.base
        # One copy per tensor into the flat (rows x length) view: no index grid built per layer.
        whole.k.view(-1, *whole.k.shape[2:]).index_copy_(0, slots, k.reshape(-1, *k.shape[2:]))
        whole.v.view(-1, *whole.v.shape[2:]).index_copy_(0, slots, v.reshape(-1, *v.shape[2:]))
        if self.row_ids is not None:
            return whole.k[self.row_ids, :used], whole.v[self.row_ids, :used]
        return self.k[:, :used], self.v[:, :used]

    def rows(self, rows: slice | torch.Tensor) -> KVCache:
        """This cache restricted to some rows: contiguous rows (a slice) are read through a view,
        without a copy; a tensor of row ids reads a gathered copy."""
        if self.base is not self:
            raise ValueError("rows are taken from a whole cache")
        view = KVCache.__new__(KVCache)
        view.base, view.row_ids = self, None
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.k.shape[0])
            if step != 1:
                raise ValueError("a cache view takes contiguous rows")
            view.k, view.v, view.first = self.k[start:stop], self.v[start:stop], start
        else:
            view.k = view.v = None
            view.first, view.row_ids = 0, rows
        return view


# torch >= 2.5 lets SDPA share KV heads among query heads itself.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, device=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.layer_shape(layer)[0], cfg.n_kv_heads, cfg.head_dim
        for name, shape in cfg.projections(layer).items():
            if name.startswith("attention."):
                setattr(self, name[10:], projection(cfg, f"layers.{layer}.{name}", *shape, device=device))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, device) if cfg.qk_norm else None
        self.qkv = None

    def fuse_projections(self) -> bool:
        self.qkv = fuse([self.wq, self.wk, self.wv])
        return self.qkv is not None

    def forward(self, x, cos, sin, mask, where, cache: KVCache | None):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv is not None and self.qkv.usable((self.wq, self.wk, self.wv))
        if qkv:
            heads = self.qkv(x).view(B, T, H + 2 * KV, hd)
            q, k, v = heads.split((H, KV, KV), dim=2)
        else:
            q = self.wq(x).view(B, T, H, hd)
            k = self.wk(x).view(B, T, KV, hd)
            v = self.wv(x).view(B, T, KV, hd)
        if self.q_norm is not None:
            q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        elif qkv:
            # The query and key heads are side by side: one rotation for both.
            q, k = apply_rotary(heads[:, :, :H + KV], cos, sin).split((H, KV), dim=2)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(where, k, v)  # (B, S, kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, hd)
        gqa = {}
        if KV != H:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}  # shares each KV head among its query heads without copying
            else:
                rep = H // KV
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, device=None):
        super().__init__()
        # w1 gate, w2 down, w3 up
        for name, shape in cfg.projections(layer).items():
            if name.startswith("feed_forward."):
                setattr(self, name[13:], projection(cfg, f"layers.{layer}.{name}", *shape, device=device))
        self.w13 = None

    def fuse_projections(self) -> bool:
        self.w13 = fuse([self.w1, self.w3])
        return self.w13 is not None

    def forward(self, x):
        if self.w13 is not None and self.w13.usable((self.w1, self.w3)):
            gate, up = self.w13(x).chunk(2, dim=-1)
            # No gradients on this path (fused groups are inference-only): in place, two passes fewer.
            return self.w2(F.silu(gate, inplace=True).mul_(up))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, device=None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.attention = Attention(cfg, layer, device)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.feed_forward = FeedForward(cfg, layer, device)

    def forward(self, x, cos, sin, mask, where, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, where, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The whole model, or the slice of it given by `layer_ids`, `embed` and `head`.

    `device="meta"` builds it without memory, to be filled from a checkpoint.

    The first slice takes token ids (B, T); a later one takes hidden states
    (B, T, dim). A slice with the head returns logits (B, T, vocab); any other
    returns hidden states.
    """

    def __init__(self, cfg: ModelConfig, layer_ids=None, embed: bool = True, head: bool = True, device=None):
        super().__init__()
        self.cfg = cfg
        layer_ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim, device=device) if embed else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, device) for i in layer_ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device) if head else None
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False, device=device) if head else None
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding with the head when the config ties them and this slice has both.

        Called again after `to_empty`, which gives every parameter fresh storage.
        """
        if (self.cfg.tie_embeddings and isinstance(self.tok_embeddings, nn.Embedding)
                and isinstance(self.output, nn.Linear)):  # a quantized pair shares its packed table itself
            self.output.weight = self.tok_embeddings.weight

    def fuse_projections(self) -> int:
        """Inference: compute each layer's q/k/v and gate/up projections as one matmul each.

        The parameters keep their names and values (the checkpoint format does not change);
        training, and any projection replaced later, use the separate ones. Returns the number
        of groups fused.
        """
        return sum(int(m.fuse_projections()) for m in self.modules() if isinstance(m, (Attention, FeedForward)))

    def pack_weights(self) -> int:
        """CPU inference: hold every plain and fused projection's weight (and the head's) prepacked for
        oneDNN too, used for inputs of `PACK_MIN_ROWS` rows and more. Costs a second copy of those
        weights; a weight changed in place afterwards is computed from the plain copy again. Returns
        how many were packed (0 where there is no such path)."""
        groups = [g for m in self.modules() if isinstance(m, (Attention, FeedForward))
                  for g in (getattr(m, "qkv", None), getattr(m, "w13", None)) if g is not None]
        fused = {id(module) for g in groups for module, _ in g.sources}  # computed through their group
        return sum(g.pack() for g in groups) + sum(
            m.pack() for m in self.modules() if type(m) is Linear and id(m) not in fused)

    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.layers]

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict[str, KVCache]:
        """An empty KV cache for this slice's own layers."""
        cfg = self.cfg
        return {k: KVCache(batch, max_len, cfg.n_kv_heads, cfg.head_dim, device, dtype) for k in self.layers}

    def trunk(self, x, positions=None, key_mask=None, cache: dict[str, KVCache] | None = None, segments=None):
        """Embedding (if owned) and this slice's layers: hidden states (B, T, dim) before the final norm.

        x: tokens (B, T) or hidden (B, T, dim); positions (B, T); key_mask (B, T) bool, True = real token;
        segments (B, T) int, 0 = the shared prefix (see the attention rule above; not with a cache).
        """
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        B, T = h.shape[:2]
        if positions is None:
            if cache is not None:
                raise ValueError("decoding with a cache needs explicit positions")
            positions = torch.arange(T, device=h.device).expand(B, T)
        if segments is not None and not bool(segments.any()):
            segments = None  # no packed row in this batch
        cached = cache is not None
        mask = attention_mask(positions, key_mask, cached, _is_plain(positions, key_mask, cache, segments), segments)
        window, cfg = mask, self.cfg
        # No distance reaches the window below it (the first position is 0): the full mask serves.
        if any(cfg.slides(i) for i in self.layer_ids) and int(positions.max()) >= cfg.sliding_window:
            window = attention_mask(positions, key_mask, cached, False, segments, cfg.sliding_window)
        # SDPA turns a boolean mask into an additive one in every call; once here serves every layer.
        same = window is mask
        mask = _additive(mask, h.dtype)
        window = mask if same else _additive(window, h.dtype)
        cos, sin = rotary_tables(cfg, positions, h.dtype)
        # Where this step's keys and values go: the same slots in every layer's cache.
        where = next(iter(cache.values())).locate(positions) if cache else None
        for key, layer in self.layers.items():
            layer_mask = window if cfg.slides(int(key)) else mask
            h = layer(h, cos, sin, layer_mask, where, None if cache is None else cache[key])
        return h

    def head(self, h):
        """Final norm and output projection: logits (..., vocab)."""
        return self.output(self.norm(h))

    def forward(self, x, positions=None, key_mask=None, cache: dict[str, KVCache] | None = None):
        """Logits (B, T, vocab) if this slice has the head, else hidden states (B, T, dim)."""
        h = self.trunk(x, positions, key_mask, cache)
        return h if self.output is None else self.head(h)


def _additive(mask, dtype):
    """A boolean mask as the additive one SDPA makes of it (0 where allowed, -inf elsewhere)."""
    if mask is None:
        return None
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _is_plain(positions, key_mask, cache, segments=None) -> bool:
    # The common case -- no cache, no mask, no segments, positions 0..T-1 in every row --
    # takes SDPA's built-in causal path, which never builds a (T, T) mask.
    if cache is not None or key_mask is not None or segments is not None:
        return False
    T = positions.shape[1]
    return bool((positions == torch.arange(T, device=positions.device)).all())


def attention_mask(positions, key_mask, cached: bool, plain: bool, segments=None, window: int | None = None):
    """Boolean (B, 1, T, S) mask, True where attention is allowed; None for plain causal.

    `window`: a query also sees only keys fewer than this many positions before it.
    """
    if plain:
        return None
    if cached:
        S = int(positions.max()) + 1
        key_pos = torch.arange(S, device=positions.device).expand(positions.shape[0], S)
    else:
        key_pos = positions
    allowed = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, S)
    if window is not None:
        allowed = allowed & (positions[:, :, None] - key_pos[:, None, :] < window)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    if segments is not None:
        if cached:
            raise ValueError("segments are for scoring packed rows, not for decoding with a cache")
        allowed = allowed & ((segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None]))
    # A query that may see nothing (a masked pad) would give NaN; let it see
    # itself instead -- its output is never used.
    T = positions.shape[1]
    if not cached:
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=positions.device)
    return allowed[:, None]


def init_parameter(name: str, shape, n_layers: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """The seeded initial value of one parameter, the same whichever rank or layout makes it.

    Each tensor draws from its own generator seeded by (seed, name), so a
    stage that builds only its own layers gets exactly the numbers the whole
    model would have. Norm weights start at one; matrices are N(0, 0.02),
    with the projections back into the residual stream scaled by
    1/sqrt(2 n_layers) (GPT-2) so the stream's variance does not grow with depth.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (1 << 63))
    std = 0.02
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std /= math.sqrt(2 * n_layers)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def _stable_hash(text: str) -> int:
    h = 1469598103934665603  # FNV-1a: Python's own hash() differs between processes
    for b in text.encode():
        h = ((h ^ b) * 1099511628211) % (1 << 64)
    return h


def init_weights(model: Transformer, seed: int) -> Transformer:
    """Fill every parameter of a model or slice with its seeded initial value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_parameter(name, p.shape, model.cfg.n_layers, seed, p.dtype))
    return model
