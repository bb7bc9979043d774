"""Weight quantization for linear layers: plain torch, no distribution, no I/O.

Two schemes, named as in the checkpoint format (docs/checkpoint.md):

- `int8-channel`: symmetric, one fp32 scale per output row. q = round(w / s)
  in [-127, 127] with s = max|w_row| / 127; w ~ q * s.
- `int4-group`: asymmetric, one fp32 scale and one offset per `group_size`
  consecutive inputs of a row. The group's range [lo, hi] is widened to hold
  0 (so the offset is a valid code, as GPTQ does); q = round(w / s) + z in
  [0, 15] with s = (hi - lo) / 15 and z = round(-lo / s); w ~ (q - z) * s. Two
  values per byte, the even input in the low nibble.

Both round to nearest (ties to even, as torch.round). A row or group of zeros
gets scale 1 so that it round-trips exactly.
"""

from __future__ import annotations

import torch


def quantize_int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, in), fp32 scale (out,))."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_channel(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    # In place on the one fresh buffer: a second weight-sized temporary cost 30x more than the
    # arithmetic on the CPU (measured, 1536 x 576), the allocator returning and re-faulting its pages.
    return q.to(torch.float32).mul_(scale[:, None]).to(dtype)


def check_group(in_features: int, group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group size must be an even number of at least 2, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {in_features}")


def quantize_int4_group(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (uint8 packed (out, in / 2), fp32 scale and uint8 offset (out, in / group_size))."""
    out_f, in_f = w.shape
    check_group(in_f, group_size)
    g = w.float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return pack_int4(q), scale, zero.to(torch.uint8)


def dequantize_int4_group(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                          dtype=torch.float32) -> torch.Tensor:
    # Nibbles written straight into one float buffer, then offset and scale in place: 5-10x
    # faster on the CPU than unpacking to bytes and building temporaries (measured, 1536 x 576).
    out_f, half = packed.shape
    q = torch.empty(out_f, half, 2, dtype=torch.float32, device=packed.device)
    q[..., 0] = packed & 0x0F
    q[..., 1] = packed >> 4
    g = q.view(out_f, 2 * half // group_size, group_size)
    g.sub_(zero.to(torch.float32)[..., None]).mul_(scale[..., None])
    return q.view(out_f, 2 * half).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, 2k) values in [0, 15] -> (rows, k) bytes, even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows, k = packed.shape
    out = torch.empty(rows, 2 * k, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


SCHEMES = ("int8-channel", "int4-group")


def quantize(w: torch.Tensor, scheme: str, group_size: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """A float (out, in) weight as stored: (packed data, {part: tensor}, attrs), per docs/checkpoint.md."""
    attrs = scheme_attrs(w, scheme, group_size)
    if scheme == "int8-channel":
        q, scale = quantize_int8_channel(w)
        return q, {"scale": scale}, attrs
    packed, scale, zero = quantize_int4_group(w, group_size)
    return packed, {"scale": scale, "zero": zero}, attrs


def scheme_attrs(w: torch.Tensor, scheme: str, group_size: int = 32) -> dict:
    """What the checkpoint records about a quantized tensor: its scheme, logical shape and dtype, parameters."""
    attrs = {"scheme": scheme, "logical_shape": list(w.shape), "logical_dtype": _DTYPE_NAMES[w.dtype]}
    if scheme == "int8-channel":
        return {**attrs, "bits": 8}
    if scheme == "int4-group":
        return {**attrs, "bits": 4, "group_size": group_size}
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def dequantize(data: torch.Tensor, parts: dict[str, torch.Tensor], attrs: dict, dtype=None) -> torch.Tensor:
    """The logical tensor of a stored quantized one (rows of it, when `data` and `parts` are those rows)."""
    dtype = dtype or _DTYPES[attrs.get("logical_dtype", "float32")]
    if attrs["scheme"] == "int8-channel":
        return dequantize_int8_channel(data, parts["scale"], dtype)
    if attrs["scheme"] == "int4-group":
        return dequantize_int4_group(data, parts["scale"], parts["zero"], attrs["group_size"], dtype)
    raise ValueError(f"unknown quantization scheme {attrs['scheme']!r}")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight stays packed in memory and is dequantized for each forward.

    Resident memory is the packed weight plus its scales (int4 with groups of
    32: about 16% of fp32); the compute is the same fp32/bf16 matmul as a
    plain Linear, on the dequantized weight. (torch's CPU weight-only int8
    kernel measured 18-33x slower than fp32 matmul on the development VM.)
    """

    def __init__(self, data: torch.Tensor, parts: dict[str, torch.Tensor], attrs: dict,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if attrs.get("scheme") not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {attrs.get('scheme')!r}")
        self.attrs = dict(attrs)
        self.scheme, self.group_size = attrs["scheme"], attrs.get("group_size", 0)
        self.out_features, self.in_features = attrs["logical_shape"]
        self.register_buffer("qweight", data)
        self.roles = sorted(parts)
        for role in self.roles:
            self.register_buffer(role, parts[role])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str, group_size: int = 32) -> QuantizedLinear:
        data, parts, attrs = quantize(linear.weight.detach(), scheme, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(data, parts, attrs, bias)

    def parts(self) -> dict[str, torch.Tensor]:
        return {role: getattr(self, role) for role in self.roles}

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.parts(), self.attrs, dtype)

    def dense_rows(self, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """Rows `ids` of the logical weight, dequantizing only those (an embedding lookup)."""
        flat = ids.reshape(-1)
        rows = dequantize(self.qweight[flat], {r: t[flat] for r, t in self.parts().items()}, self.attrs, dtype)
        return rows.view(*ids.shape, self.in_features)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, *self.parts().values(), self.bias)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{group}"


class QuantizedEmbedding(torch.nn.Module):
    """A token embedding kept packed: a lookup dequantizes only the rows it reads.

    `table` is the packed (vocab, dim) matrix; with tied embeddings the
    output head is that same QuantizedLinear, so the table is held once.
    """

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.dense_rows(ids, self.dtype)
