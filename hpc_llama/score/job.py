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

import os

from ..errors import HpcLlamaError


def add_arguments(p):
    from ..batchjob import add_closing_arguments, add_common_arguments
    from ..cli import field_list, positive_int

    add_common_arguments(p, model_help="checkpoint: .h5, sharded directory, HF directory, GGUF file, or smollm2-135m",
                         input_help="JSONL files, Parquet files, .txt files, directories of .txt, or globs",
                         output_help="OUT.jsonl, OUT.parquet or OUT.h5", formats=("jsonl", "parquet", "hdf5"),
                         sections="score/parallel")
    p.add_argument("--text-field", help="JSONL field or Parquet column with the text (default text)")
    p.add_argument("--id-field", help="JSONL field or Parquet column with the id (default id)")
    p.add_argument("--context", type=positive_int, help="most tokens per window (default: the model's context)")
    p.add_argument("--stride", type=positive_int, help="new tokens per window after the first (default: the context)")
    p.add_argument("--tokens-per-batch", type=int, help="padded tokens per micro-batch (default 1024 on a CPU, 8192 on a GPU)")
    p.add_argument("--max-batch", type=int, help="most sequences per micro-batch (default 64)")
    p.add_argument("--token-logprobs", action="store_true", help="also write per-token log-probabilities")
    p.add_argument("--no-bos", action="store_true", help="do not put BOS before text documents")
    p.add_argument("--keep-fields", type=field_list, default=(), metavar="A,B",
                   help="copy these fields (Parquet columns) of each input record into its output record")
    p.add_argument("--shard", metavar="I/N", help="score only the I-th of N contiguous blocks of the documents, into "
                   "OUT.part-I-of-N.jsonl; `hpc-llama merge --output OUT` joins the N parts (job arrays)")
    p.add_argument("--ledger", metavar="FILE", help="score only documents whose content is not in FILE, then add "
                   "theirs (scheduled runs; see docs/slurm.md); an OUT that exists means done")
    add_closing_arguments(p)


_FLAGS = {"text_field": "score.text_field", "id_field": "score.id_field", "context": "score.context",
          "stride": "score.stride", "tokens_per_batch": "score.tokens_per_batch", "max_batch": "score.max_batch"}


def run(args) -> int:
    from ..batchjob import BatchJob
    from ..documents import Fields, scan_inputs
    from .records import SCORE_COLUMNS, parse_shard, part_path
    from .scorer import Scorer

    # A part of a sharded job is JSON lines whatever OUT's format: `merge` writes OUT.
    shard = parse_shard(args.shard) if args.shard else None
    job = BatchJob(args, "score", _FLAGS,
                   ["score.token_logprobs=true"] * args.token_logprobs + ["score.add_bos=false"] * args.no_bos,
                   out=part_path(args.output, *shard) if shard else None, fmt="jsonl" if shard else None)
    cfg, reader, info = job.cfg, job.reader, job.info
    fields = Fields(cfg.text_field, cfg.id_field, max_bytes=cfg.max_document_bytes, conditional=True,
                    keep=args.keep_fields)
    if args.ledger:
        job.files = _select_new(job, shard, fields)
        if job.files is None:
            job.close()
            return 0

    def scan(files):
        files, _ = scan_inputs(files, fields, reader.config.vocab_size, job.tokenizer is not None)
        return files, (_shard_block(files, fields, reader, cfg, shard) if shard else
                       range(sum(f.documents for f in files)))

    block = job.validate(scan, {"score": cfg.__dict__, "dtype": job.parallel.dtype, "format": job.fmt,
                                "shard": shard, "keep_fields": list(args.keep_fields)})
    total = len(block)
    with job.running(total, "doc"):
        scorer = Scorer(reader, job.tokenizer, info, job.comm, job.parallel, cfg)
        score_documents(job, scorer, fields, total, block.start, args.keep_fields)
        ranks = scorer.rank_stats()
        if info.rank == 0:
            columns = dict(SCORE_COLUMNS, **({"token_logprobs": "float_list"} if cfg.token_logprobs else {}),
                           **{k: "id" for k in args.keep_fields})
            summary = _summary(job, scorer, ranks, shard and {
                "index": shard[0], "count": shard[1], "first": block.start, "documents": total,
                "of": sum(f.documents for f in job.files)})
            job.finish(columns, summary, f"scored {summary['documents']} documents, {summary['tokens']} tokens: "
                       f"corpus perplexity {_rounded(summary['corpus_ppl'])}, padding waste "
                       f"{summary['padding_waste']:.1%}; wrote {job.out} and {os.path.basename(job.out)}.summary.json")
            if args.ledger:
                _record_selection(args.ledger, job.out, fields, reader)
    return 0


def score_documents(job, scorer, fields, total: int, first: int = 0, keep_fields=()) -> None:
    """Score documents first.. first+total-1 of the job's inputs step by step, from where an earlier attempt
    stopped; rank 0 commits each step's records to the journal."""
    from itertools import islice

    from ..documents import chunks, read_documents
    from .records import step_records

    cfg = job.cfg
    docs = islice(read_documents(job.files, fields, job.reader.config.vocab_size, first + job.start), total - job.start)
    for step in chunks(docs, cfg.chunk_docs, cfg.chunk_chars):
        result = scorer.score_step(step)
        if job.info.rank == 0:
            totals = result.totals()
            lines, stats = step_records(step, result, keep_fields)
            job.commit(lines, dict(totals, **stats), totals["tokens"])


def _latest(times):
    times = list(times)
    return None if None in times else max(times)


def _rounded(x):
    return x if x is None else round(x, 3)


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


def _select_new(job, shard, fields):
    """Rank 0 writes OUT.inputs.jsonl, the documents not in the ledger; None when this period is done already."""
    from ..atomic import open_atomic
    from ..documents import read_documents
    from .ledger import Ledger

    args, out, reader, cfg = job.args, job.out, job.reader, job.cfg
    if shard:
        raise HpcLlamaError("--ledger and --shard do not go together")
    selection = _selection(out).path
    state = None
    if job.info.rank == 0:
        if os.path.exists(out) and not args.overwrite:
            added = _record_selection(args.ledger, out, fields, reader)
            job.say(f"{out} exists: this period is scored already, nothing to do"
                    + (f" ({added} checksums were missing from the ledger and are added)" if added else ""),
                    always=True)
        else:
            if not (os.path.exists(selection) and os.path.exists(out + ".journal.json")):  # else: resume as is
                ledger = Ledger(args.ledger)
                n = ledger.select(read_documents(job.files, fields, reader.config.vocab_size), selection,
                                  cfg.text_field, cfg.id_field)
                job.say(f"{n} new documents ({len(ledger.keys)} in the ledger) -> {selection}")
            state = selection
    state = job.bcast(state)
    if state is None:
        return None
    selection = _selection(out)
    if selection.size == 0:
        if job.info.rank == 0:
            with open_atomic(out):  # a dated output with nothing new in it
                pass
            job.say(f"no new documents: wrote an empty {out}", always=True)
        return None
    return [selection]


def _selection(out: str):
    """OUT.inputs.jsonl, the period's documents not yet in the ledger, as an input file."""
    from ..documents import InputFile

    path = out + ".inputs.jsonl"
    return InputFile(path, "jsonl", os.path.getsize(path) if os.path.exists(path) else 0)


def _record_selection(ledger_path, out, fields, reader) -> int:
    from ..documents import read_documents
    from .ledger import Ledger

    selection = _selection(out)
    if not os.path.exists(selection.path):
        return 0
    docs = read_documents([selection], fields, reader.config.vocab_size)
    return Ledger(ledger_path).record(docs, os.path.basename(out))


def _summary(job, scorer, ranks, shard) -> dict:
    from .records import corpus_numbers

    journal = job.journal
    stats = journal.state["stats"]
    tokens = stats.get("tokens", 0)
    wall = job.wall()
    summary = {
        "output": os.path.abspath(job.out), "documents": journal.documents_done, "tokens": tokens,
        "loglik": stats.get("loglik", 0.0), **corpus_numbers(stats),
        "wall_s": round(wall, 3), "tokens_per_s_this_run": round(job.progress.tokens / max(wall, 1e-9), 1),
        "padding_waste": round(1 - stats.get("real_positions", 0) / stats["positions"], 4) if stats.get("positions") else 0.0,
        "positions": stats.get("positions", 0), "real_positions": stats.get("real_positions", 0),
        "layout": job.layout(dtype=str(scorer.dtype).replace("torch.", "")),
        "context": scorer.context, "stride": scorer.stride, "resumed": journal.resumed,
        # What else decides a record's bytes; `merge` refuses parts that differ in it.
        "options": {k: journal.fingerprint["options"][k] for k in ("score", "dtype")},
        "model": job.model_summary(), "inputs": job.inputs_summary("documents"), "ranks": ranks,
        # Seconds from the start of the last rank's process to its first forward: what starting cost.
        "first_forward_s": _latest(r["first_forward_s"] for r in ranks),
    }
    if shard:
        summary["shard"] = shard
    return summary
