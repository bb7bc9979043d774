"""Wrap this rank's model slice in DeepSpeed's pipeline engine.

The split is ours (`partition.layer_partition`), so DeepSpeed is handed one
"layer" per stage -- the stage's whole slice, already loaded from the
checkpoint on this rank -- and partitions them uniformly, one per stage.
Other stages' entries are inert placeholders that are never built here.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from .checkpoint import load_slice
from .checkpoint.base import CheckpointReader
from .config import ParallelConfig
from .errors import HpcLlamaError
from .model import ModelConfig, Transformer, embedding_params, layer_param_counts
from .partition import StagePlan, layer_partition, stage_and_replica
from .runtime import RankInfo


def stage_plans(cfg: ModelConfig, parallel: ParallelConfig) -> list[StagePlan]:
    """Every stage's share of the model.

    uniform: the same number of layers; balanced: the same number of
    parameters, embedding and head counted (memory); compute: the same
    forward work per token -- a layer's matmuls and the head's, while the
    embedding, a table lookup, costs nothing.
    """
    head = embedding_params(cfg) + cfg.dim
    try:
        if parallel.partition == "compute":
            return layer_partition(cfg.n_layers, parallel.pp, "balanced", layer_param_counts(cfg),
                                   embed_cost=0, head_cost=head)
        return layer_partition(cfg.n_layers, parallel.pp, parallel.partition, layer_param_counts(cfg),
                               embed_cost=embedding_params(cfg), head_cost=head)
    except ValueError as e:
        raise HpcLlamaError(str(e)) from None


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """fp32 / bf16, or auto: bf16 on a GPU that supports it, fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class PipeStage(nn.Module):
    """One stage's slice in the engine's calling convention: a tuple of tensors in, a tuple out.

    The first stage receives `(tokens, positions, *extra)`; between stages
    travels `(hidden, positions, *extra)`, the extras (targets, masks) passed
    along untouched. The last stage returns `head_fn(model, hidden, inputs)`,
    by default the logits.
    """

    def __init__(self, model: Transformer, head_fn=None):
        super().__init__()
        self.model = model
        self.head_fn = head_fn

    def forward(self, inputs):
        x, positions, *extra = inputs
        h = self.model.trunk(x, positions)
        if self.model.output is None:
            return (h, positions, *extra)
        return self.model.head(h) if self.head_fn is None else self.head_fn(self.model, h, inputs)


def build_pipeline(reader: CheckpointReader, info: RankInfo, parallel: ParallelConfig, micro_batch: int,
                   head_fn=None, dtype: torch.dtype | None = None, ds_extra: dict | None = None,
                   load_stats: dict | None = None):
    """This rank's stage of the model inside a DeepSpeed PipelineEngine, for forward passes.

    Returns (engine, plan, replica). Only this stage's layers are read from
    the checkpoint. Variable sequence lengths are allowed between calls
    (dynamic_shape), within one call the micro-batches must share a shape.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    stage, replica = stage_and_replica(info.rank, info.world_size, parallel.pp)
    plan = stage_plans(reader.config, parallel)[stage]
    dtype = dtype or resolve_dtype(parallel.dtype, info.device)
    model = load_slice(reader, plan.layers, plan.embed, plan.head, info.device, dtype, stats=load_stats)
    layers = [PipeStage(model, head_fn) if s == stage else f"stage {s} (built on its own ranks)"
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
    """Forward `batches` (micro-batches of one shape) through the pipeline.

    Returns the last stage's outputs, one per micro-batch, on last-stage ranks
    and None elsewhere. Every rank of the job must make the same calls.
    """
    # The engine only resets its accumulated output in train_batch; left set,
    # it would sum outputs across calls.
    engine.total_loss = None
    it = iter([(b, torch.zeros(1)) for b in batches])
    return engine.eval_batch(it, compute_loss=False, reduce_output=None, bcast_loss=False,
                             num_micro_batches=len(batches))
