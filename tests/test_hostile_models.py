"""Model files from strangers: each case is a real crafted file, refused with one line before it can make
hpc_llama read outside the model directory, allocate what the file does not hold, compute NaN, or hang.

Most cases call the readers in-process on tiny files; the CLI runs are the ones where the exit code and
the one line are the point, and one child process under an address-space limit proves that nothing big
is allocated before a lying file is refused.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from hpc_llama.chat import MAX_INT_BITS, ChatTokenizer
from hpc_llama.checkpoint import open_checkpoint
from hpc_llama.checkpoint.gguf import MAX_ARRAY_ITEMS
from hpc_llama.checkpoint.h5 import MAX_INFLATE, write_checkpoint
from hpc_llama.checkpoint.hf import MAX_HEADER, write_hf
from hpc_llama.checkpoint.slices import load_slice
from hpc_llama.checkpoint.tensors import checksum
from hpc_llama.checkpoint.views import InitReader
from hpc_llama.errors import HpcLlamaError
from hpc_llama.model.llama import MAX_DIM, ModelConfig

from helpers.run import ROOT, one_line_error, run_cli

# Tied embeddings: the embedding is the only tensor of vocabulary size.
CFG = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64,
                  tie_embeddings=True, bos_id=1, eos_ids=(2,))
EMBED_HF = "model.embed_tokens.weight"
SECRET = b"TOP-SECRET-CONTENT-0123456789"
HUGE_VOCAB = 1 << 27  # x dim 16 x 4 bytes = 8 GiB claimed by files of a few hundred KB


# --- crafting --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Pristine tiny models in every format, copied by each test before it damages them."""
    root = tmp_path_factory.mktemp("pristine")
    reader = InitReader(CFG, seed=0)
    write_hf(str(root / "hf"), reader)
    write_hf(str(root / "hf-sharded"), reader, shard_bytes=1)
    write_checkpoint(str(root / "m.h5"), reader)
    write_checkpoint(str(root / "sharded"), reader, shard_bytes=1)
    return root


def copy(models, name, tmp_path):
    """A private copy of a pristine model, inside a directory that also holds the secret beside it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "secret.bin").write_bytes(SECRET)
    src, dst = models / name, tmp_path / "model" / name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir()
        shutil.copy(src, dst)
    return dst


def header_of(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data):
    raw = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data)


def set_hf_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))  # NaN and Infinity as Python's json writes them


def rewrite_h5_index(path, change):
    with h5py.File(path, "a") as f:
        index = change(json.loads(f["index"][()].tobytes()))
        raw = np.frombuffer(json.dumps(index).encode(), np.uint8)
        del f["index"]
        f.create_dataset("index", data=raw).attrs["xxh3"] = checksum(raw)


def h5_claiming_vocab(path, vocab, filtered):
    """An .h5 whose config and embedding claim `vocab` rows the file has no bytes for (HDF5 allocates
    a dataset's storage only when it is written); its index is consistent, so only its size gives it away."""
    with h5py.File(path, "a") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["vocab_size"] = vocab
        f.attrs["config"] = json.dumps(cfg)
        del f["tensors/tok_embeddings.weight"]
        extra = dict(chunks=(1024, CFG.dim), compression="gzip") if filtered else {}
        f["tensors"].create_dataset("tok_embeddings.weight", shape=(vocab, CFG.dim), dtype="<f4", **extra)

    def grow(index):
        index["tok_embeddings.weight"]["shape"] = [vocab, CFG.dim]
        return index

    rewrite_h5_index(path, grow)


def hf_claiming_vocab(d, vocab):
    set_hf_config(d, vocab_size=vocab)
    header, data = header_of(d / "model.safetensors")
    begin = header[EMBED_HF]["data_offsets"][0]
    header[EMBED_HF] = {"dtype": "F32", "shape": [vocab, CFG.dim], "data_offsets": [begin, begin + vocab * CFG.dim * 4]}
    write_st(d / "model.safetensors", header, data)


_GGUF_PARTS = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def write_gguf(path, eps=1e-5, block_count=CFG.n_layers, vocab_claim=None):
    """A tiny Llama GGUF (no tokenizer); `vocab_claim` makes token_embd claim that many rows with no data."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    if isinstance(block_count, str):
        w.add_string("llama.block_count", block_count)
    else:
        w.add_block_count(block_count)
    w.add_context_length(CFG.max_seq_len)
    w.add_embedding_length(CFG.dim)
    w.add_feed_forward_length(CFG.ffn_dim)
    w.add_head_count(CFG.n_heads)
    w.add_head_count_kv(CFG.n_kv_heads)
    w.add_layer_norm_rms_eps(eps)
    reader = InitReader(CFG, seed=0)
    for name in reader.names():
        if name.startswith("layers."):
            _, i, *part, kind = name.split(".")
            out = f"blk.{i}.{_GGUF_PARTS['.'.join(part)]}.{kind}"
        else:
            out = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}[name]
        if vocab_claim and out == "token_embd.weight":
            w.add_tensor_info(out, (vocab_claim, CFG.dim), np.dtype(np.float32), vocab_claim * CFG.dim * 4)
        else:
            w.add_tensor(out, reader.read(name).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if vocab_claim:
        w.write_ti_data_to_file()  # the tensor table, and no tensor data at all
    else:
        w.write_tensors_to_file()
    w.close()
    return str(path)


def gguf_array_bomb(path, entries):
    """A GGUF header whose one metadata array claims `entries` one-byte entries, in a file of 48 bytes.
    The gguf package would loop over every one of them, past the end of the file, making an object each."""
    key = b"general.bomb"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IIQ", 9, 0, entries))
    return str(path)


class Opened:
    """Records every file this process opens by name: Python's own opens (an audit hook) and h5py's."""

    paths: list = []  # cleared, never replaced: the fixture hands out this list
    recording = False

    @staticmethod
    def hook(event, args):
        if Opened.recording and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            Opened.paths.append(os.fsdecode(args[0]))


sys.addaudithook(Opened.hook)  # audit hooks cannot be removed; this one only records while asked to


@pytest.fixture
def opened(monkeypatch):
    real_file = h5py.File

    def recording_file(name, *args, **kwargs):
        Opened.paths.append(os.fsdecode(name))
        return real_file(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", recording_file)
    Opened.paths.clear()
    Opened.recording = True
    yield Opened.paths
    Opened.recording = False


def refused(path, *needles, read=lambda r: None):
    """Open (and `read`) a checkpoint, which must fail with one HpcLlamaError holding every needle."""
    Opened.paths.clear()  # what the crafting opened is not the reader's doing
    with pytest.raises(HpcLlamaError) as e:
        with open_checkpoint(str(path)) as r:
            read(r)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def never_touched(opened, tmp_path, message=""):
    secret = os.path.realpath(tmp_path / "secret.bin")
    assert not [p for p in opened if os.path.realpath(p) == secret]
    assert SECRET.decode() not in message


# --- 1. paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("where", ["h5 tensors", "h5 assets", "h5 shards", "weight_map"])
def test_an_index_naming_a_file_outside_the_model_directory_is_refused(models, tmp_path, opened, where, form):
    d = copy(models, "hf-sharded" if where == "weight_map" else "sharded", tmp_path)
    target = "../../secret.bin" if form == "relative" else str(tmp_path / "secret.bin")
    index_name = "model.safetensors.index.json" if where == "weight_map" else "index.json"
    index = json.loads((d / index_name).read_text())
    if where == "weight_map":
        index["weight_map"][EMBED_HF] = target
        entry = f"weight_map entry {EMBED_HF!r}"
    elif where == "h5 tensors":
        index["tensors"]["tok_embeddings.weight"] = target
        entry = "the entry of tensor 'tok_embeddings.weight'"
    elif where == "h5 assets":
        index["assets"] = target
        entry = "assets"
    else:
        index["shards"][0] = target
        entry = "shards[0]"
    (d / index_name).write_text(json.dumps(index))
    message = refused(d, f"{d / index_name}: {entry} names {target!r}, which is not a plain file name")
    never_touched(opened, tmp_path, message)


@pytest.mark.parametrize("model, link", [
    ("hf", "model.safetensors"), ("hf", "config.json"), ("hf", "tokenizer.json"),
    ("sharded", "index.json"), ("sharded", "model-00001-of-00004.h5"),
])
def test_a_symlink_leading_out_of_the_model_directory_is_refused(models, tmp_path, opened, model, link):
    d = copy(models, model, tmp_path)
    if link == "model-00001-of-00004.h5":
        assert json.loads((d / "index.json").read_text())["shards"][0] == link  # four units: embed, 2 layers, head
    if (d / link).exists():
        os.remove(d / link)
    os.symlink(tmp_path / "secret.bin", d / link)
    message = refused(d, f"names {link!r}, a link that leads outside the model directory",
                      read=lambda r: (r.assets(), [r.info(n) for n in r.names()]))
    never_touched(opened, tmp_path, message)


def test_a_hugging_face_cache_snapshot_links_into_its_own_blobs(models, tmp_path):
    # models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/HASH is how the hub cache stores every model.
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(models / "hf"))):
        shutil.copy(models / "hf" / f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", repo / "snapshots" / "rev" / f)
    with open_checkpoint(str(repo / "snapshots" / "rev")) as r:
        assert r.config == CFG
        load_slice(r)


@pytest.mark.parametrize("kind", ["external link", "external storage"])
def test_hdf5_objects_that_point_into_other_files_are_refused(models, tmp_path, opened, kind):
    p = copy(models, "m.h5", tmp_path)
    name = "layers.0.ffn_norm.weight"
    with h5py.File(p, "a") as f:
        del f[f"tensors/{name}"]
        if kind == "external link":
            f["tensors"][name] = h5py.ExternalLink(str(tmp_path / "secret.bin"), "/data")
        else:
            f["tensors"].create_dataset(name, shape=(CFG.dim,), dtype="<f4",
                                        external=[(str(tmp_path / "secret.bin"), 0, CFG.dim * 4)])
    what = "is a link to another object or file" if kind == "external link" else "keeps its data in other files"
    message = refused(p, f"{p}: {name!r} {what}", read=lambda r: load_slice(r))
    never_touched(opened, tmp_path, message)


def test_a_contiguous_dataset_that_disagrees_with_the_index_is_refused(models, tmp_path):
    # Contiguous tensors are planned from HDF5's offset and storage size alone (no shape query): a dataset
    # replaced by a shorter one, under an index that still claims the old shape, must still be caught.
    p = copy(models, "m.h5", tmp_path)
    name = "layers.1.attention.wq.weight"
    with h5py.File(p, "a") as f:
        value = f[f"tensors/{name}"][()]
        del f[f"tensors/{name}"]
        f["tensors"].create_dataset(name, data=value[:-1], track_times=False)
    refused(p, f"{p}: tensor {name} disagrees with the index", read=lambda r: load_slice(r))


def test_a_file_that_is_not_safetensors_is_not_quoted(models, tmp_path):
    d = copy(models, "hf", tmp_path)
    (d / "model.safetensors").write_bytes(SECRET * 40)
    message = refused(d, f"{d / 'model.safetensors'}: ")
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in message and SECRET[:8].decode() not in message


# --- 2. sizes before allocation ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["reversed", "short", "past the end", "overlap", "header past the end",
                                    "header too long", "no dtype", "not JSON", "deep JSON"])
def test_safetensors_entries_must_describe_their_own_bytes(models, tmp_path, damage):
    d = copy(models, "hf", tmp_path)
    st = d / "model.safetensors"
    header, data = header_of(st)
    name = "model.layers.0.input_layernorm.weight"
    begin, end = header[name]["data_offsets"]
    nbytes = CFG.dim * 4
    assert end - begin == nbytes
    where = f"{st}: tensor {name!r}"
    if damage == "reversed":
        header[name]["data_offsets"] = [end, begin]
        needle = f"{where}: corrupt entry (data_offsets [{end}, {begin}] are reversed or negative)"
    elif damage == "short":
        header[name]["data_offsets"] = [begin, end - 4]
        needle = (f"{where}: corrupt entry (shape [{CFG.dim}] of float32 takes {nbytes} bytes, "
                  f"but its data_offsets hold {nbytes - 4})")
    elif damage == "past the end":
        header[name]["data_offsets"] = [len(data), len(data) + nbytes]
        needle = (f"{where}: truncated (data_offsets end at byte {len(data) + nbytes} "
                  f"of a data section of {len(data)} bytes)")
    elif damage == "overlap":
        other = "model.layers.0.post_attention_layernorm.weight"
        header[other]["data_offsets"] = [begin, end]
        needle = f"{st}: corrupt safetensors header (tensors {name!r} and {other!r} overlap)"
    elif damage == "no dtype":
        del header[name]["dtype"]
        needle = f"{where} has unsupported dtype None"
    if damage in ("reversed", "short", "past the end", "overlap", "no dtype"):
        write_st(st, header, data)
    elif damage == "header past the end":
        raw = st.read_bytes()
        st.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
        needle = f"{st}: truncated safetensors file (the header runs past the end of the file)"
    elif damage == "header too long":
        st.write_bytes(struct.pack("<Q", MAX_HEADER + 1) + b" " * 64)
        needle = f"{st}: not a safetensors file (its header length is over {MAX_HEADER} bytes)"
    else:
        raw = b"\xff\xfe{" if damage == "not JSON" else b"[" * 100_000
        st.write_bytes(struct.pack("<Q", len(raw)) + raw)
        needle = f"{st}: corrupt safetensors header (not JSON)"
    refused(d, needle)


def test_inspect_verify_fails_on_lying_offsets_and_claims(models, tmp_path):
    d = copy(models, "hf", tmp_path)
    header, data = header_of(d / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    header[name]["data_offsets"] = header[name]["data_offsets"][::-1]
    write_st(d / "model.safetensors", header, data)
    one_line_error(run_cli("inspect", d, "--verify"), f"tensor {name!r}", "reversed")
    h5 = copy(models, "m.h5", tmp_path / "b")
    h5_claiming_vocab(h5, HUGE_VOCAB, filtered=False)
    one_line_error(run_cli("inspect", h5, "--verify"),
                   f"'tok_embeddings.weight' claims {HUGE_VOCAB * CFG.dim * 4} bytes, more than the file holds")


def test_a_small_file_claiming_a_huge_vocabulary_allocates_nothing_first(models, tmp_path):
    """Each lying file is opened and loaded in a child whose address space is capped at 2 GiB (torch and
    h5py need about 0.7): allocating what they claim (8 GiB) would end in MemoryError, not in one line."""
    h5, chunked = copy(models, "m.h5", tmp_path / "a"), copy(models, "m.h5", tmp_path / "b")
    h5_claiming_vocab(h5, HUGE_VOCAB, filtered=False)
    h5_claiming_vocab(chunked, HUGE_VOCAB, filtered=True)
    hf = copy(models, "hf", tmp_path / "c")
    hf_claiming_vocab(hf, HUGE_VOCAB)
    gguf_file = write_gguf(tmp_path / "claim.gguf", vocab_claim=HUGE_VOCAB)
    bomb = gguf_array_bomb(tmp_path / "bomb.gguf", 1 << 62)
    short = gguf_array_bomb(tmp_path / "short.gguf", MAX_ARRAY_ITEMS)
    cases = [str(h5), str(chunked), str(hf), gguf_file, bomb, short]
    assert all(os.path.getsize(p) < 1 << 20 for p in (h5, chunked, hf / "model.safetensors", gguf_file, bomb, short))
    script = textwrap.dedent("""
        import json, resource, sys
        cap = 2 << 30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import numpy as np
        from hpc_llama.checkpoint import open_checkpoint
        from hpc_llama.checkpoint.slices import load_slice
        from hpc_llama.errors import HpcLlamaError
        try:
            np.ones(cap, np.uint8)
            control = "allocated"
        except MemoryError:
            control = "MemoryError"  # the cap holds
        out = {"control": control}
        for path in sys.argv[1:]:
            try:
                with open_checkpoint(path) as r:
                    load_slice(r)
                out[path] = "loaded"
            except HpcLlamaError as e:
                out[path] = str(e)
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-c", script, *cases], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out.pop("control") == "MemoryError"
    claim = HUGE_VOCAB * CFG.dim * 4
    assert f"'tok_embeddings.weight' claims {claim} bytes" in out[str(h5)]
    assert f"'tok_embeddings.weight' claims {claim} bytes" in out[str(chunked)]
    assert f"tensor {EMBED_HF!r}: truncated (data_offsets end at byte" in out[str(hf)]
    assert "corrupt GGUF file (tensor 'token_embd.weight' runs past the end of the file)" in out[gguf_file]
    assert f"corrupt GGUF file (its metadata arrays hold over {MAX_ARRAY_ITEMS} entries)" in out[bomb]
    assert "corrupt GGUF file (an array runs past the end of the file)" in out[short]


def test_a_deflated_dataset_inside_deflates_bound_still_reads(models, tmp_path):
    # The bound refuses only lies: a real filtered tensor (shuffle + deflate) inflates far less, and reads.
    p = copy(models, "m.h5", tmp_path)
    name = "layers.0.attention.wq.weight"
    with open_checkpoint(str(p)) as r:
        value = r.read(name).numpy()
    with h5py.File(p, "a") as f:
        del f[f"tensors/{name}"]
        d = f["tensors"].create_dataset(name, data=value, chunks=value.shape, shuffle=True, compression="gzip")
        stored = d.id.get_storage_size()
    assert value.nbytes <= stored * MAX_INFLATE
    with open_checkpoint(str(p)) as r:
        assert np.array_equal(r.read(name).numpy(), value)


def test_a_config_claiming_more_layers_than_stored_is_refused_before_any_is_built(models, tmp_path):
    d = copy(models, "hf", tmp_path)
    set_hf_config(d, num_hidden_layers=10 ** 9)
    t0 = time.perf_counter()
    refused(d, f"{d}: the model config says {10 ** 9} layers, but layer {CFG.n_layers} stores no tensor")
    assert time.perf_counter() - t0 < 5  # a billion meta layers would take hours
    g = write_gguf(tmp_path / "m.gguf", block_count=CFG.n_layers - 1)
    refused(g, f"{g}: the model config says {CFG.n_layers - 1} layers, but it stores layers up to {CFG.n_layers - 1}")


# --- 3. config ranges ----------------------------------------------------------------------


LLAMA3_EQUAL_BANDS = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}


@pytest.mark.parametrize("key, value, field, problem", [
    ("rms_norm_eps", -1e-5, "rms_norm_eps", "must be positive and finite, got -1e-05"),
    ("rms_norm_eps", math.nan, "rms_norm_eps", "must be positive and finite, got nan"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps", "must be a number, got '1e-5'"),
    ("rope_theta", 0.0, "rope_theta", "must be positive and finite, got 0.0"),
    ("rope_theta", math.inf, "rope_theta", "must be positive and finite, got inf"),
    ("rope_scaling", {"rope_type": "linear", "factor": -2.0}, "rope_scaling.factor",
     "must be positive and finite, got -2.0"),
    ("rope_scaling", LLAMA3_EQUAL_BANDS, "rope_scaling.high_freq_factor",
     "4.0 must be larger than low_freq_factor 4.0"),
    ("rope_scaling", [2.0], "rope_scaling", "must be a mapping, got [2.0]"),
    ("hidden_size", 16.0, "hidden_size", "must be an integer, got 16.0"),
    ("vocab_size", MAX_DIM + 1, "vocab_size", f"must be positive and at most {MAX_DIM}, got {MAX_DIM + 1}"),
    ("num_key_value_heads", 0, "num_key_value_heads", f"must be positive and at most {MAX_DIM}, got 0"),
    ("bos_token_id", CFG.vocab_size, "bos_token_id",
     f"must be token ids in 0..{CFG.vocab_size - 1}, got {CFG.vocab_size}"),
    ("eos_token_id", [2, -1], "eos_token_id", f"must be token ids in 0..{CFG.vocab_size - 1}, got -1"),
])
def test_config_values_out_of_range_are_refused_naming_file_and_key(models, tmp_path, key, value, field, problem):
    d = copy(models, "hf", tmp_path)
    set_hf_config(d, **{key: value})
    refused(d, f"{d / 'config.json'}: {field} {problem}")


def test_config_ranges_hold_in_every_format(models, tmp_path):
    p = copy(models, "m.h5", tmp_path)
    with h5py.File(p, "a") as f:
        f.attrs["config"] = json.dumps(dict(json.loads(f.attrs["config"]), rope_theta=-1.0))
    refused(p, f"{p} (config attribute): rope_theta must be positive and finite, got -1.0")
    d = copy(models, "sharded", tmp_path / "b")
    index = json.loads((d / "index.json").read_text())
    index["config"]["rms_norm_eps"] = math.nan
    (d / "index.json").write_text(json.dumps(index))
    refused(d, f"{d / 'index.json'} (config): rms_norm_eps must be positive and finite, got nan")
    g = write_gguf(tmp_path / "m.gguf", eps=math.nan)
    refused(g, f"{g}: llama.attention.layer_norm_rms_epsilon must be positive and finite, got nan")


def test_model_config_table():
    base = dict(vocab_size=10, dim=32, n_layers=2, n_heads=4, ffn_dim=8)
    for bad in (dict(norm_eps=0.0), dict(norm_eps=-math.inf), dict(rope_theta=math.nan), dict(dim=True),
                dict(head_dim=7), dict(max_seq_len=MAX_DIM + 1), dict(bos_id=10), dict(eos_ids="2"),
                dict(rope_scaling={"rope_type": "linear", "factor": math.inf}),
                dict(layer_shapes={"0": {"n_heads": 0}}), dict(lowrank={"layers.0.attention.wq": 0})):
        with pytest.raises(ValueError):
            ModelConfig(**{**base, **bad})
    assert ModelConfig(**base, norm_eps=1, eos_ids=np.int64(3)).norm_eps == 1.0


def test_a_config_error_through_the_cli_is_one_line(models, tmp_path):
    d = copy(models, "hf", tmp_path)
    set_hf_config(d, rms_norm_eps=-1e-5)
    one_line_error(run_cli("inspect", d), f"{d / 'config.json'}: rms_norm_eps must be positive and finite")


# --- 5. malformed files: one line, never a raw exception -------------------------------------


@pytest.mark.parametrize("damage", ["index entry without dtype", "index not an object", "index.json a list",
                                    "weight_map a list", "config.json a list", "gguf block_count a string"])
def test_malformed_files_are_one_line_errors(models, tmp_path, damage):
    if damage == "index entry without dtype":
        path = copy(models, "m.h5", tmp_path)
        rewrite_h5_index(path, lambda i: {**i, "norm.weight": {"shape": i["norm.weight"]["shape"]}})
        needle = f"{path}: corrupt tensor index (entry 'norm.weight' has no dtype)"
    elif damage == "index not an object":
        path = copy(models, "m.h5", tmp_path)
        rewrite_h5_index(path, lambda i: [1, 2])
        needle = f"{path}: corrupt tensor index (not an object)"
    elif damage == "index.json a list":
        path = copy(models, "sharded", tmp_path)
        (path / "index.json").write_text("[]")
        needle = f"{path / 'index.json'}: not an hpc_llama checkpoint index"
    elif damage == "weight_map a list":
        path = copy(models, "hf-sharded", tmp_path)
        (path / "model.safetensors.index.json").write_text('{"weight_map": []}')
        needle = f"{path / 'model.safetensors.index.json'}: corrupt index (no weight_map object)"
    elif damage == "config.json a list":
        path = copy(models, "hf", tmp_path)
        (path / "config.json").write_text("[]")
        needle = f"{path / 'config.json'}: the model config is not a JSON object"
    else:
        path = write_gguf(tmp_path / "m.gguf", block_count="two")
        needle = f"{path}: llama.block_count must be an integer, got 'two'"
    refused(path, needle, read=lambda r: [r.info(n) for n in r.names()])


# --- 4. chat templates ---------------------------------------------------------------------


class _Tok:
    vocab_size = 10


SMOLLM_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_well_behaved_template_renders_as_jinja_renders_it():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = SMOLLM_TEMPLATE + ("{% for k, v in {'a': 1}.items() %}{{ k ~ v ~ loop.length }}{% endfor %}"
                                  "{% for x in [] %}{% else %}{{ 'x' * 3 }}{% endfor %}{{ [1, 2]|join('-') }}")
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    text = "What is the capital of France?"
    expected = plain.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
    assert ChatTokenizer(_Tok(), template, {}).render(text) == expected
    long = "z" * (2 << 20)  # a prompt longer than the bound raises it to 8 times its length
    assert ChatTokenizer(_Tok(), "{{ messages[0]['content'] ~ messages[0]['content'] }}", {}).render(long) == long * 2


@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "it ran for more than 0.3 s"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
     "it wrote more than 1048576 characters"),
    ("{{ 'x' * 10 ** 9 }}", "a repetition would be over 1048576 characters"),
    ("{{ 10 ** (10 ** 8) }}", f"10 ** {10 ** 8} would have over {MAX_INT_BITS} bits"),
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}", "RecursionError"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "a ~ concatenation would be over 1048576"),
    ("{{ (['ab'] * 1000) | join('x' * 100000) }}", "a join would be over 1048576"),
    ("{{ 'x'|center(999999999) }}", "center's argument would be over 1048576"),
    ("{{ '{:>999999999}'.format('x') }}", "a width in a format string would be over 1048576"),
    ("{{ ''.__class__.__mro__ }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ raise_exception('no tools here') }}", "no tools here"),
])
def test_a_runaway_chat_template_ends_in_one_line(template, needle):
    chat = ChatTokenizer(_Tok(), template, {}, seconds=0.3)
    t0 = time.perf_counter()
    with pytest.raises(HpcLlamaError, match="the chat template failed") as e:
        chat.render("hi")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 3


def test_a_broken_tokenizer_config_is_one_line():
    class Reader:
        def asset(self, name):
            return b"{not json"

    with pytest.raises(HpcLlamaError, match="tokenizer_config.json is not JSON"):
        ChatTokenizer.from_checkpoint(Reader(), _Tok())
