"""Scoring throughput: `hpc-llama score` against plain transformers, and against the machine's peak.

    python benchmarks/score.py [--docs 200] [--config bench-100m] [--out benchmarks/results/score.json]

One process, in turns, on the same ~100M-parameter random Llama (fp32) and the
same documents of realistic, varied lengths (log-normal, 16..1024 tokens):
  ours       the score job itself (`hpc-llama score`, in this process: 1 rank),
             including reading the input and writing the output;
  reference  LlamaForCausalLM scoring the documents as a typical user would:
             batches of 8 in input order, right-padded with an attention mask,
             log_softmax over the logits, the targets' log-probabilities summed.
Both produce the same numbers (checked: max |loglik difference| is reported).
Achieved FLOP/s counts useful work only (no padding) and is compared with the
best fp32 matmul rate measured here with the same threads.
Then 2 ranks (PP 2, and DP 2) run the same job under mpirun; their tokens/s
against 1 rank gives the parallel efficiency.
Goals (issue #4): ours/reference >= 1.5; achieved/peak >= 0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)


def make_docs(path: str, n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(180), 0.8, n), 16, 1024).astype(int)
    docs = [rng.integers(3, vocab, int(L)).tolist() for L in lengths]
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "input_ids": d}) + "\n")
    return docs


def matmul_peak(threads: int, n: int = 2048, repeat: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def useful_flops(cfg, docs) -> float:
    """Forward FLOPs of scoring every document once (no padding): matmuls, attention, head."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    per_token_layer = 2 * (cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.ffn_dim)
    total = 0.0
    for d in docs:
        L = len(d)
        total += L * (cfg.n_layers * per_token_layer + 2 * cfg.dim * cfg.vocab_size)
        total += cfg.n_layers * 2 * L * L * q  # QK^T and AV over the causal half: 2 * (L^2/2) * q * 2
    return total


def reference_scores(model, docs, batch: int = 8) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(docs), batch):
            part = docs[i:i + batch]
            T = max(len(d) for d in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)
            mask = torch.zeros(len(part), T, dtype=torch.long)
            for j, d in enumerate(part):
                ids[j, :len(d)] = torch.tensor(d)
                mask[j, :len(d)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
            out.extend((lp * mask[:, 1:]).double().sum(1).tolist())
    return np.array(out)


def run_ours(model_path, docs_path, out_path, threads: int) -> float:
    from hpc_llama.cli import _main

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _main(["score", "--model", model_path, "--input", docs_path, "--output", out_path, "--overwrite", "--quiet",
           "--dtype", "fp32"])
    return time.perf_counter() - t0


def run_mpi(n: int, pp: int, model_path, docs_path, out_path) -> dict:
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    exe = os.path.join(os.path.dirname(sys.executable), "hpc-llama")
    t0 = time.perf_counter()
    subprocess.run([mpirun, "-n", str(n), exe, "score", "--model", model_path, "--input", docs_path, "--output", out_path,
                    "--overwrite", "--quiet", "--dtype", "fp32", "--pp", str(pp)], check=True,
                   env=dict(os.environ, DS_ACCELERATOR="cpu"))
    wall = time.perf_counter() - t0
    with open(out_path + ".summary.json") as f:
        s = json.load(f)
    return {"ranks": n, "pp": pp, "dp": n // pp, "wall_s": round(wall, 2), "job_wall_s": s["wall_s"],
            "tokens_per_s": round(s["tokens"] / s["wall_s"], 1), "padding_waste": s["padding_waste"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench-100m")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "score.json"))
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.hf import write_hf
    from hpc_llama.checkpoint.views import InitReader
    from hpc_llama.config import load_sections

    cfg = load_sections(args.config)["model"]
    tmp = tempfile.mkdtemp(prefix="hpc-llama-score-bench-")
    model_path, hf_path = os.path.join(tmp, "model.h5"), os.path.join(tmp, "hf")
    write_checkpoint(model_path, InitReader(cfg, seed=0))
    with open_checkpoint(model_path) as r:
        write_hf(hf_path, r)
    docs_path = os.path.join(tmp, "docs.jsonl")
    docs = make_docs(docs_path, args.docs, cfg.vocab_size)
    tokens = sum(len(d) - 1 for d in docs)

    ref_model = LlamaForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    torch.set_num_threads(args.threads)
    reference_scores(ref_model, docs[:8])  # warm-up, both sides
    run_ours(model_path, docs_path, os.path.join(tmp, "warm.jsonl"), args.threads)

    t0 = time.perf_counter()
    ref = reference_scores(ref_model, docs)
    ref_s = time.perf_counter() - t0
    ours_s = run_ours(model_path, docs_path, os.path.join(tmp, "ours.jsonl"), args.threads)
    with open(os.path.join(tmp, "ours.jsonl")) as f:
        ours = np.array([json.loads(line)["loglik"] for line in f])
    with open(os.path.join(tmp, "ours.jsonl.summary.json")) as f:
        waste = json.load(f)["padding_waste"]
    peak = matmul_peak(args.threads)
    flops = useful_flops(cfg, docs)
    del ref_model

    parallel = [run_mpi(2, 2, model_path, docs_path, os.path.join(tmp, "pp2.jsonl")),
                run_mpi(2, 1, model_path, docs_path, os.path.join(tmp, "dp2.jsonl"))]
    one_rank = tokens / ours_s
    for p in parallel:
        p["speedup_vs_1_rank"] = round(p["tokens_per_s"] / one_rank, 3)
    result = {
        "benchmark": "score", "config": args.config, "parameters": cfg.n_params, "documents": len(docs),
        "tokens": tokens, "threads": args.threads,
        "ours": {"seconds": round(ours_s, 2), "tokens_per_s": round(tokens / ours_s, 1), "padding_waste": waste},
        "reference": {"seconds": round(ref_s, 2), "tokens_per_s": round(tokens / ref_s, 1), "batch": 8},
        "speedup_vs_reference": round(ref_s / ours_s, 3),
        "max_abs_loglik_difference": float(np.abs(ours - ref).max()),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "achieved_gflops": round(flops / ours_s / 1e9, 1),
        "fraction_of_peak": round(flops / ours_s / peak, 3),
        "reference_fraction_of_peak": round(flops / ref_s / peak, 3),
        "parallel": parallel,
        "parallel_note": "1 rank runs 2 torch threads; each of 2 ranks runs 1: the same 2 cores, so "
                         "speedup_vs_1_rank is the throughput ratio at equal cores",
        "goals": {"speedup_vs_reference": 1.5, "fraction_of_peak": 0.6},
    }
    save_result(result, args.out)


if __name__ == "__main__":
    main()
