"""Generate completions for a file of prompts, with a KV cache across pipeline stages.

    mpirun -n 4 hpc-llama generate --model llama.h5 --input prompts.jsonl --output out.jsonl --pp 2 --max-new-tokens 64
    mpirun -n 2 hpc-llama generate --model m.h5 --input prompts.txt --output out.parquet --temperature 0.8 --top-p 0.95 --seed 1

Prompts: JSONL records or Parquet rows with `prompt` (or `input_ids`) and
optionally `id`, or text files with one prompt per line. Ranks = pp stages x dp replicas; each
replica takes every dp-th prompt of a step. Rank 0 writes one record per
prompt in input order (index, id, completion, tokens, n_prompt_tokens,
n_new_tokens, finish_reason: eos, stop, length or context), atomically and
resumably like `score`, plus OUT.summary.json with stage utilisation.
"""

from __future__ import annotations

import json
import os

from ..errors import HpcLlamaError
from ..tokenizer import prefix_and_bos


def add_arguments(p):
    from ..batchjob import add_closing_arguments, add_common_arguments
    from ..cli import field_list, finite_float, positive_int

    add_common_arguments(p, model_help="checkpoint: .h5, sharded directory, HF directory, GGUF file, or smollm2-135m",
                         input_help="JSONL or Parquet prompts, text files (a prompt per line), or globs",
                         output_help="OUT.jsonl or OUT.parquet", formats=("jsonl", "parquet"),
                         sections="generate/parallel")
    p.add_argument("--max-new-tokens", type=int, help="most new tokens per prompt (default 128)")
    p.add_argument("--temperature", type=finite_float, help="0 = greedy (default); otherwise sample")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=finite_float, help="nucleus sampling: the smallest set reaching probability p")
    p.add_argument("--seed", type=int, help="sampling seed (each prompt mixes in its index)")
    p.add_argument("--stop", action="append", metavar="STR", help="a string that ends a completion (repeatable)")
    p.add_argument("--batch-size", type=int, help="sequence slots per replica (default 8)")
    p.add_argument("--groups", type=positive_int, help="micro-batches in flight (default one per stage)")
    p.add_argument("--context", type=positive_int, help="longest prompt + completion (default: the model's context)")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before text prompts")
    p.add_argument("--chat", action="store_true",
                   help="put each text prompt in the checkpoint's chat template as a user turn")
    p.add_argument("--keep-fields", type=field_list, default=(), metavar="A,B",
                   help="copy these fields of each input record into its output record")
    add_closing_arguments(p)


GENERATE_COLUMNS = {"index": "int", "id": "id", "completion": "str", "tokens": "int_list", "n_prompt_tokens": "int",
                    "n_new_tokens": "int", "finish_reason": "str"}

_FLAGS = {"max_new_tokens": "generate.max_new_tokens", "temperature": "generate.temperature",
          "top_k": "generate.top_k", "top_p": "generate.top_p", "seed": "generate.seed", "stop": "generate.stops",
          "batch_size": "generate.batch_size", "groups": "generate.groups", "context": "generate.context"}


def run(args) -> int:
    from ..batchjob import BatchJob
    from ..chat import ChatTokenizer
    from ..documents import Fields, chunks, read_documents

    job = BatchJob(args, "generate", _FLAGS,
                   ["generate.add_bos=false"] * args.no_bos + ["generate.chat=true"] * args.chat,
                   formats=("jsonl", "parquet"))
    cfg, reader, info = job.cfg, job.reader, job.info
    if cfg.chat:
        if job.tokenizer is None:
            raise HpcLlamaError("--chat needs the checkpoint's tokenizer, and it has none")
        job.tokenizer = ChatTokenizer.from_checkpoint(reader, job.tokenizer)
    fields = Fields(cfg.prompt_field, cfg.id_field, text_lines=True, max_bytes=cfg.max_document_bytes,
                    keep=args.keep_fields)
    context = cfg.context or reader.config.max_seq_len
    if context > reader.config.max_seq_len:
        raise HpcLlamaError(f"context {context} exceeds the model's {reader.config.max_seq_len} tokens")
    # A text prompt starts as transformers' tokenizer would start it (Llama: BOS; Qwen, SmolLM2: none).
    bos = prefix_and_bos(reader, job.tokenizer)[1] if cfg.add_bos and not cfg.chat else None
    longest = job.validate(lambda files: _scan(files, fields, reader, job.tokenizer, bos, context),
                           {"generate": cfg.__dict__, "dtype": job.parallel.dtype, "format": job.fmt,
                            "keep_fields": list(args.keep_fields)})
    capacity = min(context, longest + cfg.max_new_tokens)
    with job.running(sum(f.documents for f in job.files), "prompt"):
        engine = _engine(job, capacity)
        stats = {"new_tokens": 0, "reasons": {}}
        docs = read_documents(job.files, fields, reader.config.vocab_size, job.start)
        for step in chunks(docs, cfg.chunk_docs, 1 << 62):
            records = _generate_step(step, engine, job, bos)
            if info.rank == 0:
                for r, d in zip(records, step, strict=True):
                    if d.keep:
                        r.update(zip(args.keep_fields, d.keep))
                new = sum(r["n_new_tokens"] for r in records)
                stats["new_tokens"] += new
                for r in records:
                    stats["reasons"][r["finish_reason"]] = stats["reasons"].get(r["finish_reason"], 0) + 1
                job.commit([json.dumps(r, ensure_ascii=False) + "\n" for r in records], {}, new)
        busy = job.gather((info.rank, engine.stage, engine.replica, engine.busy_s))
        if info.rank == 0:
            summary = _summary(job, engine, stats, busy)
            job.finish(dict(GENERATE_COLUMNS, **{k: "id" for k in args.keep_fields}), summary, f"generated {stats['new_tokens']} tokens for "
                       f"{job.journal.documents_done} prompts ({summary['new_tokens_per_s']} tokens/s); wrote {job.out}")
    return 0


def _scan(files, fields, reader, tokenizer, bos, context):
    """Validate every prompt (JSON, fields, vocabulary, length) on rank 0; returns the longest in tokens."""
    from ..documents import read_documents, scan_inputs

    files, with_text = scan_inputs(files, fields, reader.config.vocab_size, tokenizer is not None)
    longest = 0
    for doc in read_documents(files, fields, reader.config.vocab_size):
        n = len(doc.input_ids) if doc.text is None else len(tokenizer.encode(doc.text)) + (bos is not None)
        if n == 0:
            raise HpcLlamaError(f"{doc.where}: the prompt is empty (and there is no BOS to start from)")
        if n >= context:
            raise HpcLlamaError(f"{doc.where}: the prompt has {n} tokens, which leaves no room in the context "
                                f"of {context}")
        longest = max(longest, n)
    return files, longest


def _engine(job, capacity):
    from ..checkpoint.slices import load_slice
    from ..inference import ready_for_inference
    from ..parallel.layout import stage_and_replica, stage_plans
    from ..parallel.ranks import resolve_dtype
    from .engine import RingGenerator

    info, parallel, cfg, reader = job.info, job.parallel, job.cfg, job.reader
    stage, _ = stage_and_replica(info.rank, info.world_size, parallel.pp)
    plan = stage_plans(reader.config, parallel)[stage]
    dtype = resolve_dtype(parallel.dtype, info.device)
    model = load_slice(reader, plan.layers, plan.embed, plan.head, info.device, dtype)
    ready_for_inference(model, pack=True)  # decode steps of a few rows: 1.2x faster prepacked
    return RingGenerator(model, info, parallel.pp, cfg, job.tokenizer, reader.config.eos_ids, capacity, dtype)


def _generate_step(step, engine, job, bos) -> list[dict]:
    """Generate a step's prompts; rank 0 gets the records, in input order."""
    from ..tokenizer import tokenize_documents
    from .sampling import Prompt

    info = job.info
    seqs = tokenize_documents(step, job.tokenizer, bos, job.comm, info.rank, info.world_size)
    mine = [Prompt(d.index, d.id, tuple(int(t) for t in s)) for j, (d, s) in enumerate(zip(step, seqs))
            if j % job.dp == engine.replica]
    gathered = job.gather(engine.run(mine))
    if info.rank != 0:
        return []
    out = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    if len(out) != len(step):
        raise HpcLlamaError(f"internal: {len(out)} completions for {len(step)} prompts")
    return out


def _summary(job, engine, stats, busy) -> dict:
    wall = job.wall()
    per_rank = [{"rank": r, "stage": s, "replica": d, "busy_s": round(b, 3), "utilisation": round(b / wall, 3)}
                for r, s, d, b in sorted(busy)]
    return {
        "output": os.path.abspath(job.out), "prompts": job.journal.documents_done,
        "new_tokens_this_run": stats["new_tokens"], "finish_reasons_this_run": stats["reasons"],
        "wall_s": round(wall, 3), "new_tokens_per_s": round(stats["new_tokens"] / max(wall, 1e-9), 1),
        "layout": job.layout(batch_size=engine.cfg.batch_size, groups=len(engine.groups)),
        "capacity": engine.capacity, "resumed": job.journal.resumed, "ranks": per_rank,
        "model": job.model_summary(), "inputs": job.inputs_summary("prompts"),
    }
