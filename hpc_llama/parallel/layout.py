"""Split arithmetic: which layers a stage owns, which items a replica takes.

Pure functions of plain integers with serial defaults, so every split can be
checked in a table test without MPI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage owns."""

    stage: int
    layers: range
    embed: bool
    head: bool


def stage_and_replica(rank: int = 0, world_size: int = 1, pp: int = 1) -> tuple[int, int]:
    """(pipeline stage, data-parallel replica) of a rank.

    Ranks are laid out stage-major, as DeepSpeed's PipeDataParallelTopology
    does: ranks 0..dp-1 are stage 0, the next dp ranks stage 1, and so on.
    """
    check_layout(world_size, pp)
    dp = world_size // pp
    return rank // dp, rank % dp


def check_layout(world_size: int, pp: int, n_layers: int | None = None) -> None:
    if pp < 1:
        raise ValueError(f"pipeline stages must be at least 1, got {pp}")
    if world_size % pp:
        raise ValueError(f"{world_size} ranks cannot be split into {pp} pipeline stages (ranks must be a multiple of stages)")
    if n_layers is not None and pp > n_layers:
        raise ValueError(f"{pp} pipeline stages but the model has only {n_layers} layers")


def require_layout(world_size: int, pp: int, n_layers: int | None = None) -> None:
    """`check_layout` for a job about to start: the same rule, refused as the one-line user error."""
    from ..errors import HpcLlamaError

    try:
        check_layout(world_size, pp, n_layers)
    except ValueError as e:
        raise HpcLlamaError(str(e)) from None


def uniform_sizes(n_items: int, n_parts: int) -> list[int]:
    """Sizes of n_parts contiguous parts differing by at most one; earlier parts take the extras."""
    base, extra = divmod(n_items, n_parts)
    return [base + (1 if i < extra else 0) for i in range(n_parts)]


def balanced_sizes(costs: list[int], n_parts: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Contiguous part sizes (each >= 1) minimising the largest part's cost.

    The first part also carries `first_extra` and the last `last_extra` (the
    embedding and the head). Ties are broken the same way every time: later
    parts take the spare items.
    """
    n = len(costs)
    if n_parts > n:
        raise ValueError(f"cannot split {n} items into {n_parts} non-empty parts")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(part: int, i: int, j: int) -> int:  # items i..j-1 as part `part`
        extra = (first_extra if part == 0 else 0) + (last_extra if part == n_parts - 1 else 0)
        return prefix[j] - prefix[i] + extra

    # best[p][j]: smallest max cost of placing items 0..j-1 into parts 0..p.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_parts)]
    cut = [[0] * (n + 1) for _ in range(n_parts)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for p in range(1, n_parts):
        for j in range(p + 1, n + 1):
            for i in range(p, j):
                value = max(best[p - 1][i], cost(p, i, j))
                if value < best[p][j]:
                    best[p][j], cut[p][j] = value, i
    sizes, j = [], n
    for p in range(n_parts - 1, 0, -1):
        i = cut[p][j]
        sizes.append(j - i)
        j = i
    sizes.append(j)
    return sizes[::-1]


def layer_partition(n_layers: int, pp: int = 1, method: str = "balanced", layer_costs: list[int] | None = None,
                    embed_cost: int = 0, head_cost: int = 0) -> list[StagePlan]:
    """Every stage's share of the model: contiguous layers, embedding on the first, head on the last.

    `uniform` gives each stage the same number of layers; `balanced` evens out
    the parameter count of each stage, counting the embedding and the head.
    """
    check_layout(pp, pp, n_layers)
    if method == "uniform":
        sizes = uniform_sizes(n_layers, pp)
    elif method == "balanced":
        costs = [1] * n_layers if layer_costs is None else list(layer_costs)
        if len(costs) != n_layers:
            raise ValueError(f"{len(costs)} layer costs for {n_layers} layers")
        sizes = balanced_sizes(costs, pp, embed_cost, head_cost)
    else:
        raise ValueError(f"unknown partition method {method!r} (uniform, balanced)")
    plans, start = [], 0
    for stage, size in enumerate(sizes):
        plans.append(StagePlan(stage, range(start, start + size), stage == 0, stage == pp - 1))
        start += size
    return plans


def shard_range(n_items: int, rank: int = 0, size: int = 1) -> range:
    """The contiguous block of items 0..n_items-1 that replica `rank` of `size` takes."""
    sizes = uniform_sizes(n_items, size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def plan_shards(unit_bytes: list[int], cap: int | None) -> list[list[int]]:
    """Group consecutive units (embedding, layers, head) into shards of at most `cap` bytes.

    A unit is never cut; one larger than the cap gets a shard to itself.
    """
    if cap is None:
        return [list(range(len(unit_bytes)))] if unit_bytes else []
    shards, current, size = [], [], 0
    for i, b in enumerate(unit_bytes):
        if current and size + b > cap:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += b
    if current:
        shards.append(current)
    return shards


def stage_plans(cfg, parallel) -> list[StagePlan]:
    """Every stage's share of the model.

    uniform: the same number of layers; balanced: the same number of
    parameters, embedding and head counted (memory); compute: the same
    forward work per token -- a layer's matmuls and the head's, while the
    embedding, a table lookup, costs nothing.
    """
    from ..errors import HpcLlamaError
    from ..model.llama import embedding_params, layer_param_counts

    head = embedding_params(cfg) + cfg.dim
    try:
        if parallel.partition == "compute":
            return layer_partition(cfg.n_layers, parallel.pp, "balanced", layer_param_counts(cfg),
                                   embed_cost=0, head_cost=head)
        return layer_partition(cfg.n_layers, parallel.pp, parallel.partition, layer_param_counts(cfg),
                               embed_cost=embedding_params(cfg), head_cost=head)
    except ValueError as e:
        raise HpcLlamaError(str(e)) from None
