"""What every benchmark script shares: where results go and how they are written."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_result(result: dict, path: str, show: bool = True) -> None:
    """Write a benchmark's result as JSON (the ratios docs/performance.md quotes), and print it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if show:
        print(json.dumps(result, indent=1))
