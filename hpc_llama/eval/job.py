"""Evaluate a model on lm-evaluation-harness-style tasks, on any layout, resumably.

    mpirun -n 4 hpc-llama eval --model M --tasks configs/tasks --output results.json --samples samples.jsonl --pp 2
    srun -n 8 hpc-llama eval --model /models/Llama-3-8B --tasks mmlu.yaml hellaswag.yaml --output r.json --num-fewshot 5

Rank 0 turns every document of every task into log-likelihood requests
(`eval.tasks`) and writes them to OUT.requests.jsonl; all requests of all
tasks are then scored together by the score machinery (PP x DP, length
buckets, shared contexts scored once, the journal), so a killed job resumes
where it stopped and every layout gives the same numbers. At the end rank 0
computes the metrics (`eval.metrics`, lm-eval's definitions) and writes
`--samples` (one record per document) and OUT (per task, each metric with its
standard error), each atomically. docs/eval.md has the details.
"""

from __future__ import annotations

import os

from ..errors import HpcLlamaError


def add_arguments(p):
    from ..batchjob import add_closing_arguments
    from ..cli import non_negative_int, positive_int
    from . import DEFAULT_FEWSHOT_SEED

    p.add_argument("--model", required=True, help="checkpoint: .h5, sharded directory, HF directory, GGUF file, "
                   "or smollm2-135m")
    p.add_argument("--tasks", required=True, nargs="+", help="task YAML files, or directories of them")
    p.add_argument("--output", required=True, help="results.json: every metric of every task, with its stderr")
    p.add_argument("--samples", help="samples.jsonl: one record per document (prompt, per-choice results, metrics)")
    p.add_argument("--num-fewshot", type=non_negative_int, help="few-shot examples per prompt (default: each task's "
                   "num_fewshot, else 0)")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N documents of each task")
    p.add_argument("--seed", type=int, default=DEFAULT_FEWSHOT_SEED,
                   help=f"seed of the few-shot draw (default {DEFAULT_FEWSHOT_SEED}, lm-eval's)")
    p.add_argument("--config", help="YAML preset with score/parallel sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="compute dtype (default auto)")
    add_closing_arguments(p)


def run(args) -> int:
    from ..batchjob import BatchJob
    from ..documents import Fields, InputFile, scan_inputs
    from ..score.job import score_documents
    from ..score.scorer import Scorer

    job = BatchJob(args, "score", {}, fmt="jsonl")
    cfg, reader, info = job.cfg, job.reader, job.info
    if job.tokenizer is None:
        job.close()
        raise HpcLlamaError(f"{args.model}: eval needs the checkpoint's tokenizer (tokenizer.json), and it has none")
    plan = _plan(job) if info.rank == 0 else None
    requests = job.bcast(plan and plan.requests_path)
    job.files = [InputFile(requests, "jsonl", 0)]
    fields = Fields(max_bytes=cfg.max_document_bytes, conditional=True)

    def scan(files):
        files, _ = scan_inputs(files, fields, reader.config.vocab_size, job.tokenizer is not None)
        return files, files[0].documents

    try:
        total = job.validate(scan, {"score": cfg.__dict__, "dtype": job.parallel.dtype,
                                    "tasks": plan and plan.fingerprint})
        with job.running(total, "request"):
            scorer = Scorer(reader, job.tokenizer, info, job.comm, job.parallel, cfg)
            score_documents(job, scorer, fields, total)
            if info.rank == 0:
                _finish(job, plan, scorer)
    except BaseException:
        # Refused or failed before anything was scored: the requests go too (a rerun writes them again).
        if plan is not None and (job.journal is None or job.journal.documents_done == 0):
            if os.path.lexists(plan.requests_path):
                os.remove(plan.requests_path)
        raise
    return 0


class Plan:
    """Rank 0's tasks, their documents, and which requests belong to which document."""

    def __init__(self, tasks, docs, requests_path):
        self.tasks, self.docs, self.requests_path = tasks, docs, requests_path
        self.fingerprint = [[t.name, t.checksum, [len(d) for d in docs]] for t, d in zip(tasks, docs, strict=True)]


def _plan(job) -> Plan:
    """Load the tasks, build every document's requests, and write them where every rank reads them."""
    import json

    from ..atomic import check_destination, check_not_an_input, open_atomic
    from .tasks import build_docs, load_tasks

    args = job.args
    tasks = load_tasks(args.tasks)
    inputs = [t.path for t in tasks] + [p for t in tasks for _, paths in t.data_files for p in paths]
    if args.samples:
        if os.path.abspath(args.samples) == os.path.abspath(job.out):
            raise HpcLlamaError("--samples and --output name the same file")
        job.hold(args.samples)
        # A job killed after writing --samples but before OUT left its journal: its rerun replaces them.
        resuming = os.path.exists(os.path.abspath(job.out) + ".journal.json")
        check_destination(args.samples, args.overwrite or resuming)
        check_not_an_input(args.samples, inputs + [job.reader.path])
    check_not_an_input(job.out, inputs)
    docs = [build_docs(t, args.num_fewshot, args.seed, args.limit) for t in tasks]
    path = os.path.abspath(job.out) + ".requests.jsonl"
    n = 0
    with open_atomic(path) as f:
        for t, task_docs in zip(tasks, docs, strict=True):
            for d in task_docs:
                for r in d.requests:
                    rec = {"id": n} | ({"text": r.continuation} if r.context is None else
                                       {"context": r.context, "continuation": r.continuation})
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n += 1
    if n == 0:
        raise HpcLlamaError(f"the tasks ({', '.join(t.name for t in tasks)}) hold no documents to evaluate")
    job.say(f"{len(tasks)} tasks, {sum(map(len, docs))} documents, {n} requests -> {path}")
    return Plan(tasks, docs, path)


def _finish(job, plan: Plan, scorer) -> None:
    """Rank 0: metrics from the scored requests; --samples and OUT written whole; the journal let go."""
    import contextlib
    import json

    from ..atomic import open_atomic, write_json_atomic
    from .metrics import aggregate, doc_metrics
    from .tasks import fewshot_count

    results = [(r["loglik"], bool(r.get("is_greedy", False)), r["n_tokens"]) for r in _scored(job.journal.partial)]
    at = 0
    per_task = {}
    with open_atomic(job.args.samples) if job.args.samples else contextlib.nullcontext() as samples:
        for task, docs in zip(plan.tasks, plan.docs, strict=True):
            per_doc = []
            for d in docs:
                mine = results[at:at + len(d.requests)]
                at += len(d.requests)
                got = doc_metrics(task, d, [(ll, greedy) for ll, greedy, _ in mine])
                per_doc.append(got)
                if samples is not None:
                    samples.write(json.dumps(_sample(task, d, mine, got), ensure_ascii=False) + "\n")
            per_task[task.name] = _task_result(task, docs, aggregate(task, per_doc),
                                               fewshot_count(task, job.args.num_fewshot))
    if at != len(results):
        raise HpcLlamaError(f"internal: {len(results)} scored requests for {at} planned")
    summary = {
        "results": per_task,
        "model": job.model_summary(),
        "layout": job.layout(dtype=str(scorer.dtype).replace("torch.", "")),
        "versions": _versions(),
        "num_fewshot": job.args.num_fewshot, "limit": job.args.limit, "seed": job.args.seed,
        "requests": len(results), "context": scorer.context,
        "positions": job.journal.state["stats"].get("positions", 0),
        "real_positions": job.journal.state["stats"].get("real_positions", 0),
        "wall_s": round(job.wall(), 3), "resumed": job.journal.resumed,
    }
    write_json_atomic(os.path.abspath(job.out), summary)
    job.journal.discard()
    os.remove(plan.requests_path)
    table = "; ".join(f"{name} " + ", ".join(f"{m} {v['value']:.4g}" for m, v in r["metrics"].items())
                      for name, r in per_task.items())
    job.say(f"evaluated {sum(map(len, plan.docs))} documents ({len(results)} requests): {table}; wrote {job.out}"
            + (f" and {job.args.samples}" if job.args.samples else ""))


def _scored(partial: str):
    import json

    with open(partial, "rb") as f:
        for line in f:
            yield json.loads(line)


def _sample(task, d, mine, got) -> dict:
    return {"task": task.name, "doc_index": d.index, "prompt": d.prompt,
            "requests": [{"continuation": r.continuation, "loglik": ll, "n_tokens": n}
                         | ({} if r.context is None else {"is_greedy": greedy})
                         for r, (ll, greedy, n) in zip(d.requests, mine, strict=True)],
            "choices": d.choices, "gold": d.gold, "prediction": got.get("prediction"), "metrics": got["metrics"]}


def _task_result(task, docs, metrics, shots: int) -> dict:
    from ..documents import file_checksum

    return {"documents": len(docs), "output_type": task.output_type, "num_fewshot": shots, "metrics": metrics,
            "task_file": {"path": os.path.abspath(task.path), "xxh3": task.checksum},
            "data_files": {split: [{"path": os.path.abspath(p), "xxh3": file_checksum(p)} for p in paths]
                           for split, paths in task.data_files}}


def _versions() -> dict:
    import sys

    import torch

    from .. import __version__

    return {"hpc_llama": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "lm_eval_rules": "0.4"}
