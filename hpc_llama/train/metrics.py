"""Training metrics a person can read: metrics.jsonl, TensorBoard events and a loss plot (rank 0 only)."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=30)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, step)

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f]

    def truncate_after(self, step: int) -> None:
        """On resume: forget rows past the checkpoint, which the resumed run will write again."""
        if self.enabled and os.path.exists(self.path):
            from ..atomic import open_atomic

            rows = [r for r in self.rows() if r["step"] <= step]
            with open_atomic(self.path) as f:  # a kill while it is rewritten keeps every row
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def plot(self, png: str, baseline: float | None = None) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        if baseline is not None:
            ax.axhline(baseline, ls="--", c="gray", label=f"unigram baseline ({baseline:.2f})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
