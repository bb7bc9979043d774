"""Evaluation throughput: `hpc-llama eval` against lm-eval's HF backend, and a question's cost against its context's.

    python benchmarks/eval.py [--questions 200] [--batch-sizes 1,8,32,64] [--repeats 3] [--out benchmarks/results/eval.json]

One process, in turns, on the embedded SmolLM2-135M (its Q4_1 GGUF, dequantized
to fp32 by each side) and configs/tasks/stdlib-mc (4 choices per question, 0-shot):
  ours       the eval job itself (`hpc-llama eval --samples`, in this process:
             1 rank), reading the task and writing results and samples included;
             also with `--set score.share_context=false`;
  reference  lm-eval's `simple_evaluate(log_samples=True)` on an `HFLM` holding
             transformers' own load of the same GGUF (model and tokenizer), at each
             of --batch-sizes; the fastest counts.
Model loading is timed apart on both sides (ours: the seconds the job spends in
open_checkpoint, Tokenizer.from_checkpoint and load_slice; lm-eval: from_pretrained
of tokenizer and model, and HFLM) and the goal compares evaluation time without it.
lm-eval's report of the environment (pip, git: seconds) is switched off, in its favour.
Both give the same numbers (checked: every request's log-likelihood within 1e-4 per
continuation token, is_greedy, and acc and acc_norm per question and in total identical).
Then the cost of a question: our Scorer (the eval job's score settings, model loaded
once) scores each question's 4 requests, and then its context alone (the same
context with a one-token continuation), with shared contexts and without.
Each time is the best of --repeats, taken in turns.
Goals: ours / lm-eval >= 2 (documents/s); 4-choice question / context alone <= 1.5.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)

MODEL = "smollm2-135m"
TASK = "stdlib-mc"
ONE_TOKEN = " A"  # a continuation of one token after any "...Answer:" context (checked)


@contextlib.contextmanager
def clocked(targets, spent: list):
    """Append the seconds spent in each (owner, attribute) function to `spent` while the block runs; a call
    inside another of them is not counted twice. The job does not time its loading as a whole itself."""
    saved, depth = [], [0]

    def wrap(fn):
        def timed(*a, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent.append(time.perf_counter() - t0)
        return timed

    for owner, name in targets:
        raw = inspect.getattr_static(owner, name)
        saved.append((owner, name, raw))
        setattr(owner, name, classmethod(wrap(raw.__func__)) if isinstance(raw, classmethod) else wrap(raw))
    try:
        yield spent
    finally:
        for owner, name, raw in reversed(saved):
            setattr(owner, name, raw)


def run_ours(task_yaml: str, out: str, questions: int | None, extra=()) -> dict:
    import hpc_llama.checkpoint
    import hpc_llama.checkpoint.slices
    from hpc_llama.cli import _main
    from hpc_llama.tokenizer import Tokenizer

    loading = [(hpc_llama.checkpoint, "open_checkpoint"), (Tokenizer, "from_checkpoint"),
               (hpc_llama.checkpoint.slices, "load_slice")]
    argv = ["eval", "--model", MODEL, "--tasks", task_yaml, "--output", out, "--samples", out + ".samples.jsonl",
            "--num-fewshot", "0", "--dtype", "fp32", "--overwrite", "--quiet", *extra]
    with clocked(loading, []) as spent:
        t0 = time.perf_counter()
        _main(argv + (["--limit", str(questions)] if questions else []))
        total = time.perf_counter() - t0
    with open(out + ".samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    with open(out) as f:
        results = json.load(f)["results"][TASK]
    return {"total_s": total, "load_s": sum(spent), "eval_s": total - sum(spent), "samples": samples,
            "results": results}


def load_reference(gguf: str, batch_sizes: list[int]):
    """transformers' own reading of the GGUF (tokenizer and model, dequantized to fp32), in one HFLM per batch size."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    lms = {b: HFLM(pretrained=model, tokenizer=tok, batch_size=b, device="cpu") for b in batch_sizes}
    return lms, model, time.perf_counter() - t0


def run_lm_eval(lm, task_dir: str, questions: int | None) -> dict:
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(task_dir)  # lm-eval reads data_files from the working directory
    try:
        t0 = time.perf_counter()
        out = lm_eval.evaluator.simple_evaluate(
            model=lm, tasks=[TASK], num_fewshot=0, limit=questions, log_samples=True,
            task_manager=TaskManager(include_path=task_dir, include_defaults=False))
        seconds = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    return {"eval_s": seconds, "samples": sorted(out["samples"][TASK], key=lambda s: s["doc_id"]),
            "results": out["results"][TASK]}


def compare(ours: dict, ref: dict) -> dict:
    """Every request's log-likelihood and is_greedy, and acc/acc_norm per question and in total.

    The log-likelihood tolerance is 1e-4 per continuation token: lm-eval sums a continuation's float32
    log-probabilities in float32 (ours in float64), and a 30-layer model's float32 logits move in the
    last bits with the batch's shape (lm-eval against itself at two batch sizes: see lm_eval_spread)."""
    worst = worst_per_token = 0.0
    over, greedy_same, per_question_same = 0, True, True
    if [s["doc_index"] for s in ours["samples"]] != [s["doc_id"] for s in ref["samples"]]:
        raise SystemExit("ours and lm-eval evaluated different questions")
    for a, b in zip(ours["samples"], ref["samples"], strict=True):
        if [r["continuation"] for r in a["requests"]] != [arg[-1] for arg in b["arguments"]]:
            raise SystemExit(f"question {a['doc_index']}: the requests differ from lm-eval's")
        for r, (resp,) in zip(a["requests"], b["resps"], strict=True):
            diff = abs(r["loglik"] - resp[0])
            worst, worst_per_token = max(worst, diff), max(worst_per_token, diff / r["n_tokens"])
            over += diff > 1e-4
            greedy_same &= r["is_greedy"] == resp[1]
        per_question_same &= all(a["metrics"][m] == b[m] for m in ("acc", "acc_norm"))
    totals = {m: [ours["results"]["metrics"][m]["value"], ref["results"][f"{m},none"]] for m in ("acc", "acc_norm")}
    return {"max_abs_loglik_difference": worst, "max_abs_loglik_difference_per_token": worst_per_token,
            "requests_over_1e-4": over, "is_greedy_identical": bool(greedy_same),
            "per_question_identical": bool(per_question_same), "totals_ours_lm_eval": totals,
            "passed": bool(worst_per_token <= 1e-4 and greedy_same and per_question_same
                           and all(a == b for a, b in totals.values()))}


def lm_eval_spread(refs: dict) -> float:
    """The largest difference in one request's log-likelihood between lm-eval's own runs at two batch sizes."""
    lls = np.array([[resp[0][0] for s in r["samples"] for resp in s["resps"]] for r in refs.values()])
    return float((lls.max(0) - lls.min(0)).max())


def question_requests(task_yaml: str, questions: int | None):
    """Each question's 4 requests, and its context alone with a one-token continuation, as score Documents."""
    from hpc_llama.documents import Document
    from hpc_llama.eval.tasks import build_docs, load_tasks

    (task,) = load_tasks([task_yaml])
    docs = build_docs(task, 0, limit=questions)
    pairs = [(r.context, r.continuation) for d in docs for r in d.requests]
    alone = [(d.requests[0].context, ONE_TOKEN) for d in docs]

    def documents(pairs):
        return [Document(i, None, cont, None, f"request {i}", context=ctx) for i, (ctx, cont) in enumerate(pairs)]

    return len(docs), documents(pairs), documents(alone)


def make_scorer(reader, tokenizer, share: bool):
    """A Scorer with the settings the eval job gives it (its fixed micro-batches, fp32, 1 rank)."""
    from hpc_llama.config import ParallelConfig, load_sections
    from hpc_llama.eval.job import LAYOUT_FREE
    from hpc_llama.parallel.ranks import start_rank, world_comm
    from hpc_llama.score.scorer import Scorer

    cfg = load_sections(None, LAYOUT_FREE + [f"score.share_context={str(share).lower()}"])["score"]
    comm = world_comm()
    return Scorer(reader, tokenizer, start_rank(comm), comm, ParallelConfig(dtype="fp32"), cfg)


def score_all(scorer, docs) -> tuple[float, dict]:
    """Score the documents step by step as the job does; (seconds, what was computed)."""
    from hpc_llama.documents import chunks

    t0 = time.perf_counter()
    results = [scorer.score_step(step) for step in chunks(docs, scorer.cfg.chunk_docs, scorer.cfg.chunk_chars)]
    seconds = time.perf_counter() - t0
    return seconds, {"loglik": np.concatenate([r.loglik for r in results]),
                     "n_tokens": np.concatenate([r.n_tokens for r in results]),
                     "positions": sum(r.positions for r in results),
                     "real_positions": sum(r.real_positions for r in results)}


def question_cost(task_yaml: str, questions: int | None, repeats: int) -> dict:
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.tokenizer import Tokenizer

    n, four, alone = question_requests(task_yaml, questions)
    reader = open_checkpoint(MODEL)
    tokenizer = Tokenizer.from_checkpoint(reader)
    scorers = {"shared": make_scorer(reader, tokenizer, True), "unshared": make_scorer(reader, tokenizer, False)}
    for s in scorers.values():  # warm-up
        score_all(s, four[:32])
        score_all(s, alone[:8])
    best, got = {}, {}
    for _ in range(repeats):
        for name, s in scorers.items():
            for what, docs in (("question", four), ("context", alone)):
                seconds, got[name, what] = score_all(s, docs)
                best[name, what] = min(best.get((name, what), float("inf")), seconds)
    reader.close()
    if not (got["shared", "context"]["n_tokens"] == 1).all():
        raise SystemExit(f"{ONE_TOKEN!r} is not one token after every context")
    out = {"questions": n, "requests": len(four), "one_token_continuation": ONE_TOKEN}
    for name in scorers:
        q, c = got[name, "question"], got[name, "context"]
        out[name] = {"question_s": round(best[name, "question"], 3), "context_s": round(best[name, "context"], 3),
                     "ratio": round(best[name, "question"] / best[name, "context"], 3),
                     "question_positions": q["positions"], "question_real_positions": q["real_positions"],
                     "context_positions": c["positions"], "context_real_positions": c["real_positions"]}
    out["max_abs_loglik_difference_shared_vs_unshared"] = float(
        np.abs(got["shared", "question"]["loglik"] - got["unshared", "question"]["loglik"]).max())
    return out


def rate(questions: int, seconds: float) -> float:
    return round(questions / seconds, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, help="evaluate the first N questions (default: all 200)")
    ap.add_argument("--batch-sizes", default="1,8,32,64", help="lm-eval batch sizes to try (default 1,8,32,64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "eval.json"))
    args = ap.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import lm_eval.evaluator

    from hpc_llama.checkpoint import open_checkpoint

    # simple_evaluate's report of the environment (pip, torch, git) takes seconds and is no part of evaluating
    lm_eval.evaluator.add_env_info = lambda results: None
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    # The job gives a rank all its cores for torch's threads unless OMP_NUM_THREADS says otherwise, which
    # would leave the two sides on different thread counts whenever --threads is not every core.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    with open_checkpoint(MODEL) as r:
        gguf = r.path
    tmp = tempfile.mkdtemp(prefix="hpc-llama-eval-bench-")
    task_dir = os.path.join(tmp, "tasks")  # a copy: lm-eval runs in it, and nothing lands in the repository
    shutil.copytree(os.path.join(ROOT, "configs", "tasks"), task_dir, ignore=shutil.ignore_patterns("*.py", "*.md"))
    task_yaml = os.path.join(task_dir, f"{TASK}.yaml")
    out = os.path.join(tmp, "results.json")

    lms, ref_model, ref_load = load_reference(gguf, batch_sizes)
    n_params = sum(p.numel() for p in ref_model.parameters())
    run_ours(task_yaml, out, 8)  # warm-up, both sides (imports, first calls, lm-eval's dataset cache)
    run_lm_eval(lms[batch_sizes[0]], task_dir, 8)

    variants = {"ours": (), "ours_no_sharing": ("--set", "score.share_context=false")}
    ours, refs = {}, {}
    for _ in range(args.repeats):
        for name, extra in variants.items():
            got = run_ours(task_yaml, out, args.questions, extra)
            if name not in ours or got["eval_s"] < ours[name]["eval_s"]:
                ours[name] = got
        for b, lm in lms.items():
            got = run_lm_eval(lm, task_dir, args.questions)
            if b not in refs or got["eval_s"] < refs[b]["eval_s"]:
                refs[b] = got
    del lms, ref_model
    if torch.get_num_threads() != args.threads:
        raise SystemExit(f"torch ran {torch.get_num_threads()} threads, not --threads {args.threads}")
    checks = {b: compare(ours["ours"], ref) for b, ref in refs.items()}
    checks["ours_no_sharing"] = compare(ours["ours_no_sharing"], refs[batch_sizes[0]])
    n = len(ours["ours"]["samples"])
    requests = sum(len(s["requests"]) for s in ours["ours"]["samples"])
    best_b = min(refs, key=lambda b: refs[b]["eval_s"])
    best = refs[best_b]

    cost = question_cost(task_yaml, args.questions, args.repeats)
    shutil.rmtree(tmp)

    def side(r):
        return {"eval_s": round(r["eval_s"], 3), "load_s": round(r["load_s"], 3), "total_s": round(r["total_s"], 3),
                "documents_per_s": rate(n, r["eval_s"]), "requests_per_s": rate(requests, r["eval_s"])}

    result = {
        "benchmark": "eval", "model": MODEL, "gguf": os.path.basename(gguf), "parameters": n_params, "dtype": "fp32",
        "task": TASK, "num_fewshot": 0, "questions": n, "requests": requests, "threads": args.threads,
        "repeats": args.repeats,
        "ours": side(ours["ours"]),
        "ours_no_sharing": side(ours["ours_no_sharing"]),
        "lm_eval": {"load_s": round(ref_load, 3), "best_batch_size": best_b, "eval_s": round(best["eval_s"], 3),
                    "documents_per_s": rate(n, best["eval_s"]), "requests_per_s": rate(requests, best["eval_s"]),
                    "by_batch_size": {str(b): {"eval_s": round(r["eval_s"], 3), "documents_per_s": rate(n, r["eval_s"])}
                                      for b, r in refs.items()}},
        "speedup_vs_lm_eval": round(best["eval_s"] / ours["ours"]["eval_s"], 3),
        "speedup_vs_lm_eval_no_sharing": round(best["eval_s"] / ours["ours_no_sharing"]["eval_s"], 3),
        "speedup_vs_lm_eval_with_loading": round((ref_load + best["eval_s"]) / ours["ours"]["total_s"], 3),
        "timing_note": "eval_s is steady-state evaluation (task reading, requests, scoring, metrics, samples), "
                       "model loading excluded on both sides and reported as load_s; best of repeats",
        "same_numbers": {str(k): v for k, v in checks.items()},
        "lm_eval_spread": lm_eval_spread(refs),
        "question_cost": cost,
        "goals": {"speedup_vs_lm_eval": 2.0, "question_vs_context": 1.5},
    }
    save_result(result, args.out)
    if not all(c["passed"] for c in checks.values()):
        sys.exit("ours and lm-eval do not give the same numbers (see same_numbers)")


if __name__ == "__main__":
    main()
