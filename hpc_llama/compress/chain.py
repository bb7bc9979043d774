"""The compress job's machinery: a chain of methods applied to one rank's own layers.

Each rank reads only its units (embedding, layers, head) -- split by the same
partition functions as the pipeline -- and compresses them; rank 0 streams
every rank's units into one file in model order. Whatever the number of
ranks, every tensor is computed from the same inputs by the same
arithmetic, so the file is byte-identical for `-n 1`, `-n 2` and `-n 4`:
calibration statistics come from the *original* model's activations (each
rank hands its hidden states to the next), not from already-compressed
layers, whose outputs would depend on where a rank's slice begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import HpcLlamaError
from ..model.quantized import check_group, dequantize, quantize, scheme_attrs
from ..parallel.collectives import recv_activations, send_activations
from . import PROJECTIONS
from .methods import (
    channels_to_keep,
    check_fraction,
    ffn_channel_scores,
    gptq_int4,
    head_channels,
    head_scores,
    heads_to_keep,
    magnitude_prune,
    svd_factors,
    wanda_prune,
)

METHODS = {
    "int8": "weight-only int8, one scale per output channel",
    "int4": "int4 in groups of --group-size inputs (scale + offset per group, two values per byte)",
    "gptq": "int4 as above, each column's rounding error corrected in the later columns (needs --calib)",
    "prune": "unstructured: zero --sparsity of each matrix (smallest |w|; |w| * input norm with --calib)",
    "prune-ffn": "remove --ffn-prune of each layer's FFN channels, least important first",
    "prune-heads": "remove --head-prune of each KV group's query heads, least important first",
    "lowrank": "replace each projection by two factors of --rank, or of the smallest rank keeping --energy",
}
QUANT_METHODS = {"int8": "int8-channel", "int4": "int4-group", "gptq": "int4-group"}
# Which activation feeds each projection (one statistic serves the projections that share an input).
INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out",
            "w1": "ffn_in", "w3": "ffn_in", "w2": "ffn_mid"}
MODULE_OF = {p: ("attention." if p in ("wq", "wk", "wv", "wo") else "feed_forward.") + p for p in PROJECTIONS}


@dataclass(frozen=True)
class Step:
    method: str
    options: dict = field(default_factory=dict)


def plan_steps(methods: list[str], *, sparsity=None, ffn_prune=None, head_prune=None, rank=None, energy=None,
               group_size: int = 32, calibrated: bool = False, embeddings: str | None = None) -> list[Step]:
    """The chain of methods with the options each uses; every impossible chain or option is refused here,
    before any rank reads a tensor.

    `embeddings` quantizes the embedding table (and an untied head) too: "same" with the method's
    scheme, or "int8" / "int4" whatever the method (int4 layers with an int8 table keep most of
    the size saving at a fraction of the table's rounding cost).
    """
    if embeddings not in (None, "same", "int8", "int4"):
        raise HpcLlamaError(f"--embeddings takes int8 or int4, got {embeddings!r}")
    if not methods:
        raise HpcLlamaError("give at least one --method (" + ", ".join(METHODS) + ")")
    steps, quantized, factored = [], None, False
    for m in methods:
        if m not in METHODS:
            raise HpcLlamaError(f"unknown method {m!r} (known: {', '.join(METHODS)})")
        if any(s.method == m for s in steps):
            raise HpcLlamaError(f"method {m} is given twice")
        if quantized and m in QUANT_METHODS:
            raise HpcLlamaError(f"{m} after {quantized}: quantising an already-quantised tensor")
        if quantized:
            raise HpcLlamaError(f"{m} after {quantized}: quantized tensors cannot be pruned or factorised; "
                                f"put {quantized} last")
        if factored and m in ("prune-ffn", "prune-heads"):
            raise HpcLlamaError(f"{m} after lowrank: structured pruning must come before lowrank")
        try:
            if m == "prune":
                if sparsity is None:
                    raise HpcLlamaError("prune needs --sparsity")
                check_fraction("--sparsity", sparsity)
                opts = {"sparsity": sparsity, "score": "wanda" if calibrated else "magnitude"}
            elif m == "prune-ffn":
                if ffn_prune is None:
                    raise HpcLlamaError("prune-ffn needs --ffn-prune")
                check_fraction("--ffn-prune", ffn_prune)
                opts = {"fraction": ffn_prune, "score": "activation" if calibrated else "weight"}
            elif m == "prune-heads":
                if head_prune is None:
                    raise HpcLlamaError("prune-heads needs --head-prune")
                check_fraction("--head-prune", head_prune)
                opts = {"fraction": head_prune, "score": "activation" if calibrated else "weight"}
            elif m == "lowrank":
                if (rank is None) == (energy is None):
                    raise HpcLlamaError("lowrank needs exactly one of --rank and --energy")
                if rank is not None and rank < 1:
                    raise HpcLlamaError(f"--rank must be at least 1, got {rank}")
                if energy is not None and not 0.0 < energy <= 1.0:
                    raise HpcLlamaError(f"--energy must be in (0, 1], got {energy}")
                opts = {"rank": rank} if rank is not None else {"energy": energy}
                factored = True
            else:
                if m == "gptq" and not calibrated:
                    raise HpcLlamaError("gptq needs calibration text: --calib FILE")
                opts = {"scheme": QUANT_METHODS[m]}
                if embeddings:
                    opts["embeddings"] = QUANT_METHODS[m if embeddings == "same" else embeddings]
                if m != "int8" or opts.get("embeddings") == "int4-group":
                    check_group(2 * group_size, group_size)  # even and >= 2; divisibility is per tensor
                    # int8 layers with an int4 table: the group size is the table's alone.
                    opts["group_size" if m != "int8" else "embeddings_group_size"] = group_size
                quantized = m
        except ValueError as e:
            raise HpcLlamaError(str(e)) from None
        steps.append(Step(m, opts))
    used = {s.method for s in steps}
    for flag, value, users in (("--sparsity", sparsity, ("prune",)), ("--ffn-prune", ffn_prune, ("prune-ffn",)),
                               ("--head-prune", head_prune, ("prune-heads",)), ("--rank", rank, ("lowrank",)),
                               ("--energy", energy, ("lowrank",)), ("--embeddings", embeddings, QUANT_METHODS)):
        if value is not None and not used & set(users):
            raise HpcLlamaError(f"{flag} is given but no method uses it ({', '.join(users)})")
    return steps


def restrict(steps: list[Step], layers: tuple[int, ...]) -> list[Step]:
    """The chain applied to `layers` only (the others are copied as they are); recorded with each step."""
    return [Step(s.method, {**s.options, "layers": list(layers)}) for s in steps]


@dataclass
class Packed:
    """A quantized tensor as stored: packed data, its parts, and the attrs that say how to read it."""

    data: torch.Tensor
    parts: dict
    attrs: dict


class LayerStats:
    """Second moments sum(x x^T) of the inputs of one layer's projections, over the calibration tokens."""

    def __init__(self):
        self.h: dict[str, torch.Tensor] = {}

    def add(self, kind: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        xtx = (x.T @ x).double()
        self.h[kind] = self.h[kind] + xtx if kind in self.h else xtx

    def norm(self, kind: str) -> torch.Tensor:
        """Each input feature's L2 norm over the calibration tokens."""
        return torch.diag(self.h[kind]).clamp(min=0).sqrt()


def unit_tensors(reader, names: list[str]) -> dict:
    """A unit's stored tensors: dense ones as tensors, quantized ones as Packed (carried through untouched)."""
    out = {}
    for n in names:
        info = reader.info(n)
        if info.scheme != "none":
            out[n] = Packed(reader.read(n), {r: reader.read_part(n, r) for r in info.parts}, dict(info.attrs))
        else:
            out[n] = reader.read(n)
    return out


def _dense(tensors: dict, name: str, method: str) -> torch.Tensor:
    t = tensors[name]
    if isinstance(t, Packed) and t.attrs["scheme"] == "sparse":
        return t.data  # a pruned matrix is an ordinary one with zeros
    if isinstance(t, Packed):
        what = "quantising" if method in QUANT_METHODS else f"applying {method} to"
        raise HpcLlamaError(f"{what} an already-quantised tensor: {name} is stored as {t.attrs['scheme']}")
    return t


def _weights_of(tensors: dict, prefix: str) -> list[tuple[str, str]]:
    """(weight name, role) of one projection: the matrix itself, or its two factors (role a, b)."""
    if f"{prefix}.weight" in tensors:
        return [(f"{prefix}.weight", "w")]
    return [(f"{prefix}.{f}.weight", f) for f in ("a", "b") if f"{prefix}.{f}.weight" in tensors]


def _input_h(stats: LayerStats, proj: str, role: str, tensors: dict, prefix: str):
    """The second-moment matrix of a weight's input: the projection's, or for factor b, a's outputs."""
    h = stats.h[INPUT_OF[proj]]
    if role == "b":
        a = tensors[f"{prefix}.a.weight"]
        if isinstance(a, Packed):  # already quantized: b sees what the quantized a computes
            a = dequantize(a.data, a.parts, a.attrs, torch.float32) if a.attrs["scheme"] != "sparse" else a.data
        a = a.double()
        h = a @ h @ a.T
    return h


def compress_layer(layer: int, tensors: dict, cfg, steps: list[Step], targets: tuple[str, ...],
                   stats: LayerStats | None, shape: dict, lowrank: dict) -> dict:
    """Apply the chain to one layer's tensors; records shape changes in `shape` and factorisations in `lowrank`."""
    t = dict(tensors)
    p = f"layers.{layer}"
    head_dim = cfg.head_dim
    for step in steps:
        m, o = step.method, step.options
        if "layers" in o and layer not in o["layers"]:
            continue
        if m == "prune-heads":
            wq, wo = _dense(t, f"{p}.attention.wq.weight", m), _dense(t, f"{p}.attention.wo.weight", m)
            norm = stats.norm("attn_out") if stats is not None and o["score"] == "activation" else None
            heads = heads_to_keep(head_scores(wq, wo, head_dim, norm), cfg.n_kv_heads, o["fraction"])
            rows = head_channels(heads, head_dim)
            t[f"{p}.attention.wq.weight"] = wq[rows].clone()
            if f"{p}.attention.wq.bias" in t:
                t[f"{p}.attention.wq.bias"] = t[f"{p}.attention.wq.bias"][rows].clone()
            t[f"{p}.attention.wo.weight"] = wo[:, rows].clone()
            shape["n_heads"] = int(heads.numel())
            if stats is not None:
                stats.h["attn_out"] = stats.h["attn_out"][rows][:, rows]
        elif m == "prune-ffn":
            w1, w2, w3 = (_dense(t, f"{p}.feed_forward.{w}.weight", m) for w in ("w1", "w2", "w3"))
            norm = stats.norm("ffn_mid") if stats is not None and o["score"] == "activation" else None
            keep = channels_to_keep(ffn_channel_scores(w1, w2, w3, norm), o["fraction"], _group_after(steps))
            t[f"{p}.feed_forward.w1.weight"], t[f"{p}.feed_forward.w3.weight"] = w1[keep].clone(), w3[keep].clone()
            t[f"{p}.feed_forward.w2.weight"] = w2[:, keep].clone()
            for b in ("w1", "w3"):
                if f"{p}.feed_forward.{b}.bias" in t:
                    t[f"{p}.feed_forward.{b}.bias"] = t[f"{p}.feed_forward.{b}.bias"][keep].clone()
            shape["ffn_dim"] = int(keep.numel())
            if stats is not None:
                stats.h["ffn_mid"] = stats.h["ffn_mid"][keep][:, keep]
        else:
            for proj in targets:
                prefix = f"{p}.{MODULE_OF[proj]}"
                for name, role in _weights_of(t, prefix):
                    w = _dense(t, name, m)
                    if m == "prune":
                        if o["score"] == "wanda":
                            h = _input_h(stats, proj, role, t, prefix)
                            pruned = wanda_prune(w, o["sparsity"], torch.diag(h).clamp(min=0).sqrt())
                        else:
                            pruned = magnitude_prune(w, o["sparsity"])
                        t[name] = sparse(pruned)
                    elif m == "lowrank":
                        if role != "w":
                            continue
                        factored = _factorise(name, w, o, steps)
                        if factored is None:
                            continue
                        a, b = factored
                        del t[name]
                        t[f"{prefix}.a.weight"], t[f"{prefix}.b.weight"] = a, b
                        if f"{prefix}.bias" in t:
                            t[f"{prefix}.b.bias"] = t.pop(f"{prefix}.bias")
                        lowrank[prefix] = int(a.shape[0])
                    else:
                        h = _input_h(stats, proj, role, t, prefix) if m == "gptq" else None
                        t[name] = quantize_tensor(name, w, o, h)
    return t


def _group_after(steps: list[Step]) -> int:
    """The group size of the chain's group-wise quantization (1 when there is none)."""
    return next((s.options["group_size"] for s in steps if "group_size" in s.options), 1)


def sparse(w: torch.Tensor) -> Packed:
    """A pruned matrix, marked so the file stores it filtered (its zeros cost almost nothing)."""
    zeros = float((w == 0).sum().item()) / max(1, w.numel())
    return Packed(w, {}, {"scheme": "sparse", "sparsity": round(zeros, 6)})


def _factorise(name: str, w: torch.Tensor, o: dict, steps: list[Step]):
    """Two factors of w, or None when the energy threshold needs a rank that would not save anything."""
    n_out, n_in = w.shape
    rank = o.get("rank")
    group = _group_after(steps)
    if rank is not None and rank > min(n_out, n_in):
        raise HpcLlamaError(f"--rank {rank} is larger than {name} allows ({n_out} x {n_in}: at most {min(n_out, n_in)})")
    if rank is not None and rank % group:
        raise HpcLlamaError(f"group size {group} does not divide --rank {rank} (the second factor's input)")
    if rank is None:
        from .methods import one_thread, rank_for_energy

        with one_thread():
            s = torch.linalg.svdvals(w.double())
        rank = rank_for_energy(s, o["energy"])
        if group > 1:  # the factor b is quantized in groups over its rank inputs
            rank = -(-rank // group) * group
        if rank * (n_in + n_out) >= n_in * n_out:
            return None
    return svd_factors(w, rank=rank)


def quantize_tensor(name: str, w: torch.Tensor, o: dict, hessian: torch.Tensor | None = None) -> Packed:
    scheme, group = o["scheme"], o.get("group_size", 0)
    if group and w.shape[1] % group:
        raise HpcLlamaError(f"group size {group} does not divide the {w.shape[1]} inputs of {name}")
    if hessian is not None:
        packed, scale, zero = gptq_int4(w, hessian, group)
        return Packed(packed, {"scale": scale, "zero": zero}, {**scheme_attrs(w, scheme, group), "method": "gptq"})
    data, parts, attrs = quantize(w, scheme, group or 32)
    return Packed(data, parts, attrs)


def compress_outer(name: str, tensor, steps: list[Step]):
    """Embedding and head tensors: quantized only with --embeddings; everything else passes through."""
    for step in steps:
        o = step.options
        if step.method in QUANT_METHODS and o.get("embeddings") and name in ("tok_embeddings.weight", "output.weight"):
            # Rows of an embedding are looked up, not multiplied: round to nearest, even under gptq.
            tensor = quantize_tensor(name, _dense({name: tensor}, name, step.method),
                                     {"scheme": o["embeddings"],
                                      "group_size": o.get("group_size") or o.get("embeddings_group_size", 0)})
    return tensor


# --- moving units between ranks ----------------------------------------------


def _arrays(entry) -> list[torch.Tensor]:
    if isinstance(entry, Packed):
        return [entry.data] + [entry.parts[r] for r in sorted(entry.parts)]
    return [entry]


def send_unit(comm, dest: int, records: dict) -> None:
    """A unit's tensors to rank `dest`, a packed one as its data and parts with the attrs that say how to read it."""
    from ..parallel.collectives import send_tensors

    send_tensors(comm, dest, ((name, _arrays(entry), (entry.attrs, sorted(entry.parts)) if isinstance(entry, Packed)
                               else None) for name, entry in records.items()))


def recv_unit(comm, source: int) -> dict:
    from ..parallel.collectives import recv_tensors

    out = {}
    for name, arrays, packed in recv_tensors(comm, source):
        if packed is None:
            out[name] = arrays[0]
        else:
            attrs, roles = packed
            out[name] = Packed(arrays[0], dict(zip(roles, arrays[1:])), attrs)
    return out


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of a model slice, shared storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# --- calibration and evaluation: hidden states handed from rank to rank ------


def token_windows(files: list[str], tokenizer, bos, vocab_size: int, length: int, count: int, text_field: str,
                  what: str) -> torch.Tensor:
    """Up to `count` windows of `length` consecutive tokens from the documents, each document BOS first.

    A stream shorter than one window gives one shorter window; no text at all is an error.
    """
    from ..documents import Fields, expand_inputs, read_documents

    stream: list[int] = []
    for doc in read_documents(expand_inputs(files), Fields(text_field), vocab_size):
        if doc.text is None:
            stream.extend(doc.input_ids)
        else:
            if tokenizer is None:
                raise HpcLlamaError(f"{what}: the checkpoint carries no tokenizer, so documents need input_ids")
            stream.extend(([bos] if bos is not None else []) + tokenizer.encode(doc.text))
        if len(stream) >= length * count:
            break
    if len(stream) < 2:
        raise HpcLlamaError(f"{what} {' '.join(files)}: no text to use (empty)")
    n = min(count, max(1, len(stream) // length))
    length = min(length, len(stream))
    return torch.tensor(stream[:n * length], dtype=torch.long).view(n, length)


def run_layer(block, h: torch.Tensor, cfg) -> torch.Tensor:
    """One block over full causal sequences starting at position 0."""
    from ..model.llama import rotary_tables

    B, T = h.shape[:2]
    positions = torch.arange(T).expand(B, T)
    cos, sin = rotary_tables(cfg, positions, h.dtype)
    return block(h, cos, sin, None, positions)


def stage_input(comm, rank: int, model, tokens: torch.Tensor, batch: int, dim: int) -> list[torch.Tensor]:
    """This rank's first hidden states, per batch: the embedding on rank 0, else what the previous rank sent."""
    out = []
    for s in range(0, tokens.shape[0], batch):
        x = tokens[s:s + batch]
        if rank == 0:
            with torch.no_grad():
                out.append(model.tok_embeddings(x).float())
        else:
            out.append(recv_activations(comm, rank - 1, (x.shape[0], x.shape[1], dim)))
    return out


PROBES = {"attn_in": "attention.wq", "attn_out": "attention.wo", "ffn_in": "feed_forward.w1", "ffn_mid": "feed_forward.w2"}


def calibrate(comm, rank: int, world: int, model, cfg, tokens: torch.Tensor, batch: int = 16):
    """Yield (layer, LayerStats) for this rank's layers in order, from the original model's activations.

    Before collecting, a rank that is not last runs its layers once and hands the result on, so the next
    rank can start at once instead of waiting for this one's statistics and compression.
    """
    hidden = stage_input(comm, rank, model, tokens, batch, cfg.dim)
    with torch.no_grad():
        if rank < world - 1:
            for h in hidden:
                for block in model.layers.values():
                    h = run_layer(block, h, cfg)
                send_activations(comm, rank + 1, h)
        for key, block in model.layers.items():
            stats = LayerStats()
            hooks = [block.get_submodule(path).register_forward_pre_hook(
                lambda _m, args, kind=kind: stats.add(kind, args[0])) for kind, path in PROBES.items()]
            try:
                hidden = [run_layer(block, h, cfg) for h in hidden]
            finally:
                for hook in hooks:
                    hook.remove()
            yield int(key), stats


def evaluate(comm, rank: int, world: int, models: dict, cfg, tokens: torch.Tensor, batch: int = 4) -> dict | None:
    """Perplexity of both models, the mean KL divergence of their next-token distributions and their top-1
    agreement, on windows of `tokens`; the whole pipeline in the rank order. Returns the totals on the last
    rank (None elsewhere) and every rank's compute seconds per model."""
    import time

    sums = {"nll_original": 0.0, "nll_compressed": 0.0, "kl": 0.0, "agree": 0, "positions": 0}
    seconds = {name: 0.0 for name in models}
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch):
            x = tokens[s:s + batch]
            logprobs = {}
            for name, model in models.items():
                h = (stage_input(comm, rank, model, x, batch, cfg.dim)[0])
                t0 = time.perf_counter()
                for block in model.layers.values():
                    h = run_layer(block, h, cfg)
                if rank == world - 1:
                    logprobs[name] = torch.log_softmax(model.head(h[:, :-1]).float(), dim=-1)
                seconds[name] += time.perf_counter() - t0
                if rank < world - 1:
                    send_activations(comm, rank + 1, h)
            if rank == world - 1:
                lo, lc = logprobs["original"], logprobs["compressed"]
                target = x[:, 1:, None]
                sums["nll_original"] -= lo.gather(-1, target).double().sum().item()
                sums["nll_compressed"] -= lc.gather(-1, target).double().sum().item()
                sums["kl"] += (lo.exp() * (lo - lc)).sum(-1).double().sum().item()
                sums["agree"] += int((lo.argmax(-1) == lc.argmax(-1)).sum().item())
                sums["positions"] += target.numel()
    return {"sums": sums if rank == world - 1 else None, "seconds": seconds}
