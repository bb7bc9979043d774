"""Write a freshly initialised model from a config preset.

    hpc-llama init --config tiny tiny.h5 --seed 0
    hpc-llama init --config llama3-8b --set model.n_layers=4 small.h5 --tokenizer tokenizer.json

Every tensor is drawn from its own seeded generator, so the same seed gives
the same weights whichever layout later loads or trains them. Tensors are
made and written one at a time: a 70B model needs no 70B of memory.
"""

from __future__ import annotations


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument

    p.add_argument("dst", help="destination .h5 file (or directory with --shard-size)")
    p.add_argument("--config", required=True, help="YAML preset: a path or a name in configs/ (tiny, llama2-7b, llama3-8b)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored dtype")
    p.add_argument("--tokenizer", help="tokenizer.json to embed, so text can be scored with the model")
    p.add_argument("--shard-size", default=None, metavar="SIZE", help="write a directory of shards of at most SIZE")
    add_overwrite_argument(p, "the destination")
    add_quiet_argument(p)


def run(args) -> int:
    import torch

    from ..atomic import atomic_path, claim_output
    from ..checkpoint.h5 import write_checkpoint
    from ..checkpoint.views import InitReader
    from ..config import load_sections, parse_size
    from ..errors import HpcLlamaError
    from ..progress import report

    sections = load_sections(args.config, args.set)
    cfg = sections["model"]
    if cfg is None:
        raise HpcLlamaError(f"{args.config}: no model section to initialise from")
    lock = claim_output(args.dst, [args.tokenizer] if args.tokenizer else [], args.overwrite)
    assets = {}
    if args.tokenizer:
        try:
            with open(args.tokenizer, "rb") as f:
                assets["tokenizer.json"] = f.read()
        except OSError as e:
            raise HpcLlamaError(f"{args.tokenizer}: {e.strerror}") from None
    reader = InitReader(cfg, args.seed, torch.float32 if args.dtype == "fp32" else torch.bfloat16, assets)
    shard = parse_size(args.shard_size) if args.shard_size else None
    with lock, atomic_path(args.dst, args.overwrite) as tmp:
        write_checkpoint(tmp, reader, shard)
    report(f"wrote {args.dst}: {cfg.n_params / 1e6:,.1f}M parameters, seed {args.seed}, {args.dtype}", args.quiet)
    return 0
