"""Generate completions for a file of prompts, with a KV cache across pipeline stages.

    mpirun -n 4 hpc-llama generate --model llama.h5 --input prompts.jsonl --output out.jsonl --pp 2 --max-new-tokens 64
    mpirun -n 2 hpc-llama generate --model m.h5 --input prompts.txt --output out.parquet --temperature 0.8 --top-p 0.95 --seed 1

Prompts: JSONL records with `prompt` (or `input_ids`) and optionally `id`, or
text files with one prompt per line. Ranks = pp stages x dp replicas; each
replica takes every dp-th prompt of a step. Rank 0 writes one record per
prompt in input order (index, id, completion, tokens, n_prompt_tokens,
n_new_tokens, finish_reason: eos, stop, length or context), atomically and
resumably like `score`, plus OUT.summary.json with stage utilisation.
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--model", required=True,
                   help="checkpoint: .h5, sharded directory, HF directory, GGUF file, or smollm2-135m")
    p.add_argument("--input", required=True, nargs="+", help="JSONL prompts, text files (a prompt per line), or globs")
    p.add_argument("--output", required=True, help="OUT.jsonl or OUT.parquet")
    p.add_argument("--format", choices=("jsonl", "parquet"), help="output format (default: from the name)")
    p.add_argument("--config", help="YAML preset with generate/parallel sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="compute dtype (default auto)")
    p.add_argument("--max-new-tokens", type=int, help="most new tokens per prompt (default 128)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default); otherwise sample")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set reaching probability p")
    p.add_argument("--seed", type=int, help="sampling seed (each prompt mixes in its index)")
    p.add_argument("--stop", action="append", metavar="STR", help="a string that ends a completion (repeatable)")
    p.add_argument("--batch-size", type=int, help="sequence slots per replica (default 8)")
    p.add_argument("--groups", type=int, help="micro-batches in flight (default one per stage)")
    p.add_argument("--context", type=int, help="longest prompt + completion (default: the model's context)")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before text prompts")
    p.add_argument("--chat", action="store_true",
                   help="put each text prompt in the checkpoint's chat template as a user turn")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


GENERATE_COLUMNS = {"index": "int", "id": "id", "completion": "str", "tokens": "int_list", "n_prompt_tokens": "int",
                    "n_new_tokens": "int", "finish_reason": "str"}

_FLAGS = {"pp": "parallel.pp", "dtype": "parallel.dtype", "max_new_tokens": "generate.max_new_tokens",
          "temperature": "generate.temperature", "top_k": "generate.top_k", "top_p": "generate.top_p",
          "seed": "generate.seed", "stop": "generate.stops", "batch_size": "generate.batch_size",
          "groups": "generate.groups", "context": "generate.context"}


def run(args) -> int:
    import json
    import time

    from ..checkpoint import open_checkpoint
    from ..config import GenerateConfig, ParallelConfig, flag_overrides, load_sections
    from ..documents import Fields, chunks, expand_inputs, read_documents
    from ..errors import HpcLlamaError
    from ..parallel.ranks import start_distributed, start_rank, stop_distributed, world_comm
    from ..progress import Progress
    from ..records import Journal, output_format
    from ..tokenizer import ChatTokenizer, Tokenizer
    from .job import GENERATE_COLUMNS

    t_start = time.time()
    overrides = flag_overrides(args, _FLAGS)
    overrides += ["generate.add_bos=false"] * args.no_bos + ["generate.chat=true"] * args.chat
    sections = load_sections(args.config, overrides + args.set)
    parallel, cfg = sections["parallel"] or ParallelConfig(), sections["generate"] or GenerateConfig()
    comm = world_comm()
    info = start_rank(comm)
    fmt = output_format(args.output, args.format)
    if fmt == "hdf5":
        raise HpcLlamaError("generate writes .jsonl or .parquet")
    reader = open_checkpoint(args.model)
    tokenizer = Tokenizer.from_checkpoint(reader)
    if cfg.chat:
        if tokenizer is None:
            raise HpcLlamaError("--chat needs the checkpoint's tokenizer, and it has none")
        tokenizer = ChatTokenizer.from_checkpoint(reader, tokenizer)
    fields = Fields(cfg.prompt_field, cfg.id_field, text_lines=True)
    files = expand_inputs(args.input)
    if info.world_size % parallel.pp:
        raise HpcLlamaError(f"{info.world_size} ranks cannot be split into {parallel.pp} pipeline stages")
    context = cfg.context or reader.config.max_seq_len
    if context > reader.config.max_seq_len:
        raise HpcLlamaError(f"context {context} exceeds the model's {reader.config.max_seq_len} tokens")
    bos = reader.config.bos_id if cfg.add_bos and not cfg.chat else None
    journal, state = None, None
    if info.rank == 0:  # every prompt checked before any rank starts or anything is written
        files, longest = _scan(files, fields, reader, tokenizer, bos, context)
        fingerprint = {"model": reader.fingerprint(), "inputs": [[f.path, f.size, f.xxh3] for f in files],
                       "options": {"generate": cfg.__dict__, "dtype": parallel.dtype, "format": fmt}}
        journal = Journal(args.output, fingerprint, args.overwrite)
        state = (files, longest, journal.documents_done)
    files, longest, start = comm.bcast(state) if comm is not None else state
    capacity = min(context, longest + cfg.max_new_tokens)
    if parallel.pp > 1:
        start_distributed(info, comm, parallel.timeout_s)
    try:
        engine = _engine(reader, tokenizer, info, parallel, cfg, capacity)
        progress = Progress(info, sum(f.documents for f in files), start, quiet=args.quiet, unit="prompt")
        if start:
            progress.log(f"resuming after {start} prompts")
        stats = {"new_tokens": 0, "reasons": {}}
        docs = read_documents(files, fields, reader.config.vocab_size, start)
        for step in chunks(docs, cfg.chunk_docs, 1 << 62):
            lines = _generate_step(step, engine, tokenizer, bos, info, comm, parallel.pp)
            if info.rank == 0:
                journal.commit(lines, {})
                for line in lines:
                    rec = json.loads(line)
                    stats["new_tokens"] += rec["n_new_tokens"]
                    stats["reasons"][rec["finish_reason"]] = stats["reasons"].get(rec["finish_reason"], 0) + 1
                progress.update(len(step), sum(json.loads(x)["n_new_tokens"] for x in lines))
        busy = comm.gather((info.rank, engine.stage, engine.replica, engine.busy_s), root=0) if comm is not None \
            else [(0, 0, 0, engine.busy_s)]
        if info.rank == 0:
            journal.finish(fmt, GENERATE_COLUMNS)
            _summary(args, journal, files, parallel, info, engine, stats, busy, time.time() - t_start, progress)
        progress.close()
        if comm is not None:
            comm.Barrier()
    finally:
        reader.close()
        stop_distributed()
    return 0


def _scan(files, fields, reader, tokenizer, bos, context):
    """Validate every prompt (JSON, fields, vocabulary, length) on rank 0; returns the longest in tokens."""
    from ..documents import read_documents, scan_inputs
    from ..errors import HpcLlamaError

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


def _engine(reader, tokenizer, info, parallel, cfg, capacity):
    from ..checkpoint.slices import load_slice
    from ..parallel.layout import stage_and_replica, stage_plans
    from ..parallel.ranks import resolve_dtype
    from .engine import GenerationConfig, RingGenerator
    from .sampling import SamplingConfig

    stage, _ = stage_and_replica(info.rank, info.world_size, parallel.pp)
    plan = stage_plans(reader.config, parallel)[stage]
    dtype = resolve_dtype(parallel.dtype, info.device)
    model = load_slice(reader, plan.layers, plan.embed, plan.head, info.device, dtype)
    gcfg = GenerationConfig(cfg.max_new_tokens, tuple(cfg.stops), cfg.batch_size, cfg.groups)
    sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    return RingGenerator(model, info, parallel.pp, gcfg, sampling, tokenizer, reader.config.eos_ids, capacity, dtype)


def _generate_step(step, engine, tokenizer, bos, info, comm, pp) -> list[str]:
    """Generate a step's prompts; rank 0 gets the records as JSON lines, in input order."""
    import json

    from ..tokenizer import tokenize_documents
    from .engine import Prompt

    seqs = tokenize_documents(step, tokenizer, bos, comm, info.rank, info.world_size)
    dp = info.world_size // pp
    mine = [Prompt(d.index, d.id, tuple(int(t) for t in s)) for j, (d, s) in enumerate(zip(step, seqs))
            if j % dp == engine.replica]
    records = engine.run(mine)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    gathered = comm.gather(lines, root=0) if comm is not None else [lines]
    if info.rank != 0:
        return []
    out = sorted((json.loads(x)["index"], x) for part in gathered for x in part)
    if len(out) != len(step):
        from ..errors import HpcLlamaError

        raise HpcLlamaError(f"internal: {len(out)} completions for {len(step)} prompts")
    return [x for _, x in out]


def _summary(args, journal, files, parallel, info, engine, stats, busy, wall, progress) -> None:
    import os

    from ..atomic import write_json_atomic
    from ..progress import Progress

    per_rank = [{"rank": r, "stage": s, "replica": d, "busy_s": round(b, 3), "utilisation": round(b / wall, 3)}
                for r, s, d, b in sorted(busy)]
    summary = {
        "output": os.path.abspath(args.output), "prompts": journal.documents_done,
        "new_tokens_this_run": stats["new_tokens"], "finish_reasons_this_run": stats["reasons"],
        "wall_s": round(wall, 3), "new_tokens_per_s": round(stats["new_tokens"] / max(wall, 1e-9), 1),
        "layout": {"ranks": info.world_size, "pp": parallel.pp, "dp": info.world_size // parallel.pp,
                   "device": info.device, "batch_size": engine.cfg.batch_size, "groups": len(engine.groups)},
        "capacity": engine.capacity, "resumed": journal.resumed, "ranks": per_rank,
        "model": {"path": os.path.abspath(args.model), "fingerprint": journal.fingerprint["model"]},
        "inputs": [{"path": os.path.abspath(f.path), "bytes": f.size, "xxh3": f.xxh3, "prompts": f.documents}
                   for f in files],
    }
    write_json_atomic(os.path.abspath(args.output) + ".summary.json", summary)
    Progress.say(info, f"generated {stats['new_tokens']} tokens for {journal.documents_done} prompts "
                       f"({summary['new_tokens_per_s']} tokens/s); wrote {args.output}", quiet=args.quiet)
