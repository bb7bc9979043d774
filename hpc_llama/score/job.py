"""Score documents: log-likelihood and perplexity of each, in input order, exactly once.

    mpirun -n 4 hpc-llama score --model llama.h5 --input docs.jsonl --output scores.jsonl --pp 2
    srun -n 8 hpc-llama score --model /models/Llama-3-8B --input 'corpus/*.jsonl' --output s.parquet --pp 4

Ranks = pp stages x dp replicas; each replica scores its share of every step.
Rank 0 writes the records (index, id, n_tokens, loglik, ppl[, token_logprobs])
to OUT (.jsonl, .parquet, .h5) and a summary to OUT.summary.json. Killed and
started again with the same command, the job carries on from its last whole
step and the output is byte-identical to an uninterrupted run. The exact
definition of the numbers is in docs/scoring.md.
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--model", required=True, help="checkpoint: .h5, sharded directory or HF directory")
    p.add_argument("--input", required=True, nargs="+", help="JSONL files, .txt files, directories of .txt, or globs")
    p.add_argument("--output", required=True, help="OUT.jsonl, OUT.parquet or OUT.h5")
    p.add_argument("--format", choices=("jsonl", "parquet", "hdf5"), help="output format (default: from the name)")
    p.add_argument("--config", help="YAML preset with score/parallel sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="compute dtype (default auto)")
    p.add_argument("--text-field", help="JSONL field with the text (default text)")
    p.add_argument("--id-field", help="JSONL field with the id (default id)")
    p.add_argument("--context", type=int, help="most tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="new tokens per window after the first (default: the context)")
    p.add_argument("--tokens-per-batch", type=int, help="padded tokens per micro-batch (default 8192)")
    p.add_argument("--max-batch", type=int, help="most sequences per micro-batch (default 64)")
    p.add_argument("--token-logprobs", action="store_true", help="also write per-token log-probabilities")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before text documents")
    p.add_argument("--shard", metavar="I/N", help="score only the I-th of N contiguous blocks of the documents, into "
                   "OUT.part-I-of-N.jsonl; `hpc-llama merge --output OUT` joins the N parts (job arrays)")
    p.add_argument("--ledger", metavar="FILE", help="score only documents whose content is not in FILE, then add "
                   "theirs (scheduled runs; see docs/slurm.md); an OUT that exists means done")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")


_FLAGS = {"pp": "parallel.pp", "dtype": "parallel.dtype", "text_field": "score.text_field", "id_field": "score.id_field",
          "context": "score.context", "stride": "score.stride", "tokens_per_batch": "score.tokens_per_batch",
          "max_batch": "score.max_batch"}


def run(args) -> int:
    import time
    from itertools import islice

    from ..checkpoint import open_checkpoint
    from ..config import ParallelConfig, ScoreConfig, flag_overrides, load_sections
    from ..documents import Fields, chunks, expand_inputs, read_documents, scan_inputs
    from ..parallel.ranks import start_distributed, start_rank, stop_distributed, world_comm
    from ..progress import Progress
    from ..records import Journal, output_format
    from ..tokenizer import Tokenizer
    from .records import SCORE_COLUMNS, parse_shard, part_path, record_line
    from .scorer import Scorer

    t_start = time.time()
    overrides = flag_overrides(args, _FLAGS)
    overrides += ["score.token_logprobs=true"] * args.token_logprobs + ["score.add_bos=false"] * args.no_bos
    sections = load_sections(args.config, overrides + args.set)
    parallel, cfg = sections["parallel"] or ParallelConfig(), sections["score"] or ScoreConfig()
    comm = world_comm()
    info = start_rank(comm)
    fmt = output_format(args.output, args.format)
    shard, out = None, args.output
    if args.shard:  # a part is JSON lines whatever OUT's format: `merge` writes OUT
        shard = parse_shard(args.shard)
        out, fmt = part_path(args.output, *shard), "jsonl"
    reader = open_checkpoint(args.model)
    tokenizer = Tokenizer.from_checkpoint(reader)
    fields = Fields(cfg.text_field, cfg.id_field)
    files = expand_inputs(args.input)
    if info.world_size % parallel.pp:
        from ..errors import HpcLlamaError

        raise HpcLlamaError(f"{info.world_size} ranks cannot be split into {parallel.pp} pipeline stages")
    if args.ledger:
        files = _select_new(args, out, shard, files, fields, reader, info, comm, cfg)
        if files is None:
            reader.close()
            return 0
    journal, start, block = None, None, None
    if info.rank == 0:  # validate everything before any rank starts work or anything is written
        files, _ = scan_inputs(files, fields, reader.config.vocab_size, tokenizer is not None)
        n_all = sum(f.documents for f in files)
        block = _shard_block(files, fields, reader, cfg, shard) if shard else range(n_all)
        fingerprint = {"model": reader.fingerprint(), "inputs": [[f.path, f.size, f.xxh3] for f in files],
                       "options": {"score": cfg.__dict__, "dtype": parallel.dtype, "format": fmt, "shard": shard}}
        journal = Journal(out, fingerprint, args.overwrite)
        start = journal.documents_done
    files, start, block = comm.bcast((files, start, block)) if comm is not None else (files, start, block)
    n_all = sum(f.documents for f in files)
    total_docs = len(block)
    if parallel.pp > 1:
        start_distributed(info, comm, parallel.timeout_s)
    try:
        scorer = Scorer(reader, tokenizer, info, comm, parallel, cfg)
        progress = Progress(info, total_docs, start, quiet=args.quiet)
        if start:
            progress.log(f"resuming after {start} of {total_docs} documents")
        docs = islice(read_documents(files, fields, reader.config.vocab_size, block.start + start), total_docs - start)
        for step in chunks(docs, cfg.chunk_docs, cfg.chunk_chars):
            result = scorer.score_step(step)
            if info.rank == 0:
                lines = [record_line(d.index, d.id, int(n), float(ll), None if result.token_logprobs is None
                                     else result.token_logprobs[j])
                         for j, (d, n, ll) in enumerate(zip(step, result.n_tokens, result.loglik))]
                journal.commit(lines, {"tokens": int(result.n_tokens.sum()), "loglik": float(result.loglik.sum()),
                                       "positions": result.positions, "real_positions": result.real_positions})
                progress.update(len(step), int(result.n_tokens.sum()))
        ranks = scorer.rank_stats()
        if info.rank == 0:
            columns = dict(SCORE_COLUMNS, **({"token_logprobs": "float_list"} if cfg.token_logprobs else {}))
            journal.finish(fmt, columns)
            if args.ledger:
                _record_selection(args.ledger, out, fields, reader)
            _write_summary(args, out, journal, files, parallel, info, scorer, time.time() - t_start, progress, ranks,
                           shard and {"index": shard[0], "count": shard[1], "first": block.start,
                                      "documents": len(block), "of": n_all})
        progress.close()
        if comm is not None:
            comm.Barrier()
    finally:
        reader.close()
        stop_distributed()
    return 0


def _shard_block(files, fields, reader, cfg, shard) -> range:
    """Shard I of N: the documents of the I-th of N contiguous runs of whole steps.

    Steps are cut from the start of the input exactly as one job cuts them, so
    every document is scored in the same batch as in one job, and the merged
    parts are the same bytes.
    """
    from ..documents import chunks, read_documents
    from ..parallel.layout import shard_range

    starts, n = [], 0
    for step in chunks(read_documents(files, fields, reader.config.vocab_size), cfg.chunk_docs, cfg.chunk_chars):
        starts.append(n)
        n += len(step)
    steps = shard_range(len(starts), *shard)
    starts.append(n)
    return range(starts[steps.start], starts[steps.stop])


def _select_new(args, out, shard, files, fields, reader, info, comm, cfg):
    """Rank 0 writes OUT.inputs.jsonl, the documents not in the ledger; None when this period is done already."""
    import os

    from ..documents import InputFile, read_documents
    from ..errors import HpcLlamaError
    from ..progress import Progress
    from .ledger import Ledger

    if shard:
        raise HpcLlamaError("--ledger and --shard do not go together")
    selection = out + ".inputs.jsonl"
    state = None
    if info.rank == 0:
        if os.path.exists(out) and not args.overwrite:
            added = _record_selection(args.ledger, out, fields, reader)
            Progress.say(info, f"{out} exists: this period is scored already, nothing to do"
                         + (f" ({added} checksums were missing from the ledger and are added)" if added else ""))
        else:
            if not (os.path.exists(selection) and os.path.exists(out + ".journal.json")):  # else: resume as is
                ledger = Ledger(args.ledger)
                n = ledger.select(read_documents(files, fields, reader.config.vocab_size), selection,
                                  cfg.text_field, cfg.id_field)
                Progress.say(info, f"{n} new documents ({len(ledger.keys)} in the ledger) -> {selection}")
            state = selection
    state = comm.bcast(state) if comm is not None else state
    if state is None:
        return None
    if os.path.getsize(state) == 0:
        if info.rank == 0:
            open(out, "w").close()  # a dated output with nothing new in it
            Progress.say(info, f"no new documents: wrote an empty {out}")
        return None
    return [InputFile(state, "jsonl", os.path.getsize(state))]


def _record_selection(ledger_path, out, fields, reader) -> int:
    import os

    from ..documents import InputFile, read_documents
    from .ledger import Ledger

    selection = out + ".inputs.jsonl"
    if not os.path.exists(selection):
        return 0
    docs = read_documents([InputFile(selection, "jsonl", os.path.getsize(selection))], fields, reader.config.vocab_size)
    return Ledger(ledger_path).record(docs, os.path.basename(out))


def _write_summary(args, out, journal, files, parallel, info, scorer, wall, progress, ranks, shard=None) -> None:
    import math
    import os

    from ..atomic import write_json_atomic

    stats = journal.state["stats"]
    tokens = stats.get("tokens", 0)
    summary = {
        "output": os.path.abspath(out), "documents": journal.documents_done, "tokens": tokens,
        "loglik": stats.get("loglik", 0.0),
        "corpus_ppl": math.exp(-stats["loglik"] / tokens) if tokens else None,
        "wall_s": round(wall, 3), "tokens_per_s_this_run": round(progress.tokens / max(wall, 1e-9), 1),
        "padding_waste": round(1 - stats.get("real_positions", 0) / stats["positions"], 4) if stats.get("positions") else 0.0,
        "layout": {"ranks": info.world_size, "pp": parallel.pp, "dp": info.world_size // parallel.pp,
                   "device": info.device, "dtype": str(scorer.dtype).replace("torch.", "")},
        "context": scorer.context, "stride": scorer.stride, "resumed": journal.resumed,
        "model": {"path": os.path.abspath(args.model), "fingerprint": journal.fingerprint["model"]},
        "inputs": [{"path": os.path.abspath(f.path), "bytes": f.size, "xxh3": f.xxh3, "documents": f.documents}
                   for f in files],
        "ranks": ranks,
    }
    if shard:
        summary["shard"] = shard
    path = os.path.abspath(out) + ".summary.json"
    write_json_atomic(path, summary)
    from ..progress import Progress

    Progress.say(info, f"scored {summary['documents']} documents, {tokens} tokens: corpus perplexity "
                       f"{summary['corpus_ppl'] if summary['corpus_ppl'] is None else round(summary['corpus_ppl'], 3)}, "
                       f"padding waste {summary['padding_waste']:.1%}; wrote {out} and {os.path.basename(path)}",
                 quiet=args.quiet)
