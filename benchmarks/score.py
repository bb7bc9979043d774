"""Scoring throughput: `hpc-llama score` against transformers used typically and carefully, the machine's peak,
and where a scoring step's time goes.

    python benchmarks/score.py [--models bench-100m,smollm2-135m] [--docs 200] [--repeats 2]
                               [--no-parallel] [--out benchmarks/results/score.json]

One process, fp32, each model in turn:
  bench-100m    a ~100M-parameter random Llama (SmolLM2's layers, 32K vocabulary),
                documents of random token ids, log-normal lengths 16..1024;
  smollm2-135m  the embedded SmolLM2-135M (its GGUF dequantized to fp32, 49K
                vocabulary) on real text: pieces of the Python standard
                library's source files, log-normal lengths 16..2048 tokens.
Sides, in turns (the best of --repeats counts, so a slow spell of the machine
hits every side):
  ours       the score job itself (`hpc-llama score`, in this process: 1 rank),
             reading the input and writing the output included;
  typical    LlamaForCausalLM as a typical user scores: batches of 8 in input
             order, right-padded with an attention mask, log_softmax over the
             logits, the targets' log-probabilities summed;
  careful    LlamaForCausalLM used carefully: documents sorted by length,
             batches under a budget of 4,096 padded tokens, SDPA, log_softmax
             gathered per batch.
Every side produces the same numbers (the largest |loglik difference| is
reported). Achieved FLOP/s counts useful work only (no padding) and is
compared with the best fp32 matmul rate measured here with the same threads.
The breakdown profiles one more run of ours (torch.profiler, each op's own
time): projections, attention, the head's matmul, the head's softmax and
gather, norms, elementwise work (rotary, SwiGLU, residual adds), data
movement, and what no op accounts for (Python, the job around the model).
Then, for bench-100m, the same job under mpirun on 1 rank, as PP 2 and as DP 2
(2 ranks), in turns: their tokens/s against the 1-rank job's is the parallel
efficiency at equal cores (issue #18: PP 2 >= 0.95).

Goals (issues #4, #19): ours/typical >= 1.5, ours/careful >= 1.5, achieved/peak >= 0.6.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)

CAREFUL_BUDGET = 4096  # padded tokens per batch of the careful transformers user


def random_docs(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(180), 0.8, n), 16, 1024).astype(int)
    return [rng.integers(3, vocab, int(L)).tolist() for L in lengths]


def source_docs(tokenizer, n: int, seed: int = 0, median: int = 300, longest: int = 2048) -> list[list[int]]:
    """Token ids of pieces of the standard library's Python sources, log-normal lengths: real text, offline."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    rng = np.random.default_rng(seed)
    docs = []
    for want in np.clip(rng.lognormal(np.log(median), 0.9, n), 16, longest).astype(int):
        while True:
            with open(files[rng.integers(len(files))], encoding="utf-8", errors="replace") as f:
                ids = tokenizer.encode(f.read())
            if len(ids) >= want:
                break
        start = int(rng.integers(0, len(ids) - want + 1))
        docs.append(ids[start:start + want])
    return docs


def write_docs(path: str, docs) -> None:
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "input_ids": d}) + "\n")


def matmul_peak(threads: int, n: int = 2048, repeat: int = 10) -> float:
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


def _padded(part):
    T = max(len(d) for d in part)
    ids = torch.zeros(len(part), T, dtype=torch.long)
    mask = torch.zeros(len(part), T, dtype=torch.long)
    for j, d in enumerate(part):
        ids[j, :len(d)] = torch.tensor(d)
        mask[j, :len(d)] = 1
    return ids, mask


def _batch_loglik(model, part) -> list[float]:
    ids, mask = _padded(part)
    logits = model(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    return (lp * mask[:, 1:]).double().sum(1).tolist()


def typical_scores(model, docs, batch: int = 8) -> np.ndarray:
    """Batches of `batch` documents in input order."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(docs), batch):
            out.extend(_batch_loglik(model, docs[i:i + batch]))
    return np.array(out)


def careful_scores(model, docs, budget: int = CAREFUL_BUDGET) -> np.ndarray:
    """Longest first, as many documents per batch as fit `budget` padded tokens (SDPA is the model's attention)."""
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    out = np.zeros(len(docs))
    with torch.inference_mode():
        at = 0
        while at < len(order):
            part = order[at:at + max(1, budget // len(docs[order[at]]))]
            at += len(part)
            out[part] = _batch_loglik(model, [docs[i] for i in part])
    return out


def run_ours(model_path, docs_path, out_path, threads: int) -> float:
    from hpc_llama.cli import _main

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    _main(["score", "--model", model_path, "--input", docs_path, "--output", out_path, "--overwrite", "--quiet",
           "--dtype", "fp32"])
    return time.perf_counter() - t0


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise"}
ELEMENTWISE = {"aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::silu", "aten::silu_", "aten::neg",
               "aten::cat", "aten::addcmul", "aten::sub", "aten::sub_", "aten::div", "aten::div_"}
MOVEMENT = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::index", "aten::index_put_",
            "aten::embedding", "aten::index_select", "aten::gather", "aten::nonzero", "aten::zeros", "aten::fill_",
            "aten::zero_", "aten::empty", "aten::empty_strided", "aten::repeat_interleave", "aten::masked_fill"}


def breakdown(model_path, docs_path, out_path, threads: int, vocab: int) -> dict:
    """Where one run of ours spends its time: each op's own time by kind, and the rest (Python, the job)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        wall = run_ours(model_path, docs_path, out_path, threads)
    spent: collections.Counter = collections.Counter()
    for e in prof.key_averages(group_by_input_shape=True):
        name, wide = e.key, any(vocab in (s or ()) for s in e.input_shapes)
        if name in MATMULS:
            kind = "head matmul" if wide else "projections"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            kind = "attention"
        elif wide:  # any other op on vocabulary-wide rows: the log-softmax, the gather, the argmax
            kind = "head softmax and gather"
        elif "rms_norm" in name or name in ("aten::rsqrt", "aten::pow", "aten::mean"):
            kind = "norms"
        elif name in ELEMENTWISE or name in ("aten::cos", "aten::sin"):
            kind = "elementwise (rotary, SwiGLU, residual)"
        elif name in MOVEMENT:
            kind = "data movement"
        else:
            kind = "other ops"
        spent[kind] += e.self_cpu_time_total / 1e6
    spent["Python and the job around the model"] = wall - sum(spent.values())
    return {"profiled_wall_s": round(wall, 2),
            "seconds": {k: round(v, 2) for k, v in spent.most_common()},
            "share": {k: round(v / wall, 3) for k, v in spent.most_common()}}


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


def prepare(name: str, n_docs: int, tmp: str):
    """(model config, our checkpoint, a transformers copy, the documents' token ids, their JSONL)."""
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.hf import write_hf
    from hpc_llama.checkpoint.views import InitReader
    from hpc_llama.config import load_sections
    from hpc_llama.embedded import resolve
    from hpc_llama.tokenizer import Tokenizer

    hf_path, docs_path = os.path.join(tmp, f"{name}-hf"), os.path.join(tmp, f"{name}-docs.jsonl")
    model_path = os.path.join(tmp, f"{name}.h5")
    if name == "bench-100m":
        cfg = load_sections(name)["model"]
        write_checkpoint(model_path, InitReader(cfg, seed=0))
        docs = random_docs(n_docs, cfg.vocab_size)
    else:
        # Converted once, as a scheduled scoring job would (a GGUF is dequantized on every load).
        with open_checkpoint(resolve(name)) as r:
            write_checkpoint(model_path, r)
            docs = source_docs(Tokenizer.from_checkpoint(r), n_docs)
    with open_checkpoint(model_path) as r:
        write_hf(hf_path, r)
        cfg = r.config
    write_docs(docs_path, docs)
    return cfg, model_path, hf_path, docs, docs_path


def compare(name: str, n_docs: int, args, tmp: str, peak: float):
    """(the model's row of results, its checkpoint, its documents' JSONL, our 1-rank tokens/s)."""
    from transformers import LlamaForCausalLM

    cfg, model_path, hf_path, docs, docs_path = prepare(name, n_docs, tmp)
    tokens = sum(len(d) - 1 for d in docs)
    references = {"typical": typical_scores, "careful": careful_scores} if args.references else {}
    ref_model = None
    if references:
        ref_model = LlamaForCausalLM.from_pretrained(hf_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    torch.set_num_threads(args.threads)
    for score in references.values():  # warm-up, every side
        score(ref_model, docs[:8])
    out = os.path.join(tmp, f"{name}-ours.jsonl")
    run_ours(model_path, docs_path, out, args.threads)
    times: dict = {"ours": [], **{k: [] for k in references}}
    scores = {}
    for _ in range(args.repeats):  # in turns
        times["ours"].append(run_ours(model_path, docs_path, out, args.threads))
        for k, score in references.items():
            t0 = time.perf_counter()
            scores[k] = score(ref_model, docs)
            times[k].append(time.perf_counter() - t0)
    del ref_model
    with open(out) as f:
        ours = np.array([json.loads(line)["loglik"] for line in f])
    with open(out + ".summary.json") as f:
        waste = json.load(f)["padding_waste"]
    best = {k: min(v) for k, v in times.items()}
    flops = useful_flops(cfg, docs)
    sides = {k: {"seconds": round(s, 2), "tokens_per_s": round(tokens / s, 1), "achieved_gflops": round(flops / s / 1e9, 1),
                 "fraction_of_peak": round(flops / s / peak, 3)} for k, s in best.items()}
    sides["ours"]["padding_waste"] = waste
    if references:
        sides["typical"]["batch"] = 8
        sides["careful"]["token_budget"] = CAREFUL_BUDGET
    row = {"parameters": cfg.n_params, "vocabulary": cfg.vocab_size, "layers": cfg.n_layers, "documents": len(docs),
           "text": "random token ids" if name == "bench-100m" else "Python standard library sources",
           "tokens": tokens, "longest": max(len(d) for d in docs), **sides}
    if references:
        row |= {"ours_vs_typical": round(best["typical"] / best["ours"], 3),
                "ours_vs_careful": round(best["careful"] / best["ours"], 3),
                "max_abs_loglik_difference": {k: float(np.abs(ours - v).max()) for k, v in scores.items()}}
    row["breakdown"] = breakdown(model_path, docs_path, out, args.threads, cfg.vocab_size)
    return row, model_path, docs_path, tokens / best["ours"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bench-100m,smollm2-135m")
    ap.add_argument("--docs", type=int, default=200, help="documents of bench-100m (SmolLM2 gets a third as many, "
                                                          "three times as long on average)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, in turns; the best counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-parallel", action="store_true", help="skip the PP 2 / DP 2 jobs")
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="ours and its breakdown only (to compare two versions of the code)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "score.json"))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="hpc-llama-score-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # models and documents: hundreds of MB
    peak = matmul_peak(args.threads)
    result: dict = {"benchmark": "score", "threads": args.threads, "matmul_peak_gflops": round(peak / 1e9, 1)}
    for name in args.models.split(","):
        n_docs = args.docs if name == "bench-100m" else max(1, args.docs // 3)
        row, model_path, docs_path, one_rank = compare(name, n_docs, args, tmp, peak)
        if name == "bench-100m" and not args.no_parallel and args.references:
            # Jobs against a job (start-up and all), in turns, best of the repeats.
            runs = {(1, 1): [], (2, 2): [], (2, 1): []}
            for _ in range(args.repeats):
                for n, pp in runs:
                    runs[n, pp].append(run_mpi(n, pp, model_path, docs_path, os.path.join(tmp, f"job{n}{pp}.jsonl")))
            parallel = [max(r, key=lambda x: x["tokens_per_s"]) for r in runs.values()]
            for p, r in zip(parallel, runs.values(), strict=True):
                p["tokens_per_s_runs"] = [x["tokens_per_s"] for x in r]
                p["vs_1_rank_job"] = round(p["tokens_per_s"] / parallel[0]["tokens_per_s"], 3)
                p["vs_1_rank_in_process"] = round(p["tokens_per_s"] / one_rank, 3)
            row["parallel"] = parallel
            row["parallel_note"] = ("1 rank runs 2 torch threads; each of 2 ranks runs 1: the same 2 cores, so "
                                    "vs_1_rank_job is the throughput ratio at equal cores")
        result[name] = row
    result["goals"] = {"ours_vs_typical": 1.5, "ours_vs_careful": 1.5, "fraction_of_peak": 0.6}
    save_result(result, args.out)


if __name__ == "__main__":
    main()
