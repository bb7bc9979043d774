"""generate/sampling.py in process: greedy, temperature, top-k, top-p on logits small enough to check by hand."""

import dataclasses
import math

import pytest
import torch

from hpc_llama.config import GenerateConfig as SamplingConfig  # the sampler reads the job's generate section
from hpc_llama.generate.sampling import find_stop, next_token, sequence_generator

# Token 3 has probability 1/2, token 0 1/4, tokens 1 and 2 1/8 each (at temperature 1). Sorted most likely
# first (ties in token order), the cumulative probabilities are 3: 0.5, 0: 0.75, 1: 0.875, 2: 1.
LOGITS = torch.log(torch.tensor([0.25, 0.125, 0.125, 0.5], dtype=torch.float64))


def inverse_cdf(u, tokens, cumulative):
    """The definition next_token follows: the first token whose cumulative probability exceeds u."""
    return next(t for t, c in zip(tokens, cumulative) if u < c)


def draws(seeds):
    """(generator for next_token, the uniform number it will draw) for each seed."""
    for seed in seeds:
        u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()
        yield torch.Generator().manual_seed(seed), u


def test_temperature_zero_is_argmax():
    cfg = SamplingConfig()
    assert next_token(torch.tensor([0.1, 2.0, -1.0, 1.9]), cfg, None) == 1
    assert next_token(LOGITS, cfg, None) == 3
    assert next_token(torch.tensor([0.5, 2.0, 2.0]), cfg, None) == 1  # a tie: the first


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=1.5, top_k=1), SamplingConfig(temperature=1.5, top_p=1e-6)])
def test_top_k_1_and_a_tiny_top_p_keep_only_the_best(cfg):
    assert {next_token(LOGITS, cfg, g) for g, _ in draws(range(20))} == {3}


@pytest.mark.parametrize("cfg, tokens, cumulative", [
    (SamplingConfig(temperature=1.0), [3, 0, 1, 2], [0.5, 0.75, 0.875, 1.0]),
    # top-k 2 keeps 3 and 0, renormalised: 2/3 and 1/3.
    (SamplingConfig(temperature=1.0, top_k=2), [3, 0], [2 / 3, 1.0]),
    # top-p 0.7: 0.5 does not reach it, 0.75 does: the same two tokens.
    (SamplingConfig(temperature=1.0, top_p=0.7), [3, 0], [2 / 3, 1.0]),
    # top-p 0.8 needs three tokens (0.875), renormalised: 4/7, 2/7, 1/7.
    (SamplingConfig(temperature=1.0, top_p=0.8), [3, 0, 1], [4 / 7, 6 / 7, 1.0]),
])
def test_a_draw_is_the_inverse_cdf_of_one_uniform_number(cfg, tokens, cumulative):
    seen = set()
    for g, u in draws(range(40)):
        if min(abs(u - c) for c in cumulative) < 1e-9:
            continue  # too close to a boundary to call by hand
        want = inverse_cdf(u, tokens, cumulative)
        assert next_token(LOGITS, cfg, g) == want, u
        seen.add(want)
    assert seen == set(tokens)  # 40 draws reached every token kept


def test_temperature_divides_the_logits():
    # [0, 2 ln 3] at temperature 2 is [0, ln 3] at 1: probabilities 1/4 and 3/4, token 1 first.
    hot = SamplingConfig(temperature=2.0)
    for g, u in draws(range(30)):
        assert next_token(torch.tensor([0.0, 2 * math.log(3)], dtype=torch.float64), hot, g) == (1 if u < 0.75 else 0)


@pytest.mark.parametrize("top_k", [0, 2])
def test_many_draws_follow_the_softmax(top_k):
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    cfg = SamplingConfig(temperature=0.8, top_k=top_k)
    p = torch.softmax(logits.double() / 0.8, 0)
    if top_k:  # only the two largest logits (tokens 0 and 3) stay, renormalised
        p = torch.where(torch.tensor([True, False, False, True]), p, torch.zeros_like(p))
        p = p / p.sum()
    n = 4000
    g = torch.Generator().manual_seed(11)
    counts = torch.bincount(torch.tensor([next_token(logits, cfg, g) for _ in range(n)]), minlength=4)
    # Binomial standard deviation sqrt(p (1 - p) / n) is at most 0.008 here: 4 of them is 0.032.
    assert (counts / n - p).abs().max().item() < 0.032, (counts / n, p)
    if top_k:
        assert counts[1] == counts[2] == 0


def test_a_sequences_generator_depends_only_on_seed_and_index():
    first = torch.rand(5, generator=sequence_generator(7, 3))
    torch.manual_seed(123)  # the global generator, and other sequences' draws, do not matter
    torch.rand(5, generator=sequence_generator(7, 4))
    assert torch.equal(torch.rand(5, generator=sequence_generator(7, 3)), first)
    assert not torch.equal(torch.rand(5, generator=sequence_generator(7, 4)), first)
    assert not torch.equal(torch.rand(5, generator=sequence_generator(8, 3)), first)


@pytest.mark.parametrize("text, stops, where", [
    ("abc STOP xyz END", ("END", "STOP"), 4),  # the earliest hit, whatever order the stops are given in
    ("xabcd", ("bc", "abcd"), 1),
    ("abc", ("zz",), None),
    ("abc", ("",), None),  # an empty stop string never matches
    ("", ("a",), None),
])
def test_find_stop(text, stops, where):
    assert find_stop(text, stops) == where


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.1}, "temperature must not be negative, got -0.1"),
    ({"top_k": -1}, "top_k must not be negative, got -1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
])
def test_sampling_config_refuses_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kw)


def test_sampling_config_defaults_are_greedy_and_frozen():
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1.0)
    assert cfg == SamplingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3


# --- when a sequence is done, and what its record says -------------------------------------


def _seq(prompt_len=3, generated=()):
    from hpc_llama.generate.sampling import Prompt, Sequence

    return Sequence(Prompt(7, "p7", tuple(range(prompt_len))), None, list(generated))


@pytest.mark.parametrize("generated, token, text, kw, reason", [
    ([5, 2], 2, "ab", {}, "eos"),                                     # an EOS ends it, whatever else holds
    ([5, 2], 2, "ab STOP", {"stops": ("STOP",)}, "eos"),              # EOS is checked first
    ([5, 6], 6, "ab STOP", {"stops": ("STOP",)}, "stop"),
    ([5, 6], 6, "ab", {"max_new_tokens": 2}, "length"),
    ([5, 6], 6, "ab", {"max_new_tokens": 3}, "context"),             # 3 prompt + 2 new > capacity 4
    ([5], 5, "a", {"max_new_tokens": 3}, None),                       # 3 + 1 = capacity: one more fits
])
def test_finish_reason_in_order_eos_stop_length_context(generated, token, text, kw, reason):
    from hpc_llama.generate.sampling import finish_reason

    got = finish_reason(_seq(3, generated), token, {2}, SamplingConfig(**kw), 4, lambda: text)
    assert got == reason and (got is None or got.value == reason)


def test_a_record_cuts_the_completion_before_the_stop_string():
    from hpc_llama.generate.sampling import Finish, completion_record

    rec = completion_record(_seq(3, [5, 6]), Finish.STOP, "answer\nQ: next", ("\nQ:",))
    assert rec == {"index": 7, "id": "p7", "completion": "answer", "tokens": [5, 6], "n_prompt_tokens": 3,
                   "n_new_tokens": 2, "finish_reason": "stop"}
    assert completion_record(_seq(3, [5]), Finish.LENGTH, "x\nQ:", ("\nQ:",))["completion"] == "x\nQ:"


# --- stage 0's slots ---------------------------------------------------------------------


@pytest.mark.parametrize("batch, groups, bounds", [
    (8, 2, [(0, 4), (4, 8)]),
    (8, 3, [(0, 3), (3, 5), (5, 8)]),   # round(8/3) = 3, round(16/3) = 5
    (2, 4, [(0, 1), (1, 2)]),           # never more groups than slots
    (5, 0, [(0, 5)]),                   # at least one
])
def test_group_bounds(batch, groups, bounds):
    from hpc_llama.generate.scheduler import group_bounds

    assert group_bounds(batch, groups) == bounds


def test_scheduler_prefills_decodes_and_refills_a_freed_slot():
    from hpc_llama.generate.ring import Answer, Kind, Status
    from hpc_llama.generate.sampling import Prompt
    from hpc_llama.generate.scheduler import Scheduler

    prompts = [Prompt(i, i, tuple(range(n))) for i, n in enumerate((4, 5, 2))]
    s = Scheduler([(0, 2)], prompts)
    (tokens, work), = s.launch(0)  # prompts 0 and 1 take both slots, prefilled together (5 x 2 <= 64 tokens)
    assert work.kind == Kind.PREFILL and work.rows == [0, 1] and work.lengths == [4, 5] and work.prompts == [0, 1]
    assert tokens.shape == (2, 5) and tokens[0, 4] == 0  # the shorter prompt is padded
    assert s.land(work, Answer([11, 12], [Status.GOING, Status.GOING]))  # the group's only pass is back
    (tokens, work), = s.launch(0)
    assert work.kind == Kind.DECODE and tokens.tolist() == [[11], [12]] and work.positions.tolist() == [[4], [5]]
    s.land(work, Answer([13, 14], [Status.FINISHED, Status.GOING]))  # slot 0's sequence is done
    (tokens, work), = s.launch(0)  # the waiting prompt takes slot 0 before anyone decodes
    assert work.kind == Kind.PREFILL and work.rows == [0] and work.prompts == [2] and tokens.tolist() == [[0, 1]]
    s.land(work, Answer([15], [Status.FINISHED]))
    (tokens, work), = s.launch(0)  # slot 1 still runs: at position 6 with token 14
    assert work.kind == Kind.DECODE and tokens.tolist() == [[0], [14]] and work.positions.tolist() == [[0], [6]]
    s.land(work, Answer([0, 16], [Status.IDLE, Status.FINISHED]))
    assert s.launch(0) == []  # nothing waits and nothing runs
