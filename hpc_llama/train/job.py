"""Pretrain, fine-tune or LoRA-tune a Llama on prepared token shards, on DeepSpeed.

    mpirun -n 2 hpc-llama train --config tiny --data data/ --out runs/tiny --pp 2
    mpirun -n 4 hpc-llama train --config tiny --data sft/ --out runs/sft --init model.h5 --lora 8 --pp 2
    srun hpc-llama train --config configs/train.yaml --data data/ --out runs/x --resume

Without --init the model is the config's shape with seeded weights; with --init
it is that checkpoint (fine-tuning). pp > 1 uses DeepSpeed's pipeline engine
(ZeRO 0-1), pp = 1 a ZeRO engine (0-3). The run directory gets metrics.jsonl,
TensorBoard events, checkpoints, test.json, loss.png and final.h5 (a
layout-independent checkpoint). SIGUSR1 or SIGTERM: every rank saves a
checkpoint and exits 0; --resume carries on with the same losses, from the
newest complete checkpoint (a save torn by a kill is passed over).
"""

from __future__ import annotations

import math


def add_arguments(p):
    from ..cli import add_overwrite_argument, add_quiet_argument

    p.add_argument("--config", help="YAML preset (model, parallel, train sections); a path or a name in configs/")
    p.add_argument("--data", required=True, help="data directory made by hpc-llama prepare")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init", help="checkpoint to fine-tune (default: pretrain from seeded weights)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--pp", type=int, help="pipeline stages")
    p.add_argument("--zero", type=int, help="ZeRO stage (0-3; 0-1 with a pipeline)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="training dtype (fp32 master weights either way)")
    p.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank instead of all weights")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--resume", action="store_true", help="carry on from the run directory's newest checkpoint, if any")
    p.add_argument("--export-only", action="store_true", help="with --resume: export the newest checkpoint and stop")
    add_overwrite_argument(p, "an existing run directory (start over)")
    add_quiet_argument(p)


_FLAGS = {"pp": "parallel.pp", "dtype": "parallel.dtype", "zero": "train.zero", "lora": "train.lora_rank",
          "steps": "train.steps"}


def run(args) -> int:
    import os
    import time

    from ..atomic import OutputLock
    from ..config import ParallelConfig, TrainConfig, flag_overrides, load_sections
    from ..parallel.ranks import resolve_dtype, start_distributed, start_rank, stop_distributed, world_comm
    from ..progress import Progress, report
    from .data import (
        SplitData,
        counted_targets,
        load_manifest,
        make_batches,
        replica_micro_batches,
        sequence_count,
        step_sequences,
    )
    from .metrics import MetricsWriter
    from .trainer import Trainer

    overrides = flag_overrides(args, _FLAGS)
    sections = load_sections(args.config, overrides + args.set)
    parallel, tcfg = sections["parallel"] or ParallelConfig(), sections["train"] or TrainConfig()
    comm = world_comm()
    info = start_rank(comm)
    run_dir = os.path.abspath(args.out)
    # Rank 0 takes the run directory for this run: a second run on it (a job submitted twice) is refused at once.
    lock = OutputLock(run_dir).acquire() if info.rank == 0 else None
    manifest = load_manifest(args.data)
    _verify_shards(args.data, manifest, info, comm)
    reader = _model_source(args, sections["model"], tcfg, manifest)
    dp, zero, dtype = _layout(info, parallel, tcfg, reader.config, resolve_dtype)
    snapshot = {"sections": {k: (v.__dict__ if v is not None else None) for k, v in sections.items()},
                "data": {"inputs": manifest["inputs"], "totals": manifest["totals"], "seed": manifest["seed"]},
                "init": reader.fingerprint() if args.init else None, "zero": zero, "dtype": str(dtype)}
    if info.rank == 0:
        _prepare_run_dir(run_dir, snapshot, args)
    comm.Barrier()
    start_distributed(info, comm, parallel.timeout_s)
    stop = _StopFlag()
    try:
        trainer = Trainer(reader, info, comm, parallel, tcfg, dtype, zero)
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        start, passed_over = trainer.load(ckpt_dir) if args.resume else (0, None)
        if passed_over:
            # Said even in quiet mode: a batch log must show that a save was torn and where the run went back to.
            report(passed_over, rank=info.rank)
        if args.export_only:
            _export(trainer, reader, run_dir, tcfg, info)
            return 0
        splits = {s: SplitData(args.data, manifest, s) for s in ("train", "val", "test")}
        n_seq = sequence_count(splits["train"], tcfg.seq_len)
        metrics = MetricsWriter(run_dir, info.rank == 0)
        metrics.truncate_after(start if start else -1)
        if start == 0 and args.init:
            # The model before any step: what fine-tuning is measured against.
            metrics.write({"step": 0, "val_loss": _evaluate(trainer, splits["val"], tcfg, dp)})
        progress = Progress(info, tcfg.steps, start, quiet=args.quiet, unit="step")
        if start:
            progress.log(f"resuming after step {start} of {tcfg.steps}")
        for step in range(start, tcfg.steps):
            ids = step_sequences(step, tcfg.global_batch, n_seq, tcfg.seed)
            counted = counted_targets(splits["train"], ids, tcfg.seq_len)
            micro = replica_micro_batches(ids, dp, trainer.replica, tcfg.micro_batch)
            batches = make_batches(splits["train"], micro, tcfg.seq_len, trainer.gas * dp / counted)
            lr = trainer.lr
            t0 = time.perf_counter()
            loss = trainer.train_step(batches)
            seconds = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": trainer.grad_norm(),
                   "tokens_per_s": round(counted / seconds, 1)}
            done = step + 1 == tcfg.steps
            if (tcfg.eval_every and (step + 1) % tcfg.eval_every == 0) or done:
                row["val_loss"] = _evaluate(trainer, splits["val"], tcfg, dp)
                row["val_ppl"] = None if row["val_loss"] is None else math.exp(min(row["val_loss"], 50))
            metrics.write(row)
            progress.update(1, counted)
            if progress.bar is not None:
                progress.bar.set_postfix_str(f"loss {loss:.3f}, {row['tokens_per_s']:,.0f} tok/s", refresh=False)
            periodic = tcfg.checkpoint_every and (step + 1) % tcfg.checkpoint_every == 0
            if periodic or done or stop.agreed(comm):
                trainer.save(ckpt_dir, step + 1, tcfg.keep_checkpoints)
                if stop.raised and not done:
                    # Said even in quiet mode: a batch log must show why the job ended early.
                    report(f"stopped by {stop.name} after step {step + 1}: checkpoint saved, exiting", rank=info.rank)
                    progress.close()
                    return 0
        progress.close()
        test_loss = _evaluate(trainer, splits["test"], tcfg, dp, all_sequences=True)
        _export(trainer, reader, run_dir, tcfg, info)
        counts = trainer.trainable_parameters()  # a collective: every rank
        if info.rank == 0:
            _finish(run_dir, metrics, manifest, test_loss, tcfg, splits["test"], counts)
        metrics.close()
    finally:
        stop.restore()
        stop_distributed()
        if lock is not None:
            lock.release()
    return 0


def _verify_shards(data_dir, manifest, info, comm):
    """Every token shard against its checksums before anything starts, shards shared out over the ranks."""
    from ..errors import HpcLlamaError
    from .data import SplitData

    problem = None
    for split in ("train", "val", "test"):
        data = SplitData(data_dir, manifest, split, cache_shards=1)
        for i in range(info.rank, len(data.shards), info.world_size):
            try:
                data._shard(i)
            except HpcLlamaError as e:
                problem = problem or str(e)
    problems = comm.allgather(problem)
    first = next((p for p in problems if p), None)
    if first:
        raise HpcLlamaError(first)


class _StopFlag:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it after every step, so all stop at the same step."""

    def __init__(self):
        import signal

        self.raised, self.name = False, None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def _handle(self, signum, frame):
        import signal

        self.raised, self.name = True, signal.Signals(signum).name

    def agreed(self, comm) -> bool:
        if comm.Get_size() == 1:
            return self.raised
        from mpi4py import MPI

        any_raised = comm.allreduce(self.raised, op=MPI.LOR)
        if any_raised and not self.raised:
            self.raised, self.name = True, "a signal to another rank"
        return any_raised

    def restore(self):
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)


def _model_source(args, model_cfg, tcfg, manifest):
    """The checkpoint to fine-tune, or seeded weights of the config's shape."""
    import os

    import xxhash

    from ..checkpoint import open_checkpoint
    from ..checkpoint.views import InitReader
    from ..errors import HpcLlamaError

    with open(os.path.join(args.data, manifest["tokenizer"]), "rb") as f:
        tokenizer = f.read()
    if args.init:
        reader = open_checkpoint(args.init)
        if model_cfg is not None and model_cfg != reader.config:
            field = next(k for k in model_cfg.__dataclass_fields__ if getattr(model_cfg, k) != getattr(reader.config, k))
            raise HpcLlamaError(f"the config's model disagrees with --init {args.init}: {field} is "
                                f"{getattr(model_cfg, field)!r} in the config but {getattr(reader.config, field)!r} "
                                f"in the checkpoint")
        own = reader.asset("tokenizer.json")
        if own is not None and xxhash.xxh3_64_hexdigest(own) != xxhash.xxh3_64_hexdigest(tokenizer):
            raise HpcLlamaError(f"{args.data} was tokenized with a different tokenizer than {args.init}'s: "
                                f"prepare it with --tokenizer {args.init}")
    else:
        if model_cfg is None:
            raise HpcLlamaError("pretraining needs a model section in the config (or --init CHECKPOINT to fine-tune)")
        reader = InitReader(model_cfg, tcfg.seed, assets={"tokenizer.json": tokenizer})
    if manifest["vocab_size"] > reader.config.vocab_size:
        raise HpcLlamaError(f"the data's vocabulary ({manifest['vocab_size']}) is larger than the model's "
                            f"({reader.config.vocab_size})")
    return reader


def _layout(info, parallel, tcfg, cfg, resolve_dtype):
    from ..errors import HpcLlamaError
    from ..parallel.layout import require_layout
    from .trainer import default_zero

    require_layout(info.world_size, parallel.pp, cfg.n_layers)
    dp = info.world_size // parallel.pp
    if tcfg.global_batch % (tcfg.micro_batch * dp):
        raise HpcLlamaError(f"global batch {tcfg.global_batch} is not divisible by micro-batch {tcfg.micro_batch} "
                            f"x {dp} data-parallel replicas")
    dtype = resolve_dtype(parallel.dtype, info.device)
    zero = default_zero(parallel.pp, dp, dtype) if tcfg.zero is None else tcfg.zero
    if parallel.pp > 1 and zero > 1:
        raise HpcLlamaError(f"ZeRO-{zero} cannot be combined with a pipeline (pp {parallel.pp}): "
                            f"DeepSpeed's pipeline engine supports ZeRO 0 and 1")
    if parallel.pp > 1 and zero == 0 and str(dtype) == "torch.bfloat16":
        raise HpcLlamaError("bf16 with a pipeline needs ZeRO-1 (DeepSpeed cannot reload a ZeRO-0 bf16 pipeline): "
                            "use --zero 1")
    return dp, zero, dtype


def _prepare_run_dir(run_dir, snapshot, args):
    import json
    import os
    import shutil

    from ..atomic import write_json_atomic
    from ..errors import HpcLlamaError

    path = os.path.join(run_dir, "config.json")
    if os.path.exists(run_dir):
        if args.overwrite and not args.resume:
            shutil.rmtree(run_dir)
        elif not args.resume:
            raise HpcLlamaError(f"{args.out} already exists (--resume to carry on, --overwrite to start over)")
        elif os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != json.loads(json.dumps(snapshot)):
                what = next(k for k in snapshot if json.dumps(saved.get(k), sort_keys=True) !=
                            json.dumps(snapshot[k], sort_keys=True))
                raise HpcLlamaError(f"{args.out} belongs to a run with a different {what}: refusing to resume into it")
            return
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(path, snapshot, sort_keys=True)


def _evaluate(trainer, data, tcfg, dp, all_sequences=False):
    """Mean loss over the split's first eval_sequences (or all) sequences; None for an empty split."""
    import numpy as np

    from .data import counted_targets, make_batches, replica_micro_batches, sequence_count

    n = sequence_count(data, tcfg.seq_len)
    if all_sequences or not tcfg.eval_sequences:
        k = n
    else:
        k = min(n, tcfg.eval_sequences)
    if k == 0:
        return None
    ids = np.arange(k)
    counted = counted_targets(data, ids, tcfg.seq_len)
    per = dp * tcfg.micro_batch
    padded = np.concatenate([ids, np.full(-k % per, -1)])  # padding rows: weight 0
    micro = replica_micro_batches(padded, dp, trainer.replica, tcfg.micro_batch)
    batches = make_batches(data, [np.where(m < 0, 0, m) for m in micro], tcfg.seq_len, 1.0 / counted)
    for b, m in zip(batches, micro):
        b.weights[m < 0] = 0
    return trainer.evaluate(batches)


def _export(trainer, reader, run_dir, tcfg, info):
    """final.h5 (or adapters.h5), written by rank 0 stage by stage, then renamed into place."""
    import contextlib
    import json
    import os

    from ..atomic import atomic_path
    from ..checkpoint.h5 import H5Writer
    from .trainer import stream_export

    merged = tcfg.export == "merged" or not tcfg.lora_rank
    path = os.path.join(run_dir, "final.h5" if merged else "adapters.h5")
    with contextlib.ExitStack() as on_rank_0:
        writer = None
        if info.rank == 0:
            meta = {"trained_by": {"lora_rank": tcfg.lora_rank, "lora_alpha": tcfg.lora_alpha,
                                   "lora_targets": list(tcfg.lora_targets), "merged": merged}}
            tmp = on_rank_0.enter_context(atomic_path(path, overwrite=True))
            writer = on_rank_0.enter_context(contextlib.closing(
                H5Writer(tmp, reader.hf_config, reader.assets(), meta={"training": json.dumps(meta)})))
        stream_export(trainer, writer, merged)


def _finish(run_dir, metrics, manifest, test_loss, tcfg, test_data, trainable):
    import json
    import math
    import os

    from .data import sequence_count

    rows = metrics.rows()
    with open(os.path.join(run_dir, "test.json"), "w") as f:
        json.dump({"test_loss": test_loss, "test_ppl": None if test_loss is None else math.exp(min(test_loss, 50)),
                   "test_sequences": sequence_count(test_data, tcfg.seq_len),
                   "unigram_baseline": manifest["train_unigram_entropy"],
                   "final_train_loss": next((r["loss"] for r in reversed(rows) if "loss" in r), None),
                   "final_val_loss": next((r["val_loss"] for r in reversed(rows) if r.get("val_loss") is not None), None),
                   "steps": tcfg.steps, "trainable_parameters": trainable}, f, indent=1)
    metrics.plot(os.path.join(run_dir, "loss.png"), manifest["train_unigram_entropy"])
