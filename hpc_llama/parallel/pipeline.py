"""Wrap this rank's model slice in DeepSpeed's pipeline engine.

The split is ours (`parallel.layout.layer_partition`), so DeepSpeed is handed one
"layer" per stage -- the stage's whole slice, already loaded from the
checkpoint on this rank -- and partitions them uniformly, one per stage.
Other stages' entries are inert placeholders that are never built here.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from ..checkpoint.base import CheckpointReader
from ..checkpoint.slices import load_slice
from ..config import ParallelConfig
from ..inference import ready_for_inference
from ..model.llama import Transformer
from .layout import stage_and_replica, stage_plans
from .ranks import RankInfo, resolve_dtype


class PipeStage(nn.Module):
    """One stage's slice in the engine's calling convention: a tuple of tensors in, a tuple out.

    The first stage receives `(tokens, positions, *extra)`; between stages
    travels `(hidden, positions, *extra)`, the extras (targets, masks) passed
    along untouched. When `segmented`, the first extra is the rows' segments
    (packed continuations; see the model's attention rule). The last stage
    returns `head_fn(model, hidden, inputs)`, by default the logits; while
    `collected` is a list (`eval_batches`) it appends that there instead and
    returns a placeholder, because the engine adds every micro-batch's output
    into one running total, which needs them all of one shape.
    """

    def __init__(self, model: Transformer, head_fn=None, segmented: bool = False):
        super().__init__()
        self.model = model
        self.head_fn = head_fn
        self.segmented = segmented
        self.collected: list | None = None

    def forward(self, inputs):
        x, positions, *extra = inputs
        h = self.model.trunk(x, positions, segments=extra[0] if self.segmented else None)
        if self.model.output is None:
            return (h, positions, *extra)
        out = self.model.head(h) if self.head_fn is None else self.head_fn(self.model, h, inputs)
        if self.collected is None:
            return out
        self.collected.append(out)
        return torch.zeros(1, device=h.device)


def build_pipeline(reader: CheckpointReader, info: RankInfo, parallel: ParallelConfig, micro_batch: int,
                   head_fn=None, dtype: torch.dtype | None = None, ds_extra: dict | None = None,
                   load_stats: dict | None = None, segmented: bool = False):
    """This rank's stage of the model inside a DeepSpeed PipelineEngine, for forward passes.

    Returns (engine, plan, replica). Only this stage's layers are read from
    the checkpoint. Variable sequence lengths are allowed between calls
    (dynamic_shape: every hand-off sends its shapes first), so the micro-batches of one call may
    differ in shape too.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    stage, replica = stage_and_replica(info.rank, info.world_size, parallel.pp)
    plan = stage_plans(reader.config, parallel)[stage]
    dtype = dtype or resolve_dtype(parallel.dtype, info.device)
    model = load_slice(reader, plan.layers, plan.embed, plan.head, info.device, dtype, stats=load_stats)
    ready_for_inference(model, pack=False)  # forward passes only: fused projections
    layers = [PipeStage(model, head_fn, segmented) if s == stage else f"stage {s} (built on its own ranks)"
              for s in range(parallel.pp)]
    dp = info.world_size // parallel.pp
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * dp,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": dtype == torch.bfloat16},
        **(ds_extra or {}),
    }
    # DeepSpeed prints its partition table and seed settings to stdout; the
    # job's own output stays clean.
    with contextlib.redirect_stdout(io.StringIO()):
        module = PipelineModule(layers, num_stages=parallel.pp, partition_method="uniform", dynamic_shape=True)
        engine, *_ = deepspeed.initialize(model=module, config=config)
    return engine, plan, replica


def eval_batches(engine, batches: list[tuple[torch.Tensor, ...]]):
    """Forward `batches` (micro-batches, each of any shape) through the pipeline.

    Returns the last stage's outputs, one per micro-batch, on last-stage ranks
    and None elsewhere. Every rank of the job must make the same calls.
    """
    stage = next(m for m in engine.module.modules() if isinstance(m, PipeStage))
    # The engine only resets its accumulated output in train_batch; left set,
    # it would sum outputs across calls.
    engine.total_loss = None
    it = iter([(b, torch.zeros(1)) for b in batches])
    stage.collected = []
    try:
        engine.eval_batch(it, compute_loss=False, reduce_output=None, bcast_loss=False,
                          num_micro_batches=len(batches))
        return stage.collected if engine.is_last_stage() else None
    finally:
        stage.collected = None
