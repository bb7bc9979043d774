"""Converting a GGUF file: peak memory of `hpc-llama convert` against its largest tensor, at Llama-2-7B's shape.

    python benchmarks/gguf_convert_memory.py                 # 32 layers: a 3.8 GB GGUF, 27 GB of fp32 output
    python benchmarks/gguf_convert_memory.py --layers 2      # the same tensors, 2 layers: a smoke run (~1 min)

A GGUF file is the largest input users bring, so converting one must stream
tensor by tensor: peak memory within one tensor's dequantized size plus a
fixed margin. This writes a synthetic file of Llama-2-7B's shape
(vocab 32000, dim 4096, FFN 11008, 32 heads, as many layers as asked), the
way a Q4_K_M file is typed: Q4_K for the 2-D tensors, Q6_K for output.weight,
F32 norms, a small byte-level BPE tokenizer. It is written tensor by tensor
(the writer never holds more than one tensor's quantized bytes); the quantized
bytes are random except each block's fp16 scales (d, dmin), which are small
and finite so dequantization gives finite numbers.

Then `hpc-llama convert FILE OUT.h5` runs in a fresh process for each --dtype
asked (keep: fp32 output; bf16: cast on the way). That process imports
everything the job imports first and takes its VmRSS as the baseline; a thread
samples RssAnon (heap: tensors, temporaries) and RssFile (file-backed pages:
libraries and any memory-mapped input) every 10 ms; at the end VmHWM is the
peak. VmHWM rather than ru_maxrss, which survives fork+exec and would report
the parent's peak. The figure of merit is
    (peak - baseline) / (largest tensor's fp32 size),
which the goal puts at 1 plus a fixed margin (one that does not grow with the
model: compare --layers 2 with 32). Files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from common import ROOT, llama_gguf_writer, save_result  # noqa: E402  (benchmarks/common.py, beside this script)


@dataclass(frozen=True)
class Shape:
    """Llama-2-7B's shape, with the number of layers free."""

    vocab: int = 32000
    dim: int = 4096
    n_layers: int = 32
    ffn_dim: int = 11008
    n_heads: int = 32
    context: int = 4096


def tensor_plan(s: Shape):
    """(GGUF name, numpy shape, type name) in llama.cpp's order, typed as a Q4_K_M-like file."""
    yield "token_embd.weight", (s.vocab, s.dim), "Q4_K"
    yield "output_norm.weight", (s.dim,), "F32"
    yield "output.weight", (s.vocab, s.dim), "Q6_K"
    for i in range(s.n_layers):
        yield f"blk.{i}.attn_norm.weight", (s.dim,), "F32"
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            yield f"blk.{i}.{part}.weight", (s.dim, s.dim), "Q4_K"
        yield f"blk.{i}.ffn_norm.weight", (s.dim,), "F32"
        yield f"blk.{i}.ffn_gate.weight", (s.ffn_dim, s.dim), "Q4_K"
        yield f"blk.{i}.ffn_down.weight", (s.dim, s.ffn_dim), "Q4_K"
        yield f"blk.{i}.ffn_up.weight", (s.ffn_dim, s.dim), "Q4_K"


# Byte offset of each block's fp16 scale fields (gguf-py quants.py): Q4_K is d, dmin, scales[12], qs[128];
# Q6_K is ql[128], qh[64], scales[16] (int8), d.
_FP16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}


def random_tensor(rng, shape, kind: str) -> np.ndarray:
    """One tensor's stored bytes (numpy shape `shape`): random quants with small finite fp16 scales."""
    import gguf

    if kind == "F32":
        return (1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in _FP16_FIELDS[kind]:
        scale = rng.uniform(1e-4, 1e-3, raw.shape[0]).astype(np.float16)
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // block * size)


def byte_level_tokens(vocab: int) -> list[str]:
    """<unk>, <s>, </s>, the 256 byte-level symbols, then filler tokens up to `vocab`."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<unk>", "<s>", "</s>", *symbols]
    return tokens + [f"tok{i}" for i in range(vocab - len(tokens))]


def write_gguf(path: str, s: Shape, seed: int = 0) -> None:
    """A GGUF of shape `s`, written one tensor at a time: only the tensor infos are known up front."""
    import gguf

    w = llama_gguf_writer(path, gguf.LlamaFileType.MOSTLY_Q4_K_M, n_layers=s.n_layers, context=s.context, dim=s.dim,
                          ffn_dim=s.ffn_dim, n_heads=s.n_heads, n_kv_heads=s.n_heads, head_dim=s.dim // s.n_heads,
                          vocab=s.vocab)
    tokens = byte_level_tokens(s.vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    plan = list(tensor_plan(s))
    for name, shape, kind in plan:
        if kind == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (shape[0], shape[1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, kind in plan:  # the same order as the infos: the writer pops them in turn
        w.write_tensor_data(random_tensor(rng, shape, kind))
    w.close()


def largest_fp32_bytes(s: Shape) -> int:
    return max(4 * int(np.prod(shape)) for _, shape, _ in tensor_plan(s))


CHILD = r"""
import json, sys, threading, time
KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in KEYS}
# Everything the job imports, imported before the baseline: the growth is the job's data.
import gguf, gguf.quants, h5py, mpi4py.MPI, numpy, tokenizers, torch, xxhash
from hpc_llama import cli
from hpc_llama.checkpoint import gguf as _g, h5, hf, slices, views
from hpc_llama.jobs import convert
from hpc_llama.model import quantized
peaks, stop = {"RssAnon": 0, "RssFile": 0}, threading.Event()
def sample():
    while not stop.wait(0.01):
        st = status()
        for k in peaks:
            peaks[k] = max(peaks[k], st[k])
base = status()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
try:
    cli.main(["convert", *sys.argv[1:], "--quiet"])
    code = 0
except SystemExit as e:
    code = e.code
wall = time.perf_counter() - t0
stop.set()
sampler.join()
end = status()
print(json.dumps({"code": code, "wall_s": round(wall, 2), "baseline_rss": base["VmRSS"],
                  "baseline_anon": base["RssAnon"], "baseline_file": base["RssFile"], "peak_rss": end["VmHWM"],
                  "peak_anon_sampled": peaks["RssAnon"], "peak_file_sampled": peaks["RssFile"]}))
"""


def measure(src: str, dst: str, dtype: str, largest: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", CHILD, src, dst, "--dtype", dtype], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"convert --dtype {dtype} failed:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["code"] != 0:
        raise SystemExit(f"convert --dtype {dtype} exited with {r['code']}:\n{out.stderr[-4000:]}")
    growth = r["peak_rss"] - r["baseline_rss"]
    row = {"dtype": dtype, "output_bytes": os.path.getsize(dst), **r, "growth": growth,
           "growth_vs_largest": round(growth / largest, 3), "margin_bytes": growth - largest,
           "anon_growth": r["peak_anon_sampled"] - r["baseline_anon"],
           "file_growth": r["peak_file_sampled"] - r["baseline_file"]}
    os.remove(dst)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="layers of the synthetic model (Llama-2-7B: 32)")
    ap.add_argument("--dtypes", default="keep,bf16", help="comma-separated convert --dtype values to measure")
    ap.add_argument("--dir", default=None, help="where the GGUF and outputs go (default: a new temporary directory)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gguf_convert_memory.json"))
    args = ap.parse_args()

    shape = Shape(n_layers=args.layers)
    largest = largest_fp32_bytes(shape)
    tmp = tempfile.mkdtemp(prefix="hpc-llama-gguf-mem-", dir=args.dir)
    try:
        src = os.path.join(tmp, "model.gguf")
        t0 = time.perf_counter()
        write_gguf(src, shape)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(src)
        print(f"wrote {src}: {size / 1e9:.2f} GB in {write_s:.1f} s", flush=True)
        runs = []
        for dtype in args.dtypes.split(","):
            runs.append(measure(src, os.path.join(tmp, f"out-{dtype}.h5"), dtype, largest))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(tmp)
    n_params = sum(int(np.prod(s)) for _, s, _ in tensor_plan(shape))
    result = {"benchmark": "gguf_convert_memory", "shape": asdict(shape), "parameters": n_params,
              "gguf_bytes": size, "gguf_write_s": round(write_s, 1), "largest_tensor_fp32_bytes": largest,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "gguf": _version("gguf")},
              "runs": runs}
    save_result(result, args.out, show=False)
    print(f"\n{shape.n_layers} layers, {n_params / 1e9:.2f}B parameters, GGUF {size / 1e9:.2f} GB, "
          f"largest tensor {largest / 2**20:.0f} MiB as fp32")
    print("| --dtype | output | wall (s) | peak RSS growth | heap growth | file-backed growth "
          "| growth / largest | margin |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['dtype']} | {r['output_bytes'] / 1e9:.2f} GB | {r['wall_s']:.1f} | {r['growth'] / 2**20:.0f} MiB "
              f"| {r['anon_growth'] / 2**20:.0f} MiB | {r['file_growth'] / 2**20:.0f} MiB "
              f"| {r['growth_vs_largest']:.2f} | {r['margin_bytes'] / 2**20:.0f} MiB |")
    print(f"wrote {args.out}")


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
