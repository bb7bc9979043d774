"""Checkpoint formats: bit-exact round trips, slices that read only their own bytes, corruption caught."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from hpc_llama.checkpoint import open_checkpoint, tensors
from hpc_llama.checkpoint.base import unit_of
from hpc_llama.checkpoint.h5 import write_checkpoint
from hpc_llama.checkpoint.hf import to_hf_name, write_hf
from hpc_llama.checkpoint.slices import load_slice, slice_sources
from hpc_llama.checkpoint.tensors import checksum, new_hasher, read_exact
from hpc_llama.cli import _main as cli
from hpc_llama.errors import HpcLlamaError
from hpc_llama.parallel.layout import layer_partition
from hpc_llama.procstats import bytes_read

from helpers.models import FAMILIES, make_hf_model
from helpers.run import one_line_error, run_cli


def state(reader):
    return {n: reader.read(n) for n in reader.names()}


def assert_bit_identical(a: dict, b: dict):
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n].view(torch.uint8) if a[n].dim() else a[n], b[n].view(torch.uint8) if b[n].dim() else b[n]), n


@pytest.fixture
def hf_with_tokenizer(hf_dirs, tokenizer_json, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(hf_dirs["llama3"], d)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    return str(d)


@pytest.mark.parametrize("name", ["llama2", "llama3", "tied", "bias", *FAMILIES])
def test_hf_to_h5_to_hf_is_bit_exact(name, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    cli(["convert", hf_dirs[name], str(tmp_path / "m.h5")])
    cli(["convert", str(tmp_path / "m.h5"), str(tmp_path / "back"), "--format", "hf"])
    with open_checkpoint(hf_dirs[name]) as a, open_checkpoint(str(tmp_path / "back")) as b:
        assert_bit_identical(state(a), state(b))
        assert a.hf_config == b.hf_config
    # transformers itself loads the export as its own family's class, with the very same tensors.
    ref = AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    assert type(got) is type(ref) and type(got).__name__ == json.load(open(tmp_path / "back" / "config.json"))[
        "architectures"][0]
    ref, got = ref.state_dict(), got.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_config_written_by_us_names_the_family(name, hf_dirs, tmp_path):
    # An export from our own ModelConfig (as a GGUF or a new model gets) states every option under the
    # family's keys: transformers builds the same model from it.
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint.hf import hf_config_from_model, model_config_from_hf

    with open_checkpoint(hf_dirs[name]) as r:
        ours = hf_config_from_model(r.config)
        assert model_config_from_hf(ours) == r.config
        (tmp_path / "m").mkdir()
        json.dump(ours, open(tmp_path / "m" / "config.json", "w"))
        shutil.copy(os.path.join(hf_dirs[name], "model.safetensors"), tmp_path / "m")
    ref = AutoModelForCausalLM.from_pretrained(hf_dirs[name], dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, got(x).logits)


def test_tokenizer_travels_inside_the_checkpoint(hf_with_tokenizer, tokenizer_json, tmp_path):
    cli(["convert", hf_with_tokenizer, str(tmp_path / "m.h5")])
    with open_checkpoint(str(tmp_path / "m.h5")) as r:
        assert r.asset("tokenizer.json") == open(tokenizer_json, "rb").read()
    cli(["convert", str(tmp_path / "m.h5"), str(tmp_path / "hf_out")])
    assert open(tmp_path / "hf_out" / "tokenizer.json", "rb").read() == open(tokenizer_json, "rb").read()


def test_bf16_is_stored_losslessly(tmp_path):
    make_hf_model("llama3", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    cli(["convert", str(tmp_path / "hf"), str(tmp_path / "m.h5")])
    with open_checkpoint(str(tmp_path / "hf")) as a, open_checkpoint(str(tmp_path / "m.h5")) as b:
        assert b.info("layers.0.attention.wq.weight").dtype == "bfloat16"
        assert_bit_identical(state(a), state(b))
    with h5py.File(tmp_path / "m.h5") as f:
        assert f["tensors/layers.0.attention.wq.weight"].attrs["dtype"] == "bfloat16"


def test_sharded_checkpoint_cuts_at_layer_boundaries(hf_dirs, tmp_path):
    cap = 60_000
    cli(["convert", hf_dirs["llama2"], str(tmp_path / "sh"), "--shard-size", str(cap)])
    index = json.load(open(tmp_path / "sh" / "index.json"))
    assert len(index["shards"]) > 2
    by_shard = {}
    for name, shard in index["tensors"].items():
        by_shard.setdefault(unit_of(name), set()).add(shard)
    assert all(len(s) == 1 for s in by_shard.values()), "a layer was cut across shards"
    with open_checkpoint(str(tmp_path / "sh")) as r:
        for shard in index["shards"]:
            names = [n for n, s in index["tensors"].items() if s == shard]
            size = sum(r.info(n).nbytes for n in names)
            units = {unit_of(n) for n in names}
            assert size <= cap or len(units) == 1
        with open_checkpoint(hf_dirs["llama2"]) as ref:
            assert_bit_identical(state(ref), state(r))


def test_hf_directory_with_sharded_safetensors_is_read_in_place(hf_dirs, tmp_path):
    with open_checkpoint(hf_dirs["llama3"]) as r:
        write_hf(str(tmp_path / "hf"), r, shard_bytes=50_000)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        a = load_slice(open_checkpoint(hf_dirs["llama3"]))(x)
        b = load_slice(open_checkpoint(str(tmp_path / "hf")))(x)
    assert torch.equal(a, b)


def test_safetensors_we_write_are_read_by_the_safetensors_library(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    with open_checkpoint(hf_dirs["tied"]) as r:
        write_hf(str(tmp_path / "hf"), r)
        got = load_file(str(tmp_path / "hf" / "model.safetensors"))
        assert set(got) == {to_hf_name(n) for n in r.names()}
        for n in r.names():
            assert torch.equal(got[to_hf_name(n)], r.read(n))


def test_checkpoint_reads_the_same_at_every_pipeline_degree(hf_dirs, tmp_path):
    # Layout independence: the slices of any split, chained, give the same logits.
    with open_checkpoint(hf_dirs["llama3"]) as r:
        write_checkpoint(str(tmp_path / "m.h5"), r)
    r = open_checkpoint(str(tmp_path / "m.h5"))
    x = torch.randint(0, 320, (2, 16))
    outs = []
    for pp in (1, 2, 3, 4):
        h = x
        for p in layer_partition(r.config.n_layers, pp, "balanced"):
            with torch.no_grad():
                h = load_slice(r, p.layers, p.embed, p.head)(h)
        outs.append(h)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_one_stage_of_four_reads_only_its_own_bytes(tmp_path):
    # A model big enough that the measured reads are dominated by tensors.
    cli(["init", "--config", "bench-100m", "--set", "model.n_layers=8", "--set", "model.vocab_size=8000",
         str(tmp_path / "m.h5")])
    reader = open_checkpoint(str(tmp_path / "m.h5"))
    plans = layer_partition(reader.config.n_layers, 4, "uniform")
    for plan in (plans[1], plans[3]):  # a middle stage, and the last (which owns the head)
        names = slice_sources(reader, plan.layers, plan.embed, plan.head)
        expected = sum(reader.info(n).nbytes for n in names)
        fresh = open_checkpoint(str(tmp_path / "m.h5"))
        before = bytes_read()
        model = load_slice(fresh, plan.layers, plan.embed, plan.head)
        read = bytes_read() - before
        fresh.close()
        header = 64 << 10
        print(f"stage {plan.stage}: read {read} bytes for {expected} bytes of tensors "
              f"(+{100 * (read - expected) / expected:.2f}%)")
        assert expected <= read <= expected * 1.05 + header
        assert sorted(int(k) for k in model.layers) == list(plan.layers)
    total = sum(reader.info(n).nbytes for n in reader.names())
    assert expected < total / 2


# --- bad input: one line, exit 2, nothing written ------------------------------------------


def _flip_byte(path, tensor, where=100):
    with h5py.File(path, "r") as f:
        offset = f["tensors"][tensor].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + where)
        b = f.read(1)
        f.seek(offset + where)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def h5_path(hf_dirs, tmp_path):
    p = str(tmp_path / "m.h5")
    with open_checkpoint(hf_dirs["llama3"]) as r:
        write_checkpoint(p, r)
    return p


def test_flipped_bytes_are_caught_naming_the_tensor(h5_path):
    _flip_byte(h5_path, "layers.2.feed_forward.w3.weight")
    r = open_checkpoint(h5_path)
    load_slice(r, range(0, 2), True, False)  # other layers still load
    with pytest.raises(HpcLlamaError, match="checksum mismatch in tensor layers.2.feed_forward.w3.weight"):
        load_slice(r, range(2, 4), False, True)


def test_a_tensor_read_in_pieces_hashes_as_a_whole_and_a_short_file_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(tensors, "CHUNK", 4096)  # several pieces, the last one short
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 100, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(b"header" + data.tobytes())
    out, hasher = np.empty(len(data), np.uint8), new_hasher()
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, 6, out, hasher)
        assert out.tobytes() == data.tobytes() and hasher.hexdigest() == checksum(data)
        with pytest.raises(HpcLlamaError, match=f"unexpected end of file at byte {6 + len(data)}"):
            read_exact(fd, 6, np.empty(len(data) + 1, np.uint8), new_hasher())
    finally:
        os.close(fd)


def test_a_flipped_byte_in_the_last_piece_of_a_tensor_is_caught(h5_path, monkeypatch):
    monkeypatch.setattr(tensors, "CHUNK", 1024)
    name = "layers.0.feed_forward.w2.weight"
    with open_checkpoint(h5_path) as r:
        nbytes = r.info(name).nbytes
    assert nbytes > 3 * 1024
    _flip_byte(h5_path, name, where=nbytes - 1)
    with open_checkpoint(h5_path) as r:
        with pytest.raises(HpcLlamaError, match=f"checksum mismatch in tensor {name}"):
            load_slice(r, range(0, 1), False, False)


def outputs_in(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("damage, needle", [
    ("flip", "checksum mismatch in tensor layers.1.attention.wv.weight"),
    ("truncate", "truncated"),
    ("missing", "tensor layers.3.ffn_norm.weight is missing"),
    ("shape", "has shape"),
    ("model_type", "model_type 'mixtral' is not supported (llama, mistral, qwen2, qwen3)"),
])
def test_damaged_checkpoints_fail_cleanly(h5_path, tmp_path, damage, needle):
    if damage == "flip":
        _flip_byte(h5_path, "layers.1.attention.wv.weight")
    elif damage == "truncate":
        size = os.path.getsize(h5_path)
        with open(h5_path, "r+b") as f:
            f.truncate(size - 5000)
    elif damage == "missing":
        with h5py.File(h5_path, "a") as f:
            del f["tensors/layers.3.ffn_norm.weight"]
    else:
        with h5py.File(h5_path, "a") as f:
            cfg = json.loads(f.attrs["config"])
            if damage == "shape":
                cfg["intermediate_size"] += 8
            else:
                cfg["model_type"] = "mixtral"
            f.attrs["config"] = json.dumps(cfg)
    before = outputs_in(tmp_path)
    for args in (["inspect", h5_path, "--verify"], ["convert", h5_path, str(tmp_path / "out"), "--format", "hf"]):
        one_line_error(run_cli(*args), needle)
    assert outputs_in(tmp_path) == before


def test_bad_inputs_fail_cleanly(hf_dirs, h5_path, tmp_path):
    no_config = tmp_path / "noconfig"
    shutil.copytree(hf_dirs["llama2"], no_config)
    os.remove(no_config / "config.json")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  dim: 64\n  n_layer: 4\n")
    before = outputs_in(tmp_path)
    cases = [
        (["convert", str(no_config), str(tmp_path / "x.h5")], "without config.json"),
        (["inspect", h5_path, "--pp", "9"], "9 pipeline stages but the model has only 4 layers"),
        (["init", "--config", str(bad_yaml), str(tmp_path / "y.h5")], "unknown key 'n_layer'"),
        (["convert", hf_dirs["llama2"], h5_path], "already exists (use --overwrite"),
        (["inspect", str(tmp_path / "nope.h5")], "no such file"),
    ]
    for args, needle in cases:
        one_line_error(run_cli(*args), needle)
    assert outputs_in(tmp_path) == before


def test_force_replaces_an_existing_destination(hf_dirs, h5_path):
    run_cli("convert", hf_dirs["llama2"], h5_path, "--force", check=True)
    with open_checkpoint(h5_path) as r:
        assert r.config.n_kv_heads == 4  # the llama2 model, not the llama3 one it replaced


def test_inspect_reports_stages_and_verifies(h5_path):
    p = run_cli("inspect", h5_path, "--pp", "2", "--verify", "--json", check=True)
    s = json.loads(p.stdout)
    assert s["verify"]["checksums"] and s["verify"]["tensors"] == s["tensors"]
    assert [st["layers"] for st in s["stages"]] == [[0, 2], [2, 4]]
    assert s["parameters"] == sum(int(np.prod(v)) for v in [open_checkpoint(h5_path).info(n).shape
                                                             for n in open_checkpoint(h5_path).names()])


@pytest.mark.parametrize("extra, window, layers", [
    ({}, 12, (2, 3)),  # the window on the layers from max_window_layers up
    ({"use_sliding_window": False}, None, None),  # every released Qwen2.5
    ({"max_window_layers": 28}, None, None),  # no layer that high: none slides
    ({"layer_types": ["sliding_attention", "full_attention"] * 2}, 12, (0, 2)),  # layer_types win
])
def test_qwen_sliding_window_settings_read_as_hf_reads_them(hf_dirs, extra, window, layers):
    from hpc_llama.checkpoint.hf import model_config_from_hf

    saved = json.load(open(os.path.join(hf_dirs["qwen2"], "config.json")))
    saved.pop("layer_types")  # transformers writes the list it derived; without it the rule derives it
    cfg = model_config_from_hf({**saved, **extra})
    assert (cfg.sliding_window, cfg.sliding_layers) == (window, layers)
