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
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


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
    q = unpack_int4(packed).to(torch.float32)
    out_f, in_f = q.shape
    g = q.reshape(out_f, in_f // group_size, group_size)
    return ((g - zero.to(torch.float32)[..., None]) * scale[..., None]).reshape(out_f, in_f).to(dtype)


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


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight stays packed in memory and is dequantized for each forward.

    Resident memory is the packed weight plus its scales (int4 with groups of
    32: about 16% of fp32); the compute is the same fp32/bf16 matmul as a
    plain Linear, on the dequantized weight. (torch's CPU weight-only int8
    kernel measured 18-33x slower than fp32 matmul on the development VM.)
    """

    def __init__(self, scheme: str, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 group_size: int = 0, bias: torch.Tensor | None = None, in_features: int | None = None):
        super().__init__()
        if scheme not in ("int8-channel", "int4-group"):
            raise ValueError(f"unknown quantization scheme {scheme!r}")
        self.scheme, self.group_size = scheme, group_size
        self.out_features = weight.shape[0]
        self.in_features = in_features or (weight.shape[1] * (2 if scheme == "int4-group" else 1))
        self.register_buffer("qweight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: str, group_size: int = 32) -> QuantizedLinear:
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if scheme == "int8-channel":
            q, scale = quantize_int8_channel(w)
            return cls(scheme, q, scale, bias=bias)
        if scheme == "int4-group":
            packed, scale, zero = quantize_int4_group(w, group_size)
            return cls(scheme, packed, scale, zero, group_size, bias, w.shape[1])
        raise ValueError(f"unknown quantization scheme {scheme!r}")

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.scheme == "int8-channel":
            return dequantize_int8_channel(self.qweight, self.scale, dtype)
        return dequantize_int4_group(self.qweight, self.scale, self.zero, self.group_size, dtype)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero, self.bias)
                   if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dense_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{group}"
