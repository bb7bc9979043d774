"""Weight quantization schemes (hpc_llama/quant.py): hand-worked cases, error bounds, packing."""

import pytest
import torch

from hpc_llama.model.quantized import (
    dequantize_int4_group,
    dequantize_int8_channel,
    pack_int4,
    quantize_int4_group,
    quantize_int8_channel,
    unpack_int4,
)


def test_pack_int4_round_trips_every_value_in_the_low_then_high_nibble():
    q = torch.arange(16, dtype=torch.uint8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(q)
    assert packed.shape == (3, 16) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 0 | (1 << 4) and packed[0, 7].item() == 14 | (15 << 4)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("w, q, scale", [
    # max |w| = 1.27 -> scale 0.01; -0.635 / 0.01 = -63.5 rounds half to even: -64
    ([[1.27, -0.635, 0.0, 0.005]], [[127, -64, 0, 0]], [0.01]),
    ([[0.0, 0.0, 0.0, 0.0]], [[0, 0, 0, 0]], [1.0]),  # an all-zero row keeps scale 1 and comes back exactly
    ([[-2.54, 1.0, 0.02, -0.01]], [[-127, 50, 1, 0]], [0.02]),
])
def test_int8_channel_hand_worked(w, q, scale):
    got_q, got_scale = quantize_int8_channel(torch.tensor(w))
    assert got_q.dtype == torch.int8 and got_q.tolist() == q
    assert torch.allclose(got_scale, torch.tensor(scale))


@pytest.mark.parametrize("row, q, scale, zero", [
    # lo -1.5, hi 3 -> scale 0.3, zero round(5) = 5; q = round(w / 0.3) + 5
    ([0.0, 1.5, 3.0, -1.5], [5, 10, 15, 0], 0.3, 5),
    ([2.0, 2.0, 2.0, 2.0], [15, 15, 15, 15], 2 / 15, 0),  # the range widens to hold 0: [0, 2]
    ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 1.0, 0),  # all zero: scale 1
    ([0.0, 0.75, 1.5, 0.3], [0, 8, 15, 3], 0.1, 0),  # 0.75 / 0.1 = 7.5 rounds half to even: 8
])
def test_int4_group_hand_worked(row, q, scale, zero):
    packed, s, z = quantize_int4_group(torch.tensor([row]), group_size=4)
    assert unpack_int4(packed).tolist() == [q]
    assert torch.allclose(s, torch.tensor([[scale]])) and z.tolist() == [[zero]]


def test_int4_group_dequantizes_a_group_spanning_zero_exactly_on_its_grid():
    w = torch.tensor([[0.0, 1.5, 3.0, -1.5, -1.5, 0.0, 3.0, 0.3]])  # on the grid of scale 0.3, offset 5
    packed, s, z = quantize_int4_group(w, group_size=4)
    assert torch.allclose(dequantize_int4_group(packed, s, z, 4), w, atol=1e-6)


@pytest.mark.parametrize("shape, group", [((64, 128), 32), ((7, 64), 64), ((3, 16), 2)])
def test_errors_are_within_half_a_step(shape, group):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q8, s8 = quantize_int8_channel(w)
    assert ((dequantize_int8_channel(q8, s8) - w).abs() <= s8[:, None] / 2 + 1e-7).all()
    packed, s4, z4 = quantize_int4_group(w, group)
    err = (dequantize_int4_group(packed, s4, z4, group) - w).abs().reshape(shape[0], -1, group)
    # Half a step, plus the offset's own rounding at the ends of the range.
    assert (err <= s4[..., None] * 0.5 + 1e-6).float().mean() > 0.99
    assert (err <= s4[..., None] + 1e-6).all()
    assert packed.numel() == w.numel() // 2  # two values per byte


@pytest.mark.parametrize("group, needle", [(48, "does not divide the input dimension 128"),
                                           (3, "even number of at least 2"), (0, "even number")])
def test_bad_group_sizes(group, needle):
    with pytest.raises(ValueError, match=needle):
        quantize_int4_group(torch.zeros(4, 128), group)


@pytest.mark.parametrize("scheme, group, most", [("int8-channel", 0, 0.27), ("int4-group", 32, 0.18)])
def test_quantized_linear_is_a_smaller_linear(scheme, group, most):
    from hpc_llama.model.quantized import QuantizedLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=True)
    q = QuantizedLinear.from_linear(lin, scheme, group or 32)
    x = torch.randn(5, 128)
    # Exactly a Linear with the dequantized weight, and close to the original.
    assert torch.equal(q(x), torch.nn.functional.linear(x, q.dense_weight(), lin.bias))
    assert (q(x) - lin(x)).abs().max().item() < (0.02 if scheme == "int8-channel" else 0.2)
    dense = lin.weight.numel() * 4 + lin.bias.numel() * 4
    assert q.resident_bytes() <= most * dense
    assert q.in_features == 128 and q.out_features == 64 and scheme in repr(q)


def test_quantized_linears_in_a_model_keep_its_predictions():
    from hpc_llama.model.llama import ModelConfig, Transformer
    from hpc_llama.model.quantized import QuantizedLinear

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(ids)
        for layer in model.layers.values():
            for parent in (layer.attention, layer.feed_forward):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, QuantizedLinear.from_linear(child, "int8-channel"))
        after = model(ids)
    assert (after - before).abs().max().item() < 0.05
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9
