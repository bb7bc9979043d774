"""Join the parts that `score --shard I/N` wrote (one per job-array task) into one output, in input order.

    hpc-llama merge --output scores.jsonl      # reads scores.jsonl.part-00000-of-00008.jsonl ... 00007

Every part must be there and whole, cover exactly its block of the documents,
and come from the same model, inputs and options; otherwise the merge fails
with one line naming the first problem and writes nothing. The result is the
same bytes as one job scoring everything, plus OUT.summary.json.
"""

from __future__ import annotations


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument

    p.add_argument("--output", required=True, help="OUT (.jsonl, .parquet or .h5) that the parts were scored for")
    p.add_argument("--format", choices=("jsonl", "parquet", "hdf5"), help="output format (default: from the name)")
    p.add_argument("--parts", type=int, help="how many parts to expect (default: from the parts' names)")
    p.add_argument("--keep-parts", action="store_true", help="leave the parts in place (default: remove them)")
    add_overwrite_argument(p)
    add_quiet_argument(p)


def find_parts(out: str, expected: int | None) -> list[str]:
    """The N part files of OUT in order; a one-line error for any that is missing or stray."""
    import glob
    import os
    import re

    from ..errors import HpcLlamaError
    from .records import part_path

    found = {}
    for p in glob.glob(glob.escape(out) + ".part-*-of-*.jsonl"):
        m = re.fullmatch(re.escape(out) + r"\.part-(\d{5})-of-(\d{5})\.jsonl", p)
        if m:
            found[p] = (int(m.group(1)), int(m.group(2)))
    counts = {n for _, n in found.values()}
    if expected is None:
        if not counts:
            raise HpcLlamaError(f"no parts of {out} (expected {part_path(out, 0, 1).replace('00001', 'NNNNN')} ...)")
        if len(counts) > 1:
            raise HpcLlamaError(f"parts of {out} from arrays of different sizes ({sorted(counts)}): give --parts")
        expected = counts.pop()
    for i in range(expected):
        path = part_path(out, i, expected)
        if not os.path.isfile(path):
            hint = " (still being written: its task did not finish)" if os.path.exists(path + ".partial") else ""
            raise HpcLlamaError(f"part {i} of {expected} is missing: {os.path.basename(path)}{hint}")
    return [part_path(out, i, expected) for i in range(expected)]


def run(args) -> int:
    import os

    from ..atomic import claim_output
    from ..errors import HpcLlamaError
    from ..parallel.ranks import world_comm
    from ..records import output_format

    comm = world_comm()
    if comm.Get_size() > 1:
        raise HpcLlamaError("merge runs as one process")
    fmt = output_format(args.output, args.format)
    out = os.path.abspath(args.output)
    with claim_output(out, overwrite=args.overwrite):
        return _merge(args, out, fmt)


def _merge(args, out, fmt) -> int:
    import json
    import math
    import os
    import shutil

    from ..atomic import open_regular, write_json_atomic
    from ..errors import HpcLlamaError
    from ..progress import report
    from ..records import Journal
    from .records import SCORE_COLUMNS

    parts = find_parts(out, args.parts)
    summaries = []
    for i, p in enumerate(parts):
        try:
            with open(p + ".summary.json") as f:
                s = json.load(f)
        except (OSError, ValueError):
            raise HpcLlamaError(f"part {i} of {len(parts)} has no readable summary ({os.path.basename(p)}.summary.json)")
        summaries.append(s)
    first = summaries[0]
    expect = 0
    for i, (p, s) in enumerate(zip(parts, summaries)):
        sh = s.get("shard") or {}
        if sh.get("index") != i or sh.get("count") != len(parts):
            raise HpcLlamaError(f"{os.path.basename(p)} says it is part {sh.get('index')} of {sh.get('count')}")
        same = {"model": s["model"]["fingerprint"] == first["model"]["fingerprint"],
                "inputs": s["inputs"] == first["inputs"],
                "context or stride": (s["context"], s["stride"]) == (first["context"], first["stride"]),
                "score section or dtype": s.get("options") == first.get("options")}
        for what, ok in same.items():
            if not ok:
                raise HpcLlamaError(f"part {i} was scored with a different {what} than part 0: refusing to merge")
        if sh["first"] != expect or s["documents"] != sh["documents"] or sh["of"] != first["shard"]["of"]:
            raise HpcLlamaError(f"part {i} covers documents {sh['first']}..{sh['first'] + s['documents'] - 1}, "
                                f"expected {expect}..{expect + sh['documents'] - 1}: refusing to merge a gap")
        expect += sh["documents"]
    if expect != first["shard"]["of"]:
        raise HpcLlamaError(f"the parts cover {expect} of {first['shard']['of']} documents")
    journal = Journal(out, {"merge": [os.path.basename(p) for p in parts]}, args.overwrite)
    with os.fdopen(open_regular(journal.partial, os.O_WRONLY | os.O_TRUNC), "wb") as dst:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    journal.finish(fmt, SCORE_COLUMNS)
    tokens, loglik = sum(s["tokens"] for s in summaries), sum(s["loglik"] for s in summaries)
    summary = {"output": out, "documents": expect, "tokens": tokens, "loglik": loglik,
               "corpus_ppl": math.exp(-loglik / tokens) if tokens else None,
               "merged_from": [{"part": os.path.basename(p), "documents": s["documents"], "wall_s": s["wall_s"],
                                "layout": s["layout"]} for p, s in zip(parts, summaries)],
               "model": first["model"], "inputs": first["inputs"]}
    write_json_atomic(out + ".summary.json", summary)
    if not args.keep_parts:
        for p in parts:
            os.remove(p)
            os.remove(p + ".summary.json")
    report(f"merged {len(parts)} parts into {args.output}: {expect} documents, {tokens} tokens, corpus perplexity "
           f"{summary['corpus_ppl'] if summary['corpus_ppl'] is None else round(summary['corpus_ppl'], 3)}", args.quiet)
    return 0
