"""Compression arithmetic on single weight matrices: pruning, low-rank factors, GPTQ.

Plain torch, no I/O and no distribution: `compress/chain.py` applies these to
each rank's own layers. Everything that calls LAPACK (SVD, Cholesky) runs in
float64 on one thread -- LAPACK's threaded kernels sum in a different order
for different thread counts, and the output file must be byte-identical
whatever the number of ranks (and so of threads per rank). Matrix products
and elementwise work are bit-identical across thread counts (measured) and
run threaded.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.quantized import check_group, pack_int4


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """`--layers` as sorted layer ids: comma-separated ids and inclusive ranges, e.g. "0-3,28,29"."""
    ids = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"--layers: {part!r} is not a layer or a range like 4-7") from None
        if a > b:
            raise ValueError(f"--layers: range {part} runs backwards")
        if a < 0 or b >= n_layers:
            raise ValueError(f"--layers: {part} is outside the model's layers 0-{n_layers - 1}")
        ids.update(range(a, b + 1))
    return tuple(sorted(ids))


def format_layers(ids) -> str:
    """Layer ids as `--layers` writes them: (0, 1, 2, 3, 28, 29) -> "0-3,28-29"."""
    runs, ids = [], sorted(ids)
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- unstructured pruning ----------------------------------------------------


def prune_count(n: int, sparsity: float) -> int:
    """How many of n weights a sparsity removes (rounded to nearest)."""
    check_fraction("sparsity", sparsity)
    return int(round(n * sparsity))


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the `sparsity` fraction of weights with the smallest |w| (ties: lower flat index first)."""
    k = prune_count(w.numel(), sparsity)
    out = w.clone()
    if k:
        order = torch.argsort(w.abs().reshape(-1), stable=True)
        out.view(-1)[order[:k]] = 0
    return out


def wanda_prune(w: torch.Tensor, sparsity: float, input_norm: torch.Tensor) -> torch.Tensor:
    """Zero, in each output row, the weights with the smallest |w| * ||x_j|| (Wanda, Sun et al. 2023).

    `input_norm` (in,) is the L2 norm of each input feature over the calibration tokens.
    """
    k = prune_count(w.shape[1], sparsity)
    out = w.clone()
    if k:
        score = w.abs().double() * input_norm.double()[None, :]
        order = torch.argsort(score, dim=1, stable=True)
        out.scatter_(1, order[:, :k], 0.0)
    return out


# --- structured pruning ------------------------------------------------------


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in increasing index order (ties: lower index kept)."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:keep].sort().values


def ffn_channel_scores(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                       input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each FFN channel j (ffn,).

    With calibration, ||w2[:, j]|| * ||h_j|| where h_j is the channel's value
    silu(w1 x) * w3 x over the calibration tokens (what removing it changes at
    the output, to first order); without, ||w2[:, j]|| * ||w1[j]|| * ||w3[j]||.
    """
    down = w2.double().norm(dim=0)
    if input_norm is not None:
        return down * input_norm.double()
    return down * w1.double().norm(dim=1) * w3.double().norm(dim=1)


def head_scores(wq: torch.Tensor, wo: torch.Tensor, head_dim: int, input_norm: torch.Tensor | None = None):
    """Importance of each query head (n_heads,): its share of the output projection.

    With calibration, sum over the head's channels c of ||wo[:, c]|| * ||o_c||
    (o: attention output); without, ||wo[:, head]|| * ||wq[head]||.
    """
    n_heads = wo.shape[1] // head_dim
    cols = wo.double().norm(dim=0)
    if input_norm is not None:
        return (cols * input_norm.double()).view(n_heads, head_dim).sum(dim=1)
    out_part = wo.double().view(wo.shape[0], n_heads, head_dim).pow(2).sum(dim=(0, 2)).sqrt()
    in_part = wq.double().view(n_heads, head_dim, -1).pow(2).sum(dim=(1, 2)).sqrt()
    return out_part * in_part


def heads_to_keep(scores: torch.Tensor, n_kv_heads: int, fraction: float) -> torch.Tensor:
    """Query heads kept when `fraction` of each KV group's heads is removed (at least one stays per group).

    Every group keeps the same number, so the pruned layer is still
    grouped-query attention: query head j uses KV head j // (kept per group).
    """
    check_fraction("head fraction", fraction)
    per_group = scores.numel() // n_kv_heads
    keep = max(1, per_group - int(round(per_group * fraction)))
    kept = [g * per_group + keep_top(scores[g * per_group:(g + 1) * per_group], keep) for g in range(n_kv_heads)]
    return torch.cat(kept)


def channels_to_keep(scores: torch.Tensor, fraction: float, multiple: int = 1) -> torch.Tensor:
    """FFN channels kept when `fraction` of them is removed; the count is rounded up to a `multiple`
    (a later group-wise quantization needs its group size to divide it)."""
    check_fraction("ffn fraction", fraction)
    n = scores.numel()
    keep = max(1, n - int(round(n * fraction)))
    keep = min(n, -(-keep // multiple) * multiple)
    return keep_top(scores, keep)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the kept heads in a (heads * head_dim)-wide projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


# --- low rank ----------------------------------------------------------------


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep `energy` of the squared sum (Frobenius norm)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.double().pow(2)
    cum = torch.cumsum(e, 0) / e.sum()
    return min(int((cum < energy - 1e-12).sum().item()) + 1, s.numel())


def svd_factors(w: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """w (out, in) ~ b @ a with a (rank, in) and b (out, rank); the singular values split evenly (sqrt each)."""
    with one_thread():
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    if rank is None:
        rank = rank_for_energy(s, energy)
    if rank > s.numel():
        raise ValueError(f"rank {rank} is larger than the matrix allows ({list(w.shape)}: at most {s.numel()})")
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).to(w.dtype), (u[:, :rank] * root[None, :]).to(w.dtype)


# --- GPTQ --------------------------------------------------------------------


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128):
    """int4-group quantization that corrects each column's rounding error in the columns not yet quantized
    (GPTQ, Frantar et al. 2022), weighted by the inputs' second moments `hessian` = sum x x^T (in, in).

    Returns what `quant.quantize_int4_group` returns -- (packed uint8, fp32 scale, uint8 offset) -- in the
    same storage scheme, so the model reads it with the same code.
    """
    out_f, n = w.shape
    check_group(n, group_size)
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=torch.float64)
    with one_thread():
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(out_f, n, dtype=torch.uint8)
    scales = torch.zeros(out_f, n // group_size, dtype=torch.float32)
    zeros = torch.zeros(out_f, n // group_size, dtype=torch.uint8)
    block = max(group_size, (block // group_size) * group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # the group's range, from its weights as corrected so far
                # The group's scale and offset exactly as round-to-nearest computes them (in fp32), from
                # its weights as corrected so far; the codes then match what the reader multiplies.
                g = W1[:, i:i + group_size].float()
                lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
                scale32 = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
                zero = torch.round(-lo / scale32).clamp_(0, 15)
                scales[:, col // group_size], zeros[:, col // group_size] = scale32, zero.to(torch.uint8)
            q = (torch.round(W1[:, i].float() / scale32) + zero).clamp_(0, 15)
            Q[:, col] = q.to(torch.uint8)
            e = (W1[:, i] - ((q - zero) * scale32).double()) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return pack_int4(Q), scales, zeros
