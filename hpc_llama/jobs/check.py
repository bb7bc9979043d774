"""Check a parallel layout end to end before trusting it with a long job.

    mpirun -n 4 hpc-llama check --model llama.h5 --pp 2          # 2 stages x 2 data-parallel replicas
    srun -n 8 hpc-llama check --model /models/Llama-3-8B --pp 4

Every rank loads only its own slice (reporting the bytes it read and how
long it took), DeepSpeed's pipeline engine runs forward passes over random
token sequences of several lengths, and the last stage compares its logits
with the whole model run in one process on the same rank. That reference
needs memory for the whole model on last-stage ranks; --no-reference skips it.
Exits non-zero when any difference exceeds --tolerance.
"""

from __future__ import annotations


def add_arguments(p):
    from ..cli import finite_float
    p.add_argument("--model", required=True, help="checkpoint: .h5, sharded directory or HF directory")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (ranks / pp data-parallel replicas)")
    p.add_argument("--partition", choices=("compute", "balanced", "uniform"), default="compute")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="fp32")
    p.add_argument("--lengths", default="7,33,128", help="comma-separated sequence lengths to run")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per call (at least pp keeps stages busy)")
    p.add_argument("--tolerance", type=finite_float, default=None, help="largest allowed max-abs logit difference "
                   "(default 1e-5 in fp32, 5e-2 in bf16)")
    p.add_argument("--no-reference", action="store_true", help="skip the whole-model comparison")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import json
    import time

    import torch

    from ..checkpoint import open_checkpoint
    from ..checkpoint.slices import load_slice, slice_sources
    from ..config import ParallelConfig
    from ..errors import HpcLlamaError
    from ..parallel.layout import require_layout, stage_plans
    from ..parallel.pipeline import build_pipeline, eval_batches
    from ..parallel.ranks import resolve_dtype, start_distributed, start_rank, stop_distributed, world_comm

    comm = world_comm()
    info = start_rank(comm)
    try:
        parallel = ParallelConfig(pp=args.pp, partition=args.partition, dtype=args.dtype)
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError as e:
        raise HpcLlamaError(str(e)) from None
    reader = open_checkpoint(args.model)
    try:
        stage_plans(reader.config, parallel)  # refuses impossible layouts before any rank starts
        require_layout(info.world_size, args.pp)
        if max(lengths) > reader.config.max_seq_len:
            raise HpcLlamaError(f"length {max(lengths)} exceeds the model's context of {reader.config.max_seq_len}")
        start_distributed(info, comm, parallel.timeout_s)
        t0 = time.perf_counter()
        engine, plan, replica = build_pipeline(reader, info, parallel, micro_batch=2)
        load_s = time.perf_counter() - t0
        read_bytes = sum(reader.info(n).nbytes for n in slice_sources(reader, plan.layers, plan.embed, plan.head))
        dtype = resolve_dtype(parallel.dtype, info.device)
        tolerance = args.tolerance if args.tolerance is not None else (1e-5 if dtype == torch.float32 else 5e-2)
        reference = None
        if plan.head and not args.no_reference:
            reference = load_slice(reader, device=info.device, dtype=dtype)
        g = torch.Generator().manual_seed(args.seed * 1000 + replica)
        worst, t1 = 0.0, time.perf_counter()
        for T in lengths:
            batches = [(torch.randint(0, reader.config.vocab_size, (2, T), generator=g).to(info.device),
                        torch.arange(T, device=info.device).expand(2, T).contiguous())
                       for _ in range(args.micro_batches)]
            out = eval_batches(engine, batches)
            if reference is not None:
                with torch.no_grad():
                    for (x, _), o in zip(batches, out):
                        worst = max(worst, (reference(x).float() - o.float()).abs().max().item())
        forward_s = time.perf_counter() - t1
        row = {"rank": info.rank, "node": info.node, "device": info.device, "stage": plan.stage, "replica": replica,
               "layers": [plan.layers.start, plan.layers.stop], "read_MB": round(read_bytes / 1e6, 1),
               "setup_s": round(load_s, 3), "forward_s": round(forward_s, 3),
               "max_abs": worst if reference is not None else None}
        rows = comm.gather(row, root=0)
        if info.rank == 0:
            for r in rows:
                print(json.dumps(r))
            checked = [r for r in rows if r["max_abs"] is not None]
            bad = [r for r in checked if r["max_abs"] > tolerance]
            dp = info.world_size // args.pp
            print(f"check: {info.world_size} ranks = {args.pp} stage(s) x {dp} replica(s), lengths {lengths}: "
                  + (f"max-abs difference {max(r['max_abs'] for r in checked):.2e} (tolerance {tolerance:g})"
                     if checked else "no reference comparison"))
            if bad:
                raise HpcLlamaError(f"rank {bad[0]['rank']}: logits differ from the whole model by "
                                    f"{bad[0]['max_abs']:.3g} (> {tolerance:g})")
        comm.Barrier()
    finally:
        reader.close()
        stop_distributed()
    return 0
