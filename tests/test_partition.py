"""Table tests of the split arithmetic; no MPI."""

import pytest

from hpc_llama.model.llama import ModelConfig, embedding_params, layer_param_counts
from hpc_llama.parallel.layout import (
    balanced_sizes,
    layer_partition,
    plan_shards,
    shard_range,
    stage_and_replica,
    uniform_sizes,
)


@pytest.mark.parametrize("n, parts, sizes", [
    (8, 1, [8]), (8, 2, [4, 4]), (8, 3, [3, 3, 2]), (30, 4, [8, 8, 7, 7]), (4, 4, [1, 1, 1, 1]), (0, 2, [0, 0]),
])
def test_uniform_sizes(n, parts, sizes):
    assert uniform_sizes(n, parts) == sizes


@pytest.mark.parametrize("costs, parts, first, last, sizes", [
    ([1] * 8, 2, 0, 0, [4, 4]),
    ([1] * 8, 4, 0, 0, [2, 2, 2, 2]),
    ([1] * 8, 2, 2, 0, [3, 5]),            # a heavy embedding on stage 0 takes layers off it
    ([1] * 8, 2, 0, 2, [5, 3]),            # and a heavy head off the last stage
    ([1] * 30, 2, 8, 8, [15, 15]),         # tied SmolLM2-like: both ends carry the embedding matrix
    ([1] * 4, 3, 10, 0, [1, 1, 2]),        # every part keeps at least one layer; ties go late
    ([5, 1, 1, 1, 1, 5], 3, 0, 0, [1, 4, 1]),
    ([2, 2, 2], 3, 0, 0, [1, 1, 1]),
])
def test_balanced_sizes(costs, parts, first, last, sizes):
    assert balanced_sizes(costs, parts, first, last) == sizes


def test_balanced_is_optimal_against_brute_force():
    import itertools

    costs, parts, first, last = [3, 1, 4, 1, 5, 9, 2, 6], 3, 4, 7
    got = balanced_sizes(costs, parts, first, last)

    def worst(sizes):
        out, i = [], 0
        for p, s in enumerate(sizes):
            out.append(sum(costs[i:i + s]) + (first if p == 0 else 0) + (last if p == parts - 1 else 0))
            i += s
        return max(out)

    best = min(worst([a, b, len(costs) - a - b]) for a, b in itertools.product(range(1, 7), repeat=2)
               if len(costs) - a - b >= 1)
    assert worst(got) == best and sum(got) == len(costs)


@pytest.mark.parametrize("n_layers, pp, method, expect", [
    (4, 1, "uniform", [(0, 4, True, True)]),
    (4, 2, "uniform", [(0, 2, True, False), (2, 4, False, True)]),
    (5, 4, "uniform", [(0, 2, True, False), (2, 3, False, False), (3, 4, False, False), (4, 5, False, True)]),
    (4, 4, "balanced", [(0, 1, True, False), (1, 2, False, False), (2, 3, False, False), (3, 4, False, True)]),
])
def test_layer_partition(n_layers, pp, method, expect):
    plans = layer_partition(n_layers, pp, method)
    assert [(p.layers.start, p.layers.stop, p.embed, p.head) for p in plans] == expect
    assert [p.stage for p in plans] == list(range(pp))


def test_balanced_partition_of_a_real_shape_counts_embedding_and_head():
    # Llama-2-7B: the embedding and the head are each ~0.5 of a layer.
    cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008)
    plans = layer_partition(cfg.n_layers, 4, "balanced", layer_param_counts(cfg),
                            embedding_params(cfg), embedding_params(cfg) + cfg.dim)
    assert [len(p.layers) for p in plans] == [8, 8, 8, 8]
    # With a 128K vocabulary (Llama 3) the ends carry ~2.4 layers' worth each.
    cfg = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)
    plans = layer_partition(cfg.n_layers, 4, "balanced", layer_param_counts(cfg),
                            embedding_params(cfg), embedding_params(cfg) + cfg.dim)
    sizes = [len(p.layers) for p in plans]
    assert sum(sizes) == 32 and sizes[0] < sizes[1] and sizes[3] < sizes[2]


@pytest.mark.parametrize("n_layers, pp, message", [
    (4, 5, "only 4 layers"), (4, 0, "at least 1"),
])
def test_layer_partition_refuses_impossible_splits(n_layers, pp, message):
    with pytest.raises(ValueError, match=message):
        layer_partition(n_layers, pp)


@pytest.mark.parametrize("world, pp", [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 2), (6, 3)])
def test_stage_and_replica_match_deepspeed_topology(world, pp):
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    topo = PipeDataParallelTopology(num_pp=pp, num_dp=world // pp)
    for rank in range(world):
        coord = topo.get_coord(rank)
        assert stage_and_replica(rank, world, pp) == (coord.pipe, coord.data)


def test_stage_and_replica_refuses_uneven_layouts():
    with pytest.raises(ValueError, match="multiple of stages"):
        stage_and_replica(0, 3, 2)


@pytest.mark.parametrize("n, size, ranges", [
    (10, 1, [(0, 10)]), (10, 3, [(0, 4), (4, 7), (7, 10)]), (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
])
def test_shard_range_covers_everything_once(n, size, ranges):
    got = [shard_range(n, r, size) for r in range(size)]
    assert [(r.start, r.stop) for r in got] == ranges
    assert sorted(i for r in got for i in r) == list(range(n))


@pytest.mark.parametrize("sizes, cap, plan", [
    ([5, 5, 5], None, [[0, 1, 2]]),
    ([5, 5, 5], 10, [[0, 1], [2]]),
    ([5, 5, 5], 9, [[0], [1], [2]]),
    ([20, 5, 5], 10, [[0], [1, 2]]),     # a unit over the cap gets a shard of its own
    ([], 10, []),
])
def test_plan_shards(sizes, cap, plan):
    assert plan_shards(sizes, cap) == plan


def test_compute_split_counts_the_head_but_not_the_embedding():
    from hpc_llama.config import ParallelConfig, load_sections
    from hpc_llama.parallel.layout import stage_plans

    cfg = load_sections("bench-100m")["model"]  # tied 32K vocabulary: the head is ~5 layers of work
    sizes = {m: [len(p.layers) for p in stage_plans(cfg, ParallelConfig(pp=2, partition=m))]
             for m in ("compute", "balanced", "uniform")}
    assert sizes == {"compute": [15, 9], "balanced": [12, 12], "uniform": [12, 12]}
