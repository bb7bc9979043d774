"""The model against HF transformers' LlamaForCausalLM, and against itself across slices and caches."""

import pytest
import torch

from hpc_llama.checkpoint import open_checkpoint
from hpc_llama.checkpoint.slices import load_slice
from hpc_llama.model.llama import ModelConfig, Transformer, init_weights
from hpc_llama.parallel.layout import layer_partition

from helpers.models import FAMILIES, HF_CONFIGS

TOL = 1e-4  # fp32 max-abs against the reference


def tokens(vocab, B, T, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_match_transformers(name, hf_dirs, hf_models):
    ref = hf_models[name]
    model = load_slice(open_checkpoint(hf_dirs[name]))
    x = tokens(ref.config.vocab_size, 3, 70)  # past the llama3 config's original context of 32
    with torch.no_grad():
        want = ref(x).logits
        got = model(x)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{name}: max-abs {err:.3g}"


def test_llama3_rope_scaling_is_exercised(hf_dirs):
    # The parity test above only means something for rope scaling if the
    # scaled frequencies differ from the plain ones.
    from hpc_llama.model.llama import rope_frequencies

    cfg = open_checkpoint(hf_dirs["llama3"]).config
    plain = rope_frequencies(ModelConfig(**{**cfg.__dict__, "rope_scaling": None}))
    assert not torch.allclose(rope_frequencies(cfg), plain)


def test_padded_batch_equals_each_document_alone(hf_dirs):
    model = load_slice(open_checkpoint(hf_dirs["llama3"]))
    lengths = [5, 23, 1, 17]
    docs = [tokens(320, 1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.zeros(len(docs), T, dtype=torch.long)
    for i, d in enumerate(docs):
        batch[i, :len(d)] = d
    with torch.no_grad():
        # Right padding: the causal rule alone keeps pads out of real tokens' view.
        right = model(batch)
        # Left padding needs the key mask and shifted positions.
        left = torch.zeros_like(batch)
        mask = torch.zeros(batch.shape, dtype=torch.bool)
        pos = torch.zeros_like(batch)
        for i, d in enumerate(docs):
            left[i, T - len(d):] = d
            mask[i, T - len(d):] = True
            pos[i, T - len(d):] = torch.arange(len(d))
        left_out = model(left, positions=pos, key_mask=mask)
        for i, d in enumerate(docs):
            alone = model(d[None])[0]
            assert (right[i, :len(d)] - alone).abs().max() <= 1e-5
            assert (left_out[i, T - len(d):] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama2", "llama3", "tied", *FAMILIES])
def test_kv_cache_decoding_equals_full_forward(name, hf_dirs, hf_models):
    model = load_slice(open_checkpoint(hf_dirs[name]))
    B, P, N = 3, 9, 12  # prompt length, decode steps (past the sliding windows of 12 and 16)
    x = tokens(320, B, P + N, seed=1)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(B, P + N)
        steps = [model(x[:, :P], positions=torch.arange(P).expand(B, P), cache=cache)]
        for t in range(P, P + N):
            steps.append(model(x[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache))
        want = hf_models[name](x).logits
    got = torch.cat(steps, dim=1)
    assert (got - full).abs().max() <= 1e-5
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_matches_transformers(name, hf_dirs, hf_models):
    # Rows of different lengths, right-padded: our causal rule against HF's attention mask.
    model, ref = load_slice(open_checkpoint(hf_dirs[name])), hf_models[name]
    lengths = [40, 7, 25]
    batch = tokens(320, len(lengths), max(lengths), seed=5)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        got = model(batch * mask)
        want = ref(batch * mask, attention_mask=mask.long()).logits
    for i, n in enumerate(lengths):
        assert (got[i, :n] - want[i, :n]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_family_options_are_exercised(name, hf_dirs):
    # The parity tests above only mean something for an option that changes the logits.
    reader = open_checkpoint(hf_dirs[name])
    cfg, state = reader.config, load_slice(reader).state_dict()
    option = {"mistral": {"sliding_window": None}, "qwen2": {"sliding_window": None, "sliding_layers": None},
              "qwen3": {"qk_norm": False}}[name]
    plain = Transformer(ModelConfig(**{**cfg.__dict__, **option}))
    plain.load_state_dict(state, strict=False)
    x = tokens(320, 1, 40, seed=2)
    with torch.no_grad():
        assert (plain(x) - load_slice(reader)(x)).abs().max() > 1e-3


def test_kv_cache_rows_of_different_lengths_decode_together(hf_dirs):
    # Row b holds a prompt of its own length; each row's next token goes at its
    # own position in one batched step, and must equal that row run alone.
    model = load_slice(open_checkpoint(hf_dirs["llama3"]))
    lengths = [4, 11, 7]
    docs = [tokens(320, 1, n + 3, seed=10 + i)[0] for i, n in enumerate(lengths)]
    B = len(docs)
    with torch.no_grad():
        cache = model.new_cache(B, 32)
        T = max(lengths)
        prompt = torch.zeros(B, T, dtype=torch.long)
        for i, (d, n) in enumerate(zip(docs, lengths)):
            prompt[i, :n] = d[:n]
        model(prompt, positions=torch.arange(T).expand(B, T), cache=cache)
        outs = []
        for step in range(3):
            pos = torch.tensor([[n + step] for n in lengths])
            nxt = torch.stack([d[n + step] for d, n in zip(docs, lengths)])[:, None]
            outs.append(model(nxt, positions=pos, cache=cache))
        for i, (d, n) in enumerate(zip(docs, lengths)):
            alone = model(d[None, :n + 3])[0, n:]
            got = torch.cat([o[i] for o in outs])
            assert (got - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama2", "tied", *FAMILIES])
def test_fused_projections_give_the_same_bits(name, hf_dirs):
    # One matmul for q/k/v (with Qwen2's biases, beside Qwen3's q/k norms) and one for gate/up:
    # the same numbers as the separate projections, full forward and KV-cache decode alike (to the
    # last bits only: the matmul library may block a wider output differently).
    reader = open_checkpoint(hf_dirs[name])
    plain, fused = load_slice(reader), load_slice(reader)
    assert fused.fuse_projections() == 2 * reader.config.n_layers
    x = tokens(320, 2, 30, seed=4)
    with torch.inference_mode():
        assert (plain(x) - fused(x)).abs().max() <= 1e-5
        caches = plain.new_cache(2, 40), fused.new_cache(2, 40)
        for m, c in zip((plain, fused), caches):
            m(x[:, :20], positions=torch.arange(20).expand(2, 20), cache=c)
        for t in range(20, 30):
            pos = torch.full((2, 1), t)
            step = plain(x[:, t:t + 1], pos, cache=caches[0]), fused(x[:, t:t + 1], pos, cache=caches[1])
            assert (step[0] - step[1]).abs().max() <= 1e-5


def test_fused_weights_share_the_parameters_memory(hf_dirs):
    model = load_slice(open_checkpoint(hf_dirs["llama2"]))
    attn, ffn = model.layers["0"].attention, model.layers["0"].feed_forward
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.fuse_projections()
    # Each parameter is now rows of the one weight, with its own values, under its own name.
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    w = attn.qkv.weight
    assert attn.wq.weight.data_ptr() == w.data_ptr() and attn.wv.weight.data_ptr() < w.data_ptr() + w.nbytes
    assert ffn.w3.weight.data_ptr() == ffn.w13.weight.data_ptr() + ffn.w1.weight.nbytes
    # An in-place change of a parameter (a merged adapter, say) is what the fused matmul computes with.
    x = tokens(320, 1, 12, seed=6)
    with torch.no_grad():
        ffn.w3.weight.mul_(2)
        attn.wk.weight.add_(0.01)
        with torch.inference_mode():
            got = model(x)
        model.layers["0"].attention.qkv = model.layers["0"].feed_forward.w13 = None
        want = model(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llama2", "qwen2"])
def test_a_loaded_slice_fuses_without_copying(name, hf_dirs):
    # load_slice lays each group's weights (and Qwen2's biases) out side by side: fusing makes views.
    model = load_slice(open_checkpoint(hf_dirs[name]))
    params = dict(model.named_parameters())
    model.fuse_projections()
    assert all(p is params[n] for n, p in model.named_parameters())  # nothing re-pointed
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        assert attn.qkv.weight.data_ptr() == attn.wq.weight.data_ptr()
        assert ffn.w13.weight.data_ptr() == ffn.w1.weight.data_ptr()
        if attn.wq.bias is not None:
            assert attn.qkv.bias.data_ptr() == attn.wq.bias.data_ptr()


def test_fused_weight_is_one_tensor_when_the_rows_lie_side_by_side():
    from hpc_llama.model.projections import Linear, fuse

    block = torch.randn(12, 8)
    parts = [Linear(8, n, bias=False) for n in (4, 6, 2)]
    rows = 0
    for lin, n in zip(parts, (4, 6, 2)):
        lin.weight = torch.nn.Parameter(block[rows:rows + n])
        rows += n
    group = fuse(parts)
    weight, bias = group.weight, group.bias
    assert weight.data_ptr() == block.data_ptr() and weight.shape == (12, 8) and bias is None
    assert parts[1].weight.data_ptr() == block[4].data_ptr()  # nothing was copied or re-pointed


def test_fused_projections_step_aside_for_training_and_replaced_modules(hf_dirs):
    from hpc_llama.model.lora import add_lora

    reader = open_checkpoint(hf_dirs["llama2"])
    model = load_slice(reader)
    model.fuse_projections()
    x = tokens(320, 1, 10, seed=7)
    # With gradients on, the parameters themselves take part (their grads are filled).
    model(x).sum().backward()
    assert model.layers["0"].attention.wq.weight.grad is not None
    assert model.layers["0"].feed_forward.w3.weight.grad is not None
    # An adapter replaces wq after fusing: its B is made non-zero, and the output must follow it.
    add_lora(model, rank=2, alpha=4.0, targets=("wq",))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.fill_(0.05)
        with torch.inference_mode():
            fused_out = model(x)
        for block in model.layers.values():
            block.attention.qkv = None
        assert torch.equal(fused_out, model(x))
        assert not torch.equal(fused_out, load_slice(reader)(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN to pack for")
@pytest.mark.parametrize("name", ["llama2", "qwen2"])
def test_prepacked_weights_compute_the_same_model(name, hf_dirs):
    # oneDNN's blocked layout (CPU inference) against the plain weights: the same logits within the
    # rounding of another kernel, and each row's result independent of how many rows share the call
    # (so a document scores the same in any batch, on any layout).
    from hpc_llama.inference import ready_for_inference

    reader = open_checkpoint(hf_dirs[name])
    plain, packed = load_slice(reader), load_slice(reader)
    done = ready_for_inference(packed, pack=True)
    n_layers = reader.config.n_layers
    assert done["fused"] == 2 * n_layers and done["packed"] == 4 * n_layers + 1  # groups, wo, w2, head
    x = tokens(320, 8, 24, seed=9)
    with torch.inference_mode():
        got = packed(x)
        assert (got - plain(x)).abs().max() <= 1e-5
        assert torch.equal(packed(x[:3]), got[:3])
        fused_only = load_slice(reader)
        fused_only.fuse_projections()
        one = packed(x[:1, :2])  # two rows in all: below PACK_MIN_ROWS, the plain path
        assert torch.equal(one, fused_only(x[:1, :2]))
    # A weight changed in place after packing is computed from its new values, not the stale copy.
    with torch.no_grad():
        for m in (packed, plain):
            m.layers["0"].attention.wo.weight.mul_(2)
            m.layers["0"].feed_forward.w3.weight.add_(0.01)
    with torch.inference_mode():
        assert (packed(x) - plain(x)).abs().max() <= 1e-5
    # With gradients on, the parameters themselves take part.
    packed(x[:1]).sum().backward()
    assert packed.layers["0"].attention.wo.weight.grad is not None


def test_packing_steps_aside_where_it_cannot_help(hf_dirs, monkeypatch):
    import hpc_llama.inference as inference
    from hpc_llama.model.projections import pack_weight

    reader = open_checkpoint(hf_dirs["llama2"])
    assert pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16)) is None  # fp32 only
    assert pack_weight(torch.zeros(4, 4, device="meta")) is None
    bf16 = load_slice(reader, dtype=torch.bfloat16)
    assert inference.ready_for_inference(bf16, pack=True)["packed"] == 0
    # Not when the second copy would not fit in the memory the machine has left.
    monkeypatch.setattr(inference, "PACK_HEADROOM", 1 << 40)
    done = inference.ready_for_inference(load_slice(reader), pack=True)
    assert done["packed"] == 0 and done["fused"] > 0


def test_cache_views_write_through_to_the_whole_cache(hf_dirs):
    # Rows picked by a slice (a decode group) and by ids (a prefill into free slots) decode as a whole cache.
    model = load_slice(open_checkpoint(hf_dirs["llama2"]))
    x = tokens(320, 4, 14, seed=8)
    with torch.no_grad():
        whole = model.new_cache(4, 16)
        model(x[:, :12], positions=torch.arange(12).expand(4, 12), cache=whole)
        want = model(x[:, 12:13], positions=torch.full((4, 1), 12), cache=whole)
        cache = model.new_cache(4, 16)
        ids = {k: c.rows(torch.tensor([3, 0])) for k, c in cache.items()}
        model(x[[3, 0], :12], positions=torch.arange(12).expand(2, 12), cache=ids)
        model(x[[1, 2], :12], positions=torch.arange(12).expand(2, 12),
              cache={k: c.rows(torch.tensor([1, 2])) for k, c in cache.items()})
        got = model(x[2:4, 12:13], positions=torch.full((2, 1), 12),
                    cache={k: c.rows(slice(2, 4)) for k, c in cache.items()})
        assert (got - want[2:4]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="past the cache length"):
            model(x[:, :1], positions=torch.full((4, 1), 16), cache=cache)


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("name", ["llama3", "tied", "qwen2", "qwen3"])
def test_chained_slices_equal_whole_model(name, pp, hf_dirs):
    reader = open_checkpoint(hf_dirs[name])
    whole = load_slice(reader)
    plans = layer_partition(reader.config.n_layers, pp, "uniform")
    stages = [load_slice(reader, p.layers, p.embed, p.head) for p in plans]
    x = tokens(320, 2, 30, seed=3)
    with torch.no_grad():
        h = x
        for s in stages:
            h = s(h)
        assert (h - whole(x)).abs().max() == 0
    # A slice is the same model with parts missing: same names, nothing else.
    whole_names = set(dict(whole.named_parameters()))
    for p, s in zip(plans, stages):
        names = set(dict(s.named_parameters()))
        assert all(int(n.split(".")[1]) in p.layers for n in names if n.startswith("layers."))
        assert names <= whole_names | {"output.weight"}
        assert ("tok_embeddings.weight" in names) == p.embed and ("norm.weight" in names) == p.head


def test_seeded_init_is_the_same_in_every_slice():
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=4, n_heads=4, ffn_dim=64)
    whole = init_weights(Transformer(cfg), seed=7)
    part = init_weights(Transformer(cfg, range(2, 4), embed=False, head=True), seed=7)
    for n, p in part.named_parameters():
        assert torch.equal(p, dict(whole.named_parameters())[n])
    other = init_weights(Transformer(cfg), seed=8)
    assert not torch.equal(other.layers["0"].attention.wq.weight, whole.layers["0"].attention.wq.weight)


def test_model_package_is_pure_torch():
    import glob
    import os

    import hpc_llama.model as m

    files = glob.glob(os.path.join(os.path.dirname(m.__file__), "*.py"))
    assert {os.path.basename(f) for f in files} >= {"llama.py", "lora.py", "quantized.py"}
    for path in files:
        src = open(path).read()
        for forbidden in ("mpi4py", "deepspeed", "h5py", ".cuda(", "torch.distributed"):
            assert forbidden not in src, (path, forbidden)


@pytest.mark.parametrize("bad, message", [
    (dict(dim=30, n_heads=4), "not divisible"),
    (dict(n_heads=6, n_kv_heads=4, head_dim=8), "not a multiple"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
    (dict(n_layers=0), "must be positive"),
])
def test_invalid_model_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**dict(vocab_size=10, dim=32, n_layers=2, n_heads=4, ffn_dim=8), **bad})
