"""GGUF tensors are read in bounded pieces with pread: the same bits as a whole-tensor read, without the file's
pages or whole-tensor temporaries staying in memory (benchmarks/gguf_convert_memory.py measures a 7B shape)."""

import os
import tracemalloc

import numpy as np
import pytest

from helpers.kquants import DATA, kq

gguf = pytest.importorskip("gguf", reason="the gguf package reads llama.cpp files; it is in the default install")

LLAMA = kq.MODELS["llama"]
# Every fixture llama.cpp quantized, and the llama source unquantized (F32, F16): Q/K rows permuted or not,
# q/k/v biases (qwen2), q/k norms (qwen3), all ten K-quant mixes.
FILES = [(arch, ftype) for arch, m in kq.MODELS.items() for ftype in m.ftypes] + [("llama", "F32"), ("llama", "F16")]


@pytest.fixture(scope="module")
def plain_files(tmp_path_factory):
    """The llama fixtures' F32 source, and the same with F16 matrices: Q/K rows permuted, not quantized."""
    tensors = kq.source_tensors(LLAMA)
    out = {}
    for kind, dtype in (("F32", np.float32), ("F16", np.float16)):
        path = str(tmp_path_factory.mktemp("plain") / f"tiny-llama-{kind}.gguf")
        kq.write_source(path, LLAMA, {n: a.astype(dtype) if a.ndim == 2 else a for n, a in tensors.items()})
        out["llama", kind] = path
    return out


def _path(arch, ftype, plain_files):
    return plain_files.get((arch, ftype)) or os.path.join(DATA, kq.file_name(arch, ftype))


def _whole_tensor(t, shape, arch):
    """A tensor read the simple way: all its bytes dequantized at once, then llama's Q/K rows put back."""
    from gguf.quants import dequantize

    from hpc_llama.checkpoint.gguf import _PLAIN, unpermute

    data = np.asarray(t.data)
    data = data.reshape(shape) if t.tensor_type.name in _PLAIN else dequantize(data, t.tensor_type).reshape(shape)
    if arch == "llama" and t.name.endswith("attn_q.weight"):
        return unpermute(data, kq.MODELS[arch].n_heads)
    if arch == "llama" and t.name.endswith("attn_k.weight"):
        return unpermute(data, kq.MODELS[arch].n_kv_heads)
    return data


@pytest.mark.parametrize("piece_bytes", [1, 3000, None])
@pytest.mark.parametrize("arch, ftype", FILES)
def test_pieces_give_the_whole_tensors_bits(arch, ftype, piece_bytes, plain_files, monkeypatch):
    """One row (one head's rows for Q/K) per piece, a few rows, and the default: bit for bit the same."""
    from hpc_llama.checkpoint import gguf as ours
    from hpc_llama.checkpoint import open_checkpoint

    if piece_bytes is not None:
        monkeypatch.setattr(ours, "PIECE_BYTES", piece_bytes)
    path = _path(arch, ftype, plain_files)
    with open_checkpoint(path) as r:
        for t in gguf.GGUFReader(path).tensors:
            got = r.read(ours.our_name(t.name)).numpy()
            want = _whole_tensor(t, got.shape, arch)
            assert got.dtype == want.dtype and np.array_equal(got, want), t.name


@pytest.mark.parametrize("cast", [None, "bfloat16"])
def test_reading_holds_a_piece_not_the_tensor(cast, monkeypatch):
    """Temporaries are bounded by the piece, also through a cast (convert --dtype bf16): the gguf package's
    dequantize alone holds twice its output, and a cast of a whole read holds the tensor twice."""
    import torch

    from hpc_llama.checkpoint import gguf as ours
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.views import CastReader

    monkeypatch.setattr(ours, "PIECE_BYTES", 4096)
    with open_checkpoint(os.path.join(DATA, kq.file_name("llama", "Q4_K_M"))) as r:
        if cast:
            r = CastReader(r, getattr(torch, cast))
        shape = r.info("output.weight").shape  # Q6_K, (vocab, dim)
        out = torch.empty(shape, dtype=getattr(torch, cast or "float32"))
        r.read_into("output.weight", out)  # once first: the file descriptor, gguf's lazy imports
        tracemalloc.start()
        try:
            r.read_into("output.weight", out)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    fp32_bytes = 4 * out.numel()
    assert fp32_bytes >= 64 * 4096
    assert peak < fp32_bytes / 8, f"{peak} bytes of temporaries for a tensor of {fp32_bytes} as fp32"


@pytest.mark.parametrize("arch, ftype", [("llama", "F16"), ("llama", "Q4_K_M"), ("qwen2", "Q4_K_M")])
def test_a_cast_in_pieces_is_the_cast_of_the_tensor(arch, ftype, plain_files, monkeypatch):
    import torch

    from hpc_llama.checkpoint import gguf as ours
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.views import CastReader

    monkeypatch.setattr(ours, "PIECE_BYTES", 3000)
    with open_checkpoint(_path(arch, ftype, plain_files)) as r:
        cast = CastReader(r, torch.bfloat16)
        for name in r.names():
            assert torch.equal(cast.read(name).view(torch.int16), r.read(name).to(torch.bfloat16).view(torch.int16))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_no_page_of_the_file_stays_mapped():
    """Reading every tensor leaves no mapping of the file: mapped pages, once touched, would stay in RSS."""
    from hpc_llama.checkpoint import open_checkpoint

    path = os.path.realpath(os.path.join(DATA, kq.file_name("llama", "Q4_K_M")))

    def mapped():
        with open("/proc/self/maps") as f:
            return [line for line in f if line.rstrip("\n").endswith(" " + path)]

    with open_checkpoint(path) as r:
        for name in r.names():
            r.read(name)
        assert mapped() == []
        assert "tokenizer.json" in r.assets()  # parsed at open, before the reader let go of the file
