"""Reading and writing the JSON-lines files the jobs take and give."""

from __future__ import annotations

import json
import os


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def metrics(run):
    """A training run's metrics.jsonl, one dict per row."""
    return read_jsonl(os.path.join(run, "metrics.jsonl"))
