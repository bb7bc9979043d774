"""Per-document metrics and their aggregation for `hpc-llama eval`, computed as lm-evaluation-harness 0.4.13
computes them (lm_eval/api/task.py ConfigurableTask.process_results, lm_eval/api/metrics.py, and
lm_eval/evaluator_utils.py's _compute_task_aggregations), so a number here is the number lm-eval reports for
the same log-likelihoods."""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tasks import EvalDoc, Task

BOOTSTRAP_ITERS = 100_000
"""lm-eval's default --bootstrap_iters: the resamples behind the stderr of a perplexity or a median."""

METRICS = {
    "multiple_choice": {"acc": ("mean", True), "acc_norm": ("mean", True), "acc_bytes": ("mean", True)},
    "loglikelihood": {"perplexity": ("perplexity", False), "acc": ("mean", True)},
    "loglikelihood_rolling": {"word_perplexity": ("weighted_perplexity", False),
                              "byte_perplexity": ("weighted_perplexity", False),
                              "bits_per_byte": ("bits_per_byte", False)},
}
"""Per output type, each metric's (default aggregation, higher_is_better): lm-eval's metric registry cut to
what its process_results computes for that type (a metric it would silently never fill is refused)."""
DEFAULT_METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
"""The metrics of a task without metric_list: lm-eval's DEFAULT_METRIC_REGISTRY."""
PAIR_METRICS = frozenset(METRICS["loglikelihood_rolling"])
"""Metrics whose per-document value is a (loglik, weight) pair rather than a number."""
SCALAR_AGGREGATIONS = ("mean", "median", "perplexity")
PAIR_AGGREGATIONS = ("weighted_perplexity", "bits_per_byte")


def doc_metrics(task: Task, doc: EvalDoc, results: list[tuple[float, bool]]) -> dict:
    """The metrics of one document from the model's (loglik, is_greedy) per request, in doc.requests order:
    exactly the values lm-eval's process_results gives. Returns {"prediction": ..., "metrics": {name: value}};
    the prediction is the chosen choice's index (multiple_choice), is_greedy (loglikelihood), or None."""
    if len(results) != len(doc.requests):
        raise ValueError(f"{doc.where}: {len(results)} results for {len(doc.requests)} requests")
    wanted = [m.name for m in task.metric_list]
    if task.output_type == "multiple_choice":
        lls = np.array([float(ll) for ll, _ in results], dtype=np.float64)
        # acc_norm divides by the choice's length in characters (str len, code points) and acc_bytes by its
        # UTF-8 bytes, neither counting the target delimiter; np.argmax takes the first of equal maxima.
        chars = np.array([float(len(c)) for c in doc.choices])
        utf8 = np.array([float(len(c.encode("utf-8"))) for c in doc.choices])
        pred, pred_norm, pred_bytes = int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / utf8))
        values = {"acc": 1.0 if pred == doc.gold else 0.0, "acc_norm": 1.0 if pred_norm == doc.gold else 0.0,
                  "acc_bytes": 1.0 if pred_bytes == doc.gold else 0.0}
        prediction = pred
    elif task.output_type == "loglikelihood":
        ll, is_greedy = results[0]
        values = {"perplexity": float(ll), "acc": int(is_greedy)}  # lm-eval keeps acc an int here
        prediction = bool(is_greedy)
    else:  # loglikelihood_rolling: the weights are the scored text's words and UTF-8 bytes
        ll = float(results[0][0])
        values = {"word_perplexity": (ll, doc.word_count), "byte_perplexity": (ll, doc.byte_count),
                  "bits_per_byte": (ll, doc.byte_count)}
        prediction = None
    return {"prediction": prediction, "metrics": {name: values[name] for name in wanted}}


def aggregate(task: Task, per_doc: list[dict], bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, dict]:
    """{metric: {"value": float, "stderr": float | None}} over doc_metrics' results, with lm-eval's
    aggregation and its stderr: the closed form for a mean, a bootstrap of `bootstrap_iters` resamples for a
    perplexity or median, and None where lm-eval reports N/A (weighted perplexities, bits per byte, a single
    document, bootstrap_iters <= 0)."""
    out = {}
    for metric in task.metric_list:
        items = [d["metrics"][metric.name] for d in per_doc if metric.name in d["metrics"]]
        if not items:
            raise ValueError(f"task {task.name}: no document has a value of {metric.name}")
        if metric.name in PAIR_METRICS:
            items = [(float(ll), weight) for ll, weight in items]  # JSON round trips make pairs lists
        out[metric.name] = {"value": float(AGGREGATIONS[metric.aggregation](items)),
                            "stderr": _stderr(metric.aggregation, items, bootstrap_iters)}
    return out


# The aggregations, as lm_eval/api/metrics.py defines them (Python's sum, left to right, as there).
def mean(items):
    return sum(items) / len(items)


def median(items):
    return sorted(items)[len(items) // 2]


def perplexity(items):
    return math.exp(-mean(items))


def weighted_mean(items):
    logliks, weights = zip(*items)
    return sum(logliks) / sum(weights)


def weighted_perplexity(items):
    return math.exp(-weighted_mean(items))


def bits_per_byte(items):
    return -weighted_mean(items) / math.log(2)


AGGREGATIONS = {"mean": mean, "median": median, "perplexity": perplexity,
                "weighted_perplexity": weighted_perplexity, "bits_per_byte": bits_per_byte}


def sample_stddev(items) -> float:
    mu = mean(items)
    return math.sqrt(sum([(x - mu) ** 2 for x in items]) / (len(items) - 1))


def _stderr(aggregation: str, items: list, bootstrap_iters: int) -> float | None:
    # lm-eval's stderr_for_metric: none at all when bootstrap_iters <= 0; the closed form for a mean; a
    # bootstrap for the aggregations on its list (median, perplexity, ...); none for the rest. And
    # _compute_task_aggregations reports N/A for a single item.
    if bootstrap_iters <= 0 or len(items) <= 1:
        return None
    if aggregation == "mean":
        return sample_stddev(items) / math.sqrt(len(items))
    if aggregation == "perplexity":
        return bootstrap_stderr(lambda rows: [math.exp(-m) for m in (rows.sum(axis=1) / rows.shape[1]).tolist()],
                                items, bootstrap_iters)
    if aggregation == "median":
        return bootstrap_stderr(lambda rows: np.sort(rows, axis=1)[:, rows.shape[1] // 2].tolist(),
                                items, bootstrap_iters)
    return None


def bootstrap_stderr(statistic, items: list, iters: int) -> float:
    """lm-eval's bootstrap_stderr, draw for draw: iters // chunk chunks of chunk = min(1000, iters) resamples
    (so 1500 iterations give 1000); chunk i draws from random.Random(i), each resample being
    `rnd.choices(items, k=n)`, i.e. items[floor(rnd.random() * n)] n times; the stderr is the sample standard
    deviation of the statistic over all resamples. The same Mersenne Twister stream is drawn here in bulk by
    numpy's RandomState started from random.Random(i)'s state (its random_sample is CPython's random(): the
    same 53-bit construction), and `statistic` maps a (rows, n) block of resamples to their values."""
    xs = np.asarray(items, dtype=np.float64)
    n, chunk = len(xs), min(1000, iters)
    block = max(1, (1 << 22) // n)  # resamples per block: a few million draws at a time
    values = []
    for i in range(iters // chunk):
        state = random.Random(i).getstate()[1]
        rs = np.random.RandomState()
        rs.set_state(("MT19937", np.array(state[:624], dtype=np.uint32), state[624]))
        for start in range(0, chunk, block):
            rows = min(block, chunk - start)
            picks = (rs.random_sample(rows * n) * n).astype(np.int64).reshape(rows, n)
            values.extend(statistic(xs[picks]))
    return sample_stddev(values)
