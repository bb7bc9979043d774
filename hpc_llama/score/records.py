"""What a score job writes per document, and how a job-array shard names its part of the output."""

from __future__ import annotations

import json
import math

from ..errors import HpcLlamaError


def record_line(index: int, doc_id, n_tokens: int, loglik: float, token_logprobs=None) -> str:
    rec = {"index": index, "id": doc_id, "n_tokens": n_tokens, "loglik": loglik,
           "ppl": math.exp(-loglik / n_tokens) if n_tokens else None}
    if token_logprobs is not None:
        rec["token_logprobs"] = [float(x) for x in token_logprobs]
    return json.dumps(rec, ensure_ascii=False) + "\n"


def step_lines(docs, result) -> list[str]:
    """One step's records as JSON lines, in input order (`result`: the scorer's StepResult on rank 0)."""
    lps = result.token_logprobs
    return [record_line(d.index, d.id, int(n), float(ll), None if lps is None else lps[j])
            for j, (d, n, ll) in enumerate(zip(docs, result.n_tokens, result.loglik, strict=True))]


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


SCORE_COLUMNS = {"index": "int", "id": "id", "n_tokens": "int", "loglik": "float", "ppl": "float"}
