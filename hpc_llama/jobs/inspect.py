"""Show what a checkpoint holds, check it against its config, and verify its checksums.

    hpc-llama inspect llama3-8b.h5                 # config, parameters, bytes per layer, dtypes
    hpc-llama inspect llama3-8b.h5 --pp 4          # ... and what each of 4 pipeline stages would read
    hpc-llama inspect llama3-8b.h5 --verify        # read every tensor and check its checksum
    hpc-llama inspect small-int4.h5 --tensors      # every tensor: storage scheme, shapes, bytes

Exits non-zero when a tensor is missing, has the wrong shape, or (with
--verify) does not match its checksum.
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("checkpoint", help=".h5 file, sharded HDF5 directory or HF model directory")
    p.add_argument("--verify", action="store_true", help="read every tensor and verify its checksum")
    p.add_argument("--pp", type=int, default=None, help="show the split over this many pipeline stages")
    p.add_argument("--partition", choices=("compute", "balanced", "uniform"), default="compute", help="stage split method")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its storage scheme, shapes and bytes")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def summarize(reader, pp: int | None, partition: str) -> dict:
    from collections import Counter

    from ..checkpoint.base import group_by_unit, unit_of
    from ..checkpoint.slices import slice_sources
    from ..config import ParallelConfig
    from ..parallel.layout import stage_plans

    cfg = reader.config
    units = {}
    for group in group_by_unit(reader.names()):
        units[str(unit_of(group[0]))] = sum(reader.info(n).stored_bytes for n in group)
    out = {
        "path": reader.path, "format": reader.format, "model_type": reader.hf_config.get("model_type"),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "parameters": cfg.n_params, "tensors": len(reader.names()),
        "bytes": sum(units.values()), "bytes_per_unit": units,
        "dtypes": dict(Counter(reader.info(n).dtype for n in reader.names())),
        "schemes": dict(Counter(reader.info(n).scheme for n in reader.names())),
        "assets": {k: len(v) for k, v in reader.assets().items()},
    }
    ours = reader.hf_config.get("hpc_llama") or {}
    if ours.get("compression"):
        out["compression"] = ours["compression"]
        out["layer_shapes"] = ours.get("layer_shapes") or {}
        out["lowrank"] = ours.get("lowrank") or {}
    if pp is not None:
        stages = []
        for plan in stage_plans(cfg, ParallelConfig(pp=pp, partition=partition)):
            names = slice_sources(reader, plan.layers, plan.embed, plan.head)
            stages.append({"stage": plan.stage, "layers": [plan.layers.start, plan.layers.stop],
                           "embed": plan.embed, "head": plan.head,
                           "bytes": sum(reader.info(n).stored_bytes for n in names)})
        out["stages"] = stages
    return out


def tensor_rows(reader) -> list[dict]:
    rows = []
    for n in reader.names():
        i = reader.info(n)
        row = {"name": n, "scheme": i.scheme, "dtype": i.dtype, "shape": list(i.shape),
               "logical_shape": list(i.logical_shape), "bytes": i.stored_bytes}
        for k in ("group_size", "sparsity", "method"):
            if k in i.attrs:
                row[k] = i.attrs[k]
        rows.append(row)
    return rows


def verify_all(reader) -> tuple[int, int, float]:
    import time

    t0, total = time.perf_counter(), 0
    for name in reader.names():
        total += reader.read(name, verify=True).nbytes
    return len(reader.names()), total, time.perf_counter() - t0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def family_options(c: dict) -> list[str]:
    """The architecture options a config turns on, in words (the ones families differ by)."""
    out = []
    if c["attention_bias"]:
        out.append("attention biases")
    elif c["qkv_bias"]:
        out.append("q/k/v biases")
    if c["mlp_bias"]:
        out.append("feed-forward biases")
    if c["qk_norm"]:
        out.append("per-head q/k norms")
    if c["sliding_window"] is not None:
        layers = c["sliding_layers"]
        from ..compress.methods import format_layers

        where = "every layer" if layers is None else f"layers {format_layers(layers)}" if layers else "no layer"
        out.append(f"sliding window {c['sliding_window']} on {where}")
    return out


def print_table(s: dict) -> None:
    c = s["config"]
    rope = f"theta {c['rope_theta']:g}"
    if c["rope_scaling"]:
        rope += f" ({c['rope_scaling'].get('rope_type', c['rope_scaling'].get('type'))} x{c['rope_scaling']['factor']:g})"
    print(f"checkpoint   {s['path']} ({s['format']})")
    print(f"model        {s['model_type']}: {c['n_layers']} layers, dim {c['dim']}, {c['n_heads']} heads "
          f"({c['n_kv_heads']} kv, head_dim {c['head_dim']}), ffn {c['ffn_dim']}, vocab {c['vocab_size']}, "
          f"rope {rope}, context {c['max_seq_len']}, tied {'yes' if c['tie_embeddings'] else 'no'}")
    options = family_options(c)
    if options:
        print(f"options      {', '.join(options)}")
    print(f"parameters   {s['parameters']:,} ({s['parameters'] / 1e6:,.1f}M)")
    print(f"tensors      {s['tensors']}, {_mb(s['bytes'])}; " + ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items()))
    if set(s["schemes"]) != {"none"}:
        print("storage      " + ", ".join(f"{k} x{v}" for k, v in s["schemes"].items()))
    if s.get("compression"):
        from ..compress.methods import format_layers

        def opt(k, v):
            return f"layers={format_layers(v)}" if k == "layers" else f"{k}={v}"

        steps = " -> ".join(c["method"] + "(" + ", ".join(opt(k, v) for k, v in c.items() if k != "method") + ")"
                            for c in s["compression"])
        print(f"compression  {steps}")
        shapes = s["layer_shapes"]
        if shapes:
            heads = sorted({v.get("n_heads", c["n_heads"]) for v in shapes.values()})
            ffn = sorted({v.get("ffn_dim", c["ffn_dim"]) for v in shapes.values()})
            print(f"pruned       {len(shapes)} layers reshaped: heads {heads}, ffn {ffn}")
        if s["lowrank"]:
            ranks = sorted(s["lowrank"].values())
            print(f"low rank     {len(ranks)} projections as two factors, rank {ranks[0]}-{ranks[-1]}")
    per = s["bytes_per_unit"]
    layers = [v for k, v in per.items() if k not in ("embed", "head")]
    parts = [f"embed {_mb(per['embed'])}"] if "embed" in per else []
    if layers:
        same = len(set(layers)) == 1
        parts.append(f"{len(layers)} layers {_mb(layers[0])} each" if same else f"layers {_mb(min(layers))}-{_mb(max(layers))}")
    if "head" in per:
        parts.append(f"head {_mb(per['head'])}")
    print(f"bytes/part   {', '.join(parts)}")
    print(f"assets       {', '.join(f'{k} ({_mb(v)})' for k, v in s['assets'].items()) or 'none (no tokenizer)'}")
    for st in s.get("stages", []):
        what = (["embed"] if st["embed"] else []) + [f"layers {st['layers'][0]}-{st['layers'][1] - 1}"] + (["head"] if st["head"] else [])
        print(f"stage {st['stage']:<6} {' + '.join(what)}: reads {_mb(st['bytes'])}")


def run(args) -> int:
    import json

    from ..checkpoint import open_checkpoint
    from ..checkpoint.slices import check_structure

    with open_checkpoint(args.checkpoint) as reader:
        check_structure(reader)
        summary = summarize(reader, args.pp, args.partition)
        if args.verify:
            n, nbytes, seconds = verify_all(reader)
            has_sums = reader.format.startswith("h5")
            summary["verify"] = {"tensors": n, "bytes": nbytes, "seconds": round(seconds, 3), "checksums": has_sums}
        if args.tensors:
            summary["tensor_list"] = tensor_rows(reader)
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            print_table(summary)
            for t in summary.get("tensor_list", []):
                extra = "".join(f" {k}={t[k]}" for k in ("group_size", "sparsity", "method") if k in t)
                logical = "" if t["logical_shape"] == t["shape"] else f" -> {t['logical_shape']}"
                print(f"  {t['name']:<40} {t['scheme']:<13} {t['dtype']}{t['shape']}{logical} "
                      f"{_mb(t['bytes'])}{extra}")
            if args.verify:
                v = summary["verify"]
                how = "checksums match" if v["checksums"] else "all readable (this format stores no checksums)"
                print(f"verify       {v['tensors']} tensors, {_mb(v['bytes'])} in {v['seconds']:.2f} s: {how}")
    return 0
