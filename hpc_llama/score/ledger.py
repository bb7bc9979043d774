"""Scheduled scoring: which documents are new, decided by content checksum in a ledger beside the outputs.

A recurring job (slurm/score-scheduled.sbatch, or cron calling sbatch) runs
`hpc-llama score --ledger LEDGER` over the whole, growing corpus with a dated
output name. Rank 0 first writes the period's selection, OUT.inputs.jsonl:
every document whose content checksum is not in the ledger, each content
once. That file is what gets scored (resumably, like any input). Only when
OUT is complete are the selection's checksums appended to the ledger, so a
killed run scores the same selection again, and a rerun of a finished period
finds OUT in place, makes sure the ledger has its checksums, and does nothing.
"""

from __future__ import annotations

import json
import os

import numpy as np
import xxhash

from ..errors import HpcLlamaError


def content_key(text: str | None, input_ids) -> str:
    """xxh3-128 of a document's content: its text, or its token ids (never its id or position)."""
    if text is not None:
        return xxhash.xxh3_128(b"t:" + text.encode("utf-8")).hexdigest()
    return xxhash.xxh3_128(b"i:" + np.asarray(input_ids, dtype=np.int64).tobytes()).hexdigest()


class Ledger:
    """A text file of content checksums, one per line, appended to and never rewritten."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(os.path.dirname(self.path)):
            raise HpcLlamaError(f"{os.path.dirname(self.path)}: ledger directory does not exist")
        self.keys: set[str] = set()
        if os.path.exists(self.path):
            with open(self.path) as f:
                for lineno, line in enumerate(f, 1):
                    key = line.split("\t", 1)[0].strip()
                    if len(key) != 32:
                        raise HpcLlamaError(f"{self.path}:{lineno}: not a ledger line")
                    self.keys.add(key)

    def select(self, documents, dest: str, text_field: str, id_field: str) -> int:
        """Write the documents not in the ledger (each content once) to `dest` as JSONL; returns how many."""
        from ..atomic import open_atomic

        seen, n = set(), 0
        with open_atomic(dest) as f:
            for doc in documents:
                key = content_key(doc.text, doc.input_ids)
                if key in self.keys or key in seen:
                    continue
                seen.add(key)
                rec = {id_field: doc.id if doc.id is not None else doc.where}
                if doc.text is not None:
                    rec[text_field] = doc.text
                else:
                    rec["input_ids"] = list(doc.input_ids)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        return n

    def record(self, documents, label: str) -> int:
        """Append the checksums of `documents` that are not there yet; returns how many were added."""
        new = []
        for doc in documents:
            key = content_key(doc.text, doc.input_ids)
            if key not in self.keys:
                self.keys.add(key)
                new.append(f"{key}\t{label}\n")
        if new:
            with open(self.path, "a") as f:
                f.write("".join(new))
                f.flush()
                os.fsync(f.fileno())
        return len(new)
