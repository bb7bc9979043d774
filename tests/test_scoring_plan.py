"""Table tests of the scoring arithmetic: rolling windows, calls, rounds, the head's log-probabilities. No MPI."""

import pytest
import torch

from hpc_llama.config import ScoreConfig
from hpc_llama.score.plan import (
    default_tokens_per_batch,
    head_chunk_elements,
    plan_calls,
    plan_micro_batches,
    replica_rounds,
    rolling_windows,
    score_head,
    target_logprobs,
)


def lm_eval_windows(n, max_seq_len, context_len):
    """lm-eval-harness's get_rolling_token_windows, over positions of S = [prefix] + tokens.

    Written from its documented behaviour: the first window predicts the first
    max_seq_len tokens from the prefix; each later one predicts up to
    max_seq_len - context_len + 1 new tokens from the max_seq_len before them.
    Returns (start, length, n_scored) in S coordinates.
    """
    tokens = n - 1
    if tokens <= 0:
        return []
    pred_len = max_seq_len - context_len + 1
    first = min(max_seq_len, tokens)
    out, predicted = [(0, first, first)], first
    while predicted < tokens:
        window_pred = min(tokens - predicted, pred_len)
        end = predicted + window_pred  # in token coordinates; S index = end
        start = max(0, end - max_seq_len)
        out.append((start, end - start, window_pred))
        predicted += window_pred
    return out


@pytest.mark.parametrize("n, context, stride, windows", [
    (0, 4, 4, []),
    (1, 4, 4, []),                                      # BOS alone: nothing to score
    (2, 4, 4, [(0, 1, 1)]),
    (5, 4, 4, [(0, 4, 4)]),                             # exactly one full window
    (6, 4, 4, [(0, 4, 4), (1, 4, 1)]),                  # the last window keeps 3 tokens of history
    (10, 4, 4, [(0, 4, 4), (4, 4, 4), (5, 4, 1)]),
    (10, 4, 2, [(0, 4, 4), (2, 4, 2), (4, 4, 2), (5, 4, 1)]),
    (10, 4, 1, [(0, 4, 4)] + [(s, 4, 1) for s in range(1, 6)]),
])
def test_rolling_windows(n, context, stride, windows):
    assert rolling_windows(n, context, stride) == windows


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 50, 101])
@pytest.mark.parametrize("context, stride", [(1, 1), (4, 4), (4, 3), (8, 1), (8, 5), (16, 16)])
def test_every_target_scored_once_with_enough_history(n, context, stride):
    seen = []
    for start, length, n_scored in rolling_windows(n, context, stride):
        assert 1 <= n_scored <= length <= context
        targets = range(start + length - n_scored + 1, start + length + 1)
        for t in targets:
            # target t is predicted from S[max(0, t-context) .. t-1] at least
            assert t - start >= min(t, context - stride + 1) or start == 0
        seen.extend(targets)
    assert seen == list(range(1, n))


@pytest.mark.parametrize("n", [1, 2, 5, 17, 64, 65, 200])
@pytest.mark.parametrize("context, stride", [(16, 16), (16, 8), (16, 1), (4, 4)])
def test_windows_are_lm_eval_rolling_windows(n, context, stride):
    assert rolling_windows(n, context, stride) == lm_eval_windows(n, context, context - stride + 1)


def test_stride_outside_the_context_is_refused():
    with pytest.raises(ValueError):
        rolling_windows(10, 4, 5)
    with pytest.raises(ValueError):
        rolling_windows(10, 4, 0)


@pytest.mark.parametrize("lengths, tpb, max_batch, micro", [
    ([8, 8, 7, 3], 16, 8, [(8, (0, 1)), (7, (2,)), (3, (3,))]),             # longest first; B = 16 // T
    ([8, 8, 8, 8], 100, 2, [(8, (0, 1)), (8, (2, 3))]),                      # max_batch caps B
    ([8, 8, 8, 8], 100, 3, [(8, (0, 1, 2)), (8, (3,))]),                     # the rest a micro-batch of its own
    ([5, 3, 8, 1], 4, 8, [(8, (2,)), (5, (0,)), (3, (1,)), (1, (3,))]),      # never fewer than one row
    ([10, 9, 4, 4, 3, 1], 20, 8, [(10, (0, 1)), (4, (2, 3)), (3, (4,)), (1, (5,))]),  # cut below 85% of T
])
def test_plan_micro_batches(lengths, tpb, max_batch, micro):
    got = plan_micro_batches(lengths, tpb, max_batch)
    assert [(m.length, m.rows) for m in got] == micro
    placed = [w for m in got for w in m.rows]
    assert sorted(placed) == list(range(len(lengths)))   # every window exactly once, no padding rows
    assert all(lengths[w] <= m.length for m in got for w in m.rows)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 32])
def test_calls_group_the_same_micro_batches_whatever_their_number(m):
    """A call is `m` micro-batches in plan order (shapes may differ within it); the micro-batches themselves --
    the shapes every row is computed in -- do not depend on `m`, so no layout changes a number."""
    import random

    rng = random.Random(1)
    lengths = [max(1, int(rng.lognormvariate(4, 1))) for _ in range(300)]
    calls = plan_calls(lengths, 1024, 64, m)
    assert [len(c.micro) for c in calls[:-1]] == [m] * (len(calls) - 1) and 1 <= len(calls[-1].micro) <= m
    assert [mb for c in calls for mb in c.micro] == plan_micro_batches(lengths, 1024, 64)
    assert sum(c.positions for c in calls) == sum(mb.batch * mb.length for c in calls for mb in c.micro)


def test_plan_calls_keeps_padding_small_for_mixed_lengths():
    import random

    rng = random.Random(0)
    lengths = [max(1, int(rng.lognormvariate(4, 1))) for _ in range(500)]
    calls = plan_calls(lengths, 2048, 64, 2)
    waste = 1 - sum(lengths) / sum(c.positions for c in calls)
    assert waste < 0.08
    unbucketed = sum(max(lengths[i:i + 37]) * len(lengths[i:i + 37]) for i in range(0, 500, 37))
    assert sum(c.positions for c in calls) < 0.5 * unbucketed  # against batches in input order


@pytest.mark.parametrize("n, dp, rounds", [
    (0, 2, []), (3, 1, [[0], [1], [2]]), (3, 2, [[0, 1], [2, None]]), (4, 2, [[0, 1], [2, 3]]),
])
def test_replica_rounds(n, dp, rounds):
    assert replica_rounds(n, dp) == rounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_are_log_softmax_gathered_and_argmax(dtype):
    """What lm-eval computes -- log_softmax gathered at the target, greedy = argmax == target -- with ties:
    the first of two equal maxima is the model's choice, the second is not."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 50, generator=g) * 4).to(dtype)
    logits[:, 7] = logits[:, 3] = logits.float().max(dim=1).values.to(dtype) + 1  # a tie for first place
    targets = torch.tensor([3, 7, 0, 49, int(logits[4].float().argmax()), 3])
    full = torch.log_softmax(logits.float(), dim=1)
    want_lp = full.gather(1, targets[:, None]).squeeze(1)
    want_greedy = full.argmax(dim=1) == targets
    lp, greedy = target_logprobs(logits.clone(), targets)
    assert torch.allclose(lp, want_lp, atol=1e-5, rtol=0)
    assert greedy.tolist() == want_greedy.tolist() == [True, False, False, False, True, True]


def test_tokens_per_batch_default_follows_the_device():
    assert ScoreConfig().tokens_per_batch == 0  # left to the device
    assert [default_tokens_per_batch(d) for d in ("cpu", "cuda:0", "cuda:3")] == [1024, 8192, 8192]
    with pytest.raises(ValueError, match="tokens_per_batch must not be negative"):
        ScoreConfig(tokens_per_batch=-1)


def test_score_head_gives_the_same_results_in_any_pieces():
    """The head runs on scored positions only, in pieces of `chunk_elements` logits: one row at a time, a few,
    or all at once give the same log-probabilities and greedy flags; unscored positions stay 0 / False."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    V, D, B, T = 50, 16, 3, 7
    head = torch.nn.Linear(D, V, bias=False)
    head.weight.data = torch.randn(V, D, generator=g)
    model = SimpleNamespace(cfg=SimpleNamespace(vocab_size=V), head=head)
    h = torch.randn(B, T, D, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g) < 0.6
    inputs = (None, None, None, targets, weights)
    with torch.inference_mode():
        whole = score_head(model, h, inputs, chunk_elements=B * T * V)
        want = torch.log_softmax(head(h), dim=-1).gather(2, targets[..., None]).squeeze(2)
        for chunk in (1, V, 3 * V + 7, None):  # below one row still makes progress; None: the device's default
            lp, greedy = score_head(model, h, inputs, chunk_elements=chunk)
            assert torch.allclose(lp, whole[0], atol=1e-6, rtol=0) and torch.equal(greedy, whole[1])
    assert torch.allclose(whole[0][weights], want[weights], atol=1e-5, rtol=0)
    assert (whole[0][~weights] == 0).all() and not whole[1][~weights].any()


def test_head_pieces_follow_the_device():
    assert [head_chunk_elements(d) for d in ("cpu", "cuda:0")] == [1 << 22, 1 << 25]
