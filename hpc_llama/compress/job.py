"""Compress a checkpoint: quantize, prune or factorise it -- each rank its own layers, rank 0 writes one file.

    hpc-llama compress --model smollm2-135m --output s-int8.h5 --method int8 --eval held-out.jsonl
    mpirun -n 4 hpc-llama compress --model m.h5 --output m-int4.h5 --method int4 --group-size 64 --embeddings
    mpirun -n 2 hpc-llama compress --model m.h5 --output m-gptq.h5 --method gptq --calib docs.jsonl
    hpc-llama compress --model m.h5 --output s.h5 --method prune-ffn,lowrank,int8 --ffn-prune 0.25 --energy 0.9

Methods, applied in the order given (several --method, or one comma-separated list):
  int8         weight-only int8, one scale per output channel
  int4         int4 in groups of --group-size inputs, scale + offset per group, two values per byte
  gptq         int4 as above, each column's rounding error corrected in the later ones (needs --calib)
  prune        unstructured: zero --sparsity of each matrix, smallest |w| first (|w| * input norm with --calib)
  prune-ffn    remove --ffn-prune of each layer's FFN channels, least important first
  prune-heads  remove --head-prune of each KV group's query heads, least important first
  lowrank      replace each projection by two factors of --rank, or the smallest rank keeping --energy

The output is an .h5 checkpoint (format 2, docs/checkpoint.md) that every job
reads at any pipeline degree; it is byte-identical whatever the number of
ranks that wrote it. --eval compares it with the original on held-out text
(perplexity, KL divergence, top-1 agreement, size, memory, speed) and writes
OUT.eval.json. See docs/compression.md.
"""

from __future__ import annotations


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument, finite_float
    from . import PROJECTIONS

    p.add_argument("--model", required=True, help="checkpoint to compress (.h5, sharded, HF, GGUF or smollm2-135m)")
    p.add_argument("--output", required=True, help="compressed checkpoint, one .h5 file")
    p.add_argument("--method", action="append", required=True, metavar="M[,M...]", help="methods, in order (above)")
    p.add_argument("--group-size", type=int, default=32, help="int4/gptq: inputs per scale and offset (default 32)")
    p.add_argument("--embeddings", nargs="?", const="same", choices=("same", "int8", "int4"),
                   help="quantize the token embedding and output head too: with the method's scheme, "
                   "or int8 / int4 whatever the method")
    p.add_argument("--sparsity", type=finite_float, help="prune: fraction of each matrix's weights set to zero")
    p.add_argument("--ffn-prune", type=finite_float, help="prune-ffn: fraction of FFN channels removed per layer")
    p.add_argument("--head-prune", type=finite_float, help="prune-heads: fraction of query heads removed per KV group")
    p.add_argument("--rank", type=int, help="lowrank: rank of the factors")
    p.add_argument("--energy", type=finite_float, help="lowrank: keep this fraction of each matrix's squared singular "
                   "values (a projection is left whole when its rank would not save anything)")
    p.add_argument("--targets", default=",".join(PROJECTIONS), help="projections the methods apply to "
                   "(default all: " + ",".join(PROJECTIONS) + ")")
    p.add_argument("--layers", help="layers the methods apply to, e.g. 0-3,28,29 (default all; the others are "
                   "copied as they are: first and last layers kept whole, heads pruned where they matter least)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help="calibration text (JSONL or .txt): gptq needs it; "
                   "pruning then ranks weights by their effect on the activations")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--eval", nargs="+", metavar="FILE", help="held-out text to compare the result with the original")
    p.add_argument("--eval-len", type=int, default=256, help="tokens per evaluation window (default 256)")
    p.add_argument("--eval-windows", type=int, default=32, help="most evaluation windows (default 32)")
    p.add_argument("--text-field", default="text", help="JSONL field with the text (default text)")
    add_overwrite_argument(p)
    add_quiet_argument(p)


CALIBRATED = ("gptq", "prune", "prune-ffn", "prune-heads")


def run(args) -> int:
    import contextlib
    import time

    from ..atomic import claim_output
    from ..embedded import resolve
    from ..parallel.ranks import start_rank, world_comm

    t_start = time.time()
    comm = world_comm()
    info = start_rank(comm)
    steps, targets, calibrated = _plan(args)
    # Rank 0 alone writes: it takes the output for the whole job.
    with claim_output(args.output, [resolve(args.model)], args.overwrite) if info.rank == 0 else \
            contextlib.nullcontext():
        return _compress(args, comm, info, steps, targets, calibrated, t_start)


def _compress(args, comm, info, steps, targets, calibrated, t_start) -> int:
    import os
    import time

    from ..checkpoint import open_checkpoint
    from ..checkpoint.slices import check_structure
    from ..config import ParallelConfig
    from ..errors import HpcLlamaError
    from ..parallel.layout import stage_plans
    from ..tokenizer import Tokenizer
    from .chain import restrict
    from .methods import parse_layers

    reader = open_checkpoint(args.model)
    check_structure(reader)
    cfg = reader.config
    if not os.path.abspath(args.output).endswith((".h5", ".hdf5")):
        raise HpcLlamaError(f"{args.output}: the compressed checkpoint is one HDF5 file; name it .h5")
    if args.layers is not None:
        try:
            steps = restrict(steps, parse_layers(args.layers, cfg.n_layers))
        except ValueError as e:
            raise HpcLlamaError(str(e)) from None
    try:  # each rank compresses the layers a pipeline stage of its number would own
        plans = stage_plans(cfg, ParallelConfig(pp=info.world_size, partition="compute"))
    except HpcLlamaError as e:
        raise HpcLlamaError(f"{info.world_size} ranks for a model of {cfg.n_layers} layers: {e}") from None
    tokenizer = Tokenizer.from_checkpoint(reader)
    eval_tokens = _windows(comm, args, tokenizer, cfg, args.eval, args.eval_len, args.eval_windows, "--eval") \
        if args.eval else None
    calib_tokens = _windows(comm, args, tokenizer, cfg, args.calib, args.calib_len, args.calib_samples, "--calib") \
        if calibrated else None
    units, results, shapes, lowrank, compute_s = _compress_own_units(comm, reader, plans[info.rank], steps, targets,
                                                                     calib_tokens)
    gathered = comm.gather((shapes, lowrank, compute_s), root=0)
    new_cfg = _write(comm, args, reader, plans, steps, units, results, gathered)
    if info.world_size > 1:
        comm.Barrier()  # the file is complete before anyone reads it
    evaluation = None
    if eval_tokens is not None:
        evaluation = _evaluate(comm, info.rank, info.world_size, plans[info.rank], reader, args.output, eval_tokens)
    if info.rank == 0:
        _summarise(args, reader, steps, new_cfg, gathered, evaluation, time.time() - t_start)
    reader.close()
    return 0


def _plan(args):
    """The chain of methods, the projections it applies to, and whether it calibrates; every flag checked."""
    from ..errors import HpcLlamaError
    from . import PROJECTIONS
    from .chain import plan_steps

    methods = [m.strip() for spec in args.method for m in spec.split(",") if m.strip()]
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise HpcLlamaError(f"--targets: unknown projection {bad[0] if bad else '(none)'!r} "
                            f"(known: {', '.join(PROJECTIONS)})")
    calibrated = bool(args.calib) and any(m in CALIBRATED for m in methods)
    if args.calib and not calibrated:
        raise HpcLlamaError(f"--calib is given but none of the methods uses calibration ({', '.join(CALIBRATED)})")
    steps = plan_steps(methods, sparsity=args.sparsity, ffn_prune=args.ffn_prune, head_prune=args.head_prune,
                       rank=args.rank, energy=args.energy, group_size=args.group_size, calibrated=calibrated,
                       embeddings=args.embeddings)
    for name in ("calib_samples", "calib_len", "eval_len", "eval_windows"):
        if getattr(args, name) < 1:
            raise HpcLlamaError(f"--{name.replace('_', '-')} must be at least 1")
    return steps, targets, calibrated


def _windows(comm, args, tokenizer, cfg, files, length, count, what):
    """Token windows of calibration or evaluation text: rank 0 reads and tokenizes, every rank gets the same ids."""
    from ..errors import HpcLlamaError
    from .chain import token_windows

    toks, err = None, None
    if comm.Get_rank() == 0:
        try:
            toks = token_windows(files, tokenizer, cfg.bos_id, cfg.vocab_size, min(length, cfg.max_seq_len),
                                 count, args.text_field, what)
        except HpcLlamaError as e:
            err = str(e)
    if comm.Get_size() > 1:
        toks, err = comm.bcast((toks, err), root=0)
    if err:
        raise HpcLlamaError(err)
    return toks


def _units(plan) -> list:
    return (["embed"] if plan.embed else []) + list(plan.layers) + (["head"] if plan.head else [])


def _compress_own_units(comm, reader, plan, steps, targets, calib_tokens):
    """This rank's units (embedding, layers, head), compressed; with the shape changes and factorisations made."""
    import time

    import torch

    from ..checkpoint.base import unit_of
    from ..checkpoint.slices import load_slice
    from .chain import calibrate, compress_layer, compress_outer, unit_tensors

    t0 = time.perf_counter()
    cfg = reader.config
    units = _units(plan)
    names = {u: [n for n in reader.names() if unit_of(n) == u] for u in units}
    stats_iter = None
    if calib_tokens is not None:
        original = load_slice(reader, plan.layers, plan.embed, head=False, device="cpu", dtype=torch.float32)
        stats_iter = calibrate(comm, comm.Get_rank(), comm.Get_size(), original, cfg, calib_tokens)
    results, shapes, lowrank = {}, {}, {}
    for u in units:
        tensors = unit_tensors(reader, names[u])
        if isinstance(u, int):
            stats = None
            if stats_iter is not None:
                layer, stats = next(stats_iter)
                assert layer == u
            shape = {}
            results[u] = compress_layer(u, tensors, cfg, steps, targets, stats, shape, lowrank)
            if shape:
                shapes[str(u)] = shape
        else:
            results[u] = {n: compress_outer(n, t, steps) for n, t in tensors.items()}
    return units, results, shapes, lowrank, time.perf_counter() - t0


def _write(comm, args, reader, plans, steps, units, results, gathered):
    """Rank 0 writes every rank's units into one file, in model order; the others send theirs.

    Returns the new model config on rank 0 (None elsewhere).
    """
    from ..atomic import atomic_path
    from ..checkpoint import open_checkpoint
    from ..checkpoint.h5 import FORMAT_VERSION, H5Writer
    from ..checkpoint.hf import model_config_from_hf
    from ..checkpoint.slices import check_structure
    from .chain import Packed, recv_unit, send_unit

    if comm.Get_rank() != 0:
        for u in units:
            send_unit(comm, 0, results.pop(u))
        return None
    hf = dict(reader.hf_config)
    ours = dict(hf.get("hpc_llama") or {})
    layer_shapes = dict(ours.get("layer_shapes") or {})
    factors = dict(ours.get("lowrank") or {})
    for sh, lr, _ in gathered:
        for k, v in sh.items():
            layer_shapes[k] = {**layer_shapes.get(k, {}), **v}
        factors.update(lr)
    record = [{"method": s.method, **s.options} for s in steps]
    ours.update(layer_shapes=dict(sorted(layer_shapes.items(), key=lambda kv: int(kv[0]))),
                lowrank=dict(sorted(factors.items())), compression=list(ours.get("compression", [])) + record)
    hf["hpc_llama"] = ours
    with atomic_path(args.output, args.overwrite) as tmp:
        w = H5Writer(tmp, hf, reader.assets(), version=FORMAT_VERSION)
        try:
            for r, p in enumerate(plans):
                for u in _units(p):
                    records = results.pop(u) if r == 0 else recv_unit(comm, r)
                    for n in sorted(records):
                        e = records[n]
                        if isinstance(e, Packed):
                            w.add(n, e.data, e.attrs, e.parts)
                        else:
                            w.add(n, e)
        finally:
            w.close()
        with open_checkpoint(tmp) as written:  # the file must describe a model every job can build
            check_structure(written)
    return model_config_from_hf(hf)


def _summarise(args, reader, steps, new_cfg, gathered, evaluation, seconds) -> None:
    """Rank 0: OUT.summary.json and the report lines."""
    import os

    from ..atomic import write_json_atomic
    from ..progress import report

    cfg = reader.config
    summary = {"model": args.model, "output": os.path.abspath(args.output), "ranks": len(gathered),
               "methods": [{"method": s.method, **s.options} for s in steps],
               "parameters": {"original": cfg.n_params, "compressed": new_cfg.n_params},
               "bytes": {"original": sum(reader.info(n).stored_bytes for n in reader.names()),
                         "original_fp32": _fp32_bytes(cfg), "compressed": os.path.getsize(args.output)},
               "compress_seconds_per_rank": [round(g[2], 3) for g in gathered]}
    if evaluation is not None:
        summary["eval"] = evaluation
    summary["seconds"] = round(seconds, 3)
    write_json_atomic(os.path.abspath(args.output) + ".summary.json", summary)
    b, p = summary["bytes"], summary["parameters"]
    report(f"compress: {'+'.join(s.method for s in steps)} on {len(gathered)} rank(s): "
           f"{b['original_fp32'] / 1e6:,.1f} MB as fp32 -> {b['compressed'] / 1e6:,.1f} MB "
           f"({100 * b['compressed'] / b['original_fp32']:.1f}%), parameters {p['original'] / 1e6:.1f}M -> "
           f"{p['compressed'] / 1e6:.1f}M; wrote {args.output}", args.quiet)
    if evaluation is not None:
        e = evaluation
        report(f"eval: {e['tokens']} tokens: perplexity {e['perplexity']['original']:.4f} -> "
               f"{e['perplexity']['compressed']:.4f} ({100 * e['perplexity_change']:+.2f}%), "
               f"KL {e['kl_mean']:.5f}, top-1 agreement {100 * e['top1_agreement']:.2f}%, "
               f"tokens/s {e['tokens_per_s']['original']:.0f} -> {e['tokens_per_s']['compressed']:.0f}, "
               f"resident {e['resident_bytes']['original'][0] / 1e6:.1f} -> "
               f"{e['resident_bytes']['compressed'][0] / 1e6:.1f} MB on rank 0", args.quiet)


def _fp32_bytes(cfg) -> int:
    return 4 * cfg.n_params


def _evaluate(comm, rank, world, plan, reader, output, tokens) -> dict | None:
    import math

    import torch

    from ..checkpoint import open_checkpoint
    from ..checkpoint.slices import load_slice
    from .chain import evaluate, resident_bytes

    with open_checkpoint(output) as compressed:
        models = {"original": load_slice(reader, plan.layers, plan.embed, plan.head, "cpu", torch.float32),
                  "compressed": load_slice(compressed, plan.layers, plan.embed, plan.head, "cpu", torch.float32)}
        resident = {k: resident_bytes(m) for k, m in models.items()}
        out = evaluate(comm, rank, world, models, reader.config, tokens)
    rows = comm.gather((resident, out), root=0)
    if world > 1:
        # The totals live on the last rank; rank 0 reports them.
        sums = comm.bcast(out["sums"], root=world - 1)
    else:
        sums = out["sums"]
    if rank != 0:
        return None
    n = sums["positions"]
    ppl = {k: math.exp(sums[f"nll_{k}"] / n) for k in ("original", "compressed")}
    secs = {k: sum(r[1]["seconds"][k] for r in rows) for k in ("original", "compressed")}
    tps = {k: tokens.numel() / secs[k] for k in secs}
    return {"tokens": n, "windows": tokens.shape[0], "window_tokens": tokens.shape[1],
            "perplexity": ppl, "perplexity_change": ppl["compressed"] / ppl["original"] - 1,
            "kl_mean": sums["kl"] / n, "top1_agreement": sums["agree"] / n,
            "tokens_per_s": tps, "speedup": tps["compressed"] / tps["original"],
            "resident_bytes": {k: [r[0][k] for r in rows] for k in ("original", "compressed")}}
