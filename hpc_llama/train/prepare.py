"""Turn a corpus into token shards with a train/validation/test split.

    hpc-llama prepare --input 'corpus/*.jsonl' --output data/ --tokenizer llama.h5
    hpc-llama prepare --input '/usr/lib/python3.11/**/*.py' --output data/ --train-tokenizer 4096 --skip-bad
    mpirun -n 4 hpc-llama prepare --input tasks.jsonl --output sft/ --tokenizer model.h5 --task

Each document goes to train, val or test by a seeded hash of its content
(docs/training.md), so the split is stable when the corpus grows. Text
documents become BOS + tokens + EOS; task records (`prompt`/`response`)
become BOS + prompt + response + EOS with the loss on the response and EOS
only. Chunks of documents are tokenized in parallel across ranks, each into
its own shard; rank 0 writes the manifest, and the directory appears whole.
"""

from __future__ import annotations


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument, positive_int
    from ..documents import MAX_DOCUMENT_BYTES

    p.add_argument("--input", required=True, nargs="+", help="JSONL files, text files, directories of .txt, or globs")
    p.add_argument("--output", required=True, help="data directory to create")
    p.add_argument("--tokenizer", help="tokenizer.json, or a checkpoint whose tokenizer to use")
    p.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", help="train a byte-level BPE on the train split")
    p.add_argument("--split", default="0.98,0.01,0.01", help="train,val,test fractions (default 0.98,0.01,0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split rule")
    p.add_argument("--task", action="store_true", help="task data: records with prompt and response fields")
    p.add_argument("--text-field", default=None, help="JSONL text field (default text; prompt with --task)")
    p.add_argument("--response-field", default="response", help="JSONL response field with --task")
    p.add_argument("--chunk-docs", type=int, default=4096, help="documents per shard")
    p.add_argument("--skip-bad", action="store_true", help="skip documents that cannot be read (counted in the manifest)")
    p.add_argument("--max-document-bytes", type=positive_int, default=MAX_DOCUMENT_BYTES,
                   help=f"a larger document is an error (or skipped with --skip-bad); default {MAX_DOCUMENT_BYTES:,}")
    add_overwrite_argument(p, "the output directory")
    add_quiet_argument(p)


def run(args) -> int:
    import contextlib
    import os

    import numpy as np

    from ..atomic import atomic_path, claim_output
    from ..documents import Fields, expand_inputs, read_documents, scan_inputs
    from ..errors import HpcLlamaError
    from ..parallel.ranks import start_rank, world_comm
    from ..progress import report
    from ..tokenizer import Tokenizer
    from .data import parse_split, write_shard

    comm = world_comm()
    info = start_rank(comm)
    fractions = parse_split(args.split)
    if args.chunk_docs < 1:
        raise HpcLlamaError("--chunk-docs must be at least 1")
    fields = Fields(args.text_field or ("prompt" if args.task else "text"), "id",
                    args.response_field if args.task else None, max_bytes=args.max_document_bytes)
    files = expand_inputs(args.input)
    with contextlib.ExitStack() as on_rank_0:  # the directory appears whole, renamed into place by rank 0
        state = None
        if info.rank == 0:
            on_rank_0.enter_context(claim_output(args.output, [f.path for f in files], args.overwrite))
            tmp = on_rank_0.enter_context(atomic_path(args.output, args.overwrite))
            skipped: list[str] = []
            files, _ = scan_inputs(files, fields, None, True, on_error=skipped.append if args.skip_bad else None)
            tok_json = _tokenizer_json(args, files, fields, fractions, skipped)
            os.makedirs(tmp)
            state = (tmp, files, tok_json, len(skipped), skipped[:5])
        tmp, files, tok_json, n_skipped, skipped_examples = comm.bcast(state)
        tok = Tokenizer(tok_json.encode(), 1 << 31)
        vocab = tok.tok.get_vocab_size(with_added_tokens=True)
        bos, eos = _special(tok, "bos"), _special(tok, "eos")
        entries, unigram = [], np.zeros(vocab, dtype=np.int64)
        chunk, k = [], 0
        docs = read_documents(files, fields, on_error=(lambda e: None) if args.skip_bad else None)
        for doc in _with_end(docs):
            if doc is not None:
                chunk.append(doc)
            if chunk and (len(chunk) == args.chunk_docs or doc is None):
                if k % info.world_size == info.rank:
                    parts = _tokenize_chunk(chunk, tok, bos, eos, args.seed, fractions, args.task)
                    entry = write_shard(os.path.join(tmp, f"shard-{k:06d}.h5"), parts, vocab)
                    entries.append((k, entry))
                    for tokens, _ in parts["train"]:
                        unigram += np.bincount(tokens, minlength=vocab)[:vocab]
                chunk, k = [], k + 1
        all_entries = comm.gather(entries)
        total = np.zeros_like(unigram) if info.rank == 0 else None
        comm.Reduce(unigram, total, root=0)
        if info.rank == 0:
            done = _write_manifest(args, tmp, files, tok_json, fractions, vocab, bos, eos, total, n_skipped,
                                   skipped_examples, [e for _, e in sorted(x for part in all_entries for x in part)])
    if info.rank == 0:
        report(done, args.quiet)
    comm.Barrier()
    return 0


def _write_manifest(args, tmp, files, tok_json, fractions, vocab, bos, eos, unigram, n_skipped, skipped_examples,
                    shards) -> str:
    """Rank 0: the tokenizer and manifest.json beside the shards; returns the line that reports the result."""
    import json
    import os

    from ..errors import HpcLlamaError
    from .data import FORMAT, FORMAT_VERSION, unigram_entropy

    totals = {s: {"documents": sum(e["splits"][s]["documents"] for e in shards),
                  "tokens": sum(e["splits"][s]["tokens"] for e in shards)} for s in ("train", "val", "test")}
    if totals["train"]["documents"] == 0:
        raise HpcLlamaError(f"no text in {', '.join(f.path for f in files)}: nothing to train on")
    with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
        f.write(tok_json)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "task" if args.task else "text",
                "vocab_size": vocab, "bos_id": bos, "eos_id": eos, "pad_id": 0, "seed": args.seed,
                "split": list(fractions), "chunk_docs": args.chunk_docs, "totals": totals,
                "train_unigram_entropy": unigram_entropy(unigram), "skipped_documents": n_skipped,
                "skipped_examples": skipped_examples,
                "inputs": [{"path": os.path.abspath(f.path), "bytes": f.size, "xxh3": f.xxh3} for f in files],
                "tokenizer": "tokenizer.json", "shards": shards}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    t = totals
    return (f"wrote {args.output}: {len(shards)} shards; train {t['train']['documents']} documents / "
            f"{t['train']['tokens']} tokens, val {t['val']['documents']} / {t['val']['tokens']}, "
            f"test {t['test']['documents']} / {t['test']['tokens']}; vocabulary {vocab}; unigram baseline "
            f"{manifest['train_unigram_entropy']:.3f} nats/token" + (f"; skipped {n_skipped} unreadable" if n_skipped else ""))


def _with_end(it):
    yield from it
    yield None


def _special(tok, which: str) -> int | None:
    names = {"bos": ("<s>", "<|begin_of_text|>", "<|im_start|>", "<|endoftext|>"),
             "eos": ("</s>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")}[which]
    for n in names:
        i = tok.token_id(n)
        if i is not None:
            return i
    return None


def _tokenize_chunk(chunk, tok, bos, eos, seed, fractions, task):
    import numpy as np

    from .data import split_of

    parts = {"train": [], "val": [], "test": []}
    texts = tok.encode_batch([d.text for d in chunk])
    responses = tok.encode_batch([d.response for d in chunk]) if task else [None] * len(chunk)
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    for d, ids, resp in zip(chunk, texts, responses):
        content = d.text.encode() if not task else (d.text + "\x00" + d.response).encode()
        if not task and not ids:
            continue  # an empty document teaches nothing
        tokens = np.array(head + ids + (resp or []) + tail, dtype=np.int64)
        mask = None
        if task:
            mask = np.zeros(len(tokens), dtype=np.uint8)
            mask[len(head) + len(ids):] = 1  # the response and EOS carry the loss
        parts[split_of(content, seed, fractions)].append((tokens, mask))
    return parts


def _tokenizer_json(args, files, fields, fractions, skipped) -> str:
    import os

    from ..errors import HpcLlamaError

    if args.tokenizer and args.train_tokenizer:
        raise HpcLlamaError("give --tokenizer or --train-tokenizer, not both")
    if args.tokenizer:
        if os.path.isfile(args.tokenizer) and args.tokenizer.endswith(".json"):
            with open(args.tokenizer) as f:
                return f.read()
        from ..checkpoint import open_checkpoint

        with open_checkpoint(args.tokenizer) as r:
            raw = r.asset("tokenizer.json")
        if raw is None:
            raise HpcLlamaError(f"{args.tokenizer}: the checkpoint has no tokenizer.json")
        return raw.decode()
    if not args.train_tokenizer:
        raise HpcLlamaError("give a tokenizer (--tokenizer tokenizer.json or a checkpoint) or --train-tokenizer VOCAB_SIZE")
    if args.train_tokenizer < 300:
        raise HpcLlamaError("--train-tokenizer needs a vocabulary of at least 300 (256 bytes + merges + specials)")
    return train_bpe(files, fields, fractions, args.seed, args.train_tokenizer, args.task, args.skip_bad)


def train_bpe(files, fields, fractions, seed, vocab_size, task, skip_bad) -> str:
    """A byte-level BPE trained on the train split only (ids 0-2: <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ..documents import read_documents
    from .data import split_of

    def train_texts():
        for d in read_documents(files, fields, on_error=(lambda e: None) if skip_bad else None):
            content = d.text if not task else d.text + "\x00" + d.response
            if split_of(content.encode(), seed, fractions) == "train":
                yield d.text if not task else d.text + d.response

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train_texts(), trainer)
    return tok.to_str()
