"""Table tests of the training-data arithmetic: split rule, steps, replica shares, schedule. No MPI."""

import numpy as np
import pytest

from hpc_llama.errors import HpcLlamaError
from hpc_llama.train.data import parse_split, replica_micro_batches, split_of, step_sequences, unigram_entropy
from hpc_llama.train.trainer import lr_at


def test_split_follows_the_content_hash():
    import xxhash

    docs = [f"document {i}".encode() for i in range(2000)]
    got = [split_of(d, 7, (0.8, 0.1, 0.1)) for d in docs]
    for d, s in zip(docs, got):
        u = xxhash.xxh3_64_intdigest(d, seed=7) / 2 ** 64
        assert s == ("train" if u < 0.8 else "val" if u < 0.9 else "test")
    share = {k: got.count(k) / len(got) for k in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["val"] - 0.1) < 0.02


def test_split_is_stable_when_the_corpus_grows_and_follows_the_seed():
    docs = [f"doc {i}".encode() for i in range(500)]
    before = {d: split_of(d, 0, (0.9, 0.05, 0.05)) for d in docs}
    more = docs[::-1] + [f"new {i}".encode() for i in range(500)]
    assert all(split_of(d, 0, (0.9, 0.05, 0.05)) == before[d] for d in more if d in before)
    assert any(split_of(d, 1, (0.9, 0.05, 0.05)) != before[d] for d in docs)


@pytest.mark.parametrize("text, ok", [
    ("0.98,0.01,0.01", (0.98, 0.01, 0.01)), ("1,0,0", (1.0, 0.0, 0.0)),
    ("0.9,0.2,0.1", "sum to 1.2"), ("0.5,0.5", "three"), ("a,b,c", "fractions"), ("0,0.5,0.5", "train fraction"),
])
def test_parse_split(text, ok):
    if isinstance(ok, tuple):
        assert parse_split(text) == ok
    else:
        with pytest.raises(HpcLlamaError, match=ok):
            parse_split(text)


def test_steps_cover_each_epoch_once_in_a_seeded_order():
    n, g = 10, 4
    seq = np.concatenate([step_sequences(s, g, n, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert not np.array_equal(seq[:10], seq[10:])  # a new order each epoch
    assert np.array_equal(step_sequences(3, g, n, seed=3), seq[12:16])  # a pure function of the step
    assert not np.array_equal(step_sequences(0, g, n, seed=4), seq[:4])


@pytest.mark.parametrize("dp, micro, replica, want", [
    (1, 2, 0, [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (2, 2, 0, [[0, 1], [2, 3]]),
    (2, 2, 1, [[4, 5], [6, 7]]),
    (4, 1, 3, [[6], [7]]),
])
def test_replica_micro_batches(dp, micro, replica, want):
    got = replica_micro_batches(np.arange(8), dp, replica, micro)
    assert [m.tolist() for m in got] == want


@pytest.mark.parametrize("step, lr", [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (55, 0.55), (100, 0.1), (200, 0.1)])
def test_warmup_then_cosine(step, lr):
    assert lr_at(step, 1.0, 0.1, 10, 100) == pytest.approx(lr)


def test_unigram_entropy():
    assert unigram_entropy(np.array([5, 5, 0, 0])) == pytest.approx(np.log(2))
    assert unigram_entropy(np.array([0, 0])) == 0.0
