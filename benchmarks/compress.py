"""Compression on the real embedded model (SmolLM2-135M): size, memory, speed and quality of every method.

    python benchmarks/compress.py [--out benchmarks/results/compress.json] [--only int8,gptq] [--windows 32]

For each method `hpc-llama compress` itself makes the checkpoint (calibrating,
where a method uses it, on 128 windows of 128 tokens of the stdlib's module
docstrings) and evaluates it with --eval on held-out text: Python's pydoc
topics (English prose no calibration window saw). From the job's report:
file size, parameters, resident weight bytes, held-out perplexity and its
change, mean KL divergence of the next-token distributions from the
original's, and top-1 agreement. Then, in this one process and in turns
(median of 3), scoring forward passes over 8 of the held-out windows time
the compressed model (our code), the original (our code) and
transformers' LlamaForCausalLM on the original weights (the reference):
the ratios are the speed-ups. fp32 on the CPU, the threads of this machine.
Last, one FFN-shaped projection (576 -> 1536) alone: a Linear against its
two low-rank factors at several ranks and against int8/int4 packed weights,
for a scoring batch (1024 rows) and a decode step (8 rows), to show where a
low rank starts to pay.
Floors (issue #8): int8 perplexity within 1% of the original; int4 file at
most 30% of fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)

CALIB = ["--calib-samples", "128", "--calib-len", "128"]
# name -> compress arguments (the calibration file is added where "calib" is listed)
METHODS = {
    "int8": ["--method", "int8"],
    "int8+emb": ["--method", "int8", "--embeddings"],
    "int4-g32": ["--method", "int4", "--group-size", "32"],
    "gptq-g32": ["--method", "gptq", "--group-size", "32", "calib"],
    "int4-g32+emb": ["--method", "int4", "--group-size", "32", "--embeddings"],
    "int4-g32+emb8": ["--method", "int4", "--group-size", "32", "--embeddings", "int8"],
    "gptq-g32+emb8": ["--method", "gptq", "--group-size", "32", "--embeddings", "int8", "calib"],
    "gptq-g32+emb8-c384": ["--method", "gptq", "--group-size", "32", "--embeddings", "int8", "calib",
                           "--calib-samples", "384"],
    "gptq-g32+emb": ["--method", "gptq", "--group-size", "32", "--embeddings", "calib"],
    "prune-0.5-magnitude": ["--method", "prune", "--sparsity", "0.5"],
    "prune-0.5-wanda": ["--method", "prune", "--sparsity", "0.5", "calib"],
    "prune-0.2-wanda": ["--method", "prune", "--sparsity", "0.2", "calib"],
    "ffn-0.25": ["--method", "prune-ffn", "--ffn-prune", "0.25", "calib"],
    "ffn-0.1": ["--method", "prune-ffn", "--ffn-prune", "0.1", "calib"],
    "ffn-0.05": ["--method", "prune-ffn", "--ffn-prune", "0.05", "calib"],
    "heads-0.34": ["--method", "prune-heads", "--head-prune", "0.34", "calib"],
    # The early layers carry the heads the model cannot lose; the last few can spare a third.
    "heads-0.34-l27-29": ["--method", "prune-heads", "--head-prune", "0.34", "--layers", "27-29", "calib"],
    "heads-0.34-l28-29": ["--method", "prune-heads", "--head-prune", "0.34", "--layers", "28-29", "calib"],
    "lowrank-e0.99": ["--method", "lowrank", "--energy", "0.99"],
    "lowrank-r128-wq,wk": ["--method", "lowrank", "--rank", "128", "--targets", "wq,wk"],
    "lowrank-r96": ["--method", "lowrank", "--rank", "96"],
    "ffn-0.1+gptq": ["--method", "prune-ffn,gptq", "--ffn-prune", "0.1", "--group-size", "32", "calib"],
}


STDLIB = ["argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "functools", "heapq",
          "inspect", "itertools", "json", "logging", "os", "pathlib", "random", "re", "shutil", "socket",
          "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile"]


def write_texts(tmp: str) -> tuple[str, str]:
    """Calibration: the stdlib's module docstrings; held-out: pydoc topics (different text)."""
    import importlib
    from pydoc_data.topics import topics

    calib = os.path.join(tmp, "calib.jsonl")
    with open(calib, "w") as f:
        for name in STDLIB:
            mod = importlib.import_module(name)
            docs = [mod.__doc__ or ""] + [getattr(mod, k).__doc__ or "" for k in sorted(dir(mod))
                                          if not k.startswith("_") and callable(getattr(mod, k))]
            f.write(json.dumps({"id": name, "text": "\n\n".join(d for d in docs if isinstance(d, str) and d)}) + "\n")
    heldout = os.path.join(tmp, "heldout.jsonl")
    with open(heldout, "w") as f:
        for name in sorted(topics):
            f.write(json.dumps({"id": name, "text": topics[name]}) + "\n")
    return calib, heldout


def timed(model_fn, batches, repeat=3) -> float:
    """Median seconds of a forward pass over every batch (the head included, as scoring runs it)."""
    times = []
    with torch.inference_mode():
        for _ in range(repeat):
            t0 = time.perf_counter()
            for x in batches:
                model_fn(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def projection_times(n_in=576, n_out=1536, ranks=(48, 96, 192, 288, 384), rows=(8, 1024)) -> dict:
    """Seconds per call of one projection in each form, per batch size; speed-up against the Linear."""
    from hpc_llama.model.llama import Linear, LowRankLinear
    from hpc_llama.model.quantized import QuantizedLinear, quantize

    g = torch.Generator().manual_seed(0)
    full = Linear(n_in, n_out, bias=False)
    torch.nn.init.normal_(full.weight, std=0.02, generator=g)
    forms = {"linear": full}
    for r in ranks:
        lr = LowRankLinear(n_in, n_out, r, bias=False)
        torch.nn.init.normal_(lr.a.weight, std=0.02, generator=g)
        torch.nn.init.normal_(lr.b.weight, std=0.02, generator=g)
        forms[f"rank-{r}"] = lr
    for scheme, label in (("int8-channel", "int8"), ("int4-group", "int4-g32")):
        data, parts, attrs = quantize(full.weight.detach(), scheme, 32)
        forms[label] = QuantizedLinear(data, parts, attrs)
    out = {"shape": [n_out, n_in]}
    for m in rows:
        x = [torch.randn(m, n_in, generator=g)]
        reps = max(20, 4096 // m)
        t = {k: timed(f, x * reps, repeat=5) / reps for k, f in forms.items()}
        out[f"rows_{m}"] = {k: {"us": round(1e6 * v, 1), "speedup_vs_linear": round(t["linear"] / v, 3)}
                            for k, v in t.items()}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compress.json"))
    ap.add_argument("--only", help="comma-separated method names (default all); updates those rows of --out")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens (default 32)")
    ap.add_argument("--keep", help="directory to keep the compressed checkpoints in")
    ap.add_argument("--reuse", action="store_true", help="with --keep: time checkpoints made by an earlier run")
    ap.add_argument("--projections-only", action="store_true", help="only the one-projection timings")
    args = ap.parse_args()
    if args.projections_only:
        print(json.dumps(projection_times(), indent=1))
        return
    hpc = os.path.join(os.path.dirname(sys.executable), "hpc-llama")
    tmp = args.keep or tempfile.mkdtemp(prefix="bench-compress-")
    os.makedirs(tmp, exist_ok=True)
    calib, heldout = write_texts(tmp)
    original = os.path.join(tmp, "smollm2.h5")
    if not os.path.exists(original):
        subprocess.run([hpc, "convert", "smollm2-135m", original], check=True)

    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.hf import write_hf
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.compress.chain import token_windows
    from hpc_llama.tokenizer import Tokenizer

    with open_checkpoint(original) as r:
        tokens = token_windows([heldout], Tokenizer.from_checkpoint(r), r.config.bos_id, r.config.vocab_size, 256,
                               args.windows, "text", "held-out")
        hf_dir = os.path.join(tmp, "smollm2-hf")
        if not os.path.exists(hf_dir):
            write_hf(hf_dir, r)
        ours_orig = load_slice(r, dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batches = list(tokens[:8].split(4))  # speed: 8 windows, enough for a stable median
    n_tok = sum(b.numel() for b in batches)
    names = args.only.split(",") if args.only else list(METHODS)
    rows = {}
    if args.only and os.path.exists(args.out):  # a partial run updates its rows of the last table
        rows = json.load(open(args.out)).get("methods", {})
    for name in names:
        spec = METHODS[name]
        out = os.path.join(tmp, f"{name}.h5")
        cmd = [hpc, "compress", "--model", original, "--output", out, "--overwrite", "--eval", heldout,
               "--eval-windows", str(args.windows), "--eval-len", "256", "--quiet"]
        cmd += [a for a in spec if a != "calib"] + (["--calib", calib] if "calib" in spec else [])
        if "calib" in spec and "--calib-samples" not in spec:
            cmd += CALIB
        t0 = time.perf_counter()
        if not (args.reuse and os.path.exists(out + ".summary.json")):
            subprocess.run(cmd, check=True)
        compress_s = time.perf_counter() - t0
        summary = json.load(open(out + ".summary.json"))
        compress_s = summary.get("seconds", compress_s)
        e = summary["eval"]
        with open_checkpoint(out) as r:
            model = load_slice(r, dtype=torch.float32)
        # In turns, so drift of the machine's speed touches all three alike.
        t_ref = timed(lambda x: reference(x).logits, batches)
        t_orig = timed(ours_orig, batches)
        t_comp = timed(model, batches)
        # A decode step's weight work: 8 sequences, one token each (M = 8 rows per matmul).
        step = [tokens[:8, :1]] * 8
        d_ref, d_orig, d_comp = (timed(f, step) / len(step) for f in (lambda x: reference(x).logits, ours_orig, model))
        rows[name] = {
            "args": " ".join(a for a in spec if a != "calib") + (" --calib" if "calib" in spec else ""),
            "file_MB": round(summary["bytes"]["compressed"] / 1e6, 1),
            "file_vs_fp32": round(summary["bytes"]["compressed"] / summary["bytes"]["original_fp32"], 4),
            "params_M": round(summary["parameters"]["compressed"] / 1e6, 2),
            "resident_MB": round(e["resident_bytes"]["compressed"][0] / 1e6, 1),
            "resident_vs_original": round(e["resident_bytes"]["compressed"][0] / e["resident_bytes"]["original"][0], 4),
            "ppl": round(e["perplexity"]["compressed"], 4), "ppl_original": round(e["perplexity"]["original"], 4),
            "ppl_change": round(e["perplexity_change"], 5), "kl_mean": round(e["kl_mean"], 5),
            "top1_agreement": round(e["top1_agreement"], 4),
            "tokens_per_s": round(n_tok / t_comp, 1), "tokens_per_s_original": round(n_tok / t_orig, 1),
            "tokens_per_s_reference": round(n_tok / t_ref, 1),
            "speedup_vs_original": round(t_orig / t_comp, 3), "speedup_vs_reference": round(t_ref / t_comp, 3),
            "decode_step_ms": round(1e3 * d_comp, 2), "decode_step_ms_original": round(1e3 * d_orig, 2),
            "decode_step_ms_reference": round(1e3 * d_ref, 2),
            "job_s": round(compress_s, 1),
        }
        print(json.dumps({name: rows[name]}), flush=True)
        del model
    result = {"model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32)", "threads": torch.get_num_threads(),
              "heldout_tokens": tokens.numel(), "heldout": "pydoc topics", "calibration": "stdlib module docstrings, "
              "128 x 128 tokens", "methods": rows, "projection": projection_times()}
    save_result(result, args.out, show=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
