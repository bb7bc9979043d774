"""Run a forward-only pipeline over a checkpoint and compare every last-stage output to one process.

    mpirun -n 4 python tests/helpers/pipeline_forward.py CKPT PP

Prints one JSON line per rank: its description, its stage, the layers it
holds, and (last stages) the worst max-abs difference from the whole model.
"""

import json
import sys

import torch


def check_forward(reader, info, pp: int, lengths=(7, 19, 3), micro_batches: int = 3) -> dict:
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.config import ParallelConfig
    from hpc_llama.parallel.pipeline import build_pipeline, eval_batches

    engine, plan, replica = build_pipeline(reader, info, ParallelConfig(pp=pp, dtype="fp32"), micro_batch=2)
    own = sorted({int(n.split(".")[3]) for n, _ in engine.module.named_parameters() if ".layers." in n})
    vocab = reader.config.vocab_size
    g = torch.Generator().manual_seed(100 + replica)  # each replica takes its own data
    full = load_slice(reader) if plan.head else None
    worst = None
    # Lengths change between calls (dynamic shapes); the last call's micro-batches each have a shape of their own.
    calls = [[(2, T)] * micro_batches for T in lengths] + [[(2, lengths[0]), (1, lengths[1]), (3, lengths[2])]]
    for shapes in calls:
        batches = [(torch.randint(0, vocab, (B, T), generator=g), torch.arange(T).expand(B, T).contiguous())
                   for B, T in shapes]
        out = eval_batches(engine, batches)
        if plan.head:
            with torch.no_grad():
                for (x, _), o in zip(batches, out):
                    worst = max(worst or 0.0, (full(x) - o).abs().max().item())
        elif out is not None:
            raise AssertionError(f"rank {info.rank} is not a last stage but got outputs")
    return {"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank, "launcher": info.launcher,
            "device": info.device, "stage": plan.stage, "replica": replica, "layers": own,
            "expected_layers": list(plan.layers), "max_abs": worst}


def main(argv):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.parallel.ranks import describe_rank, run_guarded, start_distributed, world_comm

    def job(args):
        comm = world_comm()
        info = describe_rank(comm)
        start_distributed(info, comm, timeout_s=120)
        result = check_forward(open_checkpoint(args[0]), info, int(args[1]))
        print(json.dumps(result), flush=True)
        comm.Barrier()

    return run_guarded(job, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
