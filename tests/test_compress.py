"""`hpc-llama compress`: the arithmetic (hand-worked tables), the file format, every method end to end
against transformers with the same (dequantized) weights, byte-identical output for 1, 2 and 4 ranks,
compressed checkpoints in score / generate / convert / inspect, and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from hpc_llama.compress.chain import plan_steps
from hpc_llama.compress.methods import (
    channels_to_keep,
    format_layers,
    gptq_int4,
    heads_to_keep,
    magnitude_prune,
    parse_layers,
    rank_for_energy,
    svd_factors,
    wanda_prune,
)
from hpc_llama.errors import HpcLlamaError
from hpc_llama.model.llama import ModelConfig, Transformer, layer_param_counts
from hpc_llama.model.quantized import dequantize_int4_group, quantize_int4_group

from helpers.models import make_hf_model
from helpers.run import one_line_error, run_cli, run_job

# --- arithmetic ----------------------------------------------------------------


def test_magnitude_prune_hand_worked():
    w = torch.tensor([[0.5, -0.125, 0.25], [-0.375, 0.0625, -0.875]])
    # 3 of 6 go: the three smallest magnitudes, 0.0625, 0.125 and 0.25
    assert magnitude_prune(w, 0.5).tolist() == [[0.5, 0.0, 0.0], [-0.375, 0.0, -0.875]]
    assert torch.equal(magnitude_prune(w, 0.0), w)


def test_wanda_prunes_per_row_by_weight_times_input_norm():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norm = torch.tensor([10.0, 1.0, 1.0, 0.1])  # scores row 0: 10, 2, 3, 0.4; row 1: 40, 3, 2, 0.1
    assert wanda_prune(w, 0.5, norm).tolist() == [[1.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]]


@pytest.mark.parametrize("scores, n_kv, fraction, kept", [
    ([5, 1, 3, 2, 8, 4], 2, 0.34, [0, 2, 4, 5]),  # 3 per group, 1 removed from each: the lowest of each group
    ([5, 1, 3, 2, 8, 4], 2, 0.0, [0, 1, 2, 3, 4, 5]),
    ([5, 1, 3, 2, 8, 4], 1, 0.5, [0, 4, 5]),  # one group: the top three, 8, 5 and 4
    ([1, 2, 3, 4], 2, 0.9, [1, 3]),  # at least one head stays in every group
])
def test_heads_to_keep(scores, n_kv, fraction, kept):
    assert heads_to_keep(torch.tensor(scores, dtype=torch.float64), n_kv, fraction).tolist() == kept


@pytest.mark.parametrize("n, fraction, multiple, keep", [(10, 0.25, 1, 8), (100, 0.3, 32, 96), (64, 0.5, 16, 32),
                                                         (5, 0.99, 1, 1), (40, 0.1, 32, 40)])
def test_channels_to_keep_counts_and_keeps_the_highest(n, fraction, multiple, keep):
    scores = torch.arange(n, dtype=torch.float64).flip(0)  # channel 0 most important
    got = channels_to_keep(scores, fraction, multiple)
    assert got.tolist() == list(range(keep))


@pytest.mark.parametrize("energy, rank", [(0.6, 1), (0.64, 1), (0.65, 2), (0.9, 2), (0.93, 3), (1.0, 3)])
def test_rank_for_energy_hand_worked(energy, rank):
    # squared singular values 9, 4, 1: cumulative shares 9/14 = 0.643, 13/14 = 0.929, 1
    assert rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), energy) == rank


@pytest.mark.parametrize("spec, n, ids", [
    ("0-3,28,29", 30, (0, 1, 2, 3, 28, 29)), ("2", 4, (2,)), ("1-1,1, 0", 4, (0, 1)), ("3-3", 4, (3,)),
    ("4", 4, "outside the model's layers 0-3"), ("-1", 4, "is not a layer"), ("3-1", 4, "runs backwards"),
    ("a", 4, "'a' is not a layer"), ("", 4, "'' is not a layer"), ("1-", 4, "is not a layer"),
])
def test_parse_layers(spec, n, ids):
    if isinstance(ids, str):
        with pytest.raises(ValueError, match=ids):
            parse_layers(spec, n)
    else:
        assert parse_layers(spec, n) == ids
        assert parse_layers(format_layers(ids), n) == ids


def test_format_layers():
    assert format_layers([29, 0, 1, 2, 3, 28]) == "0-3,28-29"
    assert format_layers([5]) == "5" and format_layers([1, 3]) == "1,3"


def test_svd_factors_meet_eckart_young_and_reconstruct_at_full_rank():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)  # numpy's LAPACK as the reference
    for rank in (1, 4, 16):
        a, b = svd_factors(w, rank=rank)
        assert a.shape == (rank, 16) and b.shape == (24, rank)
        err = torch.linalg.matrix_norm((b @ a - w).double()).item()
        assert err == pytest.approx(float(np.sqrt((s[rank:] ** 2).sum())), abs=1e-4)
    with pytest.raises(ValueError, match="larger than the matrix allows"):
        svd_factors(w, rank=17)


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    # Uncorrelated inputs: there is nothing to correct, so the codes are RTN's exactly.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    h = torch.diag(torch.rand(64, generator=g) + 0.5).double()
    got = gptq_int4(w, h, 16, damp=0.0)
    want = quantize_int4_group(w, 16)
    assert len(got) == len(want) == 3  # packed codes, scales, offsets
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_gptq_lowers_the_output_error_of_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(2048, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    h = (x.T @ x).double()

    def out_err(packed, scale, zero):
        return ((dequantize_int4_group(packed, scale, zero, 32) - w) @ x.T).norm().item()

    rtn, gptq = out_err(*quantize_int4_group(w, 32)), out_err(*gptq_int4(w, h, 32))
    print(f"output error: round-to-nearest {rtn:.2f}, GPTQ {gptq:.2f}")
    assert gptq < 0.7 * rtn


@pytest.mark.parametrize("methods, kw, message", [
    (["int3"], {}, "unknown method 'int3'"),
    (["prune"], {}, "prune needs --sparsity"),
    (["prune"], {"sparsity": 1.0}, r"--sparsity must be in \[0, 1\)"),
    (["prune"], {"sparsity": -0.1}, r"--sparsity must be in \[0, 1\)"),
    (["prune-ffn"], {"ffn_prune": 1.5}, r"--ffn-prune must be in \[0, 1\)"),
    (["lowrank"], {}, "exactly one of --rank and --energy"),
    (["lowrank"], {"rank": 0}, "--rank must be at least 1"),
    (["lowrank"], {"energy": 1.5}, r"--energy must be in \(0, 1\]"),
    (["int8", "int4"], {}, "quantising an already-quantised tensor"),
    (["int8", "prune"], {"sparsity": 0.5}, "put int8 last"),
    (["lowrank", "prune-ffn"], {"rank": 4, "ffn_prune": 0.1}, "structured pruning must come before lowrank"),
    (["gptq"], {}, "gptq needs calibration text"),
    (["int4"], {"group_size": 3}, "group size must be an even number"),
    (["int8", "int8"], {}, "given twice"),
    (["int8"], {"sparsity": 0.5}, "--sparsity is given but no method uses it"),
    (["prune"], {"sparsity": 0.5, "embeddings": "int8"}, "--embeddings is given but no method uses it"),
    (["int8"], {"rank": 8}, "--rank is given but no method uses it"),
    ([], {}, "at least one --method"),
])
def test_impossible_chains_are_refused_before_any_work(methods, kw, message):
    with pytest.raises(HpcLlamaError, match=message):
        plan_steps(methods, **kw)


@pytest.mark.parametrize("shapes, lowrank", [
    (None, None),
    ({1: {"n_heads": 4}, 3: {"ffn_dim": 96}}, None),
    ({"0": {"n_heads": 2, "ffn_dim": 8}}, {"layers.2.attention.wq": 5, "layers.0.feed_forward.w2": 3}),
])
def test_param_counts_follow_per_layer_shapes_and_factors(shapes, lowrank):
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=64, attention_bias=True,
                      layer_shapes=shapes, lowrank=lowrank)
    model = Transformer(cfg, device="meta")
    for i in range(4):
        assert layer_param_counts(cfg)[i] == sum(p.numel() for p in model.layers[str(i)].parameters())
    assert cfg.n_params == sum(p.numel() for p in model.parameters())


def test_layer_shapes_that_break_grouped_query_attention_are_refused():
    with pytest.raises(ValueError, match="multiple of 2 kv heads"):
        ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=8, n_kv_heads=2, layer_shapes={0: {"n_heads": 3}})


# --- end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def models(hf_dirs, tokenizer_json, tmp_path_factory):
    """HF directories (GQA llama3-style, tied, with biases) with a real tokenizer, and some text."""
    import glob

    root = tmp_path_factory.mktemp("compress")
    out = {}
    for name in ("llama3", "tied", "bias"):
        shutil.copytree(hf_dirs[name], root / name)
        shutil.copy(tokenizer_json, root / name / "tokenizer.json")
        out[name] = str(root / name)
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    for split, chosen in (("calib", files[40:46]), ("heldout", files[46:50])):
        with open(root / f"{split}.jsonl", "w") as f:
            for p in chosen:
                f.write(json.dumps({"id": os.path.basename(p), "text": open(p).read()[:4000]}) + "\n")
        out[split] = str(root / f"{split}.jsonl")
    out["root"] = root
    return out


def _compress(src, dst, *args, n=1, check=True):
    return run_job(n, "compress", "--model", src, "--output", dst, *args, check=check)


def _hf_with(hf_dir, tensors: dict):
    """transformers' own model with our tensors (dense, by our names) put in place: the reference."""
    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint.hf import to_hf_name

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    state = {to_hf_name(n): t for n, t in tensors.items()}
    missing = set(model.state_dict()) - set(state)
    model.load_state_dict({**{k: model.state_dict()[k] for k in missing}, **state}, strict=True)
    return model


def _dense_tensors(path):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.views import DenseReader

    with open_checkpoint(path) as r:
        d = DenseReader(r)
        return {n: d.read(n) for n in d.names()}


def _logits(path, x, **kw):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    with open_checkpoint(path) as r, torch.no_grad():
        return load_slice(r, **kw)(x)


TOKENS = torch.randint(3, 320, (3, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, args", [
    ("llama3", ["--method", "int8"]),
    ("tied", ["--method", "int4", "--group-size", "16", "--embeddings"]),
    ("bias", ["--method", "int8", "--embeddings"]),
    ("tied", ["--method", "int4", "--group-size", "16", "--embeddings", "int8"]),
    ("llama3", ["--method", "int8", "--embeddings", "int4", "--group-size", "16"]),
])
def test_quantized_model_equals_transformers_with_the_dequantized_weights(models, tmp_path, name, args):
    out = str(tmp_path / "q.h5")
    _compress(models[name], out, *args)
    ref = _hf_with(models[name], _dense_tensors(out))
    with torch.no_grad():
        want = ref(TOKENS).logits
    got = _logits(out, TOKENS)
    assert (got - want).abs().max().item() <= 1e-4
    # ... and it really is quantized: different from the original, but close
    with torch.no_grad():
        orig = make_hf_model(name)(TOKENS).logits
    assert 1e-4 < (got - orig).abs().max().item() < 0.5


@pytest.mark.parametrize("args, layers, table", [
    (["--method", "int4", "--group-size", "16", "--embeddings", "int8"], "int4-group", "int8-channel"),
    (["--method", "int8", "--embeddings", "int4", "--group-size", "16"], "int8-channel", "int4-group"),
    (["--method", "int8", "--embeddings"], "int8-channel", "int8-channel"),
    (["--method", "int4", "--group-size", "16"], "int4-group", "none"),
])
def test_the_embedding_table_takes_its_own_scheme(models, tmp_path, args, layers, table):
    from hpc_llama.checkpoint import open_checkpoint

    out = str(tmp_path / "q.h5")
    _compress(models["llama3"], out, *args)
    with open_checkpoint(out) as r:
        assert r.info("layers.0.attention.wq.weight").scheme == layers
        assert r.info("layers.1.feed_forward.w2.weight").scheme == layers
        assert r.info("tok_embeddings.weight").scheme == table
        assert r.info("output.weight").scheme == table
        assert r.info("norm.weight").scheme == "none"


def test_int4_shrinks_the_file_and_the_resident_weights(models, tmp_path):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.compress.chain import resident_bytes

    out = str(tmp_path / "q4.h5")
    _compress(models["tied"], out, "--method", "int4", "--group-size", "16", "--embeddings")
    with open_checkpoint(models["tied"]) as orig, open_checkpoint(out) as comp:
        fp32 = sum(orig.info(n).nbytes for n in orig.names())
        stored = sum(comp.info(n).stored_bytes for n in comp.names())
        a, b = resident_bytes(load_slice(orig)), resident_bytes(load_slice(comp))
    print(f"int4/16: tensors {stored / fp32:.3f} of fp32, resident {b / a:.3f}")
    assert stored <= 0.30 * fp32 and b <= 0.30 * a


CHAIN = ["--method", "prune-heads,prune-ffn,lowrank,gptq", "--head-prune", "0.5", "--ffn-prune", "0.25",
         "--energy", "0.9", "--group-size", "16", "--targets", "wq,wo,w2"]


@pytest.fixture(scope="module")
def chained(models):
    """The llama3 model through the whole chain with calibration, on one rank."""
    out = str(models["root"] / "chain-1.h5")
    _compress(models["llama3"], out, *CHAIN, "--calib", models["calib"], "--calib-samples", "12",
              "--calib-len", "64", "--eval", models["heldout"], "--eval-len", "64")
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_any_number_of_ranks_writes_the_same_bytes(models, chained, tmp_path, n):
    out = str(tmp_path / f"chain-{n}.h5")
    _compress(models["llama3"], out, *CHAIN, "--calib", models["calib"], "--calib-samples", "12",
              "--calib-len", "64", n=n)
    assert open(out, "rb").read() == open(chained, "rb").read()


def test_pruned_file_is_filtered_and_byte_identical_across_ranks(models, tmp_path):
    from hpc_llama.checkpoint import open_checkpoint

    one, two = str(tmp_path / "p1.h5"), str(tmp_path / "p2.h5")
    for path, n in ((one, 1), (two, 2)):
        _compress(models["llama3"], path, "--method", "prune", "--sparsity", "0.75", n=n)
    assert open(one, "rb").read() == open(two, "rb").read()
    with open_checkpoint(one) as r:
        w = r.read("layers.1.feed_forward.w2.weight")
        info = r.info("layers.1.feed_forward.w2.weight")
    assert info.scheme == "sparse" and (w == 0).float().mean().item() == pytest.approx(0.75, abs=1e-3)
    assert info.stored_bytes < 0.45 * info.nbytes


def test_chain_changes_shapes_runs_and_matches_transformers_dense(models, chained, tmp_path):
    from hpc_llama.checkpoint import open_checkpoint

    with open_checkpoint(chained) as r:
        cfg = r.config
        assert set(cfg.layer_shapes) == {0, 1, 2, 3}
        assert all(s == {"n_heads": 4, "ffn_dim": 128} for s in cfg.layer_shapes.values())  # 160 * 0.75 -> 128 (x16)
        assert cfg.n_params < make_hf_model("llama3").num_parameters()
        schemes = {r.info(n).scheme for n in r.names()}
    assert "int4-group" in schemes
    # Dense form in an HF directory (uniform shapes fold into HF's fields): transformers computes the same.
    hf_out = str(tmp_path / "hf")
    run_cli("convert", chained, hf_out, "--format", "hf", "--dequantize", check=True)
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()(TOKENS).logits
    assert (_logits(chained, TOKENS) - want).abs().max().item() <= 1e-4
    summary = json.load(open(chained + ".summary.json"))
    e = summary["eval"]
    assert e["tokens"] > 0 and e["kl_mean"] >= 0 and 0 <= e["top1_agreement"] <= 1
    assert summary["parameters"]["compressed"] == cfg.n_params


def test_layers_limits_the_chain_and_leaves_the_others_as_they_were(models, tmp_path):
    from hpc_llama.checkpoint import open_checkpoint

    args = ["--method", "prune-heads,int4", "--head-prune", "0.5", "--group-size", "16", "--layers", "1-2"]
    one, two = str(tmp_path / "l1.h5"), str(tmp_path / "l2.h5")
    _compress(models["llama3"], one, *args)
    _compress(models["llama3"], two, *args, n=2)
    assert open(one, "rb").read() == open(two, "rb").read()
    with open_checkpoint(models["llama3"]) as orig, open_checkpoint(one) as r:
        assert r.config.layer_shapes == {1: {"n_heads": 4}, 2: {"n_heads": 4}}
        for i in (0, 3):
            for n in (m for m in orig.names() if m.startswith(f"layers.{i}.")):
                assert r.info(n).scheme == "none" and torch.equal(r.read(n), orig.read(n))
        for i in (1, 2):
            assert r.info(f"layers.{i}.attention.wq.weight").scheme == "int4-group"
            assert r.info(f"layers.{i}.attention.wq.weight").logical_shape == (4 * r.config.head_dim, 64)
        assert r.info("tok_embeddings.weight").scheme == "none"
        record = r.hf_config["hpc_llama"]["compression"]
    assert [s["layers"] for s in record] == [[1, 2], [1, 2]]
    assert "prune-heads(fraction=0.5, layers=1-2, score=weight)" in run_cli("inspect", one, check=True).stdout
    # a model with layers of different shapes scores the same at PP 1 and 2
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("def f(x):", "import os\nos.path", "class A:")))
    outs = []
    for pp in (1, 2):
        out = tmp_path / f"s{pp}.jsonl"
        run_job(pp, "score", "--model", one, "--input", str(inp), "--output", str(out), "--pp", str(pp),
                "--context", "64", "--quiet")
        outs.append([json.loads(line) for line in open(out)])
    assert len(outs[0]) == len(outs[1]) == 3
    assert max(abs(a["loglik"] - b["loglik"]) for a, b in zip(*outs)) <= 1e-4


def test_eval_perplexity_is_the_reference_perplexity(models, tmp_path):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.compress.chain import token_windows
    from hpc_llama.tokenizer import Tokenizer

    out = str(tmp_path / "e.h5")
    _compress(models["llama3"], out, "--method", "int8", "--eval", models["heldout"], "--eval-len", "64",
              "--eval-windows", "6")
    e = json.load(open(out + ".summary.json"))["eval"]
    with open_checkpoint(models["llama3"]) as r:
        toks = token_windows([models["heldout"]], Tokenizer.from_checkpoint(r), r.config.bos_id, 320, 64, 6,
                             "text", "--eval")
    with torch.no_grad():
        for name, model in (("original", make_hf_model("llama3")), ("compressed", _hf_with(models["llama3"],
                                                                                            _dense_tensors(out)))):
            lp = torch.log_softmax(model(toks).logits[:, :-1].double(), -1)
            ppl = torch.exp(-lp.gather(-1, toks[:, 1:, None]).mean()).item()
            assert e["perplexity"][name] == pytest.approx(ppl, rel=1e-4)
    assert e["tokens"] == 6 * 63 and abs(e["perplexity_change"]) < 0.01


@pytest.mark.parametrize("job", ["score", "generate"])
def test_compressed_checkpoint_gives_the_same_numbers_at_pp_1_2_4(models, chained, tmp_path, job):
    inp = tmp_path / "in.jsonl"
    field = "text" if job == "score" else "prompt"
    inp.write_text("".join(json.dumps({field: t}) + "\n" for t in ("def f(x):", "import os\nos.path", "class A:")))
    extra = ["--context", "64"] if job == "score" else ["--max-new-tokens", "6"]
    outs = {}
    for n in (1, 2, 4):
        out = tmp_path / f"{job}-{n}.jsonl"
        run_job(n, job, "--model", chained, "--input", inp, "--output", out, "--pp", n, "--quiet", *extra)
        outs[n] = [json.loads(line) for line in open(out)]
    assert [len(outs[n]) for n in (1, 2, 4)] == [3, 3, 3]
    for n in (2, 4):
        if job == "score":
            assert max(abs(a["loglik"] - b["loglik"]) for a, b in zip(outs[1], outs[n])) <= 1e-4
        else:
            assert [r["tokens"] for r in outs[n]] == [r["tokens"] for r in outs[1]]


def test_inspect_shows_each_tensors_scheme(chained):
    p = run_cli("inspect", chained, "--tensors", check=True)
    assert "compression  prune-heads(" in p.stdout and "int4-group" in p.stdout
    assert "pruned       4 layers reshaped: heads [4], ffn [128]" in p.stdout
    row = next(line for line in p.stdout.splitlines() if "layers.0.feed_forward.w2" in line)
    assert "int4-group" in row and "-> [64, 128]" in row
    rows = json.loads(run_cli("inspect", chained, "--json", "--tensors", check=True).stdout)["tensor_list"]
    assert {r["scheme"] for r in rows} >= {"none", "int4-group"}


def _one_line_error(p, message, *absent):
    one_line_error(p, message)
    for path in absent:
        assert not os.path.exists(path)


def test_bad_input_one_line_and_nothing_written(models, tmp_path):
    m, out = models["llama3"], str(tmp_path / "o.h5")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--method", "int5"], "unknown method 'int5'"),
        (["--method", "prune", "--sparsity", "1"], "--sparsity must be in [0, 1)"),
        (["--method", "lowrank", "--rank", "65"], "--rank 65 is larger than layers.0.attention.wq.weight allows"),
        (["--method", "int4", "--group-size", "48"], "group size 48 does not divide the 64 inputs"),
        (["--method", "int8", "--eval", str(empty)], "no text to use (empty)"),
        (["--method", "gptq"], "gptq needs calibration text"),
        (["--method", "int8", "--targets", "wz"], "unknown projection 'wz'"),
        (["--method", "int8", "--calib", models["calib"]], "--calib is given but none of the methods uses"),
        (["--method", "int8", "--layers", "2-4"], "--layers: 2-4 is outside the model's layers 0-3"),
    ]
    for args, message in cases:
        _one_line_error(_compress(m, out, *args, check=False), message, out, out + ".summary.json")
    q = str(tmp_path / "q.h5")
    _compress(m, q, "--method", "int8")
    _one_line_error(_compress(q, out, "--method", "int4", check=False),
                    "quantising an already-quantised tensor: layers.0.attention.wq.weight is stored as int8-channel", out)
    _one_line_error(_compress(m, q, "--method", "int8", check=False), "already exists", )
    _one_line_error(run_cli("convert", q, str(tmp_path / "hf"), "--format", "hf"),
                    "is stored as int8-channel, which an HF directory cannot hold; give --dequantize",
                    str(tmp_path / "hf"))


def test_training_refuses_a_quantized_checkpoint(models, tmp_path):
    q = str(tmp_path / "q.h5")
    _compress(models["llama3"], q, "--method", "int8")
    data = str(tmp_path / "data")
    run_cli("prepare", "--input", models["calib"], "--output", data, "--tokenizer", q, "--split", "0.5,0.25,0.25",
            check=True)
    p = run_cli("train", "--init", q, "--data", data, "--out", str(tmp_path / "run"), "--steps", "1",
                "--set", "train.seq_len=32")
    _one_line_error(p, "training needs dense weights")


def test_a_scheme_this_version_does_not_know_is_refused(tmp_path, models):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import H5Writer
    from hpc_llama.checkpoint.slices import load_slice

    with open_checkpoint(models["llama3"]) as r:
        path = str(tmp_path / "future.h5")
        w = H5Writer(path, r.hf_config, version=2)
        for n in r.names():
            w.add(n, r.read(n), {"scheme": "int3-lattice"} if n == "layers.0.attention.wq.weight" else None)
        w.close()
    with open_checkpoint(path) as r, pytest.raises(HpcLlamaError, match="stored as 'int3-lattice', which this "
                                                                        "version of hpc_llama does not read"):
        load_slice(r)
