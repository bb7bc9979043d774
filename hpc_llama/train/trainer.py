"""Training on DeepSpeed engines: the pipeline engine (pp > 1, ZeRO 0/1) or a ZeRO engine (pp = 1, ZeRO 0-3).

The model is our slice; DeepSpeed does the distributed work. A step's loss is
the mean over every counted target of the global batch, whatever the layout
(see data.make_batches), so PP 1, PP 2, PP 2 x DP 2, ZeRO-2 and ZeRO-3 train
the same model from the same seed.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HpcLlamaError
from ..model.llama import Transformer

# DeepSpeed broadcasts tied weights (which require grad) at start-up; torch
# warns about the missing autograd kernel although no gradient flows there.
warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cross-entropy x weight, in fp32 whatever the logits' dtype."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1).float()).sum()


def pipeline_loss(outputs, labels):
    targets, weights = labels
    return weighted_ce(outputs, targets, weights)


class TrainModule(nn.Module):
    """The whole model for a ZeRO engine (no pipeline): tokens, targets, weights in; weighted loss out."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, weights):
        return weighted_ce(self.model(tokens), targets, weights)


class TiedCarrier(nn.Module):
    """The embedding matrix that the first and last stages share, for DeepSpeed's tied-weight sync.

    Built only on the two stages that own it, from their slice's own parameter,
    so the slice and DeepSpeed's gradient all-reduce see one Parameter.
    """

    def __init__(self, get_weight):
        super().__init__()
        self.weight = get_weight()


def _identity(module, inputs):
    return inputs


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay matrices; not norms, biases or LoRA adapters. Frozen parameters stay out."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "lora_" not in name else plain).append(p)
    # No empty groups: DeepSpeed's ZeRO optimizer drops them, and the LR scheduler
    # would then count more groups than the optimizer has.
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Trainer:
    """This rank's part of a training run."""

    def __init__(self, reader, info, comm, parallel, tcfg, dtype: torch.dtype, zero: int):
        import deepspeed

        from ..checkpoint.slices import load_slice
        from ..model.lora import add_lora
        from ..parallel.layout import stage_and_replica, stage_plans
        from ..parallel.pipeline import PipeStage

        self.info, self.comm, self.tcfg, self.dtype, self.zero = info, comm, tcfg, dtype, zero
        self.cfg = reader.config
        self.pp, self.dp = parallel.pp, info.world_size // parallel.pp
        self.gas = tcfg.global_batch // (tcfg.micro_batch * self.dp)
        self.stage, self.replica = stage_and_replica(info.rank, info.world_size, parallel.pp)
        self.plan = stage_plans(self.cfg, parallel)[self.stage]
        p = self.plan
        from ..model.quantized import SCHEMES

        packed = next((n for n in reader.names() if reader.info(n).scheme in SCHEMES), None)
        if packed is not None:
            raise HpcLlamaError(f"{reader.path}: {packed} is quantized ({reader.info(packed).scheme}); training needs "
                                f"dense weights: hpc-llama convert --dequantize first")
        self.model = load_slice(reader, p.layers, p.embed, p.head, device=info.device, dtype=torch.float32).train()
        for param in self.model.parameters():
            param.requires_grad_(True)
        self.lora = add_lora(self.model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets, tcfg.seed) \
            if tcfg.lora_rank else []
        ds_config = {
            "train_micro_batch_size_per_gpu": tcfg.micro_batch, "gradient_accumulation_steps": self.gas,
            "train_batch_size": tcfg.global_batch, "gradient_clipping": tcfg.grad_clip,
            "zero_optimization": {"stage": zero}, "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
        }
        if self.pp > 1:
            from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

            tied = self.cfg.tie_embeddings and not tcfg.lora_rank
            specs = [PipeStage(self.model) if s == self.stage else LayerSpec(PipeStage, None) for s in range(self.pp)]
            if tied:
                # The embedding is one matrix on two stages: DeepSpeed all-reduces its gradient between them.
                def weight():
                    m = self.model
                    return m.tok_embeddings.weight if m.tok_embeddings is not None else m.output.weight

                carrier = dict(forward_fn=_identity, tied_weight_attr="weight")
                specs = [TiedLayerSpec("embedding", TiedCarrier, weight, **carrier), *specs,
                         TiedLayerSpec("embedding", TiedCarrier, weight, **carrier)]
            with contextlib.redirect_stdout(io.StringIO()):
                module = PipelineModule(specs, num_stages=self.pp, loss_fn=pipeline_loss,
                                        partition_method="type:^PipeStage$" if tied else "uniform")
        else:
            module = TrainModule(self.model)
        optimizer = torch.optim.AdamW(param_groups(module, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas),
                                      eps=1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps, tcfg.steps) / tcfg.lr)
        with contextlib.redirect_stdout(io.StringIO()):
            self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
        self.last = self.pp == 1 or self.engine.is_last_stage()

    # --- steps -------------------------------------------------------------------

    def _tensors(self, b):
        dev = self.info.device
        return (torch.as_tensor(b.tokens, device=dev), torch.as_tensor(b.targets, device=dev),
                torch.as_tensor(b.weights, device=dev))

    def _pipe_items(self, batches):
        for b in batches:
            tokens, targets, weights = self._tensors(b)
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens).contiguous()
            yield (tokens, positions), (targets, weights)

    def train_step(self, batches) -> float:
        """One optimiser step over this replica's micro-batches; returns the step's mean loss (all ranks)."""
        if self.pp > 1:
            loss = self.engine.train_batch(data_iter=self._pipe_items(batches))
            return float(loss)
        total = 0.0
        for b in batches:
            loss = self.engine(*self._tensors(b))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        return self._sum(total) / (self.gas * self.dp)

    def evaluate(self, batches) -> float:
        """Sum of weighted losses over this replica's batches, summed over every replica (weights pre-scaled)."""
        local = 0.0
        if self.pp > 1:
            self.engine.total_loss = None
            out = self.engine.eval_batch(self._pipe_items(batches), compute_loss=True, reduce_output=None,
                                         bcast_loss=False, num_micro_batches=len(batches))
            if self.last:
                local = float(sum(float(x) for x in out))
        else:
            self.engine.eval()
            with torch.no_grad():
                local = sum(float(self.engine(*self._tensors(b))) for b in batches)
            self.engine.train()
        return self._sum(local)

    def _sum(self, x: float) -> float:
        if self.info.world_size == 1:
            return x
        from mpi4py import MPI

        return self.comm.allreduce(x, op=MPI.SUM)

    def trainable_parameters(self) -> dict:
        """Trainable and frozen parameter counts of the whole model (every stage, one replica)."""
        # A tied head is the embedding again: count it once, on the first stage.
        params = [p for n, p in self.model.named_parameters()
                  if not (n == "output.weight" and self.cfg.tie_embeddings and self.model.tok_embeddings is None)]
        mine = [sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params if not p.requires_grad)]
        if self.info.world_size > 1:
            rows = self.comm.allgather((self.replica, mine))
            mine = [sum(m[i] for r, m in rows if r == 0) for i in range(2)]
        return {"trainable": mine[0], "frozen": mine[1]}

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, ckpt_dir: str, step: int, keep: int) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.engine.save_checkpoint(ckpt_dir, tag=f"step-{step:07d}", client_state={"step": step})
        self.comm.Barrier()
        if self.info.rank == 0 and keep > 0:
            import shutil

            tags = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step-"))
            for old in tags[:-keep]:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)

    def load(self, ckpt_dir: str) -> int:
        """Restore the newest checkpoint; returns the number of steps it had done."""
        with contextlib.redirect_stdout(io.StringIO()):
            path, state = self.engine.load_checkpoint(ckpt_dir)
        if path is None:
            raise HpcLlamaError(f"{ckpt_dir}: no checkpoint to resume from")
        return int(state["step"])

    # --- export ---------------------------------------------------------------------

    def export_items(self, merged: bool):
        """(name, tensor) of this rank's slice for a layout-independent checkpoint, module by module.

        merged folds LoRA adapters into their weights; otherwise only the
        adapters are given. A tied model's head is the embedding, written once
        by the first stage. Under ZeRO-3 each module's parameters are gathered
        around its turn, which every rank must take part in.
        """
        from ..model.lora import LoRALinear

        zero3 = self.zero == 3 and self.pp == 1
        skip_head = self.cfg.tie_embeddings and self.model.tok_embeddings is None
        for mod_name, module in self.model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            gather = contextlib.nullcontext()
            if zero3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(params.values()))
            with gather:
                for pname, p in params.items():
                    name = f"{mod_name}.{pname}" if mod_name else pname
                    if name == "output.weight" and skip_head:
                        continue
                    if isinstance(module, LoRALinear) and merged and pname.startswith("lora_"):
                        continue
                    if not merged and not pname.startswith("lora_"):
                        continue
                    if isinstance(module, LoRALinear) and merged and pname == "weight":
                        p = module.merged_weight()
                    yield name, p.detach().cpu().contiguous()


def stream_export(trainer: Trainer, writer, merged: bool) -> None:
    """Rank 0 writes every stage's tensors, stage by stage, one tensor in memory at a time.

    Each stage's replica-0 rank streams its tensors to rank 0
    (parallel.collectives.send_tensors). With ZeRO-3 every rank takes part in
    gathering each module in turn.
    """
    from ..parallel.collectives import recv_tensors, send_tensors

    comm, info = trainer.comm, trainer.info
    zero3 = trainer.zero == 3 and trainer.pp == 1
    for stage in range(trainer.pp):
        owner = stage * trainer.dp  # replica 0 of the stage
        if info.rank == owner == 0 or (zero3 and info.rank == 0):
            for name, t in trainer.export_items(merged):
                writer.add(name, t)
        elif info.rank == owner:
            send_tensors(comm, 0, ((name, [t], None) for name, t in trainer.export_items(merged)))
        elif zero3:
            for _ in trainer.export_items(merged):  # every rank takes part in gathering each module
                pass
        elif info.rank == 0:
            for name, (t,), _ in recv_tensors(comm, owner):
                writer.add(name, t)
        comm.Barrier()
