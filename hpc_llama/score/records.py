"""What a score job writes per document, and how a job-array shard names its part of the output."""

from __future__ import annotations

import json
import math
import re

from ..errors import HpcLlamaError


def record_line(index: int, doc_id, n_tokens: int, loglik: float, n_bytes: int | None = None,
                is_greedy: bool | None = None, token_logprobs=None, keep: dict | None = None) -> str:
    rec = {"index": index, "id": doc_id, "n_tokens": n_tokens, "loglik": loglik,
           "ppl": math.exp(-loglik / n_tokens) if n_tokens else None, "n_bytes": n_bytes}
    if is_greedy is not None:
        rec["is_greedy"] = is_greedy
    if token_logprobs is not None:
        rec["token_logprobs"] = [float(x) for x in token_logprobs]
    if keep:
        rec.update(keep)
    return json.dumps(rec, ensure_ascii=False) + "\n"


def count_words(text: str) -> int:
    # lm-evaluation-harness's word count for word perplexity: pieces between runs of whitespace.
    return len(re.split(r"\s+", text))


def step_records(docs, result, keep_fields=()) -> tuple[list[str], dict]:
    """One step's records as JSON lines, in input order (`result`: the scorer's StepResult on rank 0), and what
    the corpus's per-byte and per-word numbers add up over those with text (a text document's text, a
    conditional request's continuation; token ids have none)."""
    lps = result.token_logprobs
    lines, stats = [], {"text_loglik": 0.0, "bytes": 0, "words": 0}
    for j, (d, n, ll) in enumerate(zip(docs, result.n_tokens, result.loglik, strict=True)):
        n_bytes = None
        if d.text is not None:
            n_bytes = len(d.text.encode())
            stats["text_loglik"] += float(ll)
            stats["bytes"] += n_bytes
            stats["words"] += count_words(d.text)
        lines.append(record_line(d.index, d.id, int(n), float(ll), n_bytes,
                                 bool(result.is_greedy[j]) if result.conditional[j] else None,
                                 None if lps is None else lps[j], d.keep and dict(zip(keep_fields, d.keep))))
    return lines, stats


def corpus_numbers(stats: dict) -> dict:
    """Corpus perplexity per token, and over the text records bits per byte, byte and word perplexity
    (lm-eval's definitions: the summed log-likelihood over the summed bytes or words)."""
    tokens, loglik = stats.get("tokens", 0), stats.get("loglik", 0.0)
    n_bytes, words, text_ll = stats.get("bytes", 0), stats.get("words", 0), stats.get("text_loglik", 0.0)
    return {"corpus_ppl": math.exp(-loglik / tokens) if tokens else None, "bytes": n_bytes,
            "bits_per_byte": -text_ll / n_bytes / math.log(2) if n_bytes else None,
            "byte_perplexity": math.exp(-text_ll / n_bytes) if n_bytes else None,
            "word_perplexity": math.exp(-text_ll / words) if words else None}


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) -> (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise HpcLlamaError(f"--shard {text!r}: expected I/N, e.g. 3/8") from None
    if not 0 <= i < n:
        raise HpcLlamaError(f"--shard {text}: needs 0 <= I < N")
    return i, n


def part_path(out: str, index: int, count: int) -> str:
    """Where shard `index` of `count` writes its part of OUT: always JSON lines, merged by `hpc-llama merge`."""
    return f"{out}.part-{index:05d}-of-{count:05d}.jsonl"


SCORE_COLUMNS = {"index": "int", "id": "id", "n_tokens": "int", "loglik": "float", "ppl": "float", "n_bytes": "int",
                 "is_greedy": "bool"}
